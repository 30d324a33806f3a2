"""Documented functions of Java, JavaScript, TypeScript and Go source, found with tree-sitter.

A definition is documented when its doc comment ends on the line right above it (no blank line between):

    Java                    a /** Javadoc */ before a method or constructor
    JavaScript, TypeScript  a /** JSDoc */ before a function declaration, a class or object method, or a
                            function assigned to a name (`const f = () => ...`, `exports.f = function ...`,
                            `{f: function ...}`, a class field holding an arrow function, a function
                            wrapped by a call: `const f = curry(function ...)`)
    Go                      the run of // lines right above a func (function or method)

The query is the comment's first paragraph as plain text: Javadoc / JSDoc block tags (@param, ...) are
dropped, inline tags ({@code x}, {@link A#b}) become their text, HTML tags are stripped; Go's doc links
([Reader]) lose their brackets and the leading function name ("Foo returns ...") is kept.

As with Python's nested functions, a documented definition inside another documented one stays part of
the outer one's code; inside an undocumented function (a module wrapper, an IIFE) it counts on its own.
"""

from __future__ import annotations

import html
import re
import textwrap
from dataclasses import dataclass
from functools import cache

from mbert_retrieval.code.treesitter import FUNCTION_VALUES, parser_for

LANGUAGES = ("java", "javascript", "typescript", "go")

# tree-sitter query patterns, one per definition kind; those a grammar lacks are left out.
PATTERNS = {
    "java": [
        "(method_declaration) @definition",
        "(constructor_declaration) @definition",
        "(compact_constructor_declaration) @definition",
    ],
    "javascript": [
        "(function_declaration) @definition",
        "(generator_function_declaration) @definition",
        "(method_definition) @definition",
        "(variable_declarator value: {values}) @definition",
        "(pair value: {values}) @definition",
        "(assignment_expression right: {values}) @definition",
        "(variable_declarator value: (call_expression)) @definition",
        "(assignment_expression right: (call_expression)) @definition",
        "(field_definition value: {values}) @definition",
        "(public_field_definition value: {values}) @definition",
        "(function_signature) @definition",
        "(method_signature) @definition",
    ],
    "go": ["(function_declaration) @definition", "(method_declaration) @definition"],
}
PATTERNS["typescript"] = PATTERNS["tsx"] = PATTERNS["javascript"]

# Nodes around a definition whose lines belong to it: `export`, `declare`, `const f = ...;`, `a.b = ...;`.
WRAPPERS = frozenset(
    {
        "export_statement",
        "ambient_declaration",
        "lexical_declaration",
        "variable_declaration",
        "expression_statement",
        "assignment_expression",
    }
)
# Named nodes whose name prefixes the definitions inside them (Outer.Inner.method).
SCOPES = frozenset(
    {
        "class_declaration",
        "abstract_class_declaration",
        "class",
        "interface_declaration",
        "enum_declaration",
        "record_declaration",
        "annotation_type_declaration",
        "internal_module",
        "module",
    }
)
SIGNATURES = frozenset({"function_signature", "method_signature"})
BODIES = frozenset({"block", "statement_block", "constructor_body"})

# A body of one statement that only says "not written": throw UnsupportedOperationException, throw
# new Error("not implemented"), panic("unimplemented").
_NOT_IMPLEMENTED = r"[^'\"`]*(?:not\s+(?:yet\s+)?implemented|unimplemented)"
PLACEHOLDER = re.compile(
    r"^(?:throw\s+new\s+UnsupportedOperationException\b"
    rf"|throw\s+new\s+\w*Error\(\s*['\"`]{_NOT_IMPLEMENTED}"
    rf"|panic\(\s*\"{_NOT_IMPLEMENTED})",
    re.IGNORECASE,
)
GO_DIRECTIVE = re.compile(r"^//(?:[a-z0-9]+:[a-z0-9]|line |export |extern |nolint\b)")
BLOCK_TAG = re.compile(r"^\s*@\w")
SUMMARY_TAG = re.compile(r"^\s*@(summary|description)\b\s*(.*)", re.DOTALL)
INLINE_TAG = re.compile(r"\{@(\w+)\s*")
LINK_TARGET = re.compile(r"([^\s(|]*(?:\([^)]*\))?)\s*\|?\s*(.*)", re.DOTALL)
HTML_TAGS = (
    "a|abbr|b|big|blockquote|br|caption|center|cite|code|dd|del|dfn|div|dl|dt|em|font|h[1-6]|hr|i|img|"
    "ins|kbd|li|ol|p|pre|q|s|samp|small|span|strike|strong|sub|sup|table|tbody|td|tfoot|th|thead|tr|tt|u|"
    "ul|var"
)
HTML_TAG = re.compile(rf"</?(?:{HTML_TAGS})\b[^<>]*>", re.IGNORECASE)
HTML_BLOCK = re.compile(r"<(?:p|pre|ul|ol|dl|table|blockquote|h[1-6]|hr|div)\b[^<>]*>", re.IGNORECASE)
MARKDOWN_LINK = re.compile(r"\[([^\]\n]+)\]\([^)\s]+\)")
GO_DOC_LINK = re.compile(r"\[(\*?[A-Za-z_][\w.]*)\]")


