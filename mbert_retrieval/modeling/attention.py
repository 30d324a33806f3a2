"""Attention over packed sequences: q, k, v are [total_tokens, heads, head_dim] plus `cu_seqlens`.

Backends:
- "triton": our Triton sliding-window kernel (`window_attention.py`, forward and backward) for the
  local layers, which visits only the key blocks inside each window, and varlen_attn for the global
  layers (CUDA, fp16/bf16, needs the triton package);
- "varlen": `torch.nn.attention.varlen.varlen_attn` (FlashAttention inside PyTorch, CUDA, fp16/bf16);
- "flash_attn": `flash_attn.flash_attn_varlen_func` from the flash-attn package;
- "packed_sdpa": scaled_dot_product_attention on the packed tensors without re-padding, any device
  and dtype: global attention per sequence (runs of equal lengths together) with no mask,
  sliding-window attention in blocks of queries against the keys around them;
- "reference": scaled_dot_product_attention on the batch re-padded to [B, L] (one sequence at a
  time for very uneven batches), any device and dtype.
"auto" picks the first of triton, varlen and flash_attn that can run on the given tensors; otherwise
packed_sdpa for CPU inference without gradients (it scores no padding: on 16k-token batches of
code of mixed lengths, 2.8x less time in global and 4x less in sliding-window attention than the
re-padded reference) and reference elsewhere. With a `key_mask`, packed_sdpa hands over to reference.
"""

from __future__ import annotations

import functools
import os
import shutil

import torch
import torch.nn.functional as F

from mbert_retrieval.modeling.packing import sequence_ids

BACKENDS = ("auto", "triton", "varlen", "flash_attn", "packed_sdpa", "reference")
_HALF = (torch.float16, torch.bfloat16)
PADDED_SCORES_LIMIT = 2**26  # B x L x L mask entries the re-padded reference path may build
WINDOW_BLOCK = 32  # queries per block of packed_sdpa's sliding-window attention


def check_backend_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attn_backend {name!r}; choose one of {', '.join(BACKENDS)}")


