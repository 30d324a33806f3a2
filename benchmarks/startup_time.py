"""Start-up time: `import mbert_retrieval`, `mbert-retrieval --help` and `mbert-retrieval search --help`,
each in a fresh interpreter, against a bare `python -c pass` and `import torch` measured in the same run.

Each command runs `--repeats` times after one unmeasured run (which warms the file cache); the table
shows the median wall time, and the JSON every time. The target is under 1 s for the first two.

    PYTHONPATH=. python3 benchmarks/startup_time.py     # -> benchmarks/results/startup_time.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import write_result

ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 1.0


def cli(*arguments: str) -> list[str]:
    """The installed console script when there is one (what users run), else the module."""
    script = shutil.which("mbert-retrieval")
    if script:
        return [script, *arguments]
    return [sys.executable, "-c", "from mbert_retrieval.cli import app; app()", *arguments]


COMMANDS = {
    "python_bare": [sys.executable, "-c", "pass"],
    "import_mbert_retrieval": [sys.executable, "-c", "import mbert_retrieval"],
    "cli_help": cli("--help"),
    "cli_search_help": cli("search", "--help"),
    "import_torch": [sys.executable, "-c", "import torch"],  # what a lazy start-up avoids
}
TARGETS = ("import_mbert_retrieval", "cli_help")


def wall_seconds(command: list[str]) -> float:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/startup_time.json")
    args = parser.parse_args()

    times = {}
    for name, command in COMMANDS.items():
        wall_seconds(command)  # warm the file cache
        times[name] = [round(wall_seconds(command), 3) for _ in range(args.repeats)]
    medians = {name: round(statistics.median(values), 3) for name, values in times.items()}
    result = {
        "device": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "command": "PYTHONPATH=. python3 benchmarks/startup_time.py " + " ".join(sys.argv[1:]),
        "median_seconds": medians,
        "seconds": times,
        "target_seconds": TARGET_SECONDS,
        "met": {name: medians[name] < TARGET_SECONDS for name in TARGETS},
        "load_average": os.getloadavg()[0],
    }
    write_result(result, Path(args.out))
    print("| command | median s | runs |")
    print("| --- | --- | --- |")
    for name, values in times.items():
        print(f"| {name} | {medians[name]:.3f} | {len(values)} |")
    print(", ".join(f"{name} < {TARGET_SECONDS} s: {met}" for name, met in result["met"].items()))


if __name__ == "__main__":
    main()
