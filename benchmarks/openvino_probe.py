"""Would OpenVINO run the CPU path faster than onnxruntime? The shipped model's padded graph (the one
`export-onnx` writes) through onnxruntime (float32, and int8 linear layers as shipped) and through
OpenVINO (float32; int8 weights only; int8 weights and activations calibrated by NNCF on other
functions), on one thread, in one run.

Measure: documents per CPU-second (`time.process_time`, the systems taking turns, median of the
repeats) on real Python functions cut into runs of similar length, as the ONNX backend cuts them,
for several run sizes; and each system's lowest cosine to onnxruntime float32. CPU seconds, not
wall time, because a shared machine moves wall-clock figures far more (benchmarks/NOTES.md).

Needs the `onnx` extra, and `pip install openvino nncf` (not dependencies of the project):

    PYTHONPATH=. python3 benchmarks/openvino_probe.py --out benchmarks/results/openvino_probe.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cpu_name, write_result
from benchmarks.encode_throughput import python_functions
from mbert_retrieval.models import onnx_backend
from mbert_retrieval.models.dense import DenseRetriever


def padded_runs(
    model: DenseRetriever, texts: list[str], run_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) batches: longest first, cut where padding would pass the ONNX backend's slack."""
    sequences = model.tokenize(texts)
    lengths = np.array([len(s) for s in sequences])
    order = np.argsort(-lengths, kind="stable")
    pad_id = model.encoder.config.pad_token_id
    return [
        onnx_backend.pad_numpy([sequences[r] for r in order[first : min(first + run_size, end)]], pad_id)
        for start, end in onnx_backend.similar_length_runs(lengths[order])
        for first in range(start, end, run_size)
    ]


def onnxruntime_systems(model: DenseRetriever, scratch: Path) -> dict:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    systems = {}
    for name, quantize in (("onnxruntime_fp32", False), ("onnxruntime_int8", True)):
        path = onnx_backend.export_onnx(model, scratch / f"{name}.onnx", quantize=quantize)
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        systems[name] = lambda batch, s=session: s.run(None, dict(zip(onnx_backend.INPUT_NAMES, batch)))[0]
    return systems


def openvino_systems(model: DenseRetriever, example, calibration) -> dict:
    import nncf
    import openvino

    core = openvino.Core()
    graph = onnx_backend.PaddedDenseGraph(model).eval()
    with torch.no_grad():
        converted = openvino.convert_model(
            graph,
            example_input=tuple(torch.from_numpy(a) for a in example),
            input=[openvino.PartialShape([-1, -1])] * 2,
        )
    variants = {
        "openvino_fp32": converted,
        "openvino_int8_weights": nncf.compress_weights(converted.clone()),
        "openvino_int8": nncf.quantize(
            converted.clone(),
            nncf.Dataset(calibration, lambda batch: list(batch)),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration),
        ),
    }
    config = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}
    systems = {}
    for name, variant in variants.items():
        compiled = core.compile_model(variant, "CPU", config)
        systems[name] = lambda batch, c=compiled: c(list(batch))[0]
    return systems


def docs_per_cpu_second(run, batches, documents: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.process_time()
        for batch in batches:
            run(batch)
        rates.append(documents / (time.process_time() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/openvino_probe.json"))
    parser.add_argument("--texts", type=int, default=150)
    parser.add_argument("--calibration-texts", type=int, default=300)
    parser.add_argument("--run-sizes", default="4,8,16,32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    model = DenseRetriever.from_pretrained(None, device="cpu", dtype=torch.float32).eval()
    texts = python_functions(args.texts, seed=1)
    calibration = padded_runs(model, python_functions(args.calibration_texts, seed=7), 8)
    batches = {size: padded_runs(model, texts, size) for size in map(int, args.run_sizes.split(","))}
    with tempfile.TemporaryDirectory() as scratch:
        systems = onnxruntime_systems(model, Path(scratch))
        systems.update(openvino_systems(model, batches[8][0], calibration))
        reference = np.concatenate([systems["onnxruntime_fp32"](b) for b in batches[8]])
        rows = {}
        for name, run in systems.items():
            out = np.concatenate([run(b) for b in batches[8]])
            cosine = (
                (out * reference).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1)
            )
            rows[name] = {"min_cosine_to_onnxruntime_fp32": float(cosine.min())}
        for size, runs in batches.items():  # systems take turns within each run size
            for name, run in systems.items():
                rows[name][f"docs_per_cpu_s_run_{size}"] = docs_per_cpu_second(
                    run, runs, len(texts), args.repeats
                )
    import openvino

    result = {
        "command": "python3 " + " ".join(sys.argv),
        "cpu": cpu_name(),
        "threads": 1,
        "texts": len(texts),
        "openvino": openvino.__version__,
        "systems": rows,
    }
    write_result(result, args.out)
    sizes = list(batches)
    print(f"\n{'system':24s} {'min cos':>8s} " + " ".join(f"{'run ' + str(s):>8s}" for s in sizes))
    for name, row in rows.items():
        rates = " ".join(f"{row[f'docs_per_cpu_s_run_{s}']:8.1f}" for s in sizes)
        print(f"{name:24s} {row['min_cosine_to_onnxruntime_fp32']:8.4f} {rates}")


if __name__ == "__main__":
    main()
