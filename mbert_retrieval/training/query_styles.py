"""Queries as developers type them, made from documented functions.

A doc comment's first sentence ("Returns True if the file at `path` is read-only.") is a good
query for a model to learn from, but not what people type into a search box. These rewrites turn
it, or the function's name, into the other styles seen in code-search logs:

    keywords    "python check file read only"       content words, the language name
    how_to      "how to check if file is read only in python"
    identifier  "is read only path"                  the function's name split into words
    docstring   the sentence as written

Each rewrite is a pure function of its inputs and a `random.Random`, so a data set built with a
seed is reproduced exactly.
"""

from __future__ import annotations

import random
import re

STYLES = ("docstring", "keywords", "how_to", "identifier")

# Words that carry no meaning for search; dropped from keyword queries.
STOPWORDS = frozenset(
    """a an the this that these those of to in on for from with by at as is are be been was were it its
    and or if whether which who when then than given specified provided optional optionally object
    instance method function value values current default new one any all some each every
    i.e e.g etc note see also used use uses will can may should must""".split()
)


def _third_person(verb: str) -> str:
    """The third person of a verb: parse -> parses, copy -> copies, search -> searches."""
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + ("es" if verb.endswith(("s", "sh", "ch", "x", "z")) else "s")


# The third-person verbs doc comments open with, and what a person searching would type instead:
# the plain verb ("parses" -> "parse") or, for some, one of a few words for the same thing.
PLAIN_VERBS = """get check convert parse read write set add find send start stop close open format encode decode
compare copy split join sort""".split()
LEADING_VERBS = {_third_person(verb): (verb,) for verb in PLAIN_VERBS} | {
    "returns": ("get", "return", ""),
    "return": ("get", "return", ""),
    "computes": ("compute", "calculate"),
    "calculates": ("calculate", "compute"),
    "tests": ("check", "test"),
    "determines": ("check", "determine"),
    "creates": ("create", "make"),
    "constructs": ("create", "construct"),
    "builds": ("build", "create"),
    "removes": ("remove", "delete"),
    "deletes": ("delete", "remove"),
    "appends": ("append", "add"),
    "searches": ("search", "find"),
    "loads": ("load", "read"),
    "saves": ("save", "write"),
    "generates": ("generate", "create"),
    "validates": ("validate", "check"),
}
BASE_VERBS = frozenset(v for forms in LEADING_VERBS.values() for v in forms if v) | frozenset(
    "make calculate determine construct test wait run call apply register update reset clear map filter "
    "wrap extract resolve normalize render handle install cast escape quote replace fetch print show "
    "insert merge iterate count flush match strip trim initialize init".split()
)
LANGUAGE_NAMES = {
    "python": ("python", "python3", "py"),
    "java": ("java",),
    "javascript": ("javascript", "js", "node"),
    "typescript": ("typescript", "ts"),
    "go": ("go", "golang"),
}
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]*|[0-9]+")
_MARKUP = re.compile(r":[a-z]+:`~?([^`]*)`|`+([^`]*)`+|\{@\w+\s+([^}]*)\}|<[^>]+>")


def rewrite(summary: str, name: str, language: str, style: str, rng: random.Random) -> str | None:
    """`summary` (a doc comment's first sentence) or `name` as a query in `style`, or None if the
    inputs give no such query (an empty summary, a one-letter name)."""
    if style == "docstring":
        return summary.strip() or None
    if style == "identifier":
        return identifier_query(name, language, rng)
    words = summary_words(summary)
    if words and split_identifier(name.rsplit(".", 1)[-1])[0].lower() == words[0] and len(words) > 2:
        words = words[len(split_identifier(name.rsplit(".", 1)[-1])) :]  # Go: "ParseDuration parses ..."
    if len(words) < 2:
        return None
    if style == "keywords":
        return keyword_query(words, language, rng)
    if style == "how_to":
        return how_to_query(words, language, rng)
    raise ValueError(f"unknown query style {style!r}; choose from {', '.join(STYLES)}")


def summary_words(summary: str) -> list[str]:
    """The summary's words in lower case, markup such as `x`, :func:`f` and {@code x} unwrapped,
    identifiers split (read_file -> read file), the opening verb put in the imperative."""
    sentence = re.split(r"(?<=[a-z0-9)}`])\.\s|\n\s*\n", summary, maxsplit=1)[0]
    text = _MARKUP.sub(lambda m: " " + next((g for g in m.groups() if g), "") + " ", sentence)
    words = [w for token in _WORD.findall(text) for w in split_identifier(token)]
    return [w.lower() for w in words]


def split_identifier(token: str) -> list[str]:
    """read_file_lines -> read file lines; parseHTTPResponse -> parse HTTP Response."""
    parts = re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+", token.replace("_", " "))
    return parts or [token]


def keyword_query(words: list[str], language: str, rng: random.Random) -> str | None:
    verb, rest = _imperative(words, rng)
    content = [w for w in rest if w not in STOPWORDS and len(w) > 1]
    if not content:
        return None
    keep = min(len(content), rng.randint(2, 6))
    start = rng.randint(0, len(content) - keep) if rng.random() < 0.3 else 0
    terms = ([verb] if verb else []) + content[start : start + keep]
    return _with_language(terms, language, rng)


def how_to_query(words: list[str], language: str, rng: random.Random) -> str | None:
    verb, rest = _imperative(words, rng)
    if not verb:
        return None
    rest = [w for w in rest if w not in ("the", "a", "an", "given", "specified")][:10]
    question = " ".join(["how to", verb, *rest])
    return _with_language([question], language, rng, ending=True)


def identifier_query(name: str, language: str, rng: random.Random) -> str | None:
    name = name.rsplit(".", 1)[-1]
    if name.startswith("__") or name in ("constructor", "init", "main", "String", "toString"):
        return None  # special methods say nothing about what the code does
    words = [w.lower() for w in split_identifier(name)]
    if sum(len(w) for w in words) < 4:
        return None
    return _with_language(words, language, rng)


def _imperative(words: list[str], rng: random.Random) -> tuple[str, list[str]]:
    """The opening verb in the form people search with ('' if it drops out), and the other words."""
    first, rest = words[0], words[1:]
    if first in ("return", "returns") and (
        rest[:1] == ["whether"] or rest[:2] in (["true", "if"], ["true", "when"])
    ):
        return "check", [
            "if",
            *rest[1 if rest[0] == "whether" else 2 :],
        ]  # "Returns True if x" -> "check if x"
    if first in BASE_VERBS:
        return first, rest
    if first in LEADING_VERBS:
        return rng.choice(LEADING_VERBS[first]), rest
    if first.endswith("s") and not first.endswith("ss") and len(first) > 3:
        return first[:-1], rest  # "Renders" -> "render"; crude, but the other words carry the query
    return "", words


def _with_language(terms: list[str], language: str, rng: random.Random, ending: bool = False) -> str:
    """Most web queries name the language, at the start or the end."""
    names = LANGUAGE_NAMES.get(language)
    if names is None or rng.random() < 0.25:
        return " ".join(terms)
    name = rng.choice(names)
    if ending or rng.random() < 0.5:
        return " ".join([*terms, ("in " if ending and rng.random() < 0.5 else "") + name])
    return " ".join([name, *terms])
