"""Encoder throughput: our unpadded ModernBERT against `transformers` (sdpa) on the same batches.

Base shape, random weights (made by `transformers`, saved, and loaded by both), bf16 on CUDA.
Workloads count real tokens only. Prints a table and writes JSON:

    PYTHONPATH=. python3 benchmarks/encoder_throughput.py --out benchmarks/results/encoder_throughput.json
    PYTHONPATH=. python3 benchmarks/encoder_throughput.py --small     # CPU smoke run, tiny shapes

`--train` adds a forward + backward comparison (tokens/s, peak memory) and the largest batch of
8192-token sequences each implementation can train on (`--no-max-batch` leaves that search out).

Each workload also gets its ceiling, timed in the same run: the same shapes through the model's
GEMMs alone (cuBLAS, bf16: Wqkv, Wo, Wi, Wo per layer) and the attention kernel of each layer
(global or sliding window, as the model has them), with nothing in between: `ceiling_tok_s` with
varlen_attn (FlashAttention) in every layer, `ceiling_ours_attention_tok_s` with the attention
backend the model runs; `ours_over_ceiling` is ours / ceiling_tok_s. For training the same
GEMMs forward and backward (dX and dW) and the attention's forward and backward.

Two timings of everything: `*_tok_s` waits for each call to finish before the next (median per
call, as in every earlier run), `*_back_to_back_tok_s` launches `--repeat` calls one after the other
and waits once, as a training loop or a batch-encoding loop runs them (the host prepares the next
call while the GPU runs the last; the median of three such runs since run 33);
`ours_over_ceiling_back_to_back` compares those.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import cpu_name, write_result
from mbert_retrieval import ModernBert
from mbert_retrieval.modeling.cuda_graphs import GraphedForward
from mbert_retrieval.modeling.encoder import positions_from_cu_seqlens

H100_BF16_DENSE_FLOPS = 989.4e12  # the datasheet's dense bf16 peak, the usual MFU denominator


@dataclass
class Workload:
    name: str
    batch: int
    max_len: int
    mean: float | None = None  # None: every sequence is max_len long
    std: float | None = None

    def lengths(self, generator: torch.Generator) -> list[int]:
        if self.mean is None:
            return [self.max_len] * self.batch
        draws = torch.randn(self.batch, generator=generator) * self.std + self.mean
        return draws.round().clamp(16, self.max_len).int().tolist()


FULL = [
    Workload("short_variable", 64, 512, 256, 64),
    Workload("short_fixed", 64, 512),
    Workload("long_variable", 8, 8192, 4096, 1024),
    Workload("long_fixed", 8, 8192),
]
SMALL = [
    Workload("short_variable", 8, 128, 64, 16),
    Workload("short_fixed", 8, 128),
    Workload("long_variable", 2, 512, 256, 64),
    Workload("long_fixed", 2, 512),
]


def base_config(small: bool):
    from transformers import ModernBertConfig

    if small:
        return ModernBertConfig(
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=2,
            vocab_size=50368,
            max_position_embeddings=1024,
            local_attention=32,
        )
    return ModernBertConfig()  # ModernBERT-base: 22 layers, 768 hidden, 12 heads, GeGLU 1152


def forward_flops(config, lengths: list[int]) -> float:
    """Matrix-multiply FLOPs of one forward: 2 * params per token in the GEMMs, plus attention."""
    h, inter = config.hidden_size, config.intermediate_size
    gemm_params = h * 3 * h + h * h + h * 2 * inter + inter * h
    tokens = sum(lengths)
    flops = 2 * gemm_params * tokens * config.num_hidden_layers
    window = config.local_attention + 1
    for layer_type in config.layer_types:
        for n in lengths:
            keys = n if layer_type == "full_attention" else min(n, window)
            flops += 4 * n * keys * h  # QK^T and PV
    return flops


def time_call(fn, device: torch.device, warmup: int, repeat: int) -> float:
    """Median seconds per call; CUDA events on the GPU, a host clock with syncs elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_back_to_back(fn, device: torch.device, repeat: int, windows: int = 3) -> float:
    """Seconds per call over `repeat` calls launched one after the other, with no wait between
    them: what a loop of steps or encoding batches runs at, where the host prepares the next call
    while the GPU runs the last. `time_call` waits for each call, so it also counts the time until
    the GPU receives a call's first kernels. The median of `windows` such runs: one pause of the
    host (a garbage collection, an allocation from the driver) moves a single run's mean."""
    means = []
    for _ in range(windows):
        if device.type != "cuda":
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            means.append((time.perf_counter() - start) / repeat)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        end.synchronize()
        means.append(start.elapsed_time(end) / 1e3 / repeat)
    return statistics.median(means)


