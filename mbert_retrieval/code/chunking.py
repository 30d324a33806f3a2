"""Split a source file into the pieces an IDE shows: functions, classes, methods.

    chunks = chunk_file("pkg/mod.py", text)
    chunks[0]  # Chunk(path="pkg/mod.py", language="python", symbol="Parser.parse", kind="method",
               #       start_line=12, end_line=40, text="    def parse(self, ...")

Python is parsed with `ast`; JavaScript, TypeScript, Java, Go, Rust, C and C++ with tree-sitter
(`treesitter.py`); any other text file, and source that does not parse (or nests too deeply to
parse), is cut into line windows. Lines outside every definition (imports, constants, script code)
become "module" chunks, named after the module ("pkg.sub.mod" for Python, the file path otherwise),
as are the windows of text files. Comments
and decorators right above a definition belong to it. Line numbers start at 1; `end_line` is
inclusive. Definitions longer than `max_lines` are cut into overlapping windows that keep the symbol.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import PurePosixPath

from mbert_retrieval.code.spans import Span
from mbert_retrieval.code.treesitter import treesitter_spans

EXTENSION_LANGUAGES = {
    ".py": "python",
    ".pyi": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".mts": "typescript",
    ".cts": "typescript",
    ".tsx": "typescript",
    ".java": "java",
    ".go": "go",
    ".rs": "rust",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".cxx": "cpp",
    ".hh": "cpp",
    ".hpp": "cpp",
    ".hxx": "cpp",
    # Text files chunked by line windows, named so that the language filter can pick them.
    ".md": "markdown",
    ".rst": "rst",
    ".txt": "text",
    ".toml": "toml",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".json": "json",
    ".cfg": "ini",
    ".ini": "ini",
    ".sh": "shell",
    ".bash": "shell",
    ".html": "html",
    ".css": "css",
    ".sql": "sql",
    ".rb": "ruby",
    ".php": "php",
    ".cs": "csharp",
    ".kt": "kotlin",
    ".swift": "swift",
    ".scala": "scala",
    ".lua": "lua",
    ".r": "r",
    ".m": "objective-c",
}
PARSED_LANGUAGES = ("python", "javascript", "typescript", "java", "go", "rust", "c", "cpp")
LANGUAGES = tuple(sorted(set(EXTENSION_LANGUAGES.values()) | {"text"}))

# Lines right above a definition that belong to it (doc comments, decorators, attributes).
LEADING_LINE_PREFIXES = {
    "python": ("#",),
    "javascript": ("//", "/*", "*", "@"),
    "typescript": ("//", "/*", "*", "@"),
    "java": ("//", "/*", "*", "@"),
    "go": ("//", "/*", "*"),
    "rust": ("//", "/*", "*", "#["),
    "c": ("//", "/*", "*"),
    "cpp": ("//", "/*", "*"),
}


@dataclass(frozen=True)
class Chunk:
    path: str
    language: str
    symbol: str | None  # "function", "Class", "Class.method"; the module's name for module and text chunks
    kind: str  # "function" | "method" | "class" | "type" | "module" | "text"
    start_line: int  # 1-based, inclusive
    end_line: int  # inclusive
    text: str

    @property
    def id(self) -> str:
        return f"{self.path}:{self.start_line}-{self.end_line}"


@dataclass(frozen=True)
class ChunkSettings:
    max_lines: int = 150  # longer definitions are cut into windows
    window_lines: int = 60  # text files and module code: window size ...
    window_overlap: int = 10  # ... and overlap, in lines
    min_module_lines: int = 2  # module code with fewer non-blank lines is not worth a chunk

    def __post_init__(self):
        if self.window_lines <= 0 or self.max_lines <= 0:
            raise ValueError("window_lines and max_lines must be positive")
        if not 0 <= self.window_overlap < self.window_lines:
            raise ValueError("window_overlap must be >= 0 and smaller than window_lines")


def language_of(path: str) -> str:
    return EXTENSION_LANGUAGES.get(PurePosixPath(path).suffix.lower(), "text")


def chunk_file(path: str, text: str, settings: ChunkSettings | None = None) -> list[Chunk]:
    """All chunks of one file, in line order."""
    settings = settings or ChunkSettings()
    language = language_of(path)
    lines = text.splitlines()
    if not lines:
        return []
    try:
        spans = definition_spans(path, language, text)
    except (RecursionError, MemoryError):  # absurdly deep nesting: read it as text
        spans = None
    if spans is None:  # not a parsed language, or the parser gave up
        kind = "text" if language not in PARSED_LANGUAGES else "module"
        symbol = module_symbol(path, language)
        return _windows(path, language, lines, 0, len(lines) - 1, symbol, kind, settings)
    spans = _with_leading_lines(spans, lines, LEADING_LINE_PREFIXES.get(language, ()))
    chunks = []
    for span in spans:
        chunks += _windows(
            path, language, lines, span.start, span.end, span.symbol, span.kind, settings, True
        )
    chunks += _module_chunks(path, language, lines, spans, settings)
    return sorted(chunks, key=lambda c: (c.start_line, c.end_line))


def module_symbol(path: str, language: str) -> str:
    """How module-level code is named: the dotted module path for Python, else the file path."""
    if language != "python":
        return path
    parts = list(PurePosixPath(path).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path


def definition_spans(path: str, language: str, text: str) -> list[Span] | None:
    if language == "python":
        return python_spans(text)
    if language in PARSED_LANGUAGES:
        return treesitter_spans(path, language, text)
    return None


# ---------------------------------------------------------------------------------------------- python


def python_spans(text: str) -> list[Span] | None:
    """Functions, classes and methods of a Python module; None when it does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes
        return None
    spans: list[Span] = []
    _python_body(tree.body, "", False, spans)
    return spans


