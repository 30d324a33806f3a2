"""BEIR folders: strict reading, counted warnings, clear errors; named sets offline and from local copies."""

from __future__ import annotations

import json

import pytest
from mbert_retrieval.evaluation import public
from mbert_retrieval.evaluation.data import DataFormatError, load_beir, save_beir
from mbert_retrieval.evaluation.public import (
    DatasetUnavailable,
    load_mldr,
    load_mldr_training,
    load_named_dataset,
    resolve_dataset,
)

CORPUS = {
    "d1": {"title": "Sorting", "text": "sorted(xs) returns a new sorted list"},
    "d2": {"title": "", "text": "list.sort() sorts in place"},
    "d3": {"title": "Files", "text": "open(path) returns a file object"},
}
QUERIES = {"q1": "how to sort a list", "q2": "open a file", "q3": "unjudged query"}
QRELS = {"test": {"q1": {"d1": 1, "d2": 1}, "q2": {"d3": 2}}, "train": {"q3": {"d2": 1}}}


@pytest.fixture
def folder(tmp_path):
    return save_beir(tmp_path / "set", CORPUS, QUERIES, QRELS)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")


def test_round_trip(folder):
    data = load_beir(folder, "test")
    assert data.corpus == CORPUS
    assert data.queries == {"q1": QUERIES["q1"], "q2": QUERIES["q2"]}  # only judged queries
    assert data.qrels == QRELS["test"]
    assert not data.problems
    assert data.document_texts(["d1", "d2"]) == [
        "Sorting sorted(xs) returns a new sorted list",
        CORPUS["d2"]["text"],
    ]
    assert load_beir(folder, "train").qrels == QRELS["train"]


def test_malformed_jsonl_reports_line_numbers(folder):
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    write_lines(folder / "corpus.jsonl", [lines[0], "", "{not json", lines[1], '["a list"]', '{"_id": "d9"}'])
    with pytest.raises(DataFormatError) as err:
        load_beir(folder)
    message = str(err.value)
    assert "corpus.jsonl" in message
    assert "line 3: not valid JSON" in message
    assert "line 5: expected a JSON object" in message
    assert "2 malformed line(s)" in message  # line 6 (no text) is reported once the JSON is fixed
    write_lines(folder / "corpus.jsonl", [lines[0], '{"_id": "d9"}', '{"text": "no id"}'])
    with pytest.raises(
        DataFormatError, match=r"line 2: 'text' and 'title' must be strings[\s\S]*line 3: missing '_id'"
    ):
        load_beir(folder)


