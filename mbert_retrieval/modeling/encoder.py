"""ModernBERT on unpadded, packed sequences.

A batch is one sequence of all real tokens, `input_ids [N]`, with `cu_seqlens [B+1]` marking where
each text starts. Padding is removed once at the input (`ModernBert.forward`) and never comes back
inside the model. Parameter names follow `transformers`' ModernBertModel so checkpoints load as-is.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mbert_retrieval.modeling.attention import (
    check_backend_name,
    fits_kernel_offsets,
    packed_attention,
    resolve_backend,
    supports_head_dim,
    uses_window_kernel,
)
from mbert_retrieval.modeling.config import ModernBertConfig
from mbert_retrieval.modeling.cuda_graphs import GraphShapes, ModelGraphs
from mbert_retrieval.modeling.io import (
    CheckpointError,
    find_weights,
    load_weights,
    read_state_dict,
    resolve_model_dir,
    save_safetensors,
)
from mbert_retrieval.modeling.packing import sequence_ids as make_sequence_ids
from mbert_retrieval.modeling.packing import sequence_of

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def layer_norm(config: ModernBertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


class Embeddings(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.norm = layer_norm(config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tok_embeddings(input_ids))


class Rotary(nn.Module):
    """cos/sin tables for one RoPE theta, kept in float32 whatever dtype the model is cast to."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.compiler.disable  # runs eagerly so the cache is built outside any compiled graph
    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tables is None or self._tables[0].device != device:
            self._tables = self._build(device)
        return self._tables

    @torch.inference_mode(False)  # the cache must stay usable by autograd after inference calls
    def _build(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            inv_freq = 1.0 / (
                self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim)
            )
            angles = torch.arange(self.max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
            return angles.cos().to(device), angles.sin().to(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, 1, head_dim / 2] for each token's position; computed once per forward."""
        cos_table, sin_table = self.tables(positions.device)
        return cos_table[positions][:, None, None, :], sin_table[positions][:, None, None, :]


def uses_fused_kernels(backend: str) -> bool:
    """Whether a layer runs rotary and GeGLU as single Triton kernels (`fused_elementwise.py`): on
    the eager CUDA path, and under torch.compile when gradients are on, where inductor's fusion of
    the plain code makes slower backward kernels (benchmarks/NOTES.md, runs 12-13). For compiled
    inference inductor's own fusion is as good."""
    return backend == "triton" and (not torch.compiler.is_compiling() or torch.is_grad_enabled())


def uses_fused_norm(backend: str) -> bool:
    """Whether each residual sum + LayerNorm runs as `fused_norm.py`'s kernels: in compiled training
    graphs, where inductor's backward sums the norm's weight gradient in a pass of its own, and in
    eager inference, where one kernel launch replaces the sum's and the norm's and the sum is not
    read back. Eager training keeps PyTorch's: its LayerNorm backward has no extra pass, and an
    operator call costs more host time than its two aten calls. Compiled inference keeps inductor's
    fused forward."""
    if backend != "triton":
        return False
    compiling, gradients = torch.compiler.is_compiling(), torch.is_grad_enabled()
    return (compiling and gradients) or (not compiling and not gradients)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, 2, heads, head_dim] (q and k; rotate-half convention), in float32 like `transformers`
    (cos and sin are float32)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    # Inference: the same float32 arithmetic and rounding, each half written into the output (no
    # float32 copy of x, no concatenation): the bf16 CPU path +8% end to end (benchmarks/NOTES.md).
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2 = x.chunk(2, dim=-1)
    first, second = out.chunk(2, dim=-1)
    first.copy_(x1 * cos - x2 * sin)
    second.copy_(x2 * cos + x1 * sin)
    return out


