import random

import pytest

from mbert_retrieval.training.query_styles import (
    LEADING_VERBS,
    STYLES,
    rewrite,
    split_identifier,
    summary_words,
)


def test_split_identifier_handles_snake_camel_and_acronyms():
    assert split_identifier("read_file_lines") == ["read", "file", "lines"]
    assert split_identifier("parseHTTPResponse") == ["parse", "HTTP", "Response"]
    assert split_identifier("x") == ["x"]


def test_summary_words_unwrap_markup_and_keep_the_first_sentence():
    words = summary_words("Return the :class:`Path` of {@code fileName}. Raises if missing.")
    assert words == ["return", "the", "path", "of", "file", "name"]


def test_returns_true_if_becomes_a_check_query():
    query = rewrite(
        "Returns True if the file is read-only.", "is_read_only", "python", "how_to", random.Random(1)
    )
    assert query.startswith("how to check if file is read only")


def test_go_doc_comments_lose_the_leading_function_name():
    for seed in range(20):
        query = rewrite(
            "ParseDuration parses a duration string.", "ParseDuration", "go", "keywords", random.Random(seed)
        )
        assert "parses" not in query.split()
        assert "duration" in query.split()


@pytest.mark.parametrize(
    ("doc_verb", "query_verb"), [("copies", "copy"), ("closes", "close"), ("sorts", "sort"), ("gets", "get")]
)
def test_a_leading_third_person_verb_becomes_the_plain_one(doc_verb, query_verb):
    assert LEADING_VERBS[doc_verb] == (query_verb,)
    query = rewrite(f"{doc_verb.title()} the items of the list.", "f", "go", "how_to", random.Random(0))
    assert query.startswith(f"how to {query_verb} ")


@pytest.mark.parametrize("style", STYLES)
def test_every_style_is_reproducible_and_non_empty(style):
    summary, name = "Creates a new HashMap with the specified initial capacity.", "newHashMap"
    first = rewrite(summary, name, "java", style, random.Random(7))
    assert first and first == rewrite(summary, name, "java", style, random.Random(7))


def test_keyword_queries_drop_stopwords_and_name_the_language_most_of_the_time():
    queries = [
        rewrite(
            "Compute the mean of the given list of numbers.", "mean", "python", "keywords", random.Random(s)
        )
        for s in range(200)
    ]
    assert all(" the " not in f" {q} " and " of " not in f" {q} " for q in queries)
    with_language = sum(any(w in q.split() for w in ("python", "python3", "py")) for q in queries)
    assert 0.6 < with_language / len(queries) < 0.9  # 75% expected


def test_nothing_to_rewrite_gives_none():
    rng = random.Random(0)
    assert rewrite("", "f", "python", "docstring", rng) is None
    assert rewrite("Foo.", "f", "python", "keywords", rng) is None
    assert rewrite("Does things.", "f", "python", "identifier", rng) is None
    with pytest.raises(ValueError, match="unknown query style"):
        rewrite("Compute the mean value.", "mean", "python", "shouting", rng)
