"""The one-launch padding kernel against `cuda_graphs.fill_padded`'s PyTorch code.

On a CUDA GPU, or on the CPU under Triton's interpreter:
    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -q tests/test_padding_kernel.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_kernels import DEVICE, skip_unless_kernels_run

from mbert_retrieval.modeling.cuda_graphs import GraphShapes, fill_padded

skip_unless_kernels_run("the padding kernel")

from mbert_retrieval.modeling import padding_kernel  # noqa: E402


def torch_fill(ids, cu, input_ids, cu_seqlens, pad_length, pad_id, cu_offset=0):
    """cuda_graphs.fill_padded's own code, on CPU copies (its kernel path is for CUDA tensors)."""
    ids_cpu, cu_cpu = ids.cpu().clone(), cu.cpu().clone()
    fill_padded(ids_cpu, cu_cpu, input_ids.cpu(), cu_seqlens.cpu(), pad_length, pad_id, cu_offset)
    return ids_cpu, cu_cpu


@pytest.mark.parametrize(
    "lengths, shapes",
    [
        ([5, 1, 30], GraphShapes(tokens=64, sequences=8, pad_length=16)),
        ([128] * 3, GraphShapes()),
        ([700, 3, 2000], GraphShapes(tokens=128, sequences=16, pad_length=128)),
        ([1], GraphShapes(tokens=1, sequences=1, pad_length=1)),
    ],
)
def test_kernel_writes_what_the_torch_code_writes(lengths, shapes):
    generator = torch.Generator().manual_seed(len(lengths))
    input_ids = torch.randint(3, 1000, (sum(lengths),), generator=generator).to(DEVICE)
    cu_seqlens = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)
    total, sequences, _ = shapes.padded(sum(lengths), len(lengths), max(lengths))
    # stale contents from an earlier call must not survive
    ids = torch.randint(3, 1000, (total,), generator=generator).to(DEVICE)
    cu = torch.randint(0, 1000, (sequences + 1,), generator=generator).to(torch.int32).to(DEVICE)
    expected_ids, expected_cu = torch_fill(ids, cu, input_ids, cu_seqlens, shapes.pad_length, 2)
    padding_kernel.fill_padded(ids, cu, input_ids, cu_seqlens, shapes.pad_length, 2)
    assert torch.equal(ids.cpu(), expected_ids)
    assert torch.equal(cu.cpu(), expected_cu)
    assert cu[-1].item() == total and bool((cu.diff() >= 0).all())


def test_kernel_subtracts_the_offset_of_a_later_half():
    lengths, shapes, cut = [5, 9, 3, 12, 7], GraphShapes(tokens=32, sequences=4, pad_length=8), 2
    input_ids = torch.randint(3, 1000, (sum(lengths),)).to(DEVICE)
    cu_seqlens = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)
    offset = int(cu_seqlens[cut])
    half_ids, half_cu = input_ids[offset:], cu_seqlens[cut:]
    total, sequences, _ = shapes.padded(half_ids.numel(), half_cu.numel() - 1, max(lengths))
    ids = torch.zeros(total, dtype=torch.long, device=DEVICE)
    cu = torch.zeros(sequences + 1, dtype=torch.int32, device=DEVICE)
    expected_ids, expected_cu = torch_fill(ids, cu, half_ids, half_cu, shapes.pad_length, 2, offset)
    padding_kernel.fill_padded(ids, cu, half_ids, half_cu, shapes.pad_length, 2, cu_offset=offset)
    assert torch.equal(ids.cpu(), expected_ids) and torch.equal(cu.cpu(), expected_cu)
    assert torch.equal(cu.cpu()[: half_cu.numel()], (half_cu - offset).cpu())  # starts at 0