@dataclass(frozen=True)
class Documented:
    """One documented definition; without code when it has no body, only a placeholder, or does not
    parse (`problem` says which)."""

    name: str  # qualified: Class.method, Receiver.Method
    line: int  # 1-based line of the definition
    query: str  # the doc comment's first paragraph, as plain text
    code: str | None  # the definition without its doc comment, dedented
    problem: str | None = None


def documented_definitions(
    text: str, language: str, *, tsx: bool = False, declarations: bool = False
) -> list[Documented]:
    """The documented definitions of one file, in source order.

    `declarations`: the file is a TypeScript declaration file (.d.ts), whose bodiless signatures count
    as code."""
    grammar = "tsx" if tsx else language
    source = text.encode("utf-8")
    tree = parser_for(language, tsx).parse(source)
    found: list[Documented] = []
    inside_until = -1  # end byte of the last documented definition taken
    for definition in sorted(_captures(grammar, tree.root_node), key=lambda node: node.start_byte):
        if definition.start_byte < inside_until:
            continue
        start, outer = _extent(definition)
        comment = _doc_comment(start, language, source)
        call = _assigned_call(definition)
        if comment is None or (call is not None and not _wraps_function(call)):
            continue
        inside_until = outer.end_byte
        code, problem = None, None
        if outer.has_error:
            problem = "syntax error in the definition"
        elif not _has_code(definition, declarations, source):
            problem = "no code besides the docstring"
        else:
            code = _code(source, start.start_byte, outer.end_byte)
        name = _qualified_name(definition, source)
        line = definition.start_point[0] + 1
        found.append(Documented(name, line, query_text(comment, language), code, problem))
    return found


# --------------------------------------------------------------------------------- finding definitions


@cache
def _query(grammar: str):
    from tree_sitter import Query
    from tree_sitter_language_pack import get_language

    language = get_language(grammar)
    values = " ".join(
        f"({kind})" for kind in sorted(FUNCTION_VALUES) if language.id_for_node_kind(kind, True)
    )
    valid = []
    for pattern in PATTERNS[grammar]:
        pattern = pattern.format(values=f"[{values}]")
        try:
            Query(language, pattern)
        except Exception:  # a node kind or field this grammar does not have
            continue
        valid.append(pattern)
    return Query(language, "\n".join(valid))


def _captures(grammar: str, root) -> list:
    query = _query(grammar)
    try:
        from tree_sitter import QueryCursor
    except ImportError:  # py-tree-sitter before 0.25 ran queries itself
        captures = query.captures(root)
    else:
        captures = QueryCursor(query).captures(root)
    return list(captures.get("definition", []))


def _extent(definition):
    """(first node, whole node): the definition widened to its wrappers (export, const, a.b = ...) and
    its leading decorators; the doc comment comes right before the first node."""
    outer = definition
    while (parent := outer.parent) is not None and parent.type in WRAPPERS:
        if parent.type == "assignment_expression" and parent.child_by_field_name("right") != outer:
            break
        declarators = [c for c in parent.named_children if c.type == "variable_declarator"]
        if len(declarators) > 1:
            break
        outer = parent
    start = outer
    while start.prev_sibling is not None and start.prev_sibling.type == "decorator":
        start = start.prev_sibling
    return start, outer


