"""Correctness under load: 32 concurrent HTTP clients on loopback while the index is rebuilt and swapped.

Not a timing test: it asserts that every response is a well-formed 200 from one complete snapshot, and
prints the latency percentiles for information.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
from code_search_repo import make_repository

from mbert_retrieval.code.encoders import load_encoder
from mbert_retrieval.code.index import build_code_index
from mbert_retrieval.server import CodeSearchService, create_app, start_in_thread
from mbert_retrieval.server.app import SearchResponse

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLIENTS = 32
REQUESTS = 2048
MAX_REINDEXES = 4  # alternately incremental and full
QUERIES = [
    {"query": "decode a JSON document", "k": 10},
    {"query": "encode a python string as JSON", "k": 5, "language": "python"},
    {"query": "create a MIME image", "k": 8, "path": "email/mime/*"},
    {"query": "sort users by name", "k": 3, "language": "javascript"},
    {"query": "scanner", "k": 20, "mode": "bm25"},
    {"query": "make a JSON scanner", "k": 7, "mode": "dense"},
    {"query": "def __init__(self)", "k": 10, "path": "**/*.py"},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, hf_mlm_dir):
    tmp = tmp_path_factory.mktemp("load")
    repo = make_repository(tmp / "repo", ("json", "email/mime"))
    model = load_encoder(str(hf_mlm_dir))
    build_code_index(repo, tmp / "index", model, model_name="tiny", show_progress=False)
    service = CodeSearchService(tmp / "index", model, model_name="tiny")
    server = start_in_thread(create_app(service))
    yield repo, service, server.url
    server.stop()
    service.close()


async def run_clients(url: str, requests: list[dict]) -> list[tuple[float, int, str]]:
    """Send the requests over CLIENTS concurrent connections; (seconds, status, body) each."""
    queue: asyncio.Queue = asyncio.Queue()
    for body in requests:
        queue.put_nowait(body)
    results = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def worker():
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                response = await client.post("/search", json=body)
                results.append((time.perf_counter() - started, response.status_code, response.text, body))

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return results


def test_concurrent_searches_during_reindexes_all_succeed(served):
    repo, service, url = served
    stop = threading.Event()
    reindexes, reindex_errors = [], []
    target = repo / "json" / "decoder.py"
    original = target.read_text()

    def reindex_repeatedly():
        n = 0
        with httpx.Client(base_url=url, timeout=300) as client:
            while not stop.is_set() and n < MAX_REINDEXES:
                n += 1
                target.write_text(original + f"\n\ndef generation_{n}():\n    return {n}\n")
                response = client.post("/reindex", json={"wait": True, "full": n % 2 == 0})
                if response.status_code != 200 or response.json()["status"] != "completed":
                    reindex_errors.append(response.text)
                else:
                    reindexes.append(response.json()["snapshot"])
                stop.wait(0.5)

    requests = [QUERIES[i % len(QUERIES)] for i in range(REQUESTS)]
    reindexer = threading.Thread(target=reindex_repeatedly)
    started = time.perf_counter()
    reindexer.start()
    try:
        results = asyncio.run(run_clients(url, requests))
        # One more request while a reindex is certainly running is refused, not queued.
        while not service.state.running and reindexer.is_alive():
            time.sleep(0.01)
        conflict = httpx.post(f"{url}/reindex", json={}, timeout=60)
    finally:
        stop.set()
        reindexer.join()
        target.write_text(original)
    elapsed = time.perf_counter() - started

    assert len(results) == REQUESTS
    failures = [(status, text) for _, status, text, _ in results if status != 200]
    assert failures == []
    snapshots = set()
    for _, _, text, body in results:
        response = SearchResponse.model_validate_json(text)  # well formed, or this raises
        snapshots.add(response.snapshot)
        assert len(response.hits) <= body["k"]
        scores = [h.score for h in response.hits]
        assert scores == sorted(scores, reverse=True)
        for hit in response.hits:
            assert 1 <= hit.start_line <= hit.end_line and hit.snippet
            assert body.get("language") in (None, hit.language)
            if "path" in body and body["path"] == "email/mime/*":
                assert hit.path.startswith("email/mime/")
    assert reindex_errors == [] and len(reindexes) >= 1
    assert len(snapshots) >= 2, "no reindex finished while the clients were running"
    assert conflict.status_code in (409, 202)  # 202 only if the last reindex ended in between

    latencies = np.array([seconds for seconds, *_ in results]) * 1000
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    print(
        f"\n{REQUESTS} requests from {CLIENTS} clients in {elapsed:.1f}s ({REQUESTS / elapsed:.0f} req/s), "
        f"{len(reindexes)} reindexes, {len(snapshots)} snapshots served; latency ms: "
        f"p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}  max {latencies.max():.1f}"
    )
