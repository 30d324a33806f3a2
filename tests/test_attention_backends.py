"""The fast attention paths against the SDPA references (the CUDA kernels are skipped on CPU)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from mbert_retrieval import ModernBert
from mbert_retrieval.modeling.attention import (
    FlashAttention,
    blocked_window_sdpa,
    packed_attention,
    reference_attention,
    resolve_backend,
)

LENGTHS = [300, 5, 129, 64, 200, 1, 130]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen kernels need a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("window_half", [None, 64])
def test_varlen_matches_reference(window_half):
    torch.manual_seed(0)
    cu = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0)).to(torch.int32).cuda()
    q, k, v = (torch.randn(sum(LENGTHS), 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = packed_attention(q, k, v, cu, max(LENGTHS), window_half, "varlen")
    expected = reference_attention(q.float(), k.float(), v.float(), cu, window_half)
    assert ((out.float() - expected).norm() / expected.norm()) < 1e-2


@needs_cuda
@pytest.mark.parametrize("window_half", [None, 64])
def test_eager_flash_attention_matches_varlen_attn_with_gradients(window_half):
    """The direct call the eager triton backend makes, against torch's public varlen_attn."""
    from torch.nn.attention.varlen import varlen_attn

    torch.manual_seed(1)
    cu = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0)).to(torch.int32).cuda()
    qkv = torch.randn(sum(LENGTHS), 3, 12, 64, device="cuda", dtype=torch.bfloat16)
    upstream = torch.randn(sum(LENGTHS), 12, 64, device="cuda", dtype=torch.bfloat16)
    window = (-1, -1) if window_half is None else (window_half, window_half)
    results = []
    for run in (
        lambda q, k, v: FlashAttention.apply(q, k, v, cu, max(LENGTHS), window_half),
        lambda q, k, v: varlen_attn(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), window_size=window),
    ):
        buffer = qkv.clone().requires_grad_()
        out = run(*buffer.unbind(1))  # strided views, as the model passes them
        out.backward(upstream)
        results.append((out, buffer.grad))
    (got, got_grad), (expected, expected_grad) = results
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)


@needs_cuda
def test_bf16_model_on_cuda_matches_fp32_reference(hf_encoder_dir):
    fast = ModernBert.from_pretrained(hf_encoder_dir, dtype=torch.bfloat16, device="cuda").compile_layers()
    exact = ModernBert.from_pretrained(hf_encoder_dir, device="cuda", attn_backend="reference")
    ids = torch.randint(3, 1000, (3, 600), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0
    with torch.no_grad():
        out, ref = fast(ids, mask).float(), exact(ids, mask)
    assert ((out - ref).norm() / ref.norm()) < 2e-2


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "varlen"])
def test_whole_forward_compiled_on_cuda_matches_eager(hf_encoder_dir, backend):
    """torch.compile of the whole packed forward, sequence ids and positions inside the graph: on
    CUDA, inductor's searchsorted once misread a sliced `cu_seqlens` (wrong sequence per token, NaN
    out of the window kernel)."""
    model = ModernBert.from_pretrained(
        hf_encoder_dir, dtype=torch.bfloat16, device="cuda", attn_backend=backend
    )
    lengths = [300, 5, 40, 129, 1, 257]
    ids = torch.randint(3, 1000, (sum(lengths),), device="cuda")
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).cuda()
    compiled = torch.compile(model.forward_packed, dynamic=True)
    one_graph = copy.deepcopy(model).compile_forward()  # what the trainer and the benchmark run
    with torch.inference_mode():
        eager = model.forward_packed(ids, cu, max(lengths)).float()
        for got in (
            compiled(ids, cu, max(lengths), check_inputs=False),
            one_graph.forward_packed(ids, cu, max(lengths)),
        ):
            assert torch.isfinite(got).all()
            assert (got.float() - eager).norm() / eager.norm() < 2e-2


