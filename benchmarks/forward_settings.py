"""The replayed short forward under settings of cuBLAS and of our own launch shapes, one process each.

`encoder_throughput.py` measures the shipped defaults. This script asks what a setting changes: each
runs in a process of its own (cuBLAS reads its workspace size once per process), on the same random
base-shape weights and the same short variable batch, and reports:

- the model's GEMMs alone (the four products of each of the 22 layers, as `Ceiling` runs them),
  replayed from a CUDA graph: time per call, and, from one profiled eager call, the kernels cuBLAS
  picked and the memsets it launched before them;
- the whole forward replayed (`GraphedForward`, batches padded to multiples of 128 tokens and of
  32), its ceiling measured in the same process (`encoder_throughput.Ceiling`), and the ratio.

    PYTHONPATH=. python3 benchmarks/forward_settings.py --out benchmarks/results/forward_settings.json
    PYTHONPATH=. python3 benchmarks/forward_settings.py --settings default,cublaslt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

# name -> environment, torch.backends / tunable switches, and our launch-shape overrides
SETTINGS: dict[str, dict] = {
    "default": {},
    "workspace_128k": {"env": {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}},
    "workspace_none": {"env": {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}},
    "cublaslt": {"blas": "cublaslt"},
    "cublaslt_workspace_none": {"blas": "cublaslt", "env": {"CUBLASLT_WORKSPACE_SIZE": "0"}},
    "no_reduced_bf16": {"no_reduced_bf16": True},
    "tunable": {"tunable": True},
    "global_short_32": {"global_short": (32, 64, 4, 3)},
    "global_short_32_w2": {"global_short": (32, 64, 2, 3)},
}


def child(name: str, checkpoint: str, repeat: int) -> dict:
    import torch
    import torch.nn.functional as F

    from benchmarks.encoder_throughput import FULL, Ceiling, make_batch, measure_ceiling, time_call
    from mbert_retrieval import ModernBert
    from mbert_retrieval.modeling import global_attention
    from mbert_retrieval.modeling.cuda_graphs import GraphedForward, GraphShapes
    from mbert_retrieval.modeling.window_attention import Tiles

    setting = SETTINGS[name]
    if "blas" in setting:
        torch.backends.cuda.preferred_blas_library(setting["blas"])
    if setting.get("no_reduced_bf16"):
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    if setting.get("tunable"):
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        torch.cuda.tunable.set_max_tuning_duration(30)
        # results stay out of the working tree (torch 2.11 has no write_file_on_exit to turn it off)
        torch.cuda.tunable.set_filename(os.path.join(tempfile.mkdtemp(), "tunableop_results.csv"))
    if "global_short" in setting:
        global_attention.FORWARD_SHORT = Tiles(*setting["global_short"])

    device = torch.device("cuda")
    model = ModernBert.from_pretrained(checkpoint, dtype=torch.bfloat16, device=device).eval()
    config = model.config
    workload = FULL[0]  # short variable, drawn as encoder_throughput.py draws it
    lengths = workload.lengths(torch.Generator().manual_seed(1))
    packed, cu, _, _ = make_batch(lengths, config.vocab_size, device, torch.Generator().manual_seed(2))
    tokens, max_len = sum(lengths), max(lengths)
    result: dict = {"tokens": tokens, "setting": setting}

    ceiling = Ceiling(config, device, torch.bfloat16)
    inter = config.intermediate_size
    x = torch.randn(-(-tokens // 128) * 128, config.hidden_size, device=device, dtype=torch.bfloat16)

    # The model's four products per layer, each on an input of the model's shape and layout.
    attended = torch.randn_like(x)
    gated = torch.randn(x.shape[0], inter, device=device, dtype=torch.bfloat16)

    def gemms() -> torch.Tensor:
        h = x
        for w_qkv, w_o, w_i, w_mlp_o in ceiling.layers:
            F.linear(h, w_qkv)
            F.linear(F.linear(attended, w_o), w_i)
            h = F.linear(gated, w_mlp_o)
        return h

    with torch.inference_mode():
        for _ in range(3):
            gemms()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            gemms()
            torch.cuda.synchronize()
        kernels, memsets = Counter(), 0
        for event in prof.events():
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            if "memset" in event.name.lower():
                memsets += 1
            elif "elementwise" not in event.name and "copy" not in event.name.lower():
                kernels[event.name[:80]] += 1
        result["gemm_kernels"] = dict(kernels)
        result["gemm_memsets_per_call"] = memsets
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gemms()
        result["gemms_replayed_ms"] = 1e3 * time_call(graph.replay, device, 3, repeat)

        for multiple in (128, 32):
            graphed = GraphedForward(model, GraphShapes(tokens=multiple, token_offset=0))
            seconds = time_call(lambda g=graphed: g(packed, cu, max_len), device, 3, repeat)
            result[f"replayed_pad{multiple}_tok_s"] = tokens / seconds
        args = argparse.Namespace(repeat=repeat)
        times = measure_ceiling(ceiling, tokens, cu, max_len, device, args, train=False)
        result["ceiling_tok_s"] = tokens / times["varlen"]
        for multiple in (128, 32):
            result[f"ratio_pad{multiple}"] = result[f"replayed_pad{multiple}_tok_s"] / result["ceiling_tok_s"]
    if setting.get("tunable"):
        result["tunable_results"] = [list(map(str, row)) for row in torch.cuda.tunable.get_results()]
    return result


def save_checkpoint(directory: str) -> None:
    import torch
    from transformers import ModernBertModel

    from benchmarks.encoder_throughput import base_config

    torch.manual_seed(0)
    ModernBertModel(base_config(False)).save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/forward_settings.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.checkpoint, args.repeat)), flush=True)
        return
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; known: {list(SETTINGS)}")

    import torch

    from benchmarks.common import write_result

    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": "python3 " + " ".join(sys.argv),
        "settings": {},
    }
    with tempfile.TemporaryDirectory() as checkpoint:
        save_checkpoint(checkpoint)
        for name in args.settings.split(","):
            env = {**os.environ, **SETTINGS[name].get("env", {})}
            command = [sys.executable, __file__, "--child", name, "--checkpoint", checkpoint]
            command += ["--repeat", str(args.repeat)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                results["settings"][name] = {"error": done.stderr[-2000:]}
                print(f"{name}: failed\n{done.stderr[-2000:]}", flush=True)
            else:
                row = json.loads(lines[-1].removeprefix("RESULT "))
                results["settings"][name] = row
                print(
                    f"{name:26s} gemms {row['gemms_replayed_ms']:.3f} ms, memsets {row['gemm_memsets_per_call']:3d}; "
                    f"replayed {row['replayed_pad128_tok_s'] / 1e6:.3f} / {row['replayed_pad32_tok_s'] / 1e6:.3f} M tok/s "
                    f"(pad 128 / 32), ceiling {row['ceiling_tok_s'] / 1e6:.3f}, "
                    f"ratio {row['ratio_pad128']:.3f} / {row['ratio_pad32']:.3f}",
                    flush=True,
                )
            write_result(results, args.out)
    values = [r["ratio_pad128"] for r in results["settings"].values() if "ratio_pad128" in r]
    if values:
        print(
            f"ratio spread over settings: {min(values):.3f}-{max(values):.3f} (median {statistics.median(values):.3f})"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
