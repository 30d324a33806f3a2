"""The fused residual sum + LayerNorm kernels against `x + update` and `F.layer_norm`, with gradients.

They run on a CUDA GPU, or on the CPU under Triton's interpreter:
    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -q tests/test_fused_norm.py
Without either (or without Triton) the tests are skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_kernels import (
    DEVICE,
    ON_GPU,
    assert_autocast_training_matches_the_plain_path,
    needs_gpu_compile,
    relative_error,
    skip_unless_kernels_run,
)

skip_unless_kernels_run("the fused kernels")

from mbert_retrieval.modeling import fused_norm  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
EPS = 1e-5


def plain_add_norm(x, update, weight, eps=EPS):
    total = x + update
    return total, F.layer_norm(total, total.shape[-1:], weight, None, eps)


def inputs(tokens, width, dtypes, seed):
    """x with a large mean and spread (as a residual stream has), update, weight, upstream gradients."""
    generator = torch.Generator().manual_seed(seed)
    x = (4 * torch.randn(tokens, width, generator=generator) + 3).to(DEVICE, dtypes[0])
    update = torch.randn(tokens, width, generator=generator).to(DEVICE, dtypes[1])
    weight = (1 + 0.1 * torch.randn(width, generator=generator)).to(DEVICE, dtypes[2])
    dtype = torch.promote_types(dtypes[0], dtypes[1])
    upstream = [torch.randn(tokens, width, generator=generator).to(DEVICE, dtype) for _ in range(2)]
    return x, update, weight, upstream


def run_with_gradients(add_norm, x, update, weight, upstream, used=(0, 1)):
    leaves = [t.clone().requires_grad_() for t in (x, update, weight)]
    outputs = add_norm(*leaves)
    sum((outputs[i].float() * upstream[i].float()).sum() for i in used).backward()
    return outputs, [leaf.grad for leaf in leaves]


def assert_matches(got, expected, tolerance):
    (outputs, grads), (plain_outputs, plain_grads) = got, expected
    for out, plain in zip(outputs, plain_outputs):
        assert out.dtype == plain.dtype and out.shape == plain.shape
        assert relative_error(out, plain) < tolerance
    for grad, plain in zip(grads, plain_grads):
        assert grad.dtype == plain.dtype
        assert relative_error(grad, plain) < tolerance


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, width", [(1, 16), (7, 100), (130, 768), (300, 64)])
def test_add_layer_norm_matches_plain_code_with_gradients(dtype, tokens, width):
    """Token counts below, at and past a backward program's rows (partial sums of the weight's
    gradient over several programs), widths that are and are not powers of two."""
    x, update, weight, upstream = inputs(tokens, width, (dtype, dtype, dtype), tokens + width)
    got = run_with_gradients(lambda *a: fused_norm.add_layer_norm(*a, EPS), x, update, weight, upstream)
    expected = run_with_gradients(plain_add_norm, x, update, weight, upstream)
    assert_matches(got, expected, 1e-5 if dtype == torch.float32 else 1e-2)


def test_add_layer_norm_under_autocast_dtypes():
    """bf16 autocast training: float32 residual stream and weight, a bf16 update (a Linear's output);
    the sum and the norm in float32, each input's gradient in its own dtype."""
    x, update, weight, upstream = inputs(70, 96, (torch.float32, torch.bfloat16, torch.float32), 3)
    got = run_with_gradients(lambda *a: fused_norm.add_layer_norm(*a, EPS), x, update, weight, upstream)
    expected = run_with_gradients(plain_add_norm, x, update, weight, upstream)
    assert_matches(got, expected, 1e-5)


@pytest.mark.parametrize("used", [(1,), (0,)])
def test_add_layer_norm_with_one_output_unused(used):
    """The final norm's sum has no other reader (its gradient is None); an unused norm output too."""
    x, update, weight, upstream = inputs(90, 32, (torch.float32,) * 3, 5)
    got = run_with_gradients(lambda *a: fused_norm.add_layer_norm(*a, EPS), x, update, weight, upstream, used)
    expected = run_with_gradients(plain_add_norm, x, update, weight, upstream, used)
    assert relative_error(got[1][0], expected[1][0]) < 1e-5
    if used == (1,):
        assert relative_error(got[1][2], expected[1][2]) < 1e-5
    else:
        assert got[1][2] is None or got[1][2].abs().max() == 0


def test_add_layer_norm_reads_strided_rows():
    wide = torch.randn(11, 80, device=DEVICE)
    x, update = wide[:, :32], wide[:, 40:72]
    weight = torch.rand(32, device=DEVICE) + 0.5
    for got, expected in zip(
        fused_norm.add_layer_norm(x, update, weight, EPS), plain_add_norm(x, update, weight)
    ):
        assert relative_error(got, expected) < 1e-5


def test_add_layer_norm_without_gradients_launches_the_kernel_directly(monkeypatch):
    """Eager inference: the forward kernel without the operator around it, the plain code's numbers."""
    x, update, weight, _ = inputs(130, 96, (torch.float32,) * 3, 9)
    expected = plain_add_norm(x, update, weight)

    def refuse(*args, **kwargs):
        raise AssertionError("the operator was called without gradients to record")

    monkeypatch.setattr(fused_norm, "add_layer_norm_forward_op", refuse)
    with torch.inference_mode():
        got = fused_norm.add_layer_norm(x, update, weight, EPS)
    for out, plain in zip(got, expected, strict=True):
        assert relative_error(out, plain) < 1e-5


def test_add_layer_norm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="add_layer_norm needs"):
        fused_norm.add_layer_norm(torch.zeros(4, 8), torch.zeros(4, 6), torch.ones(8), EPS)


