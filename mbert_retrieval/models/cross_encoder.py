"""Cross-encoder reranking: `[CLS] query [SEP] document [SEP]` -> relevance score.

The head is `transformers`' ModernBertForSequenceClassification (pooling per `classifier_pooling`,
then `head.dense` -> activation -> `head.norm` -> `classifier`), with the same parameter names, so
the saved folder is a plain `transformers` checkpoint that `sentence_transformers.CrossEncoder`
loads as well, and their cross-encoder folders load here.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from mbert_retrieval.modeling import ModernBert
from mbert_retrieval.modeling.encoder import MLMHead
from mbert_retrieval.modeling.io import (
    CheckpointError,
    find_weights,
    load_weights,
    read_state_dict,
    save_safetensors,
)
from mbert_retrieval.models import folders
from mbert_retrieval.models.base import Devices, EncodeOptions, PooledModel
from mbert_retrieval.models.encoding import (
    PackedBatch,
    check_pairs,
    check_texts,
)

ARCHITECTURE = "ModernBertForSequenceClassification"
ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": torch.sigmoid,
    "torch.nn.modules.linear.Identity": lambda x: x,
    "torch.nn.modules.activation.Tanh": torch.tanh,
}
SIGMOID, IDENTITY = "torch.nn.modules.activation.Sigmoid", "torch.nn.modules.linear.Identity"


class CrossEncoder(PooledModel):
    """ModernBERT over a (query, document) pair -> `num_labels` logits -> activation.

    Example:
        >>> model = CrossEncoder.from_pretrained("path/to/reranker")
        >>> model.predict([("how to sort", "sorted(xs)"), ("how to sort", "len(xs)")])   # [2]
        >>> model.rerank("how to sort", ["len(xs)", "sorted(xs)"], top_k=1)
        [{'corpus_id': 1, 'score': 0.93}]
    """

    def __init__(
        self,
        encoder: ModernBert,
        tokenizer,
        *,
        head: MLMHead,
        classifier: nn.Linear,
        pooling: Literal["cls", "mean"] = "cls",
        activation: str | None = None,
        max_length: int | None = None,
    ):
        super().__init__(encoder, tokenizer, pooling, max_length)
        self.head = head
        self.classifier = classifier
        self.activation = activation or (SIGMOID if self.num_labels == 1 else IDENTITY)
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is not supported; use one of {sorted(ACTIVATIONS)}"
            )

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    # -- forward -----------------------------------------------------------------------------------

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled float32 states [B, H] -> logits [B, num_labels] float32."""
        dtype = self.classifier.weight.dtype
        return self.classifier(self.head(pooled.to(dtype))).float()

    # -- scoring -----------------------------------------------------------------------------------

    def tokenize_pairs(self, queries: list[str], documents: list[str]) -> list[np.ndarray]:
        """`[CLS] q [SEP] d [SEP]` ids, the longer side cut first when over `max_length`."""
        return self.text_tokenizer.encode(list(zip(queries, documents)), self.max_length)[0]

    def predict(
        self,
        pairs: list[tuple[str, str]],
        *,
        apply_activation: bool = True,
        convert_to_tensor: bool = False,
        max_tokens_per_batch: int | None = None,
        devices: Devices = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Scores of (query, document) pairs: [n] when the model has one label, else [n, num_labels].

        Scores go through the model's activation (sigmoid for one label, as sentence-transformers
        does) unless `apply_activation=False`, which gives the logits. An empty list gives an empty
        array.
        """
        queries, documents = check_pairs(pairs)
        logits = torch.zeros(len(queries), self.num_labels)
        if queries:
            run = EncodeOptions(max_tokens_per_batch, devices, show_progress_bar)
            for batch, (out,) in self._run_pairs(queries, documents, run):
                logits[torch.from_numpy(batch.rows)] = out
        scores = ACTIVATIONS[self.activation](logits) if apply_activation else logits
        scores = scores[:, 0] if self.num_labels == 1 else scores
        return scores if convert_to_tensor else scores.numpy()

    def _run_pairs(self, queries, documents, run: EncodeOptions):
        def tokenize(indices):
            pairs = [(queries[i], documents[i]) for i in indices]
            ids, truncated = self.text_tokenizer.encode(pairs, self.max_length)
            return list(indices), [0] * len(ids), ids, truncated

        def compute(model: CrossEncoder, batch: PackedBatch):
            return (model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, False),)

        sizes = [len(q) + len(d) for q, d in zip(queries, documents)]
        return self.run_encoding(sizes, tokenize, compute, run, what="pairs", desc="Scoring pairs")

    def rerank(
        self,
        query: str,
        documents: list[str],
        top_k: int | None = None,
        *,
        return_documents: bool = False,
        **predict_kwargs,
    ) -> list[dict]:
        """Documents sorted by score for one query, as dicts {'corpus_id', 'score'} (plus 'text' with
        `return_documents`), best first, the `top_k` best if given (as sentence-transformers does)."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        documents = check_texts(documents, "documents")
        if self.num_labels != 1:
            raise ValueError(
                f"rerank needs a model with one score per pair; this one has {self.num_labels} labels"
            )
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        scores = self.predict([(query, d) for d in documents], **predict_kwargs)
        order = np.argsort(-scores, kind="stable")[:top_k]
        ranked = []
        for i in order:
            hit = {"corpus_id": int(i), "score": float(scores[i])}
            if return_documents:
                hit["text"] = documents[i]
            ranked.append(hit)
        return ranked

    rank = rerank  # sentence-transformers' name for the same call

    # -- checkpoints -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        tokenizer=None,
        num_labels: int = 1,
        pooling: Literal["cls", "mean"] | None = None,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        attn_backend: str = "auto",
    ) -> CrossEncoder:
        """Load a ModernBertForSequenceClassification checkpoint (ours, `transformers`', or a
        sentence-transformers CrossEncoder folder), or start from a bare ModernBERT checkpoint with a
        fresh classifier of `num_labels` outputs (a masked-LM checkpoint's prediction head is kept,
        as `transformers` does). `pooling` defaults to the config's `classifier_pooling`.
        """
        model_dir = cls.resolve(path_or_hub_id)
        encoder, device, dtype = cls.load_encoder(
            model_dir, device=device, dtype=dtype, attn_backend=attn_backend
        )
        config = encoder.config
        state = read_state_dict(model_dir)
        trained = "classifier.weight" in state
        if trained:
            num_labels = state["classifier.weight"].shape[0]
        head = MLMHead(config)
        classifier = nn.Linear(config.hidden_size, num_labels)
        init_std = float(config.extra.get("initializer_range", 0.02))
        nn.init.normal_(classifier.weight, std=init_std)
        nn.init.zeros_(classifier.bias)
        if not any(k.startswith("head.") for k in state):
            nn.init.normal_(head.dense.weight, std=init_std)
        parts = nn.ModuleDict({"head": head, "classifier": classifier})
        wanted = {
            k: v
            for k, v in state.items()
            if k.startswith("head.") or (trained and k.startswith("classifier."))
        }
        load_weights(parts, {**parts.state_dict(), **wanted}, find_weights(model_dir))
        model = cls(
            encoder,
            cls.load_tokenizer_for(model_dir, tokenizer),
            head=head.to(device=device, dtype=dtype),
            classifier=classifier.to(device=device, dtype=dtype),
            pooling=pooling or config.extra.get("classifier_pooling", "cls"),
            activation=cls._read_activation(model_dir, config.extra),
            max_length=max_length,
        )
        return model.eval()

    @staticmethod
    def _read_activation(model_dir: Path, config_extra: dict) -> str | None:
        """The score activation sentence-transformers saved (new or old location), if any."""
        name = (config_extra.get("sentence_transformers") or {}).get("activation_fn")
        name = folders.read_settings(model_dir).get("activation_fn", name)
        if name is not None and name not in ACTIVATIONS:
            raise CheckpointError(f"{model_dir}: score activation {name!r} is not supported")
        return name

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write a `transformers` ModernBertForSequenceClassification checkpoint with the tokenizer
        and the score activation where sentence-transformers' CrossEncoder reads it."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            ("model." + k[len("encoder.") :] if k.startswith("encoder.") else k): v
            for k, v in self.state_dict().items()
        }
        save_safetensors(directory / "model.safetensors", state)
        config = copy.deepcopy(self.encoder.config)
        labels = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        config.extra.update(
            classifier_pooling=self.pooling,
            id2label=labels,
            label2id={v: int(k) for k, v in labels.items()},
            sentence_transformers={"activation_fn": self.activation},
        )
        config.save(directory / "config.json", architectures=[ARCHITECTURE])
        folders.save_tokenizer(self.tokenizer, directory, self.max_length)
