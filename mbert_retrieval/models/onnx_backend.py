"""A CPU backend for dense models: the model exported to ONNX, int8 weights, run by onnxruntime.

    export_onnx("path/to/dense-model", "model.onnx")            # or `mbert-retrieval export-onnx`
    model = OnnxDenseRetriever.from_pretrained("path/to/dense-model", onnx_file="model.onnx")
    model.encode_documents(["def f(): ..."])                      # as DenseRetriever.encode_documents

The exported graph is the whole dense model on a padded batch: `input_ids, attention_mask [B, L]`
(int64) -> `embeddings [B, dim]` float32 (pooled, projected, normalised as the model says). With
`quantize` (the default) the linear layers' weights are int8 and their inputs quantised per call
(onnxruntime's dynamic quantisation), after each input's channels are smoothed into the weights
(`smoothing.py`: the same float32 function, half the int8 error); the embedding table and the norms
stay float32. Rotary embeddings are onnxruntime's fused `com.microsoft.RotaryEmbedding`, so the file
runs on onnxruntime.

`OnnxDenseRetriever` is a `DenseRetriever` whose forward pass runs that graph, so tokenization,
prefixes, chunking, Matryoshka `dim` and batching are the same code; each packed batch is cut into
runs of similar lengths and padded (padding is what ONNX Runtime's kernels take).

An exported file found next to the model (`MODEL/onnx/model.onnx`) or in the user cache (where
`cpu_backend="onnx"` exports it on first use) is what `cpu_backend.load_dense_encoder` runs.
An export records a digest of the weights it was made from, and loading checks it against the model:
the old export of a retrained model is refused, not run.
Needs the `onnx` extra: `pip install mbert-retrieval[onnx]`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mbert_retrieval.files import atomic_write
from mbert_retrieval.modeling.io import find_weights
from mbert_retrieval.models.dense import DenseRetriever
from mbert_retrieval.models.smoothing import smoothed_for_int8

logger = logging.getLogger("mbert_retrieval")

ONNX_FILE = Path("onnx") / "model.onnx"  # relative to the model folder
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embeddings"
OPSET = 17
DIGEST_KEY = "mbert_retrieval.weights_digest"  # ONNX metadata: the digest of the exported weights
GRAPH_VERSION = 4  # of PaddedDenseGraph and its weights: a new version re-exports the cached files
PADDING_SLACK = 1.25  # a padded run may hold at most this many times its real tokens
# Runs of at most 8 sequences, each run by one thread, several runs at once: on 2 cores (600 Python
# functions, int8) ~55 docs/s at 4-8 sequences per run against ~47 for runs of 32 on 2 intra-op threads.
RUN_SEQUENCES = 8


class OnnxBackendError(RuntimeError):
    """onnxruntime (or onnx) is missing, or an ONNX file does not fit the model."""


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise OnnxBackendError(
            "the ONNX backend needs onnxruntime: pip install 'mbert-retrieval[onnx]'"
        ) from err
    return onnxruntime


# -- export ------------------------------------------------------------------------------------------


class PaddedDenseGraph(nn.Module):
    """The dense model on a right-padded batch, written with operators ONNX has: the same weights
    and arithmetic as `DenseRetriever.forward_packed`, with padding masked out of attention and
    pooling instead of removed."""

    def __init__(self, model: DenseRetriever):
        super().__init__()
        self.model = model
        config = model.encoder.config
        # Per layer: q (with the attention scale folded in), k and v, and the two GeGLU halves as
        # linear layers of their own (weights and biases, if any), so each is a constant product
        # quantised alone, and nothing slices the outputs at run time.
        scale = config.head_dim**-0.5
        self.split_layers = nn.ModuleList()
        for layer in model.encoder.layers:
            parts = {}
            for name, linear, size, factors in (
                ("attn", layer.attn.Wqkv, config.hidden_size, (scale, 1.0, 1.0)),
                ("mlp", layer.mlp.Wi, config.intermediate_size, (1.0, 1.0)),
            ):
                weights = linear.weight.detach().split(size)
                biases = [None] * len(weights) if linear.bias is None else linear.bias.detach().split(size)
                for number, (weight, bias, factor) in enumerate(zip(weights, biases, factors)):
                    parts[f"{name}{number}"] = _linear_of(
                        weight * factor, None if bias is None else bias * factor
                    )
            self.split_layers.append(nn.ModuleDict(parts))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model, encoder = self.model, self.model.encoder
        config = encoder.config
        batch, length = input_ids.shape
        heads, head_dim, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
        positions = torch.arange(length, device=input_ids.device)
        position_ids = positions[None].expand(batch, length)
        tables = {
            is_global: rotary.tables(input_ids.device)
            for is_global, rotary in ((True, encoder.global_rotary), (False, encoder.local_rotary))
        }
        # Additive masks, built once: -1e9 where a query may not look (padding; outside the window).
        # Explicit softmax attention, not SDPA: its export adds NaN guards that cost 8% of the time.
        blocked = (1 - attention_mask.to(torch.float32))[:, None, None, :] * -1e9  # [B, 1, 1, L]
        outside = ((positions[:, None] - positions[None, :]).abs() > config.window_half).to(torch.float32)
        biases = {True: blocked, False: blocked + outside[None, None] * -1e9}
        x = encoder.embeddings(input_ids)
        for layer, split in zip(encoder.layers, self.split_layers):
            normed = layer.attn_norm(x)
            q, k, v = (split[f"attn{n}"](normed) for n in range(3))  # [B, L, hidden]
            cos, sin = tables[layer.is_global]
            q, k = (RotaryEmbedding.apply(t, position_ids, cos, sin, heads) for t in (q, k))
            q, k, v = (t.view(batch, length, heads, head_dim) for t in (q, k, v))
            scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) + biases[layer.is_global]
            out = scores.softmax(dim=-1) @ v.transpose(1, 2)  # [B, heads, L, head_dim]
            x = x + layer.attn.Wo(out.transpose(1, 2).reshape(batch, length, hidden))
            normed = layer.mlp_norm(x)
            x = x + layer.mlp.Wo(layer.mlp.act(split["mlp0"](normed)) * split["mlp1"](normed))
        hidden_states = encoder.final_norm(x)
        real = attention_mask.to(hidden_states.dtype)[..., None]
        if model.pooling == "mean":
            pooled = (hidden_states * real).sum(dim=1) / real.sum(dim=1)
        else:
            pooled = hidden_states[:, 0]
        return model.from_pooled(pooled)


def _linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class RotaryEmbedding(torch.autograd.Function):
    """Rotate-half RoPE of x [B, L, heads * head_dim] at `position_ids` [B, L], from the float32
    tables [positions, head_dim / 2]. Exported as onnxruntime's fused `com.microsoft.RotaryEmbedding`
    (one operator where the plain form takes six: slices, concat, products, sum); run in PyTorch,
    it is `rotate`."""

    @staticmethod
    def forward(ctx, x, position_ids, cos_table, sin_table, heads: int):
        batch, length, width = x.shape
        cos, sin = rotation_tables((cos_table, sin_table), position_ids[0])
        return rotate(x.view(batch, length, heads, width // heads), cos, sin).reshape(batch, length, width)

    @staticmethod
    def symbolic(g, x, position_ids, cos_table, sin_table, heads: int):
        rotated = g.op(
            "com.microsoft::RotaryEmbedding",
            *(x, position_ids, cos_table, sin_table),
            interleaved_i=0,
            num_heads_i=heads,
        )
        rotated.setType(x.type())  # the exporter cannot infer a contrib operator's output
        return rotated


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B, L, heads, head_dim] as `apply_rotary` does it: x * cos + cat(x2, x1)
    * sin, the sign of the first half in sin."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((second, first), dim=-1) * sin


def rotation_tables(tables: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor):
    """cos, sin [L, 1, head_dim] for `x * cos + cat(x2, x1) * sin` over x [B, L, heads, head_dim],
    the rotate-half RoPE of `apply_rotary` (the sign of the first half is in sin)."""
    cos, sin = (t[positions][:, None, :] for t in tables)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def export_onnx(
    model: DenseRetriever | str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    quantize: bool = True,
    smooth: bool = True,
) -> Path:
    """Write `model` (a DenseRetriever, or its folder / hub id; None: the shipped model) as an ONNX
    file at `out`, with int8 linear layers when `quantize`, their inputs smoothed first when `smooth`
    (`smoothing.smoothed_for_int8`). Atomic: `out` appears complete or not at all."""
    require_onnxruntime()
    if not isinstance(model, DenseRetriever):
        model = DenseRetriever.from_pretrained(model, device="cpu", dtype=torch.float32)
    elif model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError("export a DenseRetriever loaded on the CPU in float32 (device='cpu')")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        plain, quantized = Path(tmp) / "model.onnx", Path(tmp) / "int8.onnx"
        _trace(smoothed_for_int8(model.eval()) if quantize and smooth else model.eval(), plain)
        if quantize:
            _quantize(plain, quantized)
        digest = weights_digest(model)
        atomic_write(out, lambda target: _stamp(quantized if quantize else plain, target, digest))
    return out


def weights_digest(model: nn.Module) -> str:
    """A digest of the model's weights (names, shapes and float32 values): what an export records,
    and what loading it checks, so an export is never run for weights it was not made from."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def _stamp(source: Path, target: Path, digest: str) -> None:
    """Copy the ONNX file `source` to `target` with the weights' digest in its metadata."""
    import onnx

    graph = onnx.load(str(source))
    entry = graph.metadata_props.add()
    entry.key, entry.value = DIGEST_KEY, digest
    onnx.save(graph, str(target))


