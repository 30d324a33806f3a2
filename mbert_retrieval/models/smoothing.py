"""Per-channel smoothing of a dense model's Linear inputs before int8 quantisation (SmoothQuant).

Dynamic int8 quantisation gives each Linear's input one scale per call, so a few input channels
with large values (LayerNorm outputs have such channels in every transformer) take most of the int8
range and the others lose precision. Each Linear input channel j is divided by

    s_j = max|x_j| ** alpha / max|W[:, j]| ** (1 - alpha)

and the Linear's weight column j multiplied by it: the same function in float32, with the range
moved from the activations to the weights, which are quantised once, with care. The division is
folded into what writes the input, so the exported graph does the same operations as before:

    q, k, v and the GeGLU's input:   the LayerNorm's weight before them
    the attention output projection: v's rows (attention mixes tokens, not channels)
    the MLP's output projection:     the GeGLU gate's rows (the gate multiplies channel by channel)

Layer 0 reads the residual stream itself (its attention norm is the embeddings' own), so its q, k,
v input is left as it is. Channel maxima come from a calibration pass in float32 over texts of
the library's own source: functions (as documents) and their docstrings (as queries).
"""

from __future__ import annotations

import ast
import copy
import hashlib
from pathlib import Path

import torch

from mbert_retrieval.models.dense import DenseRetriever
from mbert_retrieval.models.encoding import pack

ALPHA = 0.5  # SmoothQuant's default split of the range between activations and weights
CALIBRATION_TEXTS = 128  # documents, and as many docstrings as queries
CALIBRATION_BATCH = 32  # sequences per packed forward
SCALE_LIMITS = (1e-2, 1e2)


def smoothed_for_int8(
    model: DenseRetriever, texts: tuple[list[str], list[str]] | None = None, alpha: float = ALPHA
) -> DenseRetriever:
    """A copy of `model` computing the same embeddings (to float32 rounding), its Linear inputs
    smoothed per channel for int8. `texts`: (documents, queries) to calibrate on; by default the
    library's own functions and docstrings."""
    documents, queries = texts if texts is not None else source_calibration_texts()
    if not documents:
        raise ValueError("smoothing needs calibration texts")
    maxima = input_maxima(model, documents, queries)
    smoothed = copy.deepcopy(model)
    layers = smoothed.encoder.layers
    config = smoothed.encoder.config
    v_rows = slice(2 * config.hidden_size, None)  # of Wqkv
    gate_rows = slice(config.intermediate_size, None)  # of the GeGLU's Wi
    with torch.no_grad():
        for number, layer in enumerate(layers):
            attention, mlp = layer.attn, layer.mlp
            if number > 0:
                fold(maxima[number, "qkv"], layer.attn_norm, attention.Wqkv, alpha)
            fold(maxima[number, "attention_out"], attention.Wqkv, attention.Wo, alpha, v_rows)
            fold(maxima[number, "mlp_in"], layer.mlp_norm, mlp.Wi, alpha)
            fold(maxima[number, "mlp_out"], mlp.Wi, mlp.Wo, alpha, gate_rows)
    return smoothed


def fold(
    input_maxima: torch.Tensor,
    writer: torch.nn.Module,
    linear: torch.nn.Linear,
    alpha: float,
    rows: slice = slice(None),
) -> None:
    """Smooth `linear`'s input: its weight's columns times the scales, and output channels `rows` of
    the LayerNorm or Linear that writes that input divided by them, bias included."""
    scales = smoothing_scales(input_maxima, linear.weight, alpha)
    divisor = scales[:, None] if isinstance(writer, torch.nn.Linear) else scales
    writer.weight[rows] /= divisor
    if writer.bias is not None:
        writer.bias[rows] /= scales
    linear.weight *= scales


def smoothing_scales(input_maxima: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j for each input channel j of a Linear with `weight` [out, in]."""
    weight_maxima = weight.abs().amax(dim=0).clamp(min=1e-5)
    scales = input_maxima.clamp(min=1e-5) ** alpha / weight_maxima ** (1 - alpha)
    return scales.clamp(*SCALE_LIMITS)


def input_maxima(model: DenseRetriever, documents: list[str], queries: list[str]) -> dict:
    """max |x_j| over every real token of the texts, per Linear input: {(layer, name): [in]}."""
    maxima: dict = {}

    def record(key):
        def hook(module, inputs):
            channel_max = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0).float()
            maxima[key] = torch.maximum(maxima[key], channel_max) if key in maxima else channel_max

        return hook

    handles = []
    for number, layer in enumerate(model.encoder.layers):
        for name, linear in (
            ("qkv", layer.attn.Wqkv),
            ("attention_out", layer.attn.Wo),
            ("mlp_in", layer.mlp.Wi),
            ("mlp_out", layer.mlp.Wo),
        ):
            handles.append(linear.register_forward_pre_hook(record((number, name))))
    sequences = model.tokenize(documents, model.document_prefix)
    if queries:
        sequences += model.tokenize(queries, model.query_prefix)
    config = model.encoder.config
    try:
        with torch.inference_mode():
            for start in range(0, len(sequences), CALIBRATION_BATCH):
                part = sequences[start : start + CALIBRATION_BATCH]
                batch = pack(part, range(len(part)), config.vocab_size, config.max_position_embeddings)
                model.encoder.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def source_calibration_texts(limit: int = CALIBRATION_TEXTS) -> tuple[list[str], list[str]]:
    """Functions and classes of this library's own source (always at hand, offline), and the first
    paragraph of their docstrings: documents and queries of the kind a code index sees.

    The `limit` definitions whose text hashes lowest are taken: a spread over the whole package
    that an edit elsewhere in the library leaves as it is (taking every k-th one, an added function
    shifted the whole set, and with it the int8 rounding)."""
    root = Path(__file__).resolve().parents[1]
    definitions = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                definitions.append((hashlib.blake2b(text.encode()).digest(), text, ast.get_docstring(node)))
    documents = [text for _, text, _ in sorted(definitions)[:limit]]
    documented = sorted(item for item in definitions if item[2])[:limit]
    queries = [" ".join(docstring.split("\n\n")[0].split()) for _, _, docstring in documented]
    return documents, queries
