"""Host time of a compiled training step: our Triton kernels as Python operators or as `triton_op`s.

Inside a torch.compile'd graph, the rotary and GeGLU kernels (`modeling/fused_elementwise.py`) are
operators. Registered with `torch.library.custom_op`, every call goes from inductor's generated code
through the dispatcher into Python, which launches the kernel through Triton's JIT; registered with
`torch.library.triton_op`, inductor sees the launch and makes it from its own generated code. This
script trains the base-shape model (bf16, short variable batch, the whole forward compiled) with
each form in turn, in one process, and reports per step:

- `host_ms`: how long the step's Python call takes to return after the GPU was idle (a step launches
  fewer kernels than CUDA's queue holds, so this is the host's own time, whatever the GPU's speed);
- `gpu_ms`: the step timed with CUDA events, waiting for each step (as `encoder_throughput.py`).

`back_to_back_ms` times steps launched one after the other without waiting, as a training loop
runs them. Form `cpp_wrapper` is the shipped code compiled with inductor's C++ launcher. Form
`inductor_norm` is the shipped code with the residual sum and LayerNorm left to inductor
instead of `modeling/fused_norm.py`'s kernels: an A/B of GPU time (`step_ms`) more than host time.

    PYTHONPATH=. python3 benchmarks/operator_host_time.py
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from mbert_retrieval import ModernBert
from mbert_retrieval.modeling import encoder
from mbert_retrieval.modeling.config import ModernBertConfig

try:
    from mbert_retrieval.modeling import fused_elementwise as fused
except ImportError:  # no Triton: only the CPU smoke run (--small), which does not use the kernels
    fused = None


def custom_op_forms():
    """The same kernels as Python operators (`custom_op`), under names of their own."""
    rotary_fwd = torch.library.custom_op("mbert_retrieval_ab::rotary_qkv_fwd", mutates_args=())(
        fused._rotary_forward
    )
    rotary_bwd = torch.library.custom_op("mbert_retrieval_ab::rotary_qkv_bwd", mutates_args=())(
        fused._rotary_backward
    )
    geglu_fwd = torch.library.custom_op("mbert_retrieval_ab::geglu_fwd", mutates_args=())(
        fused._geglu_forward
    )
    geglu_bwd = torch.library.custom_op("mbert_retrieval_ab::geglu_bwd", mutates_args=())(
        fused._geglu_backward
    )

    @rotary_fwd.register_fake
    def _(qkv, cos, sin):
        return [qkv.new_empty(qkv.shape[0], qkv.shape[2], qkv.shape[3]) for _ in range(3)]

    @rotary_bwd.register_fake
    def _(grad_q, grad_k, grad_v, cos, sin):
        return grad_q.new_empty(grad_q.shape[0], 3, *grad_q.shape[1:])

    @geglu_fwd.register_fake
    def _(hidden):
        return hidden.new_empty(hidden.shape[0], hidden.shape[1] // 2)

    @geglu_bwd.register_fake
    def _(hidden, grad):
        return torch.empty_like(hidden, memory_format=torch.contiguous_format)

    def rotary_backward(ctx, grads):
        return rotary_bwd(*fused._dense_grads(grads), *ctx.saved_tensors), None, None

    rotary_fwd.register_autograd(rotary_backward, setup_context=fused._save_rotation)
    geglu_fwd.register_autograd(
        lambda ctx, grad: geglu_bwd(ctx.saved_tensors[0], grad), setup_context=fused._save_geglu_input
    )
    return {"rotary_forward_op": rotary_fwd, "geglu_forward_op": geglu_fwd}


SMALL_CONFIG = ModernBertConfig(
    vocab_size=50368, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4
)


def inductor_add_and_norm(x, update, norm, backend):
    """The residual sum and LayerNorm as plain code, for inductor to fuse (no `fused_norm` kernels)."""
    x = encoder.add_before_norm(x, update)
    return x, norm(x)


def batch(tokens_target: int, device, generator):
    lengths = []
    while sum(lengths) < tokens_target:
        lengths.append(int(torch.randint(16, 512, (1,), generator=generator)))
    ids = torch.randint(5, 50000, (sum(lengths),), generator=generator).to(device)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return ids, cu, max(lengths)


def measure(model, ids, cu, max_len, steps: int) -> dict:
    on_gpu = ids.is_cuda
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)

    def step():
        model.zero_grad(set_to_none=True)
        model.forward_packed(ids, cu, max_len, check_inputs=False).float().square().mean().backward()

    for _ in range(3):
        step()
    host, gpu = [], []
    for _ in range(steps):
        synchronize()
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        step()
        host.append(time.perf_counter() - t0)
        if on_gpu:
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end) / 1e3)
        else:
            gpu.append(host[-1])
    synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):  # as a training loop runs: no wait between steps
        step()
    synchronize()
    back_to_back = (time.perf_counter() - t0) / steps
    return {
        "host_ms": 1e3 * statistics.median(host),
        "step_ms": 1e3 * statistics.median(gpu),
        "tok_s": ids.numel() / statistics.median(gpu),
        "back_to_back_ms": 1e3 * back_to_back,
        "back_to_back_tok_s": ids.numel() / back_to_back,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--rounds", type=int, default=2, help="each form measured this many times, taking turns"
    )
    parser.add_argument(
        "--forms",
        default="triton_op,custom_op",
        help="comma list of triton_op (the code as it is), custom_op, inductor_norm (the residual sum "
        "and LayerNorm left to inductor), cpp_wrapper (the code as it is, launched from C++); one form alone gives the host time of the tree's own training "
        "step, for comparing two trees run one after the other",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/operator_host_time.json"))
    parser.add_argument(
        "--small",
        action="store_true",
        help="tiny model on the CPU (packed_sdpa, no Triton kernels): a smoke run",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.small:
        device, config, backend, dtype = torch.device("cpu"), SMALL_CONFIG, "packed_sdpa", torch.float32
    else:
        device, config, backend, dtype = torch.device("cuda"), ModernBertConfig(), "triton", torch.bfloat16
    base = ModernBert(config, attn_backend=backend).to(device, dtype).train()
    ids, cu, max_len = batch(args.tokens, device, torch.Generator().manual_seed(0))
    operators = ("rotary_forward_op", "geglu_forward_op") if fused is not None else ()
    as_shipped = {(fused, name): getattr(fused, name) for name in operators}
    as_shipped[encoder, "add_and_norm"] = encoder.add_and_norm
    forms = {"triton_op": as_shipped}
    if "custom_op" in args.forms.split(","):
        forms["custom_op"] = {**as_shipped, **{(fused, k): v for k, v in custom_op_forms().items()}}
    if "inductor_norm" in args.forms.split(","):
        forms["inductor_norm"] = {**as_shipped, (encoder, "add_and_norm"): inductor_add_and_norm}
    forms["cpp_wrapper"] = as_shipped  # the same code, its kernels launched from generated C++
    compile_options = {"cpp_wrapper": {"cpp_wrapper": True}}
    forms = {name: ops for name, ops in forms.items() if name in args.forms.split(",")}

    def use(name: str) -> None:  # compiled code guards on these globals: each form has its graphs
        for (module, attribute), value in forms[name].items():
            setattr(module, attribute, value)

    models = {}
    for name in forms:
        use(name)
        models[name] = copy.deepcopy(base).compile_forward(options=compile_options.get(name, {}))
        measure(models[name], ids, cu, max_len, 2)  # compiles with this form's operators
    results = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name, model in models.items():
            use(name)
            results[name].append(measure(model, ids, cu, max_len, args.steps))
            print(name, {k: round(v, 2) for k, v in results[name][-1].items()}, flush=True)
    summary = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": "PYTHONPATH=. python3 benchmarks/operator_host_time.py "
        f"--tokens {args.tokens} --steps {args.steps} --forms {args.forms}"
        + (" --small" if args.small else ""),
        "tokens": ids.numel(),
        "summary": summary,
        "runs": results,
    }
    print(f"\n{'form':<14} {'host ms':>8} {'step ms':>8} {'k tok/s':>8} {'back to back k tok/s':>21}")
    for name, row in summary.items():
        print(
            f"{name:<14} {row['host_ms']:8.2f} {row['step_ms']:8.2f} {row['tok_s'] / 1e3:8.0f} "
            f"{row['back_to_back_tok_s'] / 1e3:21.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
