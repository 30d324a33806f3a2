"""What the tests of our Triton kernels share: where they run (a CUDA GPU, or the CPU under Triton's
interpreter, `TRITON_INTERPRET=1` set before import) and how they compare results."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# Compiled, the operators are launched from inductor's generated code (torch.library.triton_op),
# which needs the GPU: the interpreter's kernels cannot be traced.
needs_gpu_compile = pytest.mark.skipif(not ON_GPU, reason="inductor launches Triton kernels on a GPU only")


def skip_unless_kernels_run(what: str) -> None:
    """Called at the top of a test module: skips it without Triton, or on a CPU without the interpreter."""
    pytest.importorskip("triton")
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(f"{what} need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def assert_autocast_training_matches_the_plain_path(models: dict, lengths: list[int]) -> None:
    """A training step as `train` runs it on a GPU (float32 weights under bf16 autocast) of
    models["triton"] against models["varlen"], the plain code: outputs within 2%, every parameter's
    gradient within 5% (relative norms; both take bf16 rounding in different places)."""
    ids = torch.randint(3, 1000, (sum(lengths),), device="cuda")
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to("cuda")
    outputs = {}
    for backend, model in models.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs[backend] = model.forward_packed(ids, cu, max(lengths))
        outputs[backend].float().square().mean().backward()
    assert relative_error(outputs["triton"], outputs["varlen"]) < 2e-2
    plain = dict(models["varlen"].named_parameters())
    for name, param in models["triton"].named_parameters():
        assert relative_error(param.grad, plain[name].grad) < 5e-2, name
