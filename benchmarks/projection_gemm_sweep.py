"""Triton TMA projections against cuBLAS, with and without their elementwise follow-up (GPU).

For the encoder's two projections that an elementwise pass follows (Wi -> GeGLU, Wqkv -> rotary of
q and k), on the base shape (hidden 768, Wqkv and Wi [2304, 768]) and a batch's token count:

- `cublas`: the GEMM alone (torch.mm), the floor the benchmark's ceiling is made of;
- `cublas+inductor`: the GEMM then the follow-up as the compiled model runs it (torch.compile of the
  model's own code: one cuBLAS call and one fused inductor kernel);
- `triton/<epilogue>/<config>`: `fused_projection.launch` for every launch shape listed, its output
  checked against a float32 reference before it is timed.

Each figure is the mean of CUDA-graph replays (`triton.testing.do_bench_cudagraph`). Prints a table,
writes JSON (default `benchmarks/results/projection_gemm_sweep.json`).

    PYTHONPATH=. python3 benchmarks/projection_gemm_sweep.py --tokens 15924,32208

GeGLU is timed with libdevice's erf, with the cheaper erf the model uses (`fused_projection._erf`)
and, as a diagnostic of what the epilogue costs, with no GELU at all.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from mbert_retrieval.modeling import fused_projection as fp
from mbert_retrieval.modeling.encoder import apply_rotary

HIDDEN, HEADS, HEAD_DIM, INTERMEDIATE = 768, 12, 64, 1152
EPILOGUE_NAMES = {fp.PLAIN: "plain", fp.GEGLU: "geglu", fp.ROTARY: "rotary"}


def configs(epilogue: int) -> list[fp.TileConfig]:
    """Launch shapes to time (run 15 timed a wider set: tiles 64 wide and one program per tile lost)."""
    if epilogue == fp.GEGLU:  # two accumulators: block_n columns of input and of gate
        return [fp.TileConfig(128, 128, 64, 8, stages, 8, True) for stages in (3, 4)]
    shapes = [fp.TileConfig(128, 128, 64, 8, stages, 8, True) for stages in (4, 5)]
    if epilogue == fp.PLAIN:
        shapes += [fp.TileConfig(128, 128, 64, 8, 5, 4, True), fp.TileConfig(128, 256, 64, 8, 3, 8, True)]
    return shapes


GELU_ERF = {0: "libdevice erf", 1: "A&S 7.1.26 erf", 2: "no GELU (diagnostic)"}


def rotary_tables(tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(tokens, device=device) % 300  # documents of 300 tokens
    inv_freq = 1.0 / (160_000.0 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
    angles = positions[:, None].float() * inv_freq[None, :]
    return angles.cos().contiguous(), angles.sin().contiguous()


def references(x, wqkv, wi, cos, sin) -> dict[int, torch.Tensor]:
    """float32 results of each epilogue, in the layout the fused kernel stores."""
    xf = x.float()
    plain = xf @ wqkv.float().T
    inputs, gate = (xf @ wi.float().T).chunk(2, dim=-1)
    qkv = plain.view(-1, 3, HEADS, HEAD_DIM)
    x1, x2 = qkv[:, :2].chunk(2, dim=-1)
    c, s = cos[:, None, None], sin[:, None, None]
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).reshape(len(x), -1)
    rotated = fp.interleave_rotary_columns(rotated, HEAD_DIM)
    return {
        fp.PLAIN: plain,
        fp.GEGLU: F.gelu(inputs) * gate,
        fp.ROTARY: torch.cat((rotated, qkv[:, 2].reshape(len(x), -1)), dim=1),
    }


def time_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50) * 1000.0


def baselines(x, wqkv, wi, cos, sin) -> dict[str, float]:
    def geglu_model(x, w):  # GeGLU.forward's follow-up, as compiled inference runs it
        inputs, gate = (x @ w.T).chunk(2, dim=-1)
        return F.gelu(inputs) * gate

    def rotary_model(x, w, cos, sin):  # Attention.forward's follow-up (q, k rotated into one buffer)
        qkv = (x @ w.T).view(-1, 3, HEADS, HEAD_DIM)
        return apply_rotary(qkv[:, :2], cos[:, None, None], sin[:, None, None]), qkv[:, 2]

    geglu_compiled = torch.compile(geglu_model, dynamic=False)
    rotary_compiled = torch.compile(rotary_model, dynamic=False)
    for _ in range(3):
        geglu_compiled(x, wi), rotary_compiled(x, wqkv, cos, sin)
    return {
        "cublas_us": time_us(lambda: x @ wqkv.T),
        "cublas_inductor_geglu_us": time_us(lambda: geglu_compiled(x, wi)),
        "cublas_inductor_rotary_us": time_us(lambda: rotary_compiled(x, wqkv, cos, sin)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", default="15924,32208", help="comma list of token counts (batch sizes)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop sweeping after this long")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/projection_gemm_sweep.json"))
    args = parser.parse_args()
    start = time.time()
    device = torch.device("cuda")
    torch.manual_seed(0)
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "code": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "command": "PYTHONPATH=. python3 benchmarks/projection_gemm_sweep.py --tokens " + args.tokens,
        "shapes": {"hidden": HIDDEN, "wqkv": [3 * HIDDEN, HIDDEN], "wi": [2 * INTERMEDIATE, HIDDEN]},
        "runs": [],
    }
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16)
        wqkv = (torch.randn(3 * HIDDEN, HIDDEN, device=device) / HIDDEN**0.5).bfloat16()
        wi = (torch.randn(2 * INTERMEDIATE, HIDDEN, device=device) / HIDDEN**0.5).bfloat16()
        wqkv_interleaved = fp.interleave_rotary_rows(wqkv, HEAD_DIM, 2 * HIDDEN)
        cos, sin = rotary_tables(tokens, device)
        refs = references(x, wqkv, wi, cos, sin)
        flops = 2.0 * tokens * 3 * HIDDEN * HIDDEN  # Wqkv and Wi: the same GEMM size
        run = {"tokens": tokens, **baselines(x, wqkv, wi, cos, sin), "triton": []}
        run["cublas_tflops"] = flops / run["cublas_us"] / 1e6
        print(
            f"\n{tokens} tokens: cuBLAS {run['cublas_us']:.1f} us ({run['cublas_tflops']:.0f} TFLOP/s), "
            f"+GeGLU {run['cublas_inductor_geglu_us']:.1f} us, +rotary {run['cublas_inductor_rotary_us']:.1f} us"
        )
        print(
            f"{'epilogue':>8} {'config':<52} {'us':>7} {'TFLOP/s':>8} {'vs cuBLAS+pass':>15} {'rel err':>8}"
        )
        for epilogue in (fp.PLAIN, fp.GEGLU, fp.ROTARY):
            weight = {fp.PLAIN: wqkv, fp.GEGLU: wi, fp.ROTARY: wqkv_interleaved}[epilogue]
            out_cols = INTERMEDIATE if epilogue == fp.GEGLU else 3 * HIDDEN
            baseline = {
                fp.PLAIN: run["cublas_us"],
                fp.GEGLU: run["cublas_inductor_geglu_us"],
                fp.ROTARY: run["cublas_inductor_rotary_us"],
            }[epilogue]
            erfs = (0, 1, 2) if epilogue == fp.GEGLU else (1,)
            for config, erf in ((c, e) for c in configs(epilogue) for e in erfs):
                if time.time() - start > args.budget_s:
                    break
                out = torch.empty(tokens, out_cols, device=device, dtype=torch.bfloat16)
                row = {"epilogue": EPILOGUE_NAMES[epilogue], "config": config.__dict__}
                if epilogue == fp.GEGLU:
                    row["gelu"] = GELU_ERF[erf]

                def call(config=config, weight=weight, out=out, epilogue=epilogue, erf=erf):
                    fp.launch(x, weight, out, epilogue, config, cos, sin, 2 * HIDDEN, HEAD_DIM // 2, erf)

                try:
                    call()
                    torch.cuda.synchronize()
                    ref = refs[epilogue]
                    if erf == 2:  # input * gate: its own reference
                        inputs, gate = (x.float() @ wi.float().T).chunk(2, dim=-1)
                        ref = inputs * gate
                    row["rel_err"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    row["us"] = time_us(call)
                    row["tflops"] = flops / row["us"] / 1e6
                    row["gain_vs_cublas_and_pass"] = baseline / row["us"]
                    name = row["epilogue"] + ("" if erf == 1 or epilogue != fp.GEGLU else f"/erf{erf}")
                    print(
                        f"{name:>8} {str(tuple(config.__dict__.values())):<52} {row['us']:7.1f} "
                        f"{row['tflops']:8.0f} {row['gain_vs_cublas_and_pass']:14.3f}x {row['rel_err']:8.1e}"
                    )
                except Exception as error:  # e.g. a shape that needs more shared memory than there is
                    row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                    print(
                        f"{row['epilogue']:>8} {str(tuple(config.__dict__.values())):<52} {row['error'][:60]}"
                    )
                run["triton"].append(row)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({**result, "runs": result["runs"] + [run]}, indent=1))
        result["runs"].append(run)
        for name in EPILOGUE_NAMES.values():
            timed = [
                r
                for r in run["triton"]
                if r["epilogue"] == name
                and "us" in r
                and r["rel_err"] < 2e-2
                and "no GELU" not in r.get("gelu", "")
            ]
            if timed:
                best = min(timed, key=lambda r: r["us"])
                run[f"best_{name}"] = best
                print(
                    f"best {name}: {best['us']:.1f} us, {best['gain_vs_cublas_and_pass']:.3f}x, {best['config']}"
                )
    result["seconds"] = time.time() - start
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