@needs_gpu_compile
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("used", [(0, 1), (1,)])
def test_add_layer_norm_operator_under_torch_compile_matches_plain_code(dtype, used):
    """What a compiled training step runs: the kernels as operators with their own backward."""
    x, update, weight, upstream = inputs(333, 768, (dtype, dtype, dtype), 7)
    compiled = torch.compile(lambda *a: fused_norm.add_layer_norm(*a, EPS), dynamic=True)
    got = run_with_gradients(compiled, x, update, weight, upstream, used)
    expected = run_with_gradients(plain_add_norm, x, update, weight, upstream, used)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for out, plain in zip(got[0], expected[0]):
        assert relative_error(out, plain) < tolerance
    for grad, plain in zip(got[1], expected[1]):
        assert relative_error(grad, plain) < tolerance


def test_model_with_the_fused_kernels_matches_the_plain_path(hf_encoder_dir, monkeypatch):
    """The whole encoder with every fused kernel (rotary, GeGLU, residual sum + LayerNorm, the final
    norm's sum without a reader of its own) against the plain code, outputs and every parameter's
    gradient. Attention is packed_sdpa in both, so this runs on the CPU under the interpreter."""
    from mbert_retrieval import ModernBert
    from mbert_retrieval.modeling import encoder

    calls = []
    original = fused_norm.add_layer_norm
    monkeypatch.setattr(fused_norm, "add_layer_norm", lambda *a: calls.append(1) or original(*a))
    lengths = [70, 5, 33]
    ids = torch.randint(3, 1000, (sum(lengths),), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)
    results = {}
    for fused in (True, False):
        for gate in ("uses_fused_kernels", "uses_fused_norm"):
            monkeypatch.setattr(encoder, gate, lambda backend, _fused=fused: _fused)
        model = ModernBert.from_pretrained(hf_encoder_dir, device=DEVICE, attn_backend="packed_sdpa").train()
        out = model.forward_packed(ids, cu, max(lengths))
        out.square().mean().backward()
        results[fused] = out, {name: p.grad for name, p in model.named_parameters()}
    layers = model.config.num_hidden_layers
    assert len(calls) == 2 * layers  # layer 0 has no attention norm; the final norm makes up for it
    (out, grads), (plain_out, plain_grads) = results[True], results[False]
    assert relative_error(out, plain_out) < 1e-5
    for name, grad in grads.items():
        assert relative_error(grad, plain_grads[name]) < 1e-4, name
    for gate in ("uses_fused_kernels", "uses_fused_norm"):
        monkeypatch.setattr(encoder, gate, lambda backend: True)
    with torch.inference_mode():  # eager inference: the forward kernels alone
        inferred = model.eval().forward_packed(ids, cu, max(lengths))
    assert len(calls) == 4 * layers
    assert relative_error(inferred, plain_out) < 1e-5


@needs_gpu_compile
@pytest.mark.parametrize("cpp_wrapper", [False, True], ids=["python_launcher", "cpp_launcher"])
def test_compiled_autocast_training_matches_the_plain_path(hf_encoder_dir, cpp_wrapper):
    """What `train --compile` runs on a GPU: float32 weights under bf16 autocast, the whole forward
    compiled on the triton backend (every fused kernel an operator in the graph; the residual stream
    float32, the updates bf16; kernels launched from C++ as the trainer does, or from Python)
    against the varlen backend's plain code, eagerly."""
    from mbert_retrieval import ModernBert

    models = {
        backend: ModernBert.from_pretrained(hf_encoder_dir, device="cuda", attn_backend=backend).train()
        for backend in ("triton", "varlen")
    }
    models["triton"].compile_forward(options={"cpp_wrapper": cpp_wrapper})
    assert_autocast_training_matches_the_plain_path(models, lengths=[300, 5, 40, 129, 1])
