"""Definitions in JavaScript, TypeScript, Java, Go, Rust, C and C++ source, found with tree-sitter.

The grammars come compiled inside the `tree-sitter-language-pack` wheel, so parsing works offline.
Each language is described by which syntax nodes are
    functions    leaf chunks (function, method, constructor)
    containers   a class-like node: its header is a chunk, its member functions are chunks of their own
    types        leaf chunks for type definitions (struct, enum, interface, type alias)
    scopes       a namespace or module: no chunk, but its name prefixes the symbols inside
    wrappers     a node around one definition (export, template) whose lines belong to that definition
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import PurePosixPath

from mbert_retrieval.code.spans import Span

logger = logging.getLogger(__name__)

MAX_DEPTH = 64  # definitions nested deeper than this are left to the enclosing chunk


@dataclass(frozen=True)
class Grammar:
    functions: frozenset[str]
    containers: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    wrappers: frozenset[str] = frozenset()


def _grammar(functions, containers="", types="", scopes="", wrappers="") -> Grammar:
    return Grammar(*(frozenset(group.split()) for group in (functions, containers, types, scopes, wrappers)))


JAVASCRIPT = _grammar(
    functions="function_declaration generator_function_declaration method_definition",
    containers="class_declaration class",
    wrappers="export_statement lexical_declaration variable_declaration",
)
TYPESCRIPT = _grammar(
    functions="function_declaration generator_function_declaration method_definition",
    containers="class_declaration abstract_class_declaration class",
    types="interface_declaration type_alias_declaration enum_declaration",
    scopes="internal_module module",
    wrappers="export_statement lexical_declaration variable_declaration ambient_declaration",
)
GRAMMARS = {
    "javascript": JAVASCRIPT,
    "typescript": TYPESCRIPT,
    "java": _grammar(
        functions="method_declaration constructor_declaration compact_constructor_declaration",
        containers="class_declaration interface_declaration enum_declaration record_declaration",
        types="annotation_type_declaration",
    ),
    "go": _grammar(
        functions="function_declaration method_declaration",
        types="type_spec",
        wrappers="type_declaration",
    ),
    "rust": _grammar(
        functions="function_item",
        containers="impl_item trait_item",
        types="struct_item enum_item union_item type_item macro_definition",
        scopes="mod_item",
    ),
    "c": _grammar(
        functions="function_definition",
        types="struct_specifier union_specifier enum_specifier type_definition",
    ),
    "cpp": _grammar(
        functions="function_definition",
        containers="class_specifier struct_specifier union_specifier",
        types="enum_specifier type_definition alias_declaration",
        scopes="namespace_definition",
        wrappers="template_declaration",
    ),
}
# A JavaScript / TypeScript variable whose value is a function counts as a function.
FUNCTION_VALUES = frozenset({"arrow_function", "function_expression", "function", "generator_function"})
NAME_NODES = frozenset(
    {
        "identifier",
        "field_identifier",
        "type_identifier",
        "qualified_identifier",
        "destructor_name",
        "operator_name",
        "property_identifier",
        "private_property_identifier",
    }
)


_parsers = threading.local()  # tree-sitter parsers must not be shared between threads


def parser_for(language: str, tsx: bool = False):
    from tree_sitter_language_pack import get_parser

    name = "tsx" if tsx else language
    cache = _parsers.__dict__.setdefault("by_name", {})
    if name not in cache:
        cache[name] = get_parser(name)
    return cache[name]


def treesitter_spans(path: str, language: str, text: str) -> list[Span] | None:
    """Definitions in `text`; None if the grammar is unavailable (the file is then cut into windows)."""
    try:
        parser = parser_for(language, PurePosixPath(path).suffix.lower() == ".tsx")
    except Exception as err:  # the language pack raises its own error types
        logger.warning("no tree-sitter grammar for %s (%s): %s is cut into line windows", language, err, path)
        return None
    source = text.encode("utf-8")
    tree = parser.parse(source)
    spans: list[Span] = []
    _visit(tree.root_node, source, GRAMMARS[language], "", False, spans, 0)
    return spans


def _visit(node, source: bytes, grammar: Grammar, prefix: str, in_container: bool, spans, depth) -> None:
    if depth > MAX_DEPTH:
        return
    for child in node.named_children:
        kind = child.type
        if kind in grammar.functions or _is_function_variable(child):
            name = _name(child, source)
            spans.append(_span(child, grammar, prefix + name if name else None, _function_kind(in_container)))
        elif kind in grammar.containers and _has_body(child):
            _container(child, source, grammar, prefix, spans, depth)
        elif kind in grammar.types and _is_type_definition(child):
            name = _name(child, source)
            spans.append(_span(child, grammar, prefix + name if name else None, "type"))
        elif kind in grammar.scopes:
            name = _name(child, source)
            _visit(child, source, grammar, f"{prefix}{name}." if name else prefix, False, spans, depth + 1)
        else:
            _visit(child, source, grammar, prefix, in_container, spans, depth + 1)


def _container(node, source, grammar, prefix, spans, depth) -> None:
    name = _name(node, source)
    symbol = prefix + name if name else None
    members: list[Span] = []
    _visit(node, source, grammar, f"{symbol}." if symbol else prefix, True, members, depth + 1)
    whole = _span(node, grammar, symbol, "class")
    if members:  # the header: from the class line to just before its first member
        header_end = max(whole.start, min(m.start for m in members) - 1)
        whole = Span(whole.start, header_end, symbol, "class")
    spans.append(whole)
    spans.extend(members)


def _function_kind(in_container: bool) -> str:
    return "method" if in_container else "function"


def _span(node, grammar: Grammar, symbol: str | None, kind: str) -> Span:
    """Lines of `node`, widened to the wrappers around it (export, template, const)."""
    outer = node
    while outer.parent is not None and outer.parent.type in grammar.wrappers and _only_definition(outer):
        outer = outer.parent
    return Span(outer.start_point[0], node.end_point[0], symbol, kind)


def _only_definition(node) -> bool:
    siblings = [c for c in node.parent.named_children if "comment" not in c.type]
    return len([c for c in siblings if c.type not in ("decorator", "template_parameter_list")]) == 1


def _is_function_variable(node) -> bool:
    if node.type != "variable_declarator":
        return False
    value = node.child_by_field_name("value")
    return value is not None and value.type in FUNCTION_VALUES


def _has_body(node) -> bool:
    return node.child_by_field_name("body") is not None


def _is_type_definition(node) -> bool:
    """A struct / enum with a body, a typedef or a type alias; not a bare `struct point *p` use."""
    if node.type in ("struct_specifier", "union_specifier", "enum_specifier"):
        return _has_body(node) and node.parent is not None and node.parent.type != "type_definition"
    return True


def _name(node, source: bytes) -> str | None:
    """The defined name: the `name` field, a C/C++ declarator, a Rust impl's type, a Go receiver."""
    if node.type == "impl_item":
        return _text(node.child_by_field_name("type"), source)
    if node.type == "type_definition":  # typedef struct {...} name;
        return _declarator_name(node.child_by_field_name("declarator"), source)
    if node.type == "method_declaration" and node.child_by_field_name("receiver") is not None:
        receiver = _receiver_type(node.child_by_field_name("receiver"), source)
        name = _text(node.child_by_field_name("name"), source)
        return f"{receiver}.{name}" if receiver else name
    named = node.child_by_field_name("name")
    if named is not None:
        return _text(named, source)
    return _declarator_name(node.child_by_field_name("declarator"), source)


def _declarator_name(node, source: bytes) -> str | None:
    """Follow C/C++ declarators (pointer, function, reference) down to the identifier."""
    for _ in range(MAX_DEPTH):
        if node is None:
            return None
        if node.type in NAME_NODES:
            return _text(node, source)
        inner = node.child_by_field_name("declarator")
        if inner is None:  # e.g. a reference_declarator keeps its declarator as a plain child
            inner = next(
                (c for c in node.named_children if "declarator" in c.type or c.type in NAME_NODES), None
            )
        node = inner
    return None


def _receiver_type(receiver, source: bytes) -> str | None:
    stack = [receiver]
    while stack:
        node = stack.pop()
        if node.type == "type_identifier":
            return _text(node, source)
        stack.extend(reversed(node.named_children))
    return None


def _text(node, source: bytes) -> str | None:
    if node is None:
        return None
    text = source[node.start_byte : node.end_byte].decode("utf-8", errors="replace")
    return " ".join(text.split()).replace("::", ".")