def make_batch(lengths: list[int], vocab: int, device: torch.device, generator: torch.Generator):
    """The same texts twice: packed (ours) and padded (transformers)."""
    seqs = [torch.randint(5, vocab, (n,), generator=generator) for n in lengths]
    packed = torch.cat(seqs).to(device)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to(device)
    padded = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, seq in enumerate(seqs):
        padded[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return packed, cu, padded.to(device), mask.to(device)


def build_models(small: bool, device: torch.device, dtype: torch.dtype, attn_backend: str):
    from transformers import ModernBertModel

    torch.manual_seed(0)
    config = base_config(small)
    hf = ModernBertModel(config)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = ModernBert.from_pretrained(tmp, dtype=dtype, device=device, attn_backend=attn_backend)
        hf = ModernBertModel.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    return config, ours, hf


def ours_forward(model, packed, cu, max_len, positions):
    return model.forward_packed(packed, cu, max_len, position_ids=positions, check_inputs=False)


class Ceiling:
    """The model's GEMMs and attention kernels alone, on the model's shapes, nothing between them.

    Random bf16 weights of the model's shapes (one set per layer, as in the model); activations
    flow from GEMM to GEMM so every product reads data that was just written, as the model's do.
    """

    def __init__(self, config, device: torch.device, dtype: torch.dtype):
        self.config = config  # our ModernBertConfig (is_global, window_half)
        h, inter = config.hidden_size, config.intermediate_size
        generator = torch.Generator().manual_seed(4)

        def weight(rows: int, cols: int) -> torch.Tensor:
            return (torch.randn(rows, cols, generator=generator) * cols**-0.5).to(device, dtype)

        self.layers = [
            (weight(3 * h, h), weight(h, h), weight(2 * inter, h), weight(h, inter))
            for _ in range(config.num_hidden_layers)
        ]

    def attention(self, layer: int, qkv: torch.Tensor, cu, max_len: int, backend: str, grad_out=None):
        from mbert_retrieval.modeling.attention import packed_attention

        window = None if self.config.is_global(layer) else self.config.window_half
        q, k, v = qkv.unbind(1)
        if grad_out is None:
            return packed_attention(q, k, v, cu, max_len, window, backend, sequence_ids=self.sequence_ids)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = packed_attention(q, k, v, cu, max_len, window, backend, sequence_ids=self.sequence_ids)
        torch.autograd.grad(out, (q, k, v), grad_out)
        return out.detach()

    def pack(self, cu, tokens: int, backend: str) -> None:
        """Per-batch index tensors, made once per forward as the model makes them."""
        self.sequence_ids = None
        if backend == "triton":
            from mbert_retrieval.modeling.window_attention import sequence_ids

            self.sequence_ids = sequence_ids(cu, tokens)

    def forward(self, x: torch.Tensor, cu, max_len: int, backend: str) -> torch.Tensor:
        tokens, heads = x.shape[0], self.config.num_attention_heads
        self.pack(cu, tokens, backend)
        inter = self.config.intermediate_size
        for layer, (w_qkv, w_o, w_i, w_mlp_o) in enumerate(self.layers):
            qkv = F.linear(x, w_qkv).view(tokens, 3, heads, -1)
            attended = self.attention(layer, qkv, cu, max_len, backend).reshape(tokens, -1)
            hidden = F.linear(attended, w_o)
            x = F.linear(F.linear(hidden, w_i)[:, :inter], w_mlp_o)  # the GeGLU's input half
        return x

    def train_step(self, x: torch.Tensor, cu, max_len: int, backend: str) -> None:
        """Forward GEMMs, attention forward + backward, and each GEMM's two backward products."""
        tokens, heads = x.shape[0], self.config.num_attention_heads
        inter = self.config.intermediate_size
        self.pack(cu, tokens, backend)
        grad_hidden = torch.randn_like(x)
        for layer, (w_qkv, w_o, w_i, w_mlp_o) in enumerate(self.layers):
            qkv = F.linear(x, w_qkv)
            grad_attn = grad_hidden.view(tokens, heads, -1)
            attended = self.attention(layer, qkv.view(tokens, 3, heads, -1), cu, max_len, backend, grad_attn)
            attended = attended.reshape(tokens, -1)
            hidden = F.linear(attended, w_o)
            up = F.linear(hidden, w_i)
            out = F.linear(up[:, :inter], w_mlp_o)
            # backward: dX = dY W and dW = dY^T X for each linear (gradient values do not matter)
            for grad_y, weight, inputs in (
                (grad_hidden, w_mlp_o, up[:, :inter]),
                (up, w_i, hidden),
                (grad_hidden, w_o, attended),
                (qkv, w_qkv, x),
            ):
                torch.mm(grad_y, weight)
                torch.mm(grad_y.t(), inputs)
            x = out


def measure_ceiling(ceiling: Ceiling, packed_len: int, cu, max_len: int, device, args, train: bool) -> dict:
    """Seconds per call of the GEMMs + attention skeleton, with FlashAttention and with our backend."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(packed_len, ceiling.config.hidden_size, generator=generator).to(device, torch.bfloat16)
    step = ceiling.train_step if train else ceiling.forward
    times = {}
    for name, backend in (("varlen", "varlen"), ("ours", ours_attention_backend(device))):
        if backend is None:
            continue
        with torch.inference_mode(not train):
            times[name] = time_call(lambda b=backend: step(x, cu, max_len, b), device, 2, args.repeat)
            times[f"{name}_back_to_back"] = time_back_to_back(
                lambda b=backend: step(x, cu, max_len, b), device, args.repeat
            )
    return times


def ours_attention_backend(device: torch.device) -> str | None:
    from mbert_retrieval.modeling.attention import resolve_backend

    try:
        return resolve_backend("auto", device, torch.bfloat16)
    except RuntimeError:
        return None


def add_ceiling(row: dict, tokens: int, times: dict) -> None:
    if "varlen" in times:
        row["ceiling_tok_s"] = tokens / times["varlen"]
        row["ours_over_ceiling"] = row["ours_tok_s"] / row["ceiling_tok_s"]
    if "ours" in times:
        row["ceiling_ours_attention_tok_s"] = tokens / times["ours"]
        row["ours_over_ceiling_ours_attention"] = row["ours_tok_s"] / row["ceiling_ours_attention_tok_s"]
    if "varlen_back_to_back" in times and "ours_back_to_back_tok_s" in row:
        row["ceiling_back_to_back_tok_s"] = tokens / times["varlen_back_to_back"]
        row["ours_over_ceiling_back_to_back"] = (
            row["ours_back_to_back_tok_s"] / row["ceiling_back_to_back_tok_s"]
        )


def add_back_to_back(row: dict, names: list[str]) -> None:
    """The best variant's calls launched back to back (`time_back_to_back`), beside the per-call figures."""
    rates = [row[f"{name}_back_to_back_tok_s"] for name in names if f"{name}_back_to_back_tok_s" in row]
    if rates:
        row["ours_back_to_back_tok_s"] = max(rates)


def measure_inference(args, config, ours, hf, device, workloads, variants):
    generator = torch.Generator().manual_seed(1)
    ceiling = Ceiling(ours.config, device, torch.bfloat16) if device.type == "cuda" else None
    results, peak = {}, H100_BF16_DENSE_FLOPS
    for workload in workloads:
        lengths = workload.lengths(generator)
        packed, cu, padded, mask = make_batch(lengths, config.vocab_size, device, generator)
        positions = positions_from_cu_seqlens(cu, packed.numel())
        max_len, tokens = max(lengths), sum(lengths)
        row: dict = {"tokens": tokens, "sequences": len(lengths), "max_len": max_len}
        with torch.inference_mode():
            hf_out = hf(input_ids=padded, attention_mask=mask).last_hidden_state[mask.bool()]
            hf_s = time_call(
                lambda: hf(input_ids=padded, attention_mask=mask), device, args.warmup, args.repeat
            )
            row["hf_sdpa_tok_s"] = tokens / hf_s
            row["hf_sdpa_back_to_back_tok_s"] = tokens / time_back_to_back(
                lambda: hf(input_ids=padded, attention_mask=mask), device, args.repeat
            )
            best = None
            for name, forward in variants.items():
                try:
                    out = forward(packed, cu, max_len, positions)
                    seconds = time_call(
                        lambda f=forward: f(packed, cu, max_len, positions), device, args.warmup, args.repeat
                    )
                    back_to_back = time_back_to_back(
                        lambda f=forward: f(packed, cu, max_len, positions), device, args.repeat
                    )
                except Exception as err:  # a variant that fails to build is reported, not fatal
                    row[f"{name}_error"] = f"{type(err).__name__}: {err}"[:500]
                    continue
                row[f"{name}_tok_s"] = tokens / seconds
                row[f"{name}_back_to_back_tok_s"] = tokens / back_to_back
                row[f"{name}_max_abs_diff"] = (out.float() - hf_out.float()).abs().max().item()
                if best is None or seconds < best[1]:
                    best = (name, seconds, row[f"{name}_max_abs_diff"])
        name, seconds, diff = best
        flops = forward_flops(config, lengths)
        row.update(
            ours_variant=name,
            ours_tok_s=tokens / seconds,
            speedup=hf_s / seconds,
            tflops=flops / seconds / 1e12,
            mfu=flops / seconds / peak,
            max_abs_diff=diff,
        )
        add_back_to_back(row, list(variants))
        if device.type == "cuda":
            add_ceiling(row, tokens, measure_ceiling(ceiling, tokens, cu, max_len, device, args, train=False))
        results[workload.name] = row
        print(
            f"  {workload.name}: ours {row['ours_tok_s'] / 1e6:.3f} M tok/s ({name}), "
            f"hf {row['hf_sdpa_tok_s'] / 1e6:.3f} M tok/s, x{row['speedup']:.2f}, "
            f"ceiling {row.get('ceiling_tok_s', 0) / 1e6:.3f} M tok/s; calls back to back: ours "
            f"{row.get('ours_back_to_back_tok_s', 0) / 1e6:.3f}, ceiling {row.get('ceiling_back_to_back_tok_s', 0) / 1e6:.3f}",
            flush=True,
        )
    return results


def relative_error_vs_fp32(small: bool, ours, device, generator) -> float:
    """‖bf16 ours − fp32 reference‖ / ‖fp32 reference‖ on a short variable batch."""
    lengths = SMALL[0].lengths(generator) if small else FULL[0].lengths(generator)
    packed, cu, _, _ = make_batch(lengths, ours.config.vocab_size, device, generator)
    reference = ModernBert(ours.config, attn_backend="reference").to(device)
    reference.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    with torch.inference_mode():
        fast = ours.forward_packed(packed, cu, max(lengths)).float()
        exact = reference.eval().forward_packed(packed, cu, max(lengths))
    return ((fast - exact).norm() / exact.norm()).item()


def measure_training(args, config, ours_models: dict, hf, device, workloads, results: dict, save):
    """Forward + backward of the encoder with the same loss on the same batches; each workload's row
    goes into `results` and is saved at once, so a run cut short keeps what it measured."""
    generator = torch.Generator().manual_seed(2)
    models = {**ours_models, "hf_sdpa": hf}
    first = next(iter(ours_models.values()))
    ceiling = Ceiling(first.config, device, torch.bfloat16) if device.type == "cuda" else None
    for model in models.values():
        model.train()
    for workload in workloads:
        if workload.mean is None:
            continue
        lengths = workload.lengths(generator)
        packed, cu, padded, mask = make_batch(lengths, config.vocab_size, device, generator)
        tokens, max_len = sum(lengths), max(lengths)

        def step(name, model):
            # As a trainer's step: gradients set to None first, so the backward hands each
            # parameter its gradient instead of adding it to the previous step's (one kernel per
            # parameter, ~134 launches per step).
            model.zero_grad(set_to_none=True)
            if name == "hf_sdpa":
                out = model(input_ids=padded, attention_mask=mask).last_hidden_state[mask.bool()]
            else:
                out = model.forward_packed(packed, cu, max_len, check_inputs=False)
            out.float().square().mean().backward()

        row = {"tokens": tokens}
        for name, model in models.items():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                seconds = time_call(lambda: step(name, model), device, 2, max(3, args.repeat // 2))
                back_to_back = time_back_to_back(lambda: step(name, model), device, max(3, args.repeat // 2))
            except Exception as err:  # a variant that fails is reported, not fatal
                row[f"{name}_error"] = f"{type(err).__name__}: {err}"[:500]
                continue
            finally:
                model.zero_grad(set_to_none=True)
            row[f"{name}_tok_s"] = tokens / seconds
            row[f"{name}_back_to_back_tok_s"] = tokens / back_to_back
            if device.type == "cuda":
                row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        best = max(ours_models, key=lambda name: row.get(f"{name}_tok_s", 0.0))
        row["ours_variant"] = best
        row["ours_tok_s"] = row.get(f"{best}_tok_s", 0.0)
        row["ours_peak_gib"] = row.get(f"{best}_peak_gib")
        row["speedup"] = row["ours_tok_s"] / row["hf_sdpa_tok_s"]
        add_back_to_back(row, list(ours_models))
        if device.type == "cuda":
            add_ceiling(row, tokens, measure_ceiling(ceiling, tokens, cu, max_len, device, args, train=True))
        if args.profile and device.type == "cuda" and workload is workloads[0]:
            model = models[best]
            print(f"\nprofile of one training step, {workload.name}, {best}:")
            print(profile_calls(lambda: step(best, model), count=3), flush=True)
            model.zero_grad(set_to_none=True)
        results[workload.name] = row
        save()
        for name in models:
            if f"{name}_tok_s" in row:
                print(f"    {name}: {row[f'{name}_tok_s'] / 1e3:.0f} k tok/s, back to back "
                      f"{row[f'{name}_back_to_back_tok_s'] / 1e3:.0f} k")  # fmt: skip
        print(
            f"  train {workload.name}: ours {row['ours_tok_s'] / 1e3:.0f} k tok/s ({best}, "
            f"peak {row['ours_peak_gib'] or 0:.1f} GiB), hf {row['hf_sdpa_tok_s'] / 1e3:.0f} k tok/s, "
            f"x{row['speedup']:.2f}, ceiling {row.get('ceiling_tok_s', 0) / 1e3:.0f} k tok/s; steps back to "
            f"back: ours {row.get('ours_back_to_back_tok_s', 0) / 1e3:.0f}, ceiling "
            f"{row.get('ceiling_back_to_back_tok_s', 0) / 1e3:.0f} k tok/s",
            flush=True,
        )
    if device.type == "cuda" and not args.small and args.max_batch:
        results["max_8192_batch"] = {
            name: largest_batch(lambda b, m=model, n=name: train_long(m, b, config, device, n != "hf_sdpa"))
            for name, model in models.items()
            if f"{name}_error" not in row
        }
        print(f"  largest 8192-token training batch: {results['max_8192_batch']}", flush=True)
    for model in models.values():
        model.eval()
    return results


def profile_forward(forward, config, device, workload: Workload) -> str:
    """The kernels that take the GPU's time in one forward (five forwards summed), as a table."""
    generator = torch.Generator().manual_seed(5)
    lengths = workload.lengths(generator)
    packed, cu, _, _ = make_batch(lengths, config.vocab_size, device, generator)
    positions = positions_from_cu_seqlens(cu, packed.numel())
    with torch.inference_mode():
        for _ in range(3):
            forward(packed, cu, max(lengths), positions)
        return profile_calls(lambda: forward(packed, cu, max(lengths), positions), count=5)


def profile_calls(fn, count: int, rows: int = 22) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(count):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def train_long(model, batch: int, config, device, packed_input: bool) -> None:
    length = 8192
    ids = torch.randint(5, config.vocab_size, (batch, length), device=device)
    if packed_input:
        cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
        out = model.forward_packed(ids.flatten(), cu, length, check_inputs=False)
    else:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()


def largest_batch(step, limit: int = 256) -> int:
    """Doubling, then bisection, on whether one training step fits in GPU memory."""

    def fits(batch: int) -> bool:
        try:
            step(batch)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    good, bad = 0, None
    trial = 1
    while trial <= limit:
        if not fits(trial):
            bad = trial
            break
        good, trial = trial, trial * 2
    if bad is None:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def print_table(results: dict) -> None:
    print(
        f"\n{'workload':16s} {'ours M tok/s':>13s} {'HF sdpa M tok/s':>16s} {'speed-up':>9s} {'MFU':>6s} {'max|diff|':>10s}"
    )
    for name, row in results["workloads"].items():
        print(
            f"{name:16s} {row['ours_tok_s'] / 1e6:13.3f} {row['hf_sdpa_tok_s'] / 1e6:16.3f} "
            f"{row['speedup']:9.2f} {row['mfu']:6.1%} {row['max_abs_diff']:10.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/encoder_throughput.json"))
    parser.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke run")
    parser.add_argument(
        "--variants",
        default="eager,compiled,compiled_layers",
        help="comma list of: eager, compiled, compiled_layers, compiled_layers_varlen, autotune_layers, "
        "compiled_model, compiled_model_inductor_reads, compiled_model_cpp, compiled_model_no_asserts, "
        "compiled_model_frozen, graphed_<variant> (CUDA graphs of a variant: graphed_eager, "
        "graphed_compiled_model), graphed2_<variant> (the same with each batch's halves on two streams), "
        "eager_rotary_pass, "
        "compiled_model_rotary_in_window[_cpp] "
        "(the `_varlen` variant runs FlashAttention in the local layers too: the same-run baseline)",
    )
    parser.add_argument("--train", action="store_true", help="also time forward + backward")
    parser.add_argument(
        "--train-variants",
        default="eager,compiled_layers",
        help="comma list of: eager, compiled_layers, compiled_layers_varlen, compiled_model (one graph "
        "for the whole forward: fewer compiled calls per step for the host), "
        "compiled_model_inductor_reads, compiled_model_cpp (its kernels launched from generated C++), "
        "eager_rotary_pass, compiled_model_rotary_in_window[_cpp]",
    )
    parser.add_argument(
        "--no-max-batch", dest="max_batch", action="store_false", help="skip the largest-batch search"
    )
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of one forward")
    parser.add_argument(
        "--profile-variants",
        default="",
        help="comma list of inference variants to profile (default: the best)",
    )
    parser.add_argument("--workloads", default="", help="comma list of workload names (default: all)")
    parser.add_argument(
        "--blas",
        choices=["default", "cublas", "cublaslt"],
        default="default",
        help="torch.backends.cuda.preferred_blas_library for the GEMMs (ours, HF and the ceiling alike)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    config, ours, hf = build_models(args.small, device, dtype, "auto")
    workloads = SMALL if args.small else FULL
    if args.workloads:
        unknown = set(args.workloads.split(",")) - {w.name for w in workloads}
        if unknown:
            parser.error(f"unknown workloads {sorted(unknown)}; known: {[w.name for w in workloads]}")
        workloads = [w for w in workloads if w.name in args.workloads.split(",")]
    models = ModelVariants(ours)
    variants = {}
    for name in args.variants.split(","):
        variants[name] = lambda *a, model=models.get(name): ours_forward(model, *a)

    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "dtype": str(dtype),
        "shape": "small" if args.small else "base",
        "command": "python3 " + " ".join(sys.argv),
        "attn_backend": ours_attention_backend(device) if device.type == "cuda" else "packed_sdpa",
        "blas": str(torch.backends.cuda.preferred_blas_library()) if device.type == "cuda" else None,
        "workloads": measure_inference(args, config, ours, hf, device, workloads, variants),
    }
    results["bf16_relative_error_vs_fp32"] = relative_error_vs_fp32(
        args.small, ours, device, torch.Generator().manual_seed(3)
    )
    write_result(results, args.out)  # after each phase, so a run cut short keeps what it measured
    print_table(results)
    print(f"bf16 vs fp32 reference, relative error: {results['bf16_relative_error_vs_fp32']:.2e}")
    if args.profile and device.type == "cuda":
        best = results["workloads"][workloads[0].name]["ours_variant"]
        for name in args.profile_variants.split(",") if args.profile_variants else [best]:
            table = profile_forward(variants[name], config, device, workloads[0])
            print(f"\nprofile of {workloads[0].name}, {name}:\n{table}")
    if args.train:
        ours_models = {f"ours_{name}": models.get(name) for name in args.train_variants.split(",")}
        results["training"] = {}
        measure_training(
            args, config, ours_models, hf, device, workloads, results["training"],
            save=lambda: write_result(results, args.out),
        )  # fmt: skip


class ModelVariants:
    """The benchmarked model (`eager`) and copies of it, made on first use: compiled layers,
    compiled layers with FlashAttention in every layer (`_varlen`), the whole forward compiled
    (`compiled`, also named `compiled_model`), that with inductor's default of recomputing short
    chains of sums in each reader (`compiled_model_inductor_reads`), or launching its kernels from
    generated C++ instead of Python (`compiled_model_cpp`: inductor's cpp_wrapper), or without the
    size, stride and alignment checks of its inputs (`compiled_model_no_asserts`), or with the
    weights folded into the graph as constants for inference (`compiled_model_frozen`: inductor's
    freezing, so the wrapper takes no parameters as inputs). `graphed_<variant>` replays CUDA graphs
    of that variant's forward (`modeling/cuda_graphs.py`, batches padded to its default shapes;
    throughput counts the real tokens only); `graphed2_<variant>` records each batch's two halves on
    two streams. Where the local
    layers rotate q and k, against the model's default: `eager_rotary_pass` (a rotary operator before
    the window kernel) and `compiled_model_rotary_in_window[_cpp]` (inside it). `eager_global_kernel`
    and `compiled_model_global_kernel`: the global layers on our Triton kernel
    (`modeling/global_attention.py`) instead of a rotary pass and FlashAttention."""

    def __init__(self, base):
        self.base, self.made = base, {"eager": base}

    def get(self, name: str):
        if name.startswith("graphed_") and name not in self.made:  # CUDA graphs of another variant
            self.made[name] = GraphedVariant(GraphedForward(self.get(name.removeprefix("graphed_"))))
        if name.startswith("graphed2_") and name not in self.made:  # the same, halves on two streams
            model = self.get(name.removeprefix("graphed2_"))
            self.made[name] = GraphedVariant(GraphedForward(model, streams=2))
        if name not in self.made:
            model = copy.deepcopy(self.base)
            if name.endswith("_varlen"):
                model.attn_backend = "varlen"
            if name.startswith("compiled_layers"):
                model.compile_layers()
            elif name == "autotune_layers":
                model.compile_layers(mode="max-autotune-no-cudagraphs")
            elif name in ("compiled", "compiled_model"):  # the whole forward as one graph (and one backward)
                model.compile_forward()
            elif name == "compiled_model_cpp":  # no Python per kernel launch
                model.compile_forward(options={"cpp_wrapper": True})
            elif name.endswith(("_global_kernel", "_flash_global")):  # global layers: ours or FlashAttention
                for layer in model.layers:
                    layer.attn.global_kernel_in_inference = name.endswith("_global_kernel")
                if name.startswith("compiled_model"):
                    model.compile_forward()
            elif name == "eager_rotary_pass":  # local layers call the rotary operator eagerly too
                set_window_rotation(model, False)
            elif name.startswith("compiled_model_rotary_in_window"):  # rotation in the window kernels
                set_window_rotation(model, True)
                model.compile_forward(options={"cpp_wrapper": name.endswith("_cpp")})
            elif name == "compiled_model_no_asserts":  # the wrapper checks no input's size or stride
                model.compile_forward(
                    options={"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}
                )
            elif name == "compiled_model_frozen":  # weights as constants: fewer inputs per call
                model.compile_forward(options={"freezing": True})
            elif name == "compiled_model_inductor_reads":  # inductor's own store-vs-recompute default
                model.compile_forward(options={"realize_reads_threshold": 4})
            else:
                raise ValueError(f"unknown variant {name!r}")
            self.made[name] = model
        return self.made[name]


class GraphedVariant:
    """A `GraphedForward` called as the other variants are (it makes the positions itself)."""

    def __init__(self, graphed: GraphedForward):
        self.graphed = graphed

    def forward_packed(self, input_ids, cu_seqlens, max_seqlen, position_ids=None, check_inputs=True):
        return self.graphed(input_ids, cu_seqlens, max_seqlen)


def set_window_rotation(model, inside: bool) -> None:
    for layer in model.layers:
        layer.attn.rotation_in_window_kernel = inside


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