def why_unavailable(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `name` can run on tensors of this device and dtype, else the reason it can't."""
    if name in ("reference", "packed_sdpa"):
        return None
    if device.type != "cuda":
        return f"attn_backend={name!r} needs a CUDA device, but the model is on {device.type}"
    if dtype not in _HALF:
        return f"attn_backend={name!r} needs float16 or bfloat16 weights, not {dtype}"
    if name == "varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen (PyTorch >= 2.10 has it)"
        return None
    if name == "triton":
        try:
            import mbert_retrieval.modeling.window_attention  # noqa: F401
        except ImportError:
            return "the triton package is not installed (pip install triton)"
        if c_compiler_for_triton() is None:
            return (
                "Triton builds its kernel launcher with a C compiler and none was found: install gcc "
                "or clang, or name one in CC"
            )
        return why_unavailable("varlen", device, dtype)  # the global layers
    if name == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "the flash-attn package is not installed (pip install flash-attn)"
        return None
    raise ValueError(f"unknown attn_backend {name!r}")


def c_compiler_for_triton() -> str | None:
    """The C compiler Triton would build its launcher with (CC, else gcc, else clang), if any: without
    one its first kernel fails, so `auto` picks another backend instead."""
    named = os.environ.get("CC")
    if named:
        return shutil.which(named) or (named if os.path.isfile(named) else None)
    return shutil.which("gcc") or shutil.which("clang")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `name` stands for on this device and dtype (`auto`: the first that can run), or a
    RuntimeError saying why the named one cannot. Answered once per case: every forward asks, and
    the availability checks look for a C compiler on the PATH (~30 us)."""
    check_backend_name(name)
    return _resolve(name, torch.device(device), dtype, torch.is_grad_enabled())


@functools.lru_cache(maxsize=64)
def _resolve(name: str, device: torch.device, dtype: torch.dtype, grad_enabled: bool) -> str:
    if name != "auto":
        reason = why_unavailable(name, device, dtype)
        if reason:
            raise RuntimeError(reason)
        return name
    for candidate in ("triton", "varlen", "flash_attn"):
        if why_unavailable(candidate, device, dtype) is None:
            return candidate
    # CPU training keeps the reference path and its exact numerics; name packed_sdpa to train with it
    # (its gradients match the reference's, tests/test_attention_backends.py).
    return "packed_sdpa" if device.type == "cpu" and not grad_enabled else "reference"


def records_gradients(*inputs: torch.Tensor) -> bool:
    """Whether an eager call must go through its autograd Function. Without gradients (inference,
    frozen inputs) the kernels are launched directly: the Function costs ~20 us of host time per
    call (benchmarks/results/launch_overhead.json), and an eager forward of a base model makes ~50."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    window_half: int | None,
    backend: str,
    key_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence; `window_half` tokens each side if set.

    `key_mask` [N] (reference backend; packed_sdpa falls back to it) keeps tokens others may attend to; every token still
    computes its own output. A token left with nothing to attend to gets zeros. `sequence_ids` [N]
    int32 (`packing.sequence_ids`), for the triton backend, is made once per forward.
    """
    if backend == "triton":
        if uses_window_kernel(backend, window_half, max_seqlen, q.shape[-1]):
            from mbert_retrieval.modeling.window_attention import window_attention

            return window_attention(q, k, v, cu_seqlens, window_half, sequence_ids)
        if window_half is not None and max_seqlen <= window_half + 1:
            window_half = None  # a window wider than every sequence is no window
        if not torch.compiler.is_compiling() and not records_gradients(q, k, v):
            return FlashAttention.run(
                q, k, v, cu_seqlens, max_seqlen, -1 if window_half is None else window_half
            )[0]
        return FlashAttention.apply(q, k, v, cu_seqlens, max_seqlen, window_half)
    window = (window_half, window_half) if window_half is not None else (-1, -1)
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=window)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=window
        )
    if backend == "packed_sdpa" and key_mask is None:
        # A window wider than every sequence is no window: short texts (queries) skip the blocks.
        if window_half is None or max_seqlen <= window_half + 1:
            return per_sequence_sdpa(q, k, v, cu_seqlens)
        return blocked_window_sdpa(q, k, v, cu_seqlens, window_half)
    return reference_attention(q, k, v, cu_seqlens, window_half, key_mask)


class FlashAttention(torch.autograd.Function):
    """The FlashAttention kernels behind `varlen_attn`, called directly, for the triton backend's
    global layers. varlen_attn wraps them in Python operators: eagerly, their autograd wrapper adds
    host time to every call (~50 us for our own window operator with gradients,
    benchmarks/results/launch_overhead.json); compiled, inductor calls each through Python (a Python
    operator call cost ~190 us of host time in run 19, benchmarks/NOTES.md), while these aten
    operators it calls directly. Steps of short batches are bound by the host."""

    @staticmethod
    def run(q, k, v, cu_seqlens, max_seqlen: int, side: int) -> tuple:
        """out, the log-sum-exp and the RNG state; `side`: the window's half width, -1 for none."""
        out, lse, rng_state, _, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, False,
            window_size_left=side, window_size_right=side,
        )  # fmt: skip
        return out, lse, rng_state

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen: int, window_half: int | None):
        side = -1 if window_half is None else window_half
        out, lse, rng_state = FlashAttention.run(q, k, v, cu_seqlens, max_seqlen, side)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state)
        ctx.max_seqlen, ctx.side = max_seqlen, side
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, rng_state = ctx.saved_tensors
        unused = torch.empty(0, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_seqlen,
            ctx.max_seqlen, 0.0, False, rng_state, unused,
            window_size_left=ctx.side, window_size_right=ctx.side,
        )  # fmt: skip
        return dq, dk, dv, None, None, None


KERNEL_OFFSET_LIMIT = 2**31  # our attention kernels index their inputs with 32-bit offsets


def check_kernel_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, kernel: str
) -> None:
    """What our Triton attention kernels (`kernel`: their name in the message) need of their inputs."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one [tokens, heads, dim] shape, got {q.shape}, {k.shape}, {v.shape}"
        )
    if not supports_head_dim(q.shape[-1]):
        raise ValueError(f"head_dim must be a power of two >= 16 for the {kernel}, got {q.shape[-1]}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError("cu_seqlens must be int32")
    check_kernel_offsets(q, k, v)


def fits_kernel_offsets(tokens: int, token_stride: int) -> bool:
    """Whether rows of `tokens` tokens, `token_stride` elements apart, stay within our kernels'
    32-bit offsets (tokens x stride bounds every offset of a [N, heads, dim] tensor)."""
    return tokens * token_stride < KERNEL_OFFSET_LIMIT


def check_kernel_offsets(*tensors: torch.Tensor) -> None:
    """A clear error where a Triton attention kernel's 32-bit element offsets would overflow."""
    for tensor in tensors:
        if not fits_kernel_offsets(tensor.shape[0], tensor.stride(0)):
            raise ValueError(
                f"a batch of {tensor.shape[0]} tokens is too large for the Triton attention kernels "
                f"(element offsets past 2**31); split it into smaller batches"
            )


