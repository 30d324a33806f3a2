"""Global attention over packed sequences through PyTorch's FlashAttention (`torch_attn::_varlen_attn`),
behind our own operator whose arguments are tensors and integers only.

`torch.nn.attention.varlen.varlen_attn` takes its window as a list of integers, which
torch.compile's C++ wrapper (`compile_layers(options={"cpp_wrapper": True})`) cannot yet pass to an
operator it does not compile; this operator has no window (the global layers need none) and so
compiles either way. Forward and backward are PyTorch's own kernels, called with the same arguments
`varlen_attn` gives them.
"""

from __future__ import annotations

import torch
from torch.nn.attention import varlen  # noqa: F401  (registers the torch_attn operators)


@torch.library.custom_op("mbert_retrieval::global_attention_fwd", mutates_args=())
def global_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output [N, heads, dim], log-sum-exp and the RNG state FlashAttention's backward takes."""
    out, lse, rng_state = torch.ops.torch_attn._varlen_attn(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, False
    )
    return out, lse, rng_state


@global_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen):
    return torch.ops.torch_attn._varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, False)


@torch.library.custom_op("mbert_retrieval::global_attention_bwd", mutates_args=())
def global_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    rng_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv."""
    dq, dk, dv = torch.ops.torch_attn._varlen_attn_backward(
        grad_out, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, False, rng_state
    )
    return dq, dk, dv


@global_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, rng_state):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen = inputs
    out, lse, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state)
    ctx.max_seqlen = max_seqlen
    ctx.mark_non_differentiable(lse, rng_state)


def _backward(ctx, grad_out, _grad_lse, _grad_rng_state):
    q, k, v, out, lse, cu_seqlens, rng_state = ctx.saved_tensors
    dq, dk, dv = global_attention_bwd(
        grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, rng_state
    )
    return dq, dk, dv, None, None


global_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def global_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """Full attention within each packed sequence: q, k, v [N, heads, dim] -> [N, heads, dim]."""
    return global_attention_fwd(q, k, v, cu_seqlens, max_seqlen)[0]
