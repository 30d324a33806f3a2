"""What the tests of our Triton kernels share: where they run (a CUDA GPU, or the CPU under Triton's
interpreter, `TRITON_INTERPRET=1` set before import) and how they compare results."""

from __future__ import annotations

import os

import pytest
import torch

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
