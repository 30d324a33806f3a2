"""Repository walking and chunking into functions / classes / methods (no model needed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from code_search_repo import GO, JAVASCRIPT, OUTSIDE_WORD, STDLIB, make_repository

from mbert_retrieval.code.chunking import PARSED_LANGUAGES, ChunkSettings, chunk_file, language_of
from mbert_retrieval.code.walk import scan_repository

PYTHON = textwrap.dedent(
    '''\
    """Module docstring."""
    import os
    import sys

    # Helper comment that belongs to the function below.
    @decorator
    def top_level(a, b):
        """Add two numbers."""
        return a + b


    class Shape:
        """A shape on the plane."""

        sides = 0

        def area(self):
            return 0

        @property
        def name(self):
            return "shape"

        class Inner:
            def deep(self):
                pass


    async def fetch(url):
        return url

    if sys.platform == "win32":
        def platform_helper():
            pass

    CONSTANT = 1
    OTHER = 2
    '''
)


def kinds_and_symbols(chunks):
    return [(c.kind, c.symbol) for c in chunks]


def check_spans(chunks, text):
    """Every chunk's text is exactly its lines of the file."""
    lines = text.splitlines()
    for chunk in chunks:
        assert 1 <= chunk.start_line <= chunk.end_line <= len(lines), chunk
        assert chunk.text == "\n".join(lines[chunk.start_line - 1 : chunk.end_line]), chunk


def test_python_functions_classes_and_methods():
    chunks = chunk_file("pkg/shapes.py", PYTHON)
    check_spans(chunks, PYTHON)
    definitions = [(k, s) for k, s in kinds_and_symbols(chunks) if k != "module"]
    assert definitions == [
        ("function", "top_level"),
        ("class", "Shape"),
        ("method", "Shape.area"),
        ("method", "Shape.name"),
        ("class", "Shape.Inner"),
        ("method", "Shape.Inner.deep"),
        ("function", "fetch"),
        ("function", "platform_helper"),
    ]
    by_symbol = {c.symbol: c for c in chunks}
    # The comment and the decorator above the function belong to it.
    assert by_symbol["top_level"].text.startswith("# Helper comment")
    assert "@decorator" in by_symbol["top_level"].text
    # A class chunk is its header: signature, docstring and attributes, up to the first method.
    assert "sides = 0" in by_symbol["Shape"].text and "def area" not in by_symbol["Shape"].text
    assert by_symbol["Shape.name"].text.lstrip().startswith("@property")
    # Code outside definitions (imports, constants) is kept as module chunks.
    module_text = "\n".join(c.text for c in chunks if c.kind == "module")
    assert "import os" in module_text and "CONSTANT = 1" in module_text
    assert all(c.language == "python" for c in chunks)


def test_python_that_does_not_parse_becomes_line_windows():
    text = "def broken(:\n" + "x = 1\n" * 130
    chunks = chunk_file("bad.py", text, ChunkSettings(window_lines=50, window_overlap=10))
    check_spans(chunks, text)
    assert {c.kind for c in chunks} == {"module"} and {c.symbol for c in chunks} == {"bad"}
    assert chunks[0].start_line == 1 and chunks[-1].end_line == 131


def test_long_definitions_are_cut_into_overlapping_windows_that_keep_the_symbol():
    body = "".join(f"    x{i} = {i}\n" for i in range(300))
    text = f"def long_function():\n{body}"
    settings = ChunkSettings(max_lines=100, window_overlap=10)
    chunks = chunk_file("long.py", text, settings)
    check_spans(chunks, text)
    assert {c.symbol for c in chunks} == {"long_function"}
    assert all(c.end_line - c.start_line + 1 <= 100 for c in chunks)
    covered = set()
    for before, after in zip(chunks, chunks[1:]):
        assert after.start_line == before.end_line - 9  # 10 lines of overlap
    for c in chunks:
        covered.update(range(c.start_line, c.end_line + 1))
    assert covered == set(range(1, 302))


def test_text_files_are_cut_into_line_windows():
    text = "".join(f"line {i}\n" for i in range(1, 131))
    chunks = chunk_file("docs/notes.md", text, ChunkSettings(window_lines=60, window_overlap=10))
    check_spans(chunks, text)
    assert [(c.start_line, c.end_line) for c in chunks] == [(1, 60), (51, 110), (101, 130)]
    assert {c.language for c in chunks} == {"markdown"} and {c.kind for c in chunks} == {"text"}


TREE_SITTER_SOURCES = {
    "web/users.js": (
        JAVASCRIPT,
        {("function", "fetchSortedUsers"), ("class", "Cache"), ("method", "Cache.evictOldest")},
    ),
    "geometry/point.go": (GO, {("type", "Point"), ("function", "Point.Distance")}),
    "src/Stack.java": (
        """\
package util;

/** A stack of integers. */
public class Stack {
    private int[] items;

    /** Push an item on top of the stack. */
    public void push(int item) { }

    public Stack() { items = new int[8]; }
}
""",
        {("class", "Stack"), ("method", "Stack.push"), ("method", "Stack.Stack")},
    ),
    "src/lib.rs": (
        """\
use std::fmt;

/// A counter that never overflows.
#[derive(Debug)]
pub struct Counter { value: u64 }

impl Counter {
    /// Increment the counter, saturating at the maximum.
    pub fn increment(&mut self) { self.value = self.value.saturating_add(1); }
}

pub fn free_function() -> u32 { 1 }
""",
        {
            ("type", "Counter"),
            ("class", "Counter"),
            ("method", "Counter.increment"),
            ("function", "free_function"),
        },
    ),
    "src/buffer.c": (
        """\
#include <stdlib.h>

struct buffer { char *data; size_t size; };

/* Grow the buffer to at least `size` bytes. */
static int grow(struct buffer *b, size_t size) {
    b->data = realloc(b->data, size);
    return b->data != NULL;
}
""",
        {("type", "buffer"), ("function", "grow")},
    ),
    "src/widget.cpp": (
        """\
#include <string>

namespace ui {
class Widget {
 public:
  // Draw the widget on the screen.
  void draw() const { }
};

template <typename T>
T clamp(T value, T low, T high) { return value < low ? low : (value > high ? high : value); }
}
""",
        {("class", "ui.Widget"), ("method", "ui.Widget.draw"), ("function", "ui.clamp")},
    ),
    "src/app.ts": (
        """\
export interface User { name: string; }

export class UserStore {
  private users: User[] = [];

  /** Add a user unless one with the same name exists. */
  add(user: User): void { this.users.push(user); }
}

export const greet = (user: User): string => `hello ${user.name}`;
""",
        {("type", "User"), ("class", "UserStore"), ("method", "UserStore.add"), ("function", "greet")},
    ),
}