def test_duplicate_ids_are_counted_and_the_first_kept(folder):
    with (folder / "corpus.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "d1", "text": "a second d1"}) + "\n")
        f.write(json.dumps({"_id": "d2", "text": "a second d2"}) + "\n")
    with (folder / "queries.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "q1", "text": "again"}) + "\n")
    with (folder / "qrels" / "test.tsv").open("a") as f:
        f.write("q1\td1\t1\n")
    data = load_beir(folder)
    assert data.corpus["d1"] == CORPUS["d1"]
    assert data.queries["q1"] == QUERIES["q1"]
    assert data.problems["duplicate document ids (later copies ignored)"] == 2
    assert data.problems["duplicate query ids (later copies ignored)"] == 1
    assert data.problems["duplicate qrels rows (later copies ignored)"] == 1


def test_qrels_naming_unknown_ids_are_counted_and_dropped(folder, caplog):
    with (folder / "qrels" / "test.tsv").open("a") as f:
        f.write("q1\tnope\t1\nq1\tnope2\t1\nghost\td1\t1\nq2\td1\t0\n")
    with caplog.at_level("WARNING"):
        data = load_beir(folder)
    assert data.problems["qrels rows naming unknown documents (ignored)"] == 2
    assert data.problems["qrels rows naming unknown queries (ignored)"] == 1
    assert data.qrels == {"q1": {"d1": 1, "d2": 1}, "q2": {"d3": 2, "d1": 0}}
    assert "2 qrels rows naming unknown documents" in caplog.text


def test_qrels_errors_name_the_line(folder):
    write_lines(
        folder / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q1\td2", "q2\td3\thigh"]
    )
    with pytest.raises(
        DataFormatError, match=r"line 3: expected 3 tab-separated columns[\s\S]*line 4: score 'high'"
    ):
        load_beir(folder)


def test_empty_corpus_is_an_error(folder):
    (folder / "corpus.jsonl").write_text("\n\n")
    with pytest.raises(DataFormatError, match="corpus is empty"):
        load_beir(folder)


def test_missing_pieces_name_the_layout(folder, tmp_path):
    with pytest.raises(DataFormatError, match="no such folder.*corpus.jsonl"):
        load_beir(tmp_path / "absent")
    with pytest.raises(DataFormatError, match=r"dev.tsv is missing \(splits available: test, train\)"):
        load_beir(folder, "dev")
    (folder / "queries.jsonl").unlink()
    with pytest.raises(DataFormatError, match="queries.jsonl is missing"):
        load_beir(folder)


def test_no_usable_qrels_is_an_error(folder):
    write_lines(folder / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "zz\td1\t1"])
    with pytest.raises(DataFormatError, match="no qrels row names a known query"):
        load_beir(folder)


# ----------------------------------------------------------------------------------------- named sets


def test_public_beir_offline_names_the_folder(tmp_path, monkeypatch):
    from beir import util

    def offline(url, out_dir, chunk_size=1024):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(util, "download_and_unzip", offline)
    with pytest.raises(DatasetUnavailable) as err:
        load_named_dataset("beir:scifact", cache_dir=tmp_path)
    assert str(tmp_path / "scifact") in str(err.value)
    assert "corpus.jsonl" in str(err.value) and "qrels/<split>.tsv" in str(err.value)


def test_public_beir_uses_a_local_copy_without_network(tmp_path, monkeypatch):
    from beir import util

    monkeypatch.setattr(util, "download_and_unzip", lambda *a, **k: pytest.fail("must not download"))
    save_beir(tmp_path / "scifact", CORPUS, QUERIES, QRELS)
    data = load_named_dataset("beir:scifact", cache_dir=tmp_path)
    assert data.name == "scifact" and data.qrels == QRELS["test"]


def test_hub_sets_offline_name_the_folder(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for spec, folder in [
        ("coir:cosqa", "cosqa"),
        ("codesearchnet:go", "codesearchnet-go"),
        ("mldr", "mldr-en"),
    ]:
        with pytest.raises(DatasetUnavailable, match="Offline, provide it at") as err:
            load_named_dataset(spec, cache_dir=tmp_path)
        assert str(tmp_path / folder) in str(err.value)
    with pytest.raises(DataFormatError, match="unknown code retrieval set"):
        load_named_dataset("coir:nope", cache_dir=tmp_path)
    with pytest.raises(DataFormatError, match="unknown data set"):
        load_named_dataset("imaginary:set", cache_dir=tmp_path)


def test_hub_set_converted_from_the_coir_layout(tmp_path, monkeypatch):
    """The CoIR rows (corpus / queries / qrels configs) become a cached BEIR folder."""
    import datasets

    configs = {
        "python-corpus": {
            "corpus": [{"_id": i, "title": d["title"], "text": d["text"]} for i, d in CORPUS.items()]
        },
        "python-queries": {"queries": [{"_id": i, "text": t} for i, t in QUERIES.items()]},
        "python-qrels": {
            split: [
                {"query-id": q, "corpus-id": d, "score": s}
                for q, docs in qrels.items()
                for d, s in docs.items()
            ]
            for split, qrels in QRELS.items()
        },
    }
    calls = []

    def fake_load(hub_id, config):
        calls.append((hub_id, config))
        return configs[config]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_named_dataset("codesearchnet:python", cache_dir=tmp_path)
    assert calls[0][0] == "CoIR-Retrieval/CodeSearchNet"
    assert data.corpus == CORPUS and data.qrels == QRELS["test"]
    assert (tmp_path / "codesearchnet-python" / "qrels" / "train.tsv").exists()
    calls.clear()
    again = load_named_dataset("csn:python", cache_dir=tmp_path)  # from the cache: no hub call
    assert not calls and again.qrels == data.qrels


def test_mldr_local_folder_in_mldr_format(tmp_path):
    folder = tmp_path / "mldr"
    folder.mkdir()
    write_lines(
        folder / "corpus.jsonl", [json.dumps({"docid": i, "text": d["text"]}) for i, d in CORPUS.items()]
    )
    rows = [
        {
            "query_id": "q1",
            "query": "sort",
            "positive_passages": [{"docid": "d1", "text": "x"}],
            "negative_passages": [],
        },
        {
            "query_id": "q2",
            "query": "file",
            "positive_passages": [{"docid": "d3", "text": "open(path)"}],
            "negative_passages": [{"docid": "d1", "text": "sorted"}],
        },
    ]
    write_lines(folder / "test.jsonl", [json.dumps(r) for r in rows])
    write_lines(folder / "train.jsonl", [json.dumps(r) for r in rows])
    data = load_mldr(folder, split="test")
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d3": 1}}
    assert len(data.corpus) == 3
    training = load_mldr_training(folder)
    assert training[1] == {"query": "file", "positive": ["open(path)"], "negatives": ["sorted"]}
    with pytest.raises(DataFormatError, match="dev.jsonl"):
        load_mldr(folder, split="dev")


def test_resolve_dataset(folder, tmp_path):
    assert resolve_dataset(folder).qrels == QRELS["test"]
    with pytest.raises(DataFormatError, match="no such folder"):
        resolve_dataset(tmp_path / "nothing")
    assert public.CODE_ALIASES["stackqa"] == "stackoverflow-qa"
