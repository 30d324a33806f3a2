"""build-code-dataset beyond Python: Javadoc, JSDoc / TSDoc and Go doc comments, the files left out,
symbolic links out of the tree, and files too deeply nested to parse."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from mbert_retrieval.evaluation.code_dataset import DEFAULT_EXCLUDED_DIRS, build_code_dataset
from mbert_retrieval.evaluation.data import load_beir

JAVA = """\
package com.example;

/** A box holding one value. */
public class Box<T> {
    private T value;

    /**
     * Returns the {@code value} held in this box, as set by {@link Box#set(Object) set}.
     * <p>
     * A second paragraph that is not part of the query.
     *
     * @return the value
     */
    @Override
    public T get() {
        return value;
    }

    /** Stores a value &amp; replaces the <b>old</b> one, like {@link java.util.List#set}. */
    public void set(T value) { this.value = value; }

    /** Removing is not supported by boxes. */
    public void remove() {
        throw new UnsupportedOperationException("remove");
    }

    /** Subclasses decide how to seal. */
    abstract void seal();

    public int undocumented() { return 1; }

    /** Short doc. */
    public int tiny() { return 2; }

    static class Lid {
        /**
         * {@return whether the {@code lid} is open}
         */
        boolean isOpen() { return open; }
    }
}
"""

JAVASCRIPT = """\
/**
 * @license MIT
 */

/**
 * Splits `array` into chunks of `size`, see [the guide](https://example.com/chunk).
 *
 * @param {Array} array The array to split.
 * @returns {Array} The chunks.
 */
function chunk(array, size) {
  return split(array, size);
}

/** Adds two numbers together. */
export const add = (a, b) => a + b;

/**
 * @name addDays
 * @summary Add the given number of days to a date.
 * @description A longer description.
 */
export function addDays(date, days) {
  return new Date(date.getTime() + days * 864e5);
}

/** Does nothing at all. */
function noop() {}

;(function () {
  /** Maps every element of xs with fn. */
  function map(xs, fn) {
    return xs.map(fn);
  }
}.call(this));

const store = {
  /** Gets the value stored under key. */
  get: function (key) { return this.items[key]; },
};

/** Doubles the given number exactly. */
exports.double = function (x) { return x * 2; };

class Counter {
  /** Increments the counter by one. */
  inc() { this.n += 1; }
}

function undocumented() { return 0; }

/** Adds two numbers, curried. */
var addCurried = curry2(function add(a, b) {
  return a + b;
});

/** A module wrapper is not a function of its own. */
var lib = (function () {
  /** Returns the version of the library. */
  function version() { return "1.0"; }
  return { version: version };
})();
"""

TYPESCRIPT = """\
/**
 * Creates an observable from the given values.
 * @remarks Emits them in order.
 */
export function of<T>(...values: T[]): Observable<T> {
  return new Observable(values);
}

/** Overload signatures have no body. */
export function f(x: string): string;
export function f(x: any) { return x; }

export class Subject<T> {
  /** Pushes the value to every subscriber. */
  @logged
  next(value: T): void {
    this.observers.forEach((o) => o.next(value));
  }
}
"""

DECLARATIONS = """\
/** Formats a number as a currency string. */
declare function formatMoney(amount: number): string;
"""

GO = """\
// Package text has helpers.
package text

// Index returns the index of the first instance of substr in s, or -1 if
// substr is not present in s. See [Contains].
//
// Only the first paragraph is the query.
//
//go:noinline
func Index(s, substr string) int {
	return indexOf(s, substr)
}

// Read reads up to len(p) bytes into p.
func (r *Reader) Read(p []byte) (n int, err error) {
	return r.read(p)
}

// A comment separated from the func by a blank line.

func lonely() int { return 1 }

// Pending work is not written yet.
func pending() {
	panic("not implemented")
}