class Attention(nn.Module):
    def __init__(self, config: ModernBertConfig, layer: int):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.window_half = None if config.is_global(layer) else config.window_half
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        # None: inside the window kernel eagerly, a rotary pass first under torch.compile.
        self.rotation_in_window_kernel: bool | None = None
        # Global layers of the triton backend, without gradients: our Triton kernel
        # (`global_attention.py`) instead of FlashAttention, 1.3-1.6x faster on an H200
        # (benchmarks/NOTES.md, run 48). Training keeps FlashAttention's forward and backward.
        self.global_kernel_in_inference = True

    def uses_global_kernel(self, backend: str) -> bool:
        return (
            self.global_kernel_in_inference
            and self.window_half is None
            and backend == "triton"
            and not torch.is_grad_enabled()
            and supports_head_dim(self.head_dim)
        )

    def rotates_in_window_kernel(self, backend: str, max_seqlen: int) -> bool:
        """A local layer of the triton backend, run eagerly: the window kernels rotate q and k as they
        load them from qkv (and rotate their gradients back), so no rotary operator is called: an eager
        forward of short variable batches ran at 1.36 M tok/s against 0.99 M with the operator on
        one H200. In compiled graphs the separate pass was as fast or faster (benchmarks/NOTES.md,
        runs 30-32)."""
        wanted = self.rotation_in_window_kernel
        if wanted is None:
            wanted = not torch.compiler.is_compiling()
        return wanted and uses_window_kernel(backend, self.window_half, max_seqlen, self.head_dim)

    def forward(
        self, x, rope: tuple, cu_seqlens, max_seqlen: int, backend: str, key_mask=None, sequence_ids=None
    ):
        qkv = self.Wqkv(x).view(-1, 3, self.num_heads, self.head_dim)
        if self.rotates_in_window_kernel(backend, max_seqlen):
            from mbert_retrieval.modeling.window_attention import window_attention_rotary

            out = window_attention_rotary(qkv, *rope, cu_seqlens, self.window_half, sequence_ids)
            return self.Wo(out.reshape(-1, self.num_heads * self.head_dim))
        if uses_fused_kernels(backend):
            from mbert_retrieval.modeling.fused_elementwise import rotary_qkv

            q, k, v = rotary_qkv(qkv, *rope)
        else:
            # q and k rotated together into one buffer and passed on as views: one fused pass, and a
            # compiled training step of 43 ms instead of 58 ms on an H100 (benchmarks/NOTES.md, step 6).
            q, k = apply_rotary(qkv[:, :2], *rope).unbind(dim=1)
            v = qkv[:, 2]
        if self.uses_global_kernel(backend):
            from mbert_retrieval.modeling.global_attention import global_attention

            out = global_attention(q, k, v, cu_seqlens, max_seqlen)
        else:
            out = packed_attention(
                q, k, v, cu_seqlens, max_seqlen, self.window_half, backend, key_mask, sequence_ids
            )
        return self.Wo(out.reshape(-1, self.num_heads * self.head_dim))