def supports_head_dim(head_dim: int) -> bool:
    """Head sizes our Triton attention kernels take: powers of two from 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def uses_window_kernel(backend: str, window_half: int | None, max_seqlen: int, head_dim: int) -> bool:
    """Whether a layer runs our Triton window kernel: the triton backend, a window narrower than the
    longest sequence, and a head size the kernel takes."""
    return (
        backend == "triton"
        and window_half is not None
        and max_seqlen > window_half + 1
        and supports_head_dim(head_dim)
    )


@torch.compiler.disable  # a Python loop over the batch's lengths: compiled, it would recompile per batch
def per_sequence_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Global attention with no mask and no padding: one SDPA call per run of consecutive sequences
    of equal length (our batches are sorted by length, so runs are common).

    The inputs go to SDPA as 4-D [B, heads, L, dim]: on the CPU, 3-D inputs take the slow math path.
    """
    bounds, lengths = cu_seqlens.tolist(), cu_seqlens.diff().tolist()
    heads, dim = q.shape[1:]
    outs, i = [], 0
    while i < len(lengths):
        j = i + 1
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        start, end, length = bounds[i], bounds[j], lengths[i]
        qs, ks, vs = (t[start:end].view(j - i, length, heads, dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs)  # [B, heads, L, dim]
        outs.append(out.transpose(1, 2).reshape(end - start, heads, dim))
        i = j
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def blocked_window_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window_half: int,
    block: int = WINDOW_BLOCK,
) -> torch.Tensor:
    """Sliding-window attention straight on the packed tokens, without re-padding.

    The N tokens are cut into blocks of `block` queries; block b attends to the packed keys
    [b * block - window_half, (b + 1) * block + window_half), masked to the query's own sequence
    and to |query - key| <= window_half. Score entries per head: N x (block + 2 window_half),
    whatever the batch's lengths, instead of B x L x L.
    """
    total, heads, dim = q.shape
    blocks = -(-total // block)
    tail = blocks * block - total
    span = block + 2 * window_half

    def key_blocks(t: torch.Tensor) -> torch.Tensor:  # [blocks, heads, span, dim], a strided view
        return F.pad(t, (0, 0, 0, 0, window_half, tail + window_half)).unfold(0, span, block).transpose(2, 3)

    queries = F.pad(q, (0, 0, 0, 0, 0, tail)).view(blocks, block, heads, dim).transpose(1, 2)
    # Each token's sequence; the padding gets -1 (padded queries attend to padded keys, so no row
    # is empty and no NaN appears, even in gradients).
    sequence = sequence_ids(cu_seqlens, total)
    query_sequence = F.pad(sequence, (0, tail), value=-1).view(blocks, block)
    key_sequence = F.pad(sequence, (window_half, tail + window_half), value=-1).unfold(0, span, block)
    # query i of a block sits at key slot i + window_half of the same block
    offset = torch.arange(span, device=q.device)[None, :] - torch.arange(block, device=q.device)[:, None]
    band = (offset >= 0) & (offset <= 2 * window_half)  # [block, span], the same for every block
    mask = (query_sequence[:, :, None] == key_sequence[:, None, :]) & band  # [blocks, block, span]
    out = F.scaled_dot_product_attention(queries, key_blocks(k), key_blocks(v), attn_mask=mask[:, None])
    return out.transpose(1, 2).reshape(blocks * block, heads, dim)[:total]


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window_half: int | None,
    key_mask: torch.Tensor | None = None,
    *,
    max_padded_scores: int = PADDED_SCORES_LIMIT,
) -> torch.Tensor:
    """SDPA on the batch re-padded to [B, heads, L, dim]; one sequence at a time when its B x L x L
    mask would be larger than `max_padded_scores`."""
    lengths = cu_seqlens.diff()
    batch, longest = lengths.numel(), int(lengths.max())
    if batch > 1 and batch * longest * longest > max_padded_scores:
        bounds = cu_seqlens.tolist()
        return torch.cat(
            [
                reference_attention(
                    q[start:end],
                    k[start:end],
                    v[start:end],
                    cu_seqlens.new_tensor([0, end - start]),
                    window_half,
                    None if key_mask is None else key_mask[start:end],
                )
                for start, end in zip(bounds[:-1], bounds[1:])
            ]
        )
    sequence = torch.repeat_interleave(torch.arange(batch, device=q.device), lengths)
    position = torch.arange(q.shape[0], device=q.device) - cu_seqlens[sequence]

    def padded(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(batch, longest, *t.shape[1:])
        out[sequence, position] = t
        return out.transpose(1, 2)

    slots = torch.arange(longest, device=q.device)
    is_real = slots[None, :] < lengths[:, None]  # [B, L]
    keys = is_real if key_mask is None else padded(key_mask[:, None]).squeeze(1).bool()
    mask = keys[:, None, :]  # [B, query, key]
    if window_half is not None:
        mask = mask & window_mask(longest, window_half, q.device)[None]
    out = masked_sdpa(padded(q), padded(k), padded(v), mask[:, None])
    return out.transpose(1, 2)[sequence, position]


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA where a query row with no allowed key gets zeros instead of NaN (and no NaN gradients)."""
    has_key = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key)
    return out.masked_fill(~has_key, 0.0)


def window_mask(length: int, window_half: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(length, device=device)
    return (positions[:, None] - positions[None, :]).abs() <= window_half