// Assembly implements this one elsewhere.
func fast(x int) int
"""

PYTHON = '''\
def area(width, height):
    """Compute the area of a rectangle."""
    return width * height
'''

EXPECTED = {
    "Box.java:Box.get": (
        "Returns the value held in this box, as set by set.",
        "@Override\npublic T get() {\n    return value;\n}",
    ),
    "Box.java:Box.set": (
        "Stores a value & replaces the old one, like java.util.List.set.",
        "public void set(T value) { this.value = value; }",
    ),
    "Box.java:Box.Lid.isOpen": ("Returns whether the lid is open", "boolean isOpen() { return open; }"),
    "web/util.js:chunk": (
        "Splits `array` into chunks of `size`, see the guide.",
        "function chunk(array, size) {\n  return split(array, size);\n}",
    ),
    "web/util.js:add": ("Adds two numbers together.", "export const add = (a, b) => a + b;"),
    "web/util.js:addDays": (
        "Add the given number of days to a date.",
        "export function addDays(date, days) {\n  return new Date(date.getTime() + days * 864e5);\n}",
    ),
    "web/util.js:map": (
        "Maps every element of xs with fn.",
        "function map(xs, fn) {\n  return xs.map(fn);\n}",
    ),
    "web/util.js:store.get": (
        "Gets the value stored under key.",
        "get: function (key) { return this.items[key]; }",
    ),
    "web/util.js:exports.double": (
        "Doubles the given number exactly.",
        "exports.double = function (x) { return x * 2; };",
    ),
    "web/util.js:Counter.inc": ("Increments the counter by one.", "inc() { this.n += 1; }"),
    "web/util.js:addCurried": (
        "Adds two numbers, curried.",
        "var addCurried = curry2(function add(a, b) {\n  return a + b;\n});",
    ),
    "web/util.js:version": ("Returns the version of the library.", 'function version() { return "1.0"; }'),
    "web/rx.ts:of": (
        "Creates an observable from the given values.",
        "export function of<T>(...values: T[]): Observable<T> {\n  return new Observable(values);\n}",
    ),
    "web/rx.ts:Subject.next": (
        "Pushes the value to every subscriber.",
        "@logged\nnext(value: T): void {\n  this.observers.forEach((o) => o.next(value));\n}",
    ),
    "text/index.go:Index": (
        "Index returns the index of the first instance of substr in s, or -1 if substr is not present in s. "
        "See Contains.",
        "func Index(s, substr string) int {\n\treturn indexOf(s, substr)\n}",
    ),
    "text/index.go:Reader.Read": (
        "Read reads up to len(p) bytes into p.",
        "func (r *Reader) Read(p []byte) (n int, err error) {\n\treturn r.read(p)\n}",
    ),
    "geometry.py:area": (
        "Compute the area of a rectangle.",
        "def area(width, height):\n    return width * height",
    ),
}
LANGUAGE_OF = {".java": "java", ".js": "javascript", ".ts": "typescript", ".go": "go", ".py": "python"}


def write_tree(root: Path) -> Path:
    files = {
        "Box.java": JAVA,
        "web/util.js": JAVASCRIPT,
        "web/rx.ts": TYPESCRIPT,
        "web/globals.d.ts": DECLARATIONS,
        "text/index.go": GO,
        "geometry.py": PYTHON,
        # left out: tests, vendored and minified code
        "src/test/java/BoxTest.java": "class BoxTest {\n  /** Checks the box holds its value. */\n"
        "  void holds() { check(); }\n}\n",
        "text/index_test.go": "package text\n\n// TestIndex checks Index on a few strings.\n"
        "func TestIndex(t *testing.T) { t.Log(1) }\n",
        "web/util.test.js": "/** Checks chunk splits evenly. */\nfunction testChunk() { return 1; }\n",
        "web/rx.spec.ts": "/** Checks of emits every value. */\nfunction specOf() { return 1; }\n",
        "web/__tests__/more.js": "/** Checks more things here. */\nfunction more() { return 1; }\n",
        "web/node_modules/dep/index.js": "/** A dependency's function is vendored. */\nfunction dep() { return 1; }\n",
        "vendor/lib/lib.go": "package lib\n\n// Vendored returns a vendored value.\nfunc Vendored() int { return 1 }\n",
        "web/util.min.js": "/** Minified code is left out. */\nfunction m(a){return a}\n",
        "web/wide.js": "/** A file with very long lines is left out. */\nfunction w() { return '"
        + "x" * 600
        + "'; }\n",
        "web/dist/bundle.js": "/** Bundled code is left out. */\nfunction b() { return 1; }\n"
        "//# sourceMappingURL=bundle.js.map\n",
        "text/tables.go": "// Code generated by maketables; DO NOT EDIT.\n\npackage text\n\n"
        "// Table returns the generated table.\nfunc Table() int { return 1 }\n",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def read_pairs(folder: Path) -> dict[str, tuple[str, str]]:
    pairs = {}
    for split in ("train", "dev", "test"):
        if not (folder / "qrels" / f"{split}.tsv").exists():
            continue
        data = load_beir(folder, split)
        for query_id, docs in data.qrels.items():
            (doc_id,) = docs
            pairs[doc_id] = (data.queries[query_id], data.corpus[doc_id]["text"])
    return pairs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("tree_sitter_language_pack")
    root = write_tree(tmp_path_factory.mktemp("tree") / "src")
    out = tmp_path_factory.mktemp("set") / "set"
    summary = build_code_dataset(root, out, test_fraction=0.3, dev_fraction=0.2, show_progress=False)
    return root, out, summary


def test_the_pairs_of_every_language(built):
    _, out, summary = built
    assert read_pairs(out) == EXPECTED
    assert summary.languages == {"java": 3, "javascript": 9, "typescript": 2, "go": 2, "python": 1}


def test_what_is_skipped_and_left_out(built):
    _, _, summary = built
    # Box.remove (throws UnsupportedOperationException), Box.seal (abstract), noop (empty body), the
    # overload signature f, pending (panics "not implemented"), fast (no body)
    assert summary.skipped["no code besides the docstring"] == 6
    assert summary.skipped["query shorter than min_query_words"] == 1  # Box.tiny
    assert summary.files_left_out == {
        "test file": 3,  # index_test.go, util.test.js, rx.spec.ts (src/test and __tests__ are test folders)
        "TypeScript declaration file": 1,
        "minified or generated": 4,  # util.min.js, wide.js, dist/bundle.js, tables.go
    }
    assert summary.files_skipped == 0


def test_language_in_the_metadata(built):
    _, out, _ = built
    corpus = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (out / "queries.jsonl").read_text().splitlines()]
    for record in corpus:
        suffix = Path(record["_id"].split(":")[0]).suffix
        assert record["metadata"] == {"language": LANGUAGE_OF[suffix]}
    assert {q["_id"]: q["metadata"]["language"] for q in queries} == {
        f"q:{r['_id']}": r["metadata"]["language"] for r in corpus
    }


def test_language_choice_declarations_and_an_evaluation_only_set(built, tmp_path):
    root, _, _ = built
    build_code_dataset(root, tmp_path / "ts", test_fraction=0.3, dev_fraction=0.2, show_progress=False)
    summary = build_code_dataset(
        root,
        tmp_path / "ts",
        languages=["typescript"],
        typescript_declarations=True,
        test_fraction=1,
        dev_fraction=0,
        show_progress=False,
    )
    assert summary.functions == {"train": 0, "dev": 0, "test": 3}
    assert sorted((tmp_path / "ts" / "qrels").iterdir()) == [tmp_path / "ts" / "qrels" / "test.tsv"]
    pairs = read_pairs(tmp_path / "ts")
    assert pairs["web/globals.d.ts:formatMoney"] == (
        "Formats a number as a currency string.",
        "declare function formatMoney(amount: number): string;",
    )
    assert set(pairs) == {"web/globals.d.ts:formatMoney", "web/rx.ts:of", "web/rx.ts:Subject.next"}


def test_folders_by_path(built, tmp_path):
    """A name leaves out that folder anywhere; a path with a slash only that folder under the root;
    include_dirs reads only the folders given."""
    root = tmp_path / "src"
    shutil.copytree(built[0], root)
    (root / "more" / "web").mkdir(parents=True)
    (root / "more" / "web" / "x.py").write_text('def x():\n    """Return the value of x."""\n    return 1\n')
    (root / "more" / "y.py").write_text('def y():\n    """Return the value of y."""\n    return 2\n')
    evaluation_only = dict(test_fraction=1, dev_fraction=0, show_progress=False)

    only = build_code_dataset(root, tmp_path / "a", include_dirs=["more/web", "text/"], **evaluation_only)
    assert set(read_pairs(tmp_path / "a")) == {
        "more/web/x.py:x",
        "text/index.go:Index",
        "text/index.go:Reader.Read",
    }
    assert only.files_left_out == {"test file": 1, "minified or generated": 1}

    build_code_dataset(root, tmp_path / "b", exclude_dirs=[*DEFAULT_EXCLUDED_DIRS, "web/"], **evaluation_only)
    by_path = set(read_pairs(tmp_path / "b"))
    assert by_path == {doc_id for doc_id in EXPECTED if not doc_id.startswith("web/")} | {
        "more/web/x.py:x",
        "more/y.py:y",
    }
    build_code_dataset(root, tmp_path / "c", exclude_dirs=[*DEFAULT_EXCLUDED_DIRS, "web"], **evaluation_only)
    assert set(read_pairs(tmp_path / "c")) == by_path - {"more/web/x.py:x"}


def test_symbolic_links_out_of_the_tree_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    (outside / "pkg").mkdir(parents=True)
    secret = '"""Secret."""\n\n\ndef secret_key():\n    """Return the secret key of the server."""\n    return "k"\n'
    (outside / "secret.py").write_text(secret)
    (outside / "pkg" / "hidden.py").write_text(secret.replace("secret_key", "hidden_key"))
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("a", "b", "c"):
        (tree / f"{name}.py").write_text(
            f'def {name}():\n    """Return the letter {name} here."""\n    return 1\n'
        )
    (tree / "inside.py").symlink_to(tree / "a.py")  # a link inside the tree is read
    (tree / "linked.py").symlink_to(outside / "secret.py")
    (tree / "linked_dir").symlink_to(outside / "pkg", target_is_directory=True)
    (tree / "loop").symlink_to(tree, target_is_directory=True)
    summary = build_code_dataset(tree, tmp_path / "out", show_progress=False)
    text = (tmp_path / "out" / "corpus.jsonl").read_text()
    assert "secret_key" not in text and "hidden_key" not in text
    assert summary.files_left_out == {"symbolic link out of the tree": 1}
    assert summary.files_read == 4  # a, b, c and the in-tree link to a (its copy is dropped as repeated)
    assert summary.skipped["repeated query or code"] == 1


def test_a_file_too_deeply_nested_is_skipped_and_counted(tmp_path, caplog):
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("a", "b", "c"):
        (tree / f"{name}.py").write_text(
            f'def {name}():\n    """Return the letter {name} here."""\n    return 1\n'
        )
    (tree / "deep.py").write_text(
        'def deep():\n    """A function with a huge expression."""\n    return '
        + "+".join(["1"] * 200_000)
        + "\n"
    )
    (tree / "parens.py").write_text("x = " + "(" * 200_000 + ")" * 200_000 + "\n")
    summary = build_code_dataset(tree, tmp_path / "out", show_progress=False)
    assert summary.files_read == 3
    assert summary.files_skipped == 2
    assert summary.file_problems == {"nested too deeply to parse": 1, "does not parse": 1}
    assert "deep.py: nested too deeply to parse" in caplog.text


@pytest.mark.parametrize("language", ["javascript", "go"])
def test_deep_nesting_in_other_languages(tmp_path, language):
    pytest.importorskip("tree_sitter_language_pack")
    tree = tmp_path / "tree"
    tree.mkdir()
    suffix, deep, documented = {
        "javascript": (
            ".js",
            "var x = " + "[" * 100_000 + "]" * 100_000 + ";\n",
            "/** Return the letter {0} here. */\nfunction {0}() {{ return 1; }}\n",
        ),
        "go": (
            ".go",
            "package p\n\nvar x = " + "(" * 100_000 + "1" + ")" * 100_000 + "\n",
            "package p\n\n// {0} returns the letter {0}.\nfunc {0}() int {{ return 1 }}\n",
        ),
    }[language]
    for name in ("a", "b", "c"):
        (tree / f"{name}{suffix}").write_text(documented.format(name))
    lines = [deep[i : i + 150] for i in range(0, len(deep), 150)]  # short lines: not taken as minified
    (tree / f"deep{suffix}").write_text("\n".join(lines))
    summary = build_code_dataset(tree, tmp_path / "out", languages=[language], show_progress=False)
    assert sum(summary.functions.values()) == 3
    assert summary.files_read == 4


def test_cli_languages_option(built, tmp_path):
    from typer.testing import CliRunner

    from mbert_retrieval.cli import app

    root, _, _ = built
    result = CliRunner().invoke(
        app,
        [
            "build-code-dataset",
            str(root),
            str(tmp_path / "out"),
            "--languages",
            "java,go,javascript",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert set(read_pairs(tmp_path / "out")) == {
        doc_id for doc_id in EXPECTED if Path(doc_id.split(":")[0]).suffix in (".java", ".go", ".js")
    }
    result = CliRunner().invoke(
        app, ["build-code-dataset", str(root), str(tmp_path / "x"), "--languages", "cobol"]
    )
    assert result.exit_code != 0 and "languages must be among" in result.output


def test_symlinked_root_is_read(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("a", "b", "c"):
        (tree / f"{name}.py").write_text(
            f'def {name}():\n    """Return the letter {name} here."""\n    return 1\n'
        )
    os.symlink(tree, tmp_path / "link")
    summary = build_code_dataset(tmp_path / "link", tmp_path / "out", show_progress=False)
    assert summary.files_read == 3 and not summary.files_left_out


def test_a_file_name_that_is_not_utf8_is_left_out(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("a", "b", "c"):
        (tree / f"{name}.py").write_text(
            f'def {name}():\n    """Return the letter {name} here."""\n    return 1\n'
        )
    with open(os.fsencode(tree) + b"/bad\xff.py", "w") as handle:
        handle.write('def bad():\n    """Return a value from a badly named file."""\n    return 1\n')
    summary = build_code_dataset(tree, tmp_path / "out", show_progress=False)
    assert summary.files_left_out == {"file name not valid UTF-8": 1}
    assert summary.files_read == 3