class GeGLU(nn.Module):
    """Wi projects to twice the intermediate size; the first half goes through GELU, the second gates it."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_activation]

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """`fused`: GELU and gate in one Triton kernel (CUDA, exact GELU only)."""
        if fused and self.act is F.gelu:
            from mbert_retrieval.modeling.fused_elementwise import geglu

            return self.Wo(geglu(self.Wi(x)))
        inputs, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.act(inputs) * gate)


class Layer(nn.Module):
    """Pre-norm block; layer 0 has no attention norm because the embeddings end with one."""

    def __init__(self, config: ModernBertConfig, layer: int):
        super().__init__()
        self.is_global = config.is_global(layer)
        self.attn_norm = nn.Identity() if layer == 0 else layer_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = layer_norm(config)
        self.mlp = GeGLU(config)

    def forward(
        self,
        x,
        pending,
        rope: tuple,
        cu_seqlens,
        max_seqlen: int,
        backend: str,
        key_mask=None,
        sequence_ids=None,
    ):
        """Returns the residual stream and the MLP's output not yet added to it (`pending`): the next
        layer adds it as its first step, or the model before the final norm."""
        if pending is not None:
            x, normed = add_and_norm(x, pending, self.attn_norm, backend)
        else:
            normed = self.attn_norm(x)
        attended = self.attn(normed, rope, cu_seqlens, max_seqlen, backend, key_mask, sequence_ids)
        x, normed = add_and_norm(x, attended, self.mlp_norm, backend)
        return x, self.mlp(normed, uses_fused_kernels(backend))


def _raise_recompile_limit(limit: int = 64) -> None:
    """Dynamo falls back to eager, silently, past its graphs-per-function limit (8 by default)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def add_before_norm(x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x + update, for a sum that a LayerNorm reads next. Under torch.compile it is written as
    x - (-update), the same number: inductor would fold `x + matmul` into addmm(x, ...), which
    copies x into the output first and runs a slower GEMM, while the subtraction fuses into the
    LayerNorm's kernel. Each layer also adds the previous layer's MLP output at its start, so that
    sum fuses into its first LayerNorm instead of needing a kernel of its own (benchmarks/NOTES.md,
    step 7)."""
    if torch.compiler.is_compiling():
        return x - update.neg()
    return x + update


def add_and_norm(x: torch.Tensor, update: torch.Tensor, norm: nn.Module, backend: str):
    """The residual sum `x + update` and `norm` of it; one Triton kernel each way in compiled
    training, and one forward kernel in eager inference (`fused_norm.py`)."""
    if uses_fused_norm(backend) and isinstance(norm, nn.LayerNorm) and norm.bias is None:
        from mbert_retrieval.modeling.fused_norm import add_layer_norm

        return add_layer_norm(x, update, norm.weight, norm.eps)
    x = add_before_norm(x, update)
    return x, norm(x)


class ModernBert(nn.Module):
    """The encoder. `forward` takes a padded batch; `forward_packed` the unpadded one."""

    architecture = "ModernBertModel"

    def __init__(self, config: ModernBertConfig, attn_backend: str = "auto"):
        super().__init__()
        check_backend_name(attn_backend)
        self.config = config
        self.attn_backend = attn_backend
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = layer_norm(config)
        head_dim, max_pos = config.head_dim, config.max_position_embeddings
        self.global_rotary = Rotary(head_dim, config.global_rope_theta, max_pos)
        self.local_rotary = Rotary(head_dim, config.local_rope_theta, max_pos)
        self._rotary_table: torch.Tensor | None = None  # both thetas' cos and sin side by side
        self.gradient_checkpointing = False
        self._compiled_run_layers = None  # set by `compile_forward`
        self._graphs = None  # set by `use_cuda_graphs`

    @property
    def device(self) -> torch.device:
        return self.embeddings.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.tok_embeddings.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask [B, L] -> last hidden state [B, L, H], zeros at padding.

        `key_mask` [B, L], when given, narrows what tokens attend to (e.g. ColBERT's [MASK] query
        expansion: those tokens compute states that no token attends to); it runs on the reference
        attention path.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} and input_ids {tuple(input_ids.shape)} differ"
            )
        packed_ids, cu_seqlens, max_seqlen, keep = unpad(input_ids, attention_mask.bool())
        packed_keys = None if key_mask is None else key_mask.bool().flatten()[keep]
        hidden = self.forward_packed(packed_ids, cu_seqlens, max_seqlen, key_mask=packed_keys)
        return repad(hidden, keep, input_ids.shape)

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        position_ids: torch.Tensor | None = None,
        check_inputs: bool = True,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [N], cu_seqlens [B+1] int32 -> hidden states [N, H].

        `check_inputs` validates ids and lengths; on CUDA that costs one host sync, so a caller that
        checked on the CPU before moving the batch (our batchers do) can turn it off.
        """
        if check_inputs:
            self.check_packed_inputs(input_ids, cu_seqlens, max_seqlen)
        plain_call = position_ids is None and key_mask is None
        if self._graphs is not None and self._graphs.serves(self, input_ids, plain_call):
            return self._graphs(self, input_ids, cu_seqlens, max_seqlen)
        return self._forward_checked(input_ids, cu_seqlens, max_seqlen, position_ids, key_mask)

    def forward_unrecorded(self, input_ids, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        """The packed forward past its checks, never from replayed graphs: what they record."""
        return self._forward_checked(input_ids, cu_seqlens, max_seqlen, None, None)

    def _forward_checked(
        self, input_ids, cu_seqlens, max_seqlen: int, position_ids, key_mask
    ) -> torch.Tensor:
        """`forward_packed` past its input checks: what every layer needs is made once, eagerly, then
        the layers run (as one compiled graph after `compile_forward`). Made inside a compiled
        graph, positions and RoPE tables were recomputed by every layer's rotary kernel, a binary
        search per element (benchmarks/NOTES.md, run 12)."""
        # Under autocast (fp32 weights, bf16 compute) the attention kernels see the autocast dtype.
        autocast = torch.is_autocast_enabled(self.device.type)
        compute_dtype = torch.get_autocast_dtype(self.device.type) if autocast else self.dtype
        backend = resolve_backend(self.attn_backend, self.device, compute_dtype)
        if key_mask is not None:  # the packed kernels have no per-key mask
            backend = "reference"
        if backend == "triton" and not fits_kernel_offsets(input_ids.shape[0], 3 * self.config.hidden_size):
            backend = "varlen"  # FlashAttention's offsets are 64-bit; our kernels' are 32-bit
        sequence_ids = None
        if backend == "triton":  # the window kernel's masks, made once for all layers
            sequence_ids = make_sequence_ids(cu_seqlens, input_ids.shape[0])
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, input_ids.shape[0], sequence_ids)
        ropes = self.rotary_per_token(position_ids)
        run = self._compiled_run_layers or ModernBert._run_layers
        return run(self, input_ids, cu_seqlens, max_seqlen, ropes, backend, key_mask, sequence_ids)

    def rotary_per_token(self, positions: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], ...]:
        """(global cos, sin), (local cos, sin), each [N, 1, 1, head_dim / 2] float32: the rows of
        one table holding all four side by side, gathered in one launch (a gather per table and a
        cast of the positions to int64 for each were eight launches, ~0.3 ms of host time per
        eager call on a GPU host: benchmarks/NOTES.md, run 38). The four are views of those rows."""
        rows = self._rotary_rows(positions.device).index_select(0, positions)[:, None, None, :]
        global_cos, global_sin, local_cos, local_sin = rows.chunk(4, dim=-1)
        return (global_cos, global_sin), (local_cos, local_sin)

    @torch.compiler.disable  # runs eagerly so the cache is built outside any compiled graph
    def _rotary_rows(self, device: torch.device) -> torch.Tensor:
        if self._rotary_table is None or self._rotary_table.device != device:
            tables = [*self.global_rotary.tables(device), *self.local_rotary.tables(device)]
            self._rotary_table = torch.cat(tables, dim=1)
        return self._rotary_table

    def _run_layers(
        self, input_ids, cu_seqlens, max_seqlen: int, ropes: tuple, backend: str, key_mask, sequence_ids
    ) -> torch.Tensor:
        """Embeddings, the layers and the final norm: what `compile_forward` compiles."""
        global_rope, local_rope = ropes
        x, pending = self.embeddings(input_ids), None
        for layer in self.layers:
            rope = global_rope if layer.is_global else local_rope
            args = (rope, cu_seqlens, max_seqlen, backend, key_mask, sequence_ids)
            if self.gradient_checkpointing and self.training:
                x, pending = torch.utils.checkpoint.checkpoint(layer, x, pending, *args, use_reentrant=False)
            else:
                x, pending = layer(x, pending, *args)
        return add_and_norm(x, pending, self.final_norm, backend)[1]

    def compile_forward(self, **compile_kwargs) -> ModernBert:
        """torch.compile the embeddings, all layers and the final norm as one graph, for varying
        token counts.

        One compiled call per forward (and one backward) instead of one per layer as with
        `compile_layers`, so less host work per step: on one H200, training on short variable
        batches ran 9-12% faster than with compiled layers, and short inference stayed GPU-bound on
        a slow host (benchmarks/NOTES.md, runs 8-9 and 12).
        Under DDP prefer `compile_layers`: a single backward graph hands over all its gradients at
        its end, so their all-reduce could not overlap the backward.
        """
        _raise_recompile_limit()
        self._forget_recorded_graphs()
        if "mode" not in compile_kwargs:
            # Store each residual sum once (it has two readers, the LayerNorm and the next sum).
            # By default inductor recomputes a chain of up to 4 sums inside every reader, so
            # LayerNorm kernels read 3-5 activations instead of 2 (benchmarks/NOTES.md, run 12).
            options = {"realize_reads_threshold": 1}
            compile_kwargs["options"] = {**options, **compile_kwargs.get("options", {})}
        # The unbound function takes the model as an argument, so a copy of the model runs itself.
        self._compiled_run_layers = torch.compile(ModernBert._run_layers, dynamic=True, **compile_kwargs)
        return self

    def use_cuda_graphs(
        self, shapes: GraphShapes | None = None, enabled: bool = True, streams: int = 1
    ) -> ModernBert:
        """Replay inference calls on CUDA from CUDA graphs (`modeling/cuda_graphs.py`): each padded
        batch shape (`shapes`) is recorded on first use, then its ~300 kernels launch at once, for
        short batches whose kernels the host launches more slowly than the GPU runs them. Calls with
        gradients, in training mode, on the CPU, or with positions or a key mask of their own run as
        before. Works eagerly and compiled (compiling afterwards records again). The copies that
        `encode(..., devices=[...])` makes for other devices start without recordings at every call.
        `streams=2` records each batch as two halves on two streams (`GraphedForward`).
        `enabled=False` turns it off."""
        self._graphs = ModelGraphs(shapes, streams) if enabled else None
        return self

    def _apply(self, fn, recurse: bool = True):
        """Every move and cast (`to`, `cuda`, `half`, ...) goes through here: the weights get new
        storage, whose addresses recorded CUDA graphs do not read, so they are recorded again."""
        self._forget_recorded_graphs()
        return super()._apply(fn, recurse)

    def _forget_recorded_graphs(self) -> None:
        """Recordings made before a compile or a move would replay the old code or read the old
        weights: record again on next use."""
        if getattr(self, "_graphs", None) is not None:
            self._graphs = ModelGraphs(self._graphs.shapes, self._graphs.streams)

    def compile_layers(self, **compile_kwargs) -> ModernBert:
        """torch.compile each layer in place, for varying token counts (dynamic shapes).

        Layers share their code, so all global layers reuse one compiled graph and all local layers another.
        Global / local x training / inference x a few shape specialisations can pass dynamo's default
        limit of 8 graphs per function, after which it silently falls back to eager: raise it.
        """
        _raise_recompile_limit()
        self._forget_recorded_graphs()
        for layer in self.layers:
            layer.compile(dynamic=True, **compile_kwargs)
        return self

    def check_packed_inputs(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
        if input_ids.dim() != 1 or input_ids.numel() == 0:
            raise ValueError(
                f"input_ids must be a non-empty 1-D packed tensor, got shape {tuple(input_ids.shape)}"
            )
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor [batch + 1] starting at 0")
        if max_seqlen > self.config.max_position_embeddings:
            raise ValueError(
                f"a sequence has {max_seqlen} tokens, more than max_position_embeddings="
                f"{self.config.max_position_embeddings}; truncate or split it"
            )
        # One read back from the device for all of them (each int() of a CUDA value waits for it).
        lengths = cu_seqlens.diff()
        low, high, start, end, shortest, longest = torch.stack(
            [input_ids.min(), input_ids.max(), cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]
        ).tolist()
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary (size {self.config.vocab_size})")
        if start != 0 or shortest < 0:
            raise ValueError("cu_seqlens must start at 0 and never decrease")
        if end != input_ids.numel():
            raise ValueError(f"cu_seqlens ends at {end} but there are {input_ids.numel()} tokens")
        if longest > max_seqlen:
            raise ValueError(
                f"max_seqlen={max_seqlen} but a sequence has {longest} tokens: the attention kernels "
                "would leave its end out"
            )

    # -- checkpoints -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        attn_backend: str = "auto",
    ):
        model_dir = resolve_model_dir(path_or_hub_id)
        config = load_config(model_dir)
        model = cls(config, attn_backend=attn_backend)
        state = cls.adapt_state_dict(read_state_dict(model_dir), config)
        load_weights(model, state, find_weights(model_dir))
        model.eval()
        return model.to(device=device, dtype=dtype)

    @classmethod
    def adapt_state_dict(cls, state: dict[str, torch.Tensor], config: ModernBertConfig) -> dict:
        """Accept the encoder saved alone or inside ModernBertForMaskedLM (keys under `model.`)."""
        if any(k.startswith("model.") for k in state):
            state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        return state

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_safetensors(directory / "model.safetensors", self.state_dict())
        self.config.save(directory / "config.json", architectures=[self.architecture])