def _assigned_call(definition):
    """The call whose result a name is given (`const f = curry(function ...)`), if it is one."""
    for field in ("value", "right"):
        value = definition.child_by_field_name(field)
        if value is not None and value.type == "call_expression":
            return value
    return None


def _wraps_function(call, depth: int = 0) -> bool:
    """A function literal among the call's arguments, or among the arguments of a call among them
    (`curry2(checkForMethod("groupBy", reduceBy(function ...)))`); not a module wrapper `(function
    () {...})()`, whose function is the callee."""
    arguments = call.child_by_field_name("arguments")
    if arguments is None or depth > 8:
        return False
    for argument in arguments.named_children:
        if argument.type in FUNCTION_VALUES:
            return True
        if argument.type == "call_expression" and _wraps_function(argument, depth + 1):
            return True
    return False


def _doc_comment(node, language: str, source: bytes) -> str | None:
    """The doc comment ending on the line above `node` (or on its line), alone on its lines."""
    if language == "go":
        return _go_comment(node, source)
    comment = node.prev_sibling
    if comment is None or "comment" not in comment.type or not _alone(comment, source):
        return None
    text = _raw_text(comment, source)
    if not text.startswith("/**") or text.startswith("/**/"):
        return None
    if comment.end_point[0] < node.start_point[0] - 1:
        return None
    return text


def _go_comment(node, source: bytes) -> str | None:
    """The consecutive // lines right above a Go func."""
    lines: list[str] = []
    row = node.start_point[0] - 1
    comment = node.prev_sibling
    while comment is not None and comment.type == "comment" and comment.end_point[0] == row:
        text = _raw_text(comment, source)
        if not text.startswith("//") or not _alone(comment, source):
            break
        lines.insert(0, text)
        row = comment.start_point[0] - 1
        comment = comment.prev_sibling
    return "\n".join(lines) if lines else None


def _alone(comment, source: bytes) -> bool:
    """Nothing but indentation before the comment on its first line."""
    line_start = source.rfind(b"\n", 0, comment.start_byte) + 1
    return not source[line_start : comment.start_byte].strip()


def _has_code(definition, declarations: bool, source: bytes) -> bool:
    """False for a bodiless definition (abstract, interface, assembly-backed, an overload signature)
    and for a body that is empty or only a placeholder."""
    if definition.type in SIGNATURES:
        return declarations
    if _assigned_call(definition) is not None:  # a function wrapped by a call: curry(function ...)
        return True
    function = definition
    for field in ("value", "right"):  # a function assigned to a name
        if definition.child_by_field_name(field) is not None:
            function = definition.child_by_field_name(field)
    body = function.child_by_field_name("body")
    if body is None:
        return False
    if body.type not in BODIES:  # an arrow function's expression body
        return True
    statements = [c for c in body.named_children if "comment" not in c.type]
    if len(statements) == 1 and statements[0].type == "statement_list":  # Go wraps a block's statements
        statements = [c for c in statements[0].named_children if "comment" not in c.type]
    if not statements:
        return False
    return len(statements) > 1 or not PLACEHOLDER.match(_text(statements[0], source))


def _code(source: bytes, start: int, end: int) -> str:
    """Source from `start` to `end`, with the first line's indentation, dedented."""
    line_start = source.rfind(b"\n", 0, start) + 1
    indent = source[line_start:start]
    if indent.strip():  # code before the definition on its first line
        indent = b" " * len(indent)
    text = (indent + source[start:end]).decode("utf-8", errors="replace")
    return textwrap.dedent(text).strip("\n")


def _qualified_name(definition, source: bytes) -> str:
    """The definition's name, prefixed by the classes / objects / namespaces around it."""
    parts = [_own_name(definition, source)]
    node = definition.parent
    while node is not None:
        if node.type in SCOPES:
            name = node.child_by_field_name("name")
            if name is not None:
                parts.append(_text(name, source))
        elif node.type == "object" and node.parent is not None:
            holder = node.parent
            label = {"variable_declarator": "name", "pair": "key", "assignment_expression": "left"}
            if holder.type in label and holder.child_by_field_name(label[holder.type]) is not None:
                parts.append(_text(holder.child_by_field_name(label[holder.type]), source))
        node = node.parent
    return ".".join(reversed(parts))