def _trace(model: DenseRetriever, path: Path) -> None:
    sample = model.tokenize(["def example(x):\n    return x + 1", "class Example:\n    pass"])
    input_ids, attention_mask = pad_numpy(sample, model.encoder.config.pad_token_id)
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(
            PaddedDenseGraph(model),
            (torch.from_numpy(input_ids), torch.from_numpy(attention_mask)),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "length"},
                "attention_mask": {0: "batch", 1: "length"},
                OUTPUT_NAME: {0: "batch"},
            },
            opset_version=OPSET,
            custom_opsets={"com.microsoft": 1},  # RotaryEmbedding
            dynamo=False,
        )


@contextlib.contextmanager
def _quiet_export():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        yield


def _quantize(source: Path, target: Path) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:
        raise OnnxBackendError(
            "int8 export needs the onnx package: pip install 'mbert-retrieval[onnx]'"
        ) from err
    # Only MatMul: a quantised Gather would round the embedding table to int8 as well.
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])


# -- running -----------------------------------------------------------------------------------------


def pad_numpy(sequences: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id arrays -> right-padded `input_ids, attention_mask [B, L]` int64."""
    longest = max(len(s) for s in sequences)
    input_ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def similar_length_runs(lengths: np.ndarray, slack: float = PADDING_SLACK) -> list[tuple[int, int]]:
    """Cut sequences (sorted longest first, as our batches are) into consecutive runs whose padded
    size stays within `slack` times their real tokens."""
    runs, start = [], 0
    for end in range(1, len(lengths) + 1):
        if end == len(lengths) or lengths[start] * (end + 1 - start) > slack * lengths[start : end + 1].sum():
            runs.append((start, end))
            start = end
    return runs


class OnnxDenseRetriever(DenseRetriever):
    """A DenseRetriever whose forward pass runs an exported ONNX file on the CPU (inference only)."""

    session = None
    onnx_file: Path | None = None
    workers: int = 1  # runs at once, each on one thread
    _pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id=None, *, onnx_file: str | os.PathLike, threads: int | None = None, **kwargs
    ) -> OnnxDenseRetriever:
        """The model folder as `DenseRetriever.from_pretrained` reads it (on the CPU), running
        `onnx_file`; `threads`: how many padded runs go through onnxruntime at once, each on one
        thread (default: torch's thread count)."""
        model = super().from_pretrained(path_or_hub_id, device="cpu", dtype=torch.float32, **kwargs)
        model.attach_session(onnx_file, threads)
        return model

    def attach_session(self, onnx_file: str | os.PathLike, threads: int | None = None) -> None:
        ort = require_onnxruntime()
        onnx_file = Path(onnx_file)
        if not onnx_file.is_file():
            raise OnnxBackendError(
                f"{onnx_file} does not exist (write it with `mbert-retrieval export-onnx`)"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # parallel over runs instead (see RUN_SEQUENCES)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise OnnxBackendError(f"{onnx_file}: not a model onnxruntime can load ({err})") from err
        names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
        if names != (list(INPUT_NAMES), [OUTPUT_NAME]):
            raise OnnxBackendError(f"{onnx_file}: not exported by export_onnx (inputs and outputs {names})")
        dim = session.get_outputs()[0].shape[-1]
        if isinstance(dim, int) and dim != self.dim:
            raise OnnxBackendError(f"{onnx_file} gives {dim}-dimensional embeddings but the model {self.dim}")
        self._check_weights(onnx_file, session.get_modelmeta().custom_metadata_map.get(DIGEST_KEY))
        self.session, self.onnx_file = session, onnx_file
        self.workers = threads or torch.get_num_threads()

    def _check_weights(self, onnx_file: Path, recorded: str | None) -> None:
        if recorded is None:
            logger.warning(
                "%s records no weights digest (an export of an earlier version): it is not checked "
                "against the model; export it again to have it checked",
                onnx_file,
            )
        elif recorded != weights_digest(self):
            raise OnnxBackendError(
                f"{onnx_file} was exported from other weights than this model (a retrained or changed "
                "model?): export it again with `mbert-retrieval export-onnx`"
            )

    def forward_packed(self, input_ids, cu_seqlens, max_seqlen, check_inputs: bool = True) -> torch.Tensor:
        if torch.is_grad_enabled() and self.training:
            raise RuntimeError("OnnxDenseRetriever runs inference only; train the DenseRetriever")
        bounds = cu_seqlens.tolist()
        ids = input_ids.numpy()
        sequences = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        lengths = np.diff(bounds)
        order = np.argsort(-lengths, kind="stable")  # already sorted in our batches; cheap if so
        out = np.empty((len(sequences), self.dim), dtype=np.float32)
        pad_id = self.encoder.config.pad_token_id

        def run(rows: np.ndarray) -> None:
            batch_ids, batch_mask = pad_numpy([sequences[r] for r in rows], pad_id)
            feeds = {INPUT_NAMES[0]: batch_ids, INPUT_NAMES[1]: batch_mask}
            out[rows] = self.session.run([OUTPUT_NAME], feeds)[0]

        runs = [
            order[first : min(first + RUN_SEQUENCES, end)]
            for start, end in similar_length_runs(lengths[order])
            for first in range(start, end, RUN_SEQUENCES)
        ]
        if self.workers > 1 and len(runs) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="onnx")
            list(self._pool.map(run, runs))  # list(): raises a run's error here
        else:
            for rows in runs:
                run(rows)
        return torch.from_numpy(out)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feeds = {INPUT_NAMES[0]: input_ids.long().numpy(), INPUT_NAMES[1]: attention_mask.long().numpy()}
        return torch.from_numpy(self.session.run([OUTPUT_NAME], feeds)[0])


# -- where exports live ----------------------------------------------------------------------------


def cache_file(model_dir: Path) -> Path:
    """Where `cpu_backend="onnx"` keeps the export of a model that has none beside it: the user cache,
    keyed by the folder, its weights' size and time and the graph's version, so a retrained model
    or a faster graph gets a new export."""
    weights = find_weights(model_dir)
    stat = weights.stat()
    source = f"{model_dir.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|graph {GRAPH_VERSION}"
    key = hashlib.sha256(source.encode()).hexdigest()[:20]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "mbert-retrieval" / "onnx" / f"{key}.onnx"


def existing_onnx_file(model_dir: Path) -> Path | None:
    for candidate in (model_dir / ONNX_FILE, cache_file(model_dir)):
        if candidate.is_file():
            return candidate
    return None
