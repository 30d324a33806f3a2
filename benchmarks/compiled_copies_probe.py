"""Copies that inductor would add around our Triton kernels in a compiled training step and a compiled
inference forward, found on a CPU: the joint forward / backward graph and the inference graph of a
small base-width model (triton backend, bf16) traced with fake tensors, then inductor's reinplacing
pass. A kernel argument the kernel writes is functionalised
(cloned, written, put back); reinplacing removes that where it can, and what it keeps is a copy on
the GPU. Our kernels' written arguments are listed here by hand (`WRITTEN`): the analysis inductor
runs for that compiles the kernel, which needs a GPU.

Needs Triton importable (its kernels are traced, not run); no GPU:

    PYTHONPATH=. python3 benchmarks/compiled_copies_probe.py --layers 3
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

from benchmarks.common import write_result

# Each kernel's arguments that it stores to (its outputs), or a function of its arguments giving them.
WRITTEN = {
    "_rotary_fwd": ["QD", "KD", "VD"],
    "_rotary_bwd": ["GRAD_QKV"],
    "_rotary_kernel": ["QD", "KD", "VD"],  # the earlier single rotary kernel, for comparisons
    "_geglu_fwd": ["OUT"],
    "_geglu_bwd": ["DH"],
    "_add_norm_fwd": ["TOTAL", "NORMED", "MEAN", "RSTD"],
    "_add_norm_bwd": ["GRAD_X", "PARTIAL"],
    "_window_fwd": ["OUT", "LSE"],
    "_window_bwd_delta": ["DELTA"],
    "_window_bwd_dkdv": lambda kwargs: ["DK"] if kwargs.get("ROTARY") else ["DK", "DV"],
    "_window_bwd_dq": ["DQ"],
}


def written_arguments(kernel_idx, constant_args_idx, kwargs, tma_descriptor_metadata) -> list[str]:
    import torch._higher_order_ops.triton_kernel_wrap as wrap

    name = wrap.kernel_side_table.get_kernel(kernel_idx).fn.__name__
    if name not in WRITTEN:
        raise KeyError(f"add kernel {name!r} and the arguments it stores to, to WRITTEN")
    written = WRITTEN[name](kwargs) if callable(WRITTEN[name]) else WRITTEN[name]
    return [argument for argument in written if argument in kwargs]


def trace_training_step(layers: int, tokens_per_sequence: list[int]):
    """(fake mode, graphs): the forward and backward graphs of one training step (loss = mean(out **
    2)), and the graph of the same forward without gradients."""
    import torch._higher_order_ops.triton_kernel_wrap as wrap
    from torch._functorch.aot_autograd import aot_function
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from mbert_retrieval.modeling.config import ModernBertConfig
    from mbert_retrieval.modeling.encoder import ModernBert

    wrap.get_mutated_tensors = written_arguments
    torch.compiler.is_compiling = lambda: True  # the model takes its compiled-training path
    config = ModernBertConfig(num_hidden_layers=layers)
    model = ModernBert(config).to(torch.bfloat16).train()
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(shape, dtype):
        return FakeTensor(mode, torch.empty(shape, dtype=dtype, device="meta"), torch.device("meta"))

    tokens = sum(tokens_per_sequence)
    names = [name for name, _ in model.named_parameters()]
    params = [fake(p.shape, p.dtype).requires_grad_() for p in model.parameters()]
    half = config.hidden_size // config.num_attention_heads // 2
    ropes = [fake((tokens, 1, 1, half), torch.float32) for _ in range(4)]
    ids, sequence_ids = fake((tokens,), torch.long), fake((tokens,), torch.int32)
    cu = fake((len(tokens_per_sequence) + 1,), torch.int32)

    def step(params, ids, cu, sequence_ids, ropes):
        tables = ((ropes[0], ropes[1]), (ropes[2], ropes[3]))
        with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, params))):
            out = ModernBert._run_layers(
                model, ids, cu, max(tokens_per_sequence), tables, "triton", None, sequence_ids
            )
        return out.float().square().mean()

    graphs = {}

    def keep(kind):
        def compiler(graph_module, _inputs):
            graphs[kind] = graph_module
            return graph_module

        return compiler

    with mode:
        traced = aot_function(
            step,
            fw_compiler=keep("forward"),
            bw_compiler=keep("backward"),
            decompositions=select_decomp_table(),
        )
        traced(params, ids, cu, sequence_ids, ropes).backward()
        inference = aot_function(step, fw_compiler=keep("inference"), decompositions=select_decomp_table())
        with torch.no_grad():  # the model's inference path (no gradients wanted)
            inference([p.detach() for p in params], ids, cu, sequence_ids, ropes)
    return mode, graphs


def copies_left(mode, graph_module) -> dict:
    """After reinplacing: our kernels whose written arguments are still cloned, and the scatters."""
    from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops
    from torch._inductor.fx_utils import FakeTensorUpdater
    from torch._inductor.virtualized import V

    with V.set_fake_mode(mode):
        reinplace_inplaceable_ops(FakeTensorUpdater(graph_module), graph_module.graph)
    graph_module.graph.eliminate_dead_code()
    import torch._higher_order_ops.triton_kernel_wrap as wrap

    cloned, operators = Counter(), Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        if target.endswith("triton_kernel_wrapper_functional") and node.kwargs["tensors_to_clone"]:
            kernel = wrap.kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
            cloned[kernel] += len(node.kwargs["tensors_to_clone"])
        if "scatter" in target or target.startswith("aten.copy"):
            operators[target] += 1
    return {"clones_per_kernel": dict(cloned), "scatters_and_copies": dict(operators)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compiled_copies_probe.json"))
    args = parser.parse_args()
    lengths = [300, 200, 124, 400]
    mode, graphs = trace_training_step(args.layers, lengths)
    result = {
        "command": "python3 " + " ".join(sys.argv),
        "torch": torch.__version__,
        "layers": args.layers,
        "tokens": sum(lengths),
        "graphs": {kind: copies_left(mode, graph) for kind, graph in graphs.items()},
    }
    write_result(result, args.out)
    print(f"\n{'graph':10s} {'kernel clones left':40s} scatters / copies left")
    for kind, row in result["graphs"].items():
        print(f"{kind:10s} {str(row['clones_per_kernel']):40s} {row['scatters_and_copies']}")


if __name__ == "__main__":
    main()