COMPOUND_STATEMENTS = (ast.If, ast.Try, ast.With, ast.AsyncWith, ast.ExceptHandler) + (
    (ast.TryStar,) if hasattr(ast, "TryStar") else ()
)


def _python_body(body: list[ast.stmt], prefix: str, in_class: bool, spans: list[Span]) -> None:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kind = "method" if in_class else "function"
            spans.append(Span(_first_line(node), node.end_lineno - 1, prefix + node.name, kind))
        elif isinstance(node, ast.ClassDef):
            _python_class(node, prefix, spans)
        elif isinstance(node, COMPOUND_STATEMENTS):  # definitions under `if`, `try`, `with` count too
            for field in ("body", "orelse", "finalbody", "handlers"):
                _python_body(getattr(node, field, []), prefix, in_class, spans)


def _python_class(node: ast.ClassDef, prefix: str, spans: list[Span]) -> None:
    members: list[Span] = []
    _python_body(node.body, f"{prefix}{node.name}.", True, members)
    start = _first_line(node)
    # The class chunk is its header (signature, docstring, attributes) up to the first member.
    end = min((m.start for m in members), default=node.end_lineno) - 1 if members else node.end_lineno - 1
    spans.append(Span(start, max(start, end), prefix + node.name, "class"))
    spans.extend(members)


def _first_line(node) -> int:
    """0-based first line, decorators included."""
    return min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1


# ----------------------------------------------------------------------------------------- line logic


def _with_leading_lines(spans: list[Span], lines: list[str], prefixes: tuple[str, ...]) -> list[Span]:
    """Extend each span upward over the comment / decorator lines right above it. Members take their
    comments first; a class header then ends before the first member's comments."""
    headers = [s for s in spans if s.kind == "class"]
    members = _extend_upward([s for s in spans if s.kind != "class"], set(), lines, prefixes)
    clipped = []
    for header in headers:
        end = min([m.start - 1 for m in members if header.start < m.start <= header.end], default=header.end)
        while end > header.start and not lines[end].strip():
            end -= 1
        clipped.append(Span(header.start, end, header.symbol, header.kind))
    taken = {line for m in members for line in range(m.start, m.end + 1)}
    return sorted(_extend_upward(clipped, taken, lines, prefixes) + members, key=lambda s: (s.start, s.end))


def _extend_upward(spans: list[Span], taken: set[int], lines: list[str], prefixes) -> list[Span]:
    taken = taken | {line for s in spans for line in range(s.start, s.end + 1)}
    extended = []
    for span in sorted(spans, key=lambda s: (s.start, s.end)):
        start = span.start
        while prefixes and start > 0 and start - 1 not in taken:
            line = lines[start - 1].strip()
            if not line or not line.startswith(prefixes):
                break
            start -= 1
            taken.add(start)
        extended.append(Span(start, span.end, span.symbol, span.kind))
    return extended


def _module_chunks(path, language, lines, spans: list[Span], settings: ChunkSettings) -> list[Chunk]:
    """Runs of lines outside every definition, kept when they hold enough code."""
    covered = [False] * len(lines)
    for span in spans:
        for i in range(span.start, min(span.end, len(lines) - 1) + 1):
            covered[i] = True
    chunks, start = [], None
    for i in range(len(lines) + 1):
        free = i < len(lines) and not covered[i]
        if free and start is None:
            start = i
        elif not free and start is not None:
            code = [n for n in range(start, i) if lines[n].strip()]
            if len(code) >= settings.min_module_lines:
                symbol = module_symbol(path, language)
                chunks += _windows(path, language, lines, code[0], code[-1], symbol, "module", settings)
            start = None
    return chunks


def _windows(path, language, lines, start, end, symbol, kind, settings: ChunkSettings, definition=False):
    """One chunk for lines start..end (0-based, inclusive), or overlapping windows when too long."""
    limit = settings.max_lines if definition else settings.window_lines
    if end - start + 1 <= limit:
        return [_chunk(path, language, lines, start, end, symbol, kind)]
    size = limit if definition else settings.window_lines
    step = size - min(settings.window_overlap, size - 1)
    chunks = []
    for first in range(start, end + 1, step):
        last = min(first + size - 1, end)
        chunks.append(_chunk(path, language, lines, first, last, symbol, kind))
        if last == end:
            break
    return chunks


def _chunk(path, language, lines, start, end, symbol, kind) -> Chunk:
    return Chunk(path, language, symbol, kind, start + 1, end + 1, "\n".join(lines[start : end + 1]))