class MLMHead(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.classifier_bias)
        self.act = ACTIVATIONS[config.classifier_activation]
        self.norm = layer_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x)))


class ModernBertForMaskedLM(nn.Module):
    """Encoder + prediction head + decoder tied to the token embeddings (with its own bias)."""

    architecture = "ModernBertForMaskedLM"

    def __init__(self, config: ModernBertConfig, attn_backend: str = "auto"):
        super().__init__()
        self.config = config
        self.model = ModernBert(config, attn_backend=attn_backend)
        self.head = MLMHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] -> logits [B, L, vocab]."""
        return self.decoder(self.head(self.model(input_ids, attention_mask)))

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        predict_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Logits [N, vocab], or only at `predict_positions` (the masked tokens) when given."""
        hidden = self.model.forward_packed(input_ids, cu_seqlens, max_seqlen, **kwargs)
        if predict_positions is not None:
            hidden = hidden[predict_positions]
        return self.decoder(self.head(hidden))

    @classmethod
    def from_pretrained(cls, path_or_hub_id, *, dtype=None, device=None, attn_backend: str = "auto"):
        model_dir = resolve_model_dir(path_or_hub_id)
        config = load_config(model_dir)
        model = cls(config, attn_backend=attn_backend)
        state = read_state_dict(model_dir)
        if not any(k.startswith("head.") for k in state):
            raise CheckpointError(f"{model_dir} has no MLM head (tensor head.dense.weight is missing)")
        # The decoder is tied to the embeddings; checkpoints may leave it out.
        state.setdefault("decoder.weight", state.get("model.embeddings.tok_embeddings.weight"))
        state = {k: v for k, v in state.items() if v is not None}
        load_weights(model, state, find_weights(model_dir))
        model.eval()
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items() if k != "decoder.weight"}
        save_safetensors(directory / "model.safetensors", state)
        self.config.save(directory / "config.json", architectures=[self.architecture])