def _own_name(definition, source: bytes) -> str:
    if definition.type == "assignment_expression":
        outermost = definition
        while outermost.parent is not None and outermost.parent.type == "assignment_expression":
            outermost = outermost.parent
        return _text(outermost.child_by_field_name("left"), source)
    for field in ("name", "key", "property"):
        name = definition.child_by_field_name(field)
        if name is not None:
            break
    else:
        return "default" if definition.parent and definition.parent.type == "export_statement" else "?"
    receiver = definition.child_by_field_name("receiver")  # Go: func (r *Reader) Read(...)
    if receiver is not None:
        types = [n for n in _descendants(receiver) if n.type == "type_identifier"]
        if types:
            return f"{_text(types[0], source)}.{_text(name, source)}"
    return _text(name, source)


def _descendants(node):
    stack = [node]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.named_children))


def _raw_text(node, source: bytes) -> str:
    return source[node.start_byte : node.end_byte].decode("utf-8", errors="replace")


def _text(node, source: bytes) -> str:
    """The node's text on one line."""
    return " ".join(_raw_text(node, source).split())


# ------------------------------------------------------------------------------------ comment to query


def query_text(comment: str, language: str) -> str:
    """The first paragraph of a doc comment as one line of plain text."""
    if language == "go":
        lines = [line for line in comment.splitlines() if not GO_DIRECTIVE.match(line)]
        lines = [re.sub(r"^// ?", "", line) for line in lines]
        paragraph = _first_paragraph("\n".join(lines))
        paragraph = GO_DOC_LINK.sub(r"\1", paragraph)
    else:
        paragraph = _first_paragraph(_description(_comment_lines(comment)))
        paragraph = html.unescape(HTML_TAG.sub("", replace_inline_tags(paragraph)))
    return " ".join(MARKDOWN_LINK.sub(r"\1", paragraph).split())


def _comment_lines(comment: str) -> list[str]:
    """The lines of a /** ... */ comment without the delimiters and the leading `*` of each line."""
    body = comment[3:-2] if comment.endswith("*/") else comment[3:]
    return [re.sub(r"^\s*\*(?!\*) ?", "", line) for line in body.splitlines()]


def _description(lines: list[str]) -> str:
    """The text before the first block tag; else the text of an @summary or @description tag."""
    tag_lines = [i for i, line in enumerate(lines) if BLOCK_TAG.match(line)]
    first_tag = tag_lines[0] if tag_lines else len(lines)
    description = "\n".join(lines[:first_tag])
    if description.strip():
        return description
    for position, start in enumerate(tag_lines):
        match = SUMMARY_TAG.match(lines[start])
        if match:
            end = tag_lines[position + 1] if position + 1 < len(tag_lines) else len(lines)
            return "\n".join([match.group(2), *lines[start + 1 : end]])
    return ""


def _first_paragraph(text: str) -> str:
    text = HTML_BLOCK.sub("\n\n", text)
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    return paragraphs[0] if paragraphs else ""


def replace_inline_tags(text: str) -> str:
    """{@code x} -> x, {@link A#b} -> A.b, {@link A#b label} / {@link A | label} -> label, ...;
    braces nested inside a tag are matched."""
    out, position = [], 0
    while (match := INLINE_TAG.search(text, position)) is not None:
        depth, end = 1, match.end()
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth:  # unbalanced: leave the rest as it is
            break
        out.append(text[position : match.start()])
        out.append(_inline_tag(match.group(1), text[match.end() : end - 1].strip()))
        position = end
    out.append(text[position:])
    return "".join(out)


def _inline_tag(tag: str, body: str) -> str:
    if tag not in ("code", "literal"):  # {@return a {@code Set} of codes}
        body = replace_inline_tags(body)
    if tag in ("link", "linkplain", "linkcode", "see"):
        target, label = LINK_TARGET.match(body).groups()
        if label.strip():
            return label.strip()
        if "://" in target:
            return target
        return re.sub(r"\(.*", "", target).replace("#", ".").lstrip(".")
    if tag in ("inheritDoc", "docRoot"):
        return ""
    if tag == "return":
        return f"Returns {body}"
    if tag == "index":
        return body.split()[0] if body.split() else ""
    return body  # code, literal, value, summary, systemProperty, ...