@pytest.mark.parametrize("path", sorted(TREE_SITTER_SOURCES))
def test_tree_sitter_languages(path):
    text, expected = TREE_SITTER_SOURCES[path]
    chunks = chunk_file(path, text)
    check_spans(chunks, text)
    found = {(c.kind, c.symbol) for c in chunks if c.kind != "module"}
    assert expected <= found, found
    assert {c.language for c in chunks} == {language_of(path)}
    # Doc comments (and Rust attributes) right above a definition belong to it.
    for chunk in chunks:
        if chunk.symbol in ("fetchSortedUsers", "Point.Distance", "Stack.push", "grow", "ui.Widget.draw"):
            assert chunk.text.lstrip().startswith(("/*", "//")), chunk
    if path.endswith(".rs"):
        counter = next(c for c in chunks if c.kind == "type")
        assert counter.text.startswith("/// A counter") and "#[derive(Debug)]" in counter.text


def test_tree_sitter_grammars_are_bundled_and_load_offline():
    """The grammars come inside the wheel: loading them must not touch the network (proxies that
    refuse every connection make any download fail)."""
    script = (
        "from mbert_retrieval.code.treesitter import parser_for\n"
        "for language in ('javascript', 'typescript', 'java', 'go', 'rust', 'c', 'cpp'):\n"
        "    assert parser_for(language).parse(b'x').root_node is not None\n"
        "assert parser_for('typescript', tsx=True) is not None\n"
    )
    closed = "http://127.0.0.1:9"
    env = {**os.environ, "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "ALL_PROXY": closed, "NO_PROXY": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_broken_source_in_a_parsed_language_never_crashes():
    for path in ("a.js", "a.ts", "a.java", "a.go", "a.rs", "a.c", "a.cpp", "a.py"):
        text = "}{ ))) class def fn func <<< \n" * 20 + "\x00 weird \ufffd\n"
        chunks = chunk_file(path, text)
        check_spans(chunks, text)
    assert set(PARSED_LANGUAGES) == {"python", "javascript", "typescript", "java", "go", "rust", "c", "cpp"}


def test_chunking_stdlib_sources_keeps_every_line_in_place():
    """On real code, chunks are exact slices of the file and every definition is found."""
    for path in sorted((STDLIB / "json").glob("*.py")) + [STDLIB / "email" / "message.py"]:
        text = path.read_text()
        chunks = chunk_file(path.name, text)
        check_spans(chunks, text)
        first_windows = {}
        for chunk in chunks:
            first_windows.setdefault(chunk.symbol, chunk)
        for chunk in first_windows.values():
            if chunk.kind != "module":  # its first line past comments and decorators defines the symbol
                first = next(x for x in chunk.text.splitlines() if not x.strip().startswith(("#", "@")))
                assert re.match(rf"\s*(async )?(def|class) {chunk.symbol.split('.')[-1]}\b", first), chunk
        top_level = re.findall(r"^(?:async )?(?:def|class) (\w+)", text, re.M)
        assert set(top_level) <= {c.symbol for c in chunks}
    message = chunk_file("message.py", (STDLIB / "email" / "message.py").read_text())
    assert ("method", "Message.get_payload") in kinds_and_symbols(message)


def test_walk_honours_gitignore_and_skips_what_it_cannot_index(tmp_path):
    root = make_repository(tmp_path / "repo", packages=("json",))
    scan = scan_repository(root)
    paths = set(scan.files)
    assert {"json/decoder.py", "web/users.js", "geometry/point.go", "secret_but_kept.py"} <= paths
    for ignored in ("build/generated.py", "debug.log", "secret_key.py", "web/vendor.js"):
        assert ignored not in paths
    for skipped in (
        "logo.png",
        "blob.dat.txt",
        "latin1.py",
        "huge.txt",
        "package-lock.json",
        "link_outside.py",
    ):
        assert skipped not in paths
    assert scan.skipped["gitignored"] == 4  # build/, debug.log, secret_key.py, web/vendor.js
    assert scan.skipped["binary"] == 2
    assert scan.skipped["not_utf8"] == 1
    assert scan.skipped["too_large"] == 1
    assert scan.skipped["generated"] == 1
    assert scan.skipped["symlink"] == 1
    assert all(OUTSIDE_WORD not in f.text for f in scan.files.values())
    assert all(not os.path.isabs(p) and ".." not in p.split("/") for p in paths)


def test_walk_of_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_repository(tmp_path / "nope")