def load_config(model_dir: Path) -> ModernBertConfig:
    path = model_dir / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: is {model_dir} a ModernBERT checkpoint folder?")
    return ModernBertConfig.from_json_file(path)


# -- packing -------------------------------------------------------------------------------------


def unpad(
    input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Padded [B, L] -> packed ids [N], cu_seqlens [B+1] int32, max length, flat indices of real tokens."""
    if input_ids.numel() == 0:
        raise ValueError("empty batch: input_ids has no tokens")
    lengths = mask.sum(dim=1, dtype=torch.int32)
    if int(lengths.min()) == 0:
        raise ValueError("a sequence in the batch is empty (attention_mask is all zeros)")
    keep = mask.flatten().nonzero().flatten()
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return input_ids.flatten()[keep], cu_seqlens, int(lengths.max()), keep


def repad(packed: torch.Tensor, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = packed.new_zeros(shape[0] * shape[1], packed.shape[-1])
    out[keep] = packed
    return out.view(shape[0], shape[1], -1)


def positions_from_cu_seqlens(
    cu_seqlens: torch.Tensor, total: int, sequence_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Each token's index within its own sequence [N] int32, computed on the device without a host
    sync; from `sequence_ids` (each token's sequence) when the caller has them."""
    token_index = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
    if sequence_ids is None:
        sequence_ids = sequence_of(cu_seqlens, token_index)
    return token_index - cu_seqlens.index_select(0, sequence_ids)
