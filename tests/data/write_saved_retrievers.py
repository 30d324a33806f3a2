"""Writes tests/data/saved_retrievers/: one folder per first stage, as `Retriever.save` wrote them
in format version 1 (before the indexes shared one protocol), and the hits each gave.

Run once from the repository root, on the version whose format the folders keep:
    PYTHONPATH=.:tests python tests/data/write_saved_retrievers.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hashing_models import HashingColBERT, HashingEncoder

from mbert_retrieval.search.retriever import Retriever

HERE = Path(__file__).parent / "saved_retrievers"
DOCUMENTS = {
    "sort": "sort a list of numbers in place",
    "parse": "parse a json string into a dict",
    "read": "read a text file line by line",
    "join": "join paths of the file system",
    "merge": "merge two sorted lists into one list",
    "http": "send an http request and read the reply",
    "hash": "hash a string with sha256",
    "zip": "zip two lists into pairs",
    "split": "split a string on white space",
    "date": "parse a date string in iso format",
    "sum": "sum the numbers of a list",
    "copy": "copy a file to another folder",
}
QUERIES = ["sort numbers", "parse a string", "read a file", "lists"]


def retrievers() -> dict[str, Retriever]:
    return {
        "bm25": Retriever(index="bm25"),
        "dense_hybrid": Retriever(HashingEncoder(), "flat", hybrid=True, model_name="hashing-dense"),
        "colbert_flat": Retriever(HashingColBERT(), "flat", model_name="hashing-colbert"),
        "colbert_plaid": Retriever(HashingColBERT(), "plaid", model_name="hashing-colbert"),
    }


def main() -> None:
    shutil.rmtree(HERE, ignore_errors=True)
    expected = {}
    for name, retriever in retrievers().items():
        retriever.add(list(DOCUMENTS), list(DOCUMENTS.values()))
        retriever.save(HERE / name)
        hits = retriever.search(QUERIES, k=5)
        expected[name] = [[[h.id, h.score] for h in row] for row in hits]
    (HERE / "expected_hits.json").write_text(json.dumps({"queries": QUERIES, "hits": expected}, indent=1))


if __name__ == "__main__":
    main()