def assert_gradients_close(reference: torch.nn.Module, model: torch.nn.Module) -> None:
    """Every parameter's gradient within 5% (relative norm) of the reference model's (bf16)."""
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert (b.grad.float() - a.grad.float()).norm() <= 5e-2 * a.grad.float().norm() + 1e-6, name


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "varlen"])
def test_compiled_training_matches_eager_with_gradients(hf_encoder_dir, backend):
    """compile_forward with gradients on: the rotary and GeGLU kernels run as operators inside the
    compiled graph (triton backend); outputs and gradients as the eager model's."""
    models = [
        ModernBert.from_pretrained(
            hf_encoder_dir, dtype=torch.bfloat16, device="cuda", attn_backend=backend
        ).train()
        for _ in range(2)
    ]
    models[1].compile_forward()
    lengths = [300, 5, 40, 129, 1, 257]
    ids = torch.randint(3, 1000, (sum(lengths),), device="cuda")
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).cuda()
    outputs = [model.forward_packed(ids, cu, max(lengths)) for model in models]
    for out in outputs:
        out.float().square().mean().backward()
    expected, got = (out.detach().float() for out in outputs)
    assert (got - expected).norm() / expected.norm() < 2e-2
    assert_gradients_close(*models)


@needs_cuda
def test_triton_backend_global_layers_without_gradients_match_with_gradients(monkeypatch):
    """Eager inference calls FlashAttention's kernel directly, not through the autograd Function."""
    torch.manual_seed(0)
    cu = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0)).to(torch.int32).cuda()
    q, k, v = (torch.randn(sum(LENGTHS), 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = packed_attention(*inputs, cu, max(LENGTHS), None, "triton").detach()

    def refuse(*args, **kwargs):
        raise AssertionError("the autograd Function was called without gradients to record")

    monkeypatch.setattr(FlashAttention, "apply", refuse)
    with torch.inference_mode():
        got = packed_attention(q, k, v, cu, max(LENGTHS), None, "triton")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("window_half", [None, 8])
def test_repadded_reference_equals_per_sequence_loop(window_half):
    torch.manual_seed(0)
    cu = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0)).to(torch.int32)
    q, k, v = (torch.randn(sum(LENGTHS), 4, 16, requires_grad=True) for _ in range(3))
    batched = reference_attention(q, k, v, cu, window_half)
    looped = reference_attention(q, k, v, cu, window_half, max_padded_scores=0)
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(batched.square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("window_half", [None, 0, 1, 8, 64])
@pytest.mark.parametrize(
    "lengths", [LENGTHS, [7, 7, 7, 300, 300, 1, 1, 40], [1], [513], [65, 3, 3, 64, 9, 10, 11]]
)
def test_packed_sdpa_matches_repadded_reference(window_half, lengths):
    torch.manual_seed(0)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    q, k, v = (torch.randn(sum(lengths), 4, 16, requires_grad=True) for _ in range(3))
    fast = packed_attention(q, k, v, cu, max(lengths), window_half, "packed_sdpa")
    slow = reference_attention(q, k, v, cu, window_half)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(slow)
    fast_grads = torch.autograd.grad((fast * weights).sum(), (q, k, v))
    slow_grads = torch.autograd.grad((slow * weights).sum(), (q, k, v))
    for got, expected in zip(fast_grads, slow_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [1, 5, 32, 1000])
def test_blocked_window_any_block_size(block):
    torch.manual_seed(0)
    cu = F.pad(torch.tensor(LENGTHS).cumsum(0), (1, 0)).to(torch.int32)
    q, k, v = (torch.randn(sum(LENGTHS), 2, 8) for _ in range(3))
    fast = blocked_window_sdpa(q, k, v, cu, 8, block=block)
    torch.testing.assert_close(fast, reference_attention(q, k, v, cu, 8), rtol=1e-5, atol=1e-5)


def test_auto_backend_on_cpu_is_packed_sdpa_without_gradients():
    with torch.no_grad():
        assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "packed_sdpa"
    with torch.inference_mode():
        assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "packed_sdpa"
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "reference"  # training
    assert resolve_backend("reference", torch.device("cpu"), torch.float32) == "reference"


def test_packed_sdpa_model_equals_reference_model(hf_encoder_dir):
    fast = ModernBert.from_pretrained(hf_encoder_dir, attn_backend="packed_sdpa")
    slow = ModernBert.from_pretrained(hf_encoder_dir, attn_backend="reference")
    lengths = [600, 5, 17, 17, 130, 64, 333, 1]  # below, at and far above the 16-token local window
    ids = torch.randint(3, 1000, (sum(lengths),), generator=torch.Generator().manual_seed(0))
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    with torch.inference_mode():
        got = fast.forward_packed(ids, cu, max(lengths))
        expected = slow.forward_packed(ids, cu, max(lengths))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_local_layers_rotate_inside_the_window_kernel_only_eagerly(hf_encoder_dir, monkeypatch):
    """The default: no rotary operator call eagerly; under torch.compile a rotary pass that inductor
    fuses; an explicit setting wins either way."""
    from mbert_retrieval.modeling import encoder

    monkeypatch.setattr(encoder, "uses_window_kernel", lambda *args: True)
    model = ModernBert.from_pretrained(hf_encoder_dir)
    attention = next(layer.attn for layer in model.layers if not layer.is_global)
    assert attention.rotates_in_window_kernel("triton", max_seqlen=512)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not attention.rotates_in_window_kernel("triton", max_seqlen=512)
    attention.rotation_in_window_kernel = True
    assert attention.rotates_in_window_kernel("triton", max_seqlen=512)
    attention.rotation_in_window_kernel = False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert not attention.rotates_in_window_kernel("triton", max_seqlen=512)


def test_triton_backend_needs_a_c_compiler_and_auto_says_why(monkeypatch):
    """Triton builds its kernels' launcher with a C compiler at first use: without one the triton
    backend is unavailable with a reason that says so (`auto` moves on to the next backend), rather
    than failing at the first kernel."""
    import shutil
    import sys
    import types

    from mbert_retrieval.modeling import attention

    # Triton itself importable (it is not on every CI machine) and varlen available for the global layers.
    monkeypatch.setitem(sys.modules, "mbert_retrieval.modeling.window_attention", types.ModuleType("stub"))
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", types.SimpleNamespace(varlen_attn=None))
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    attention._resolve.cache_clear()  # answers of earlier tests, and of this one for later tests
    monkeypatch.setattr(attention, "_resolve", functools.lru_cache(attention._resolve.__wrapped__))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    assert attention.c_compiler_for_triton() == "/usr/bin/gcc"
    assert attention.why_unavailable("triton", cuda, bf16) is None

    assert attention.resolve_backend("auto", cuda, bf16) == "triton"

    monkeypatch.setattr(shutil, "which", lambda name: None)
    reason = attention.why_unavailable("triton", cuda, bf16)
    assert reason is not None and "C compiler" in reason and "CC" in reason
    assert attention.resolve_backend("auto", cuda, bf16) == "triton"  # answered once per process
    attention._resolve.cache_clear()
    assert attention.resolve_backend("auto", cuda, bf16) == "varlen"
    with pytest.raises(RuntimeError, match="C compiler"):
        attention.resolve_backend("triton", cuda, bf16)
    monkeypatch.setenv("CC", "/nonexistent/bin/cc")  # named but absent
    assert attention.c_compiler_for_triton() is None


def test_kernel_offsets_past_32_bits_are_a_clear_error():
    from mbert_retrieval.modeling.attention import check_kernel_offsets

    fits = torch.empty_strided((1000, 12, 64), (2304, 64, 1), device="meta")
    check_kernel_offsets(fits)
    too_many = torch.empty_strided((932_068, 12, 64), (2304, 64, 1), device="meta")  # as qkv's views
    with pytest.raises(ValueError, match="too large for the Triton attention kernels"):
        check_kernel_offsets(too_many)
