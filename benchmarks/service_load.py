"""Code search service under load: 32 concurrent clients, steady and while the index is rebuilt.

A copy of a few standard-library packages is indexed with the shipped model, `mbert-retrieval serve`
is started on 127.0.0.1 (a random free port, a random token) and 32 clients send searches back to
back: first for `--duration` seconds with nothing else running, then for `--duration` seconds while
full reindexes run (a new one starts whenever the last one ends). Each phase reports requests per
second, p50 / p99 latency and the count of failed requests; a reindex should not slow searches by
more than 2x at p99. Everything is bounded: the clients stop at the end of each phase, the server
and its temp folder are removed at the end, and a reindex still running then gets `--reindex-timeout`
seconds to finish before the run stops without it.

    PYTHONPATH=. python benchmarks/service_load.py                                # 2 x 60 s
    PYTHONPATH=. python benchmarks/service_load.py --duration 10 --clients 8      # smoke run

Results: `results/service_load.json`; `results/service_load_before.json` is the same run on the code
that encoded in the server process (p99 15.9 s during a reindex against 2.8 s steady).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import markdown_table, write_result

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PACKAGES = ("json", "http", "concurrent")
QUERIES = [
    {"query": "decode a JSON document", "k": 10},
    {"query": "parse the headers of an HTTP response", "k": 10},
    {"query": "submit a callable to a thread pool", "k": 5, "language": "python"},
    {"query": "send a cookie with the request", "k": 8, "path": "http/*"},
    {"query": "encoder", "k": 20, "mode": "bm25"},
    {"query": "wait for the futures to complete", "k": 7, "mode": "dense"},
    {"query": "def __init__(self)", "k": 10, "path": "**/*.py"},
    {"query": "x", "k": 5},
]
REQUEST_TIMEOUT_S = 120.0
SERVER_START_TIMEOUT_S = 300.0


@dataclass
class Phase:
    """Latencies (seconds) of the requests that answered 200, and the count of those that did not."""

    started: float = 0.0
    ended: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict:
        ms = np.asarray(self.latencies) * 1000 if self.latencies else np.zeros(1)
        seconds = self.ended - self.started
        return {
            "rps": round(len(self.latencies) / seconds, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "errors": self.errors,
            "requests": len(self.latencies) + self.errors,
            "max_ms": round(float(ms.max()), 1),
            "seconds": round(seconds, 1),
        }


# -------------------------------------------------------------------------------------------- clients


async def run_clients(client: httpx.AsyncClient, clients: int, duration: float) -> Phase:
    """`clients` closed-loop clients, each sending its next search as soon as the last one answered."""
    phase = Phase(started=time.perf_counter())
    deadline = phase.started + duration

    async def one_client(number: int):
        sent = number
        while time.perf_counter() < deadline:
            body = QUERIES[sent % len(QUERIES)]
            sent += clients
            started = time.perf_counter()
            try:
                response = await client.post("/search", json=body)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                phase.latencies.append(time.perf_counter() - started)
            else:
                phase.errors += 1

    await asyncio.gather(*(one_client(n) for n in range(clients)))
    phase.ended = time.perf_counter()
    return phase


async def health(client: httpx.AsyncClient) -> dict:
    response = await client.get("/health")
    response.raise_for_status()
    return response.json()


async def start_reindex(client: httpx.AsyncClient) -> None:
    response = await client.post("/reindex", json={"full": True})
    if response.status_code not in (202, 409):  # 409: the previous one is still running
        raise RuntimeError(f"/reindex answered {response.status_code}: {response.text}")


async def keep_reindexing(client: httpx.AsyncClient, stop: asyncio.Event, log: dict) -> None:
    """Start a full reindex whenever none is running, until `stop`; note how long one was running."""
    last = time.perf_counter()
    while not stop.is_set():
        state = await health(client)
        now = time.perf_counter()
        if state["reindexing"]:
            log["running_s"] += now - last
        else:
            await start_reindex(client)
            log["started"] += 1
        log["completed"] = state["reindexes_completed"]
        log["last_error"] = state["last_reindex_error"]
        last = now
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.25)
        except asyncio.TimeoutError:
            pass


async def measure(url: str, token: str, clients: int, duration: float, reindex_timeout: float) -> dict:
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_S
    ) as client:
        await run_clients(client, clients, min(5.0, duration))  # warm-up, not counted
        steady = await run_clients(client, clients, duration)

        log = {"started": 0, "completed": 0, "running_s": 0.0, "last_error": None}
        completed_before = (await health(client))["reindexes_completed"]
        stop = asyncio.Event()
        reindexing = asyncio.create_task(keep_reindexing(client, stop, log))
        while log["started"] == 0:
            await asyncio.sleep(0.05)
        during = await run_clients(client, clients, duration)
        stop.set()
        await reindexing

        waited = time.perf_counter()
        while (await health(client))["reindexing"] and time.perf_counter() - waited < reindex_timeout:
            await asyncio.sleep(0.5)
        final = await health(client)
    return {
        "steady": steady.summary(),
        "during_reindex": {
            **during.summary(),
            "reindexes_started": log["started"],
            "reindexes_completed": final["reindexes_completed"] - completed_before,
            "reindex_running_share": round(log["running_s"] / (during.ended - during.started), 3),
            "reindex_error": final["last_reindex_error"],
            "reindex_finished_after_the_phase_s": None
            if final["reindexing"]
            else round(time.perf_counter() - waited, 1),
        },
    }


# ------------------------------------------------------------------------------------------ the server


def make_repository(root: Path, packages: list[str]) -> Path:
    for package in packages:
        shutil.copytree(STDLIB / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: Path, port: int, token: str, threads: int | None, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "mbert_retrieval.cli", "serve", "--index", str(index)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    if threads is not None:
        command += ["--threads", str(threads)]
    env = {**os.environ, "MBERT_RETRIEVAL_TOKEN": token}
    with open(log, "wb") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"the server did not answer within {SERVER_START_TIMEOUT_S:.0f}s")
        time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# ------------------------------------------------------------------------------------------------ main


def table(result: dict) -> str:
    header = ["phase", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors"]
    keys = ["requests", "rps", "p50_ms", "p99_ms", "max_ms", "errors"]
    phases = ("steady", "during_reindex")
    return "\n".join(markdown_table(header, [[phase, *(result[phase][k] for k in keys)] for phase in phases]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds per phase")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--packages", nargs="+", default=list(PACKAGES), help="Stdlib packages to index")
    parser.add_argument("--threads", type=int, default=None, help="The server's --threads (default: torch's)")
    parser.add_argument("--reindex-timeout", type=float, default=600.0, help="Seconds to wait at the end")
    parser.add_argument("--note", default="", help="Free text stored with the result (e.g. machine load)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/service_load.json"))
    args = parser.parse_args()

    from mbert_retrieval.code.encoders import load_encoder
    from mbert_retrieval.code.index import build_code_index

    with tempfile.TemporaryDirectory(prefix="service-load-") as tmp:
        tmp = Path(tmp)
        repo = make_repository(tmp / "repo", args.packages)
        started = time.perf_counter()
        report = build_code_index(
            repo, tmp / "index", load_encoder(None), model_name="default", show_progress=False
        )
        build_seconds = time.perf_counter() - started
        print(f"index: {report.summary()}")
        token, port = secrets.token_urlsafe(16), free_port()
        load_before = os.getloadavg()
        server = start_server(tmp / "index", port, token, args.threads, tmp / "server.log")
        try:
            result = asyncio.run(
                measure(f"http://127.0.0.1:{port}", token, args.clients, args.duration, args.reindex_timeout)
            )
        finally:
            stop_server(server)
        print((tmp / "server.log").read_text()[-2000:])

    result["p99_ratio_during_reindex_vs_steady"] = round(
        result["during_reindex"]["p99_ms"] / result["steady"]["p99_ms"], 2
    )
    result["setup"] = {
        "packages": args.packages,
        "files": report.files,
        "chunks": report.chunks,
        "initial_build_s": round(build_seconds, 1),
        "model": "shipped default model",
        "clients": args.clients,
        "duration_s_per_phase": args.duration,
        "server_threads": args.threads or "torch default",
        "queries": QUERIES,
    }
    result["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": args.note,
    }
    result["command"] = shlex.join(["python", *sys.argv])
    print("\n" + table(result))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
