"""What each retrieval head learns from: tokenization, batches, the loss, and dev-set ranking.

A task wraps a model from `mbert_retrieval.models` and reuses its tokenization (prefixes, ColBERT
markers and query expansion, cross-encoder pairs) and its `forward_packed`. The trainer calls
`batches` for global batches and `step` on its rank's share of one; `step` runs forward and
backward, whole or with GradCache (`chunk_tokens`), and returns the loss share of this rank.
Under torchrun the trainer's `GradientSync` runs the passes through DistributedDataParallel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from mbert_retrieval.models.colbert import ColBERT
from mbert_retrieval.models.cross_encoder import CrossEncoder
from mbert_retrieval.models.dense import DenseRetriever
from mbert_retrieval.training import losses
from mbert_retrieval.training.batching import (
    ContrastiveBatch,
    DataPosition,
    Sequences,
    Tokenized,
    collate,
    example_batches,
)
from mbert_retrieval.training.data import Example, ExampleSource
from mbert_retrieval.training.distributed import (
    GradientSync,
    all_gather_with_grad,
    all_reduce_max,
    current_world,
)
from mbert_retrieval.training.gradcache import forward_backward

if TYPE_CHECKING:  # pragma: no cover
    from mbert_retrieval.training.arguments import TrainingArguments


class RetrievalTask:
    """What the three retrieval heads share: batching examples and the step driver."""

    model: DenseRetriever | ColBERT | CrossEncoder
    ranks_documents = True  # a dev set scores its rankings (`training.evaluate`)

    @property
    def encoder(self):
        return self.model.encoder

    def tokenize(self, examples: list[Example]) -> list[Tokenized]:
        raise NotImplementedError

    def inputs(self, batch: ContrastiveBatch, chunk_tokens: int | None) -> list:
        """(encode, chunks) per kind of text, for `forward_backward`."""
        raise NotImplementedError

    def loss(self, representations: list[torch.Tensor], batch: ContrastiveBatch) -> torch.Tensor:
        raise NotImplementedError

    def score(self, queries: list[str], documents: list[str]) -> np.ndarray:
        """Scores [n_queries, n_documents] with the model in inference mode (for the dev metric)."""
        raise NotImplementedError

    def batches(
        self,
        source: ExampleSource,
        *,
        batch_size: int | None,
        max_tokens: int | None,
        seed: int,
        start: DataPosition,
    ) -> Iterator[ContrastiveBatch]:
        config = self.model.encoder.config

        def make_batch(tokenized, position):
            return collate(tokenized, config.vocab_size, config.max_position_embeddings, position)

        return example_batches(
            source,
            self.tokenize,
            make_batch,
            batch_size=batch_size,
            max_tokens=max_tokens,
            seed=seed,
            start=start,
            min_examples=current_world().size,
        )

    def batches_per_epoch(self, source: ExampleSource, args: TrainingArguments) -> float | None:
        """Known when batches hold a fixed number of examples."""
        return None if args.batch_size is None else len(source) / args.batch_size

    def training_batches(
        self, source: ExampleSource, args: TrainingArguments, start: DataPosition
    ) -> Iterator[ContrastiveBatch]:
        return self.batches(
            source,
            batch_size=args.batch_size,
            max_tokens=args.max_tokens_per_batch,
            seed=args.seed,
            start=start,
        )

    def step(
        self, batch: ContrastiveBatch, chunk_tokens: int | None = None, sync: GradientSync | None = None
    ) -> torch.Tensor:
        """Forward and backward of this rank's share of the loss, its passes run by `sync` (DDP
        under torchrun); returns that share, detached."""
        return forward_backward(
            self.inputs(batch, chunk_tokens),
            lambda reps: self.loss(reps, batch),
            chunk_tokens is not None,
            sync,
        )

    def save(self, directory) -> None:
        self.model.save_pretrained(directory)


def _split_documents(texts_per_example: list[list[str]], tokenize_flat) -> list[list[np.ndarray]]:
    flat = tokenize_flat([t for texts in texts_per_example for t in texts])
    out, start = [], 0
    for texts in texts_per_example:
        out.append(flat[start : start + len(texts)])
        start += len(texts)
    return out


# -- dense -------------------------------------------------------------------------------------------


Teacher = Callable[[list[str]], np.ndarray]  # texts -> [n, dim] embeddings


class DenseTask(RetrievalTask):
    """InfoNCE over in-batch and hard negatives (all ranks' documents under torchrun), optionally
    plus distillation of a teacher's embedding space.

    Args:
        temperature: scores are cosine similarities divided by this (0.05 = sentence-transformers'
            scale of 20).
        symmetric: also score each positive document against all queries, and average both ways.
        matryoshka_dims: also train these leading sub-dimensions (the loss is the mean over them
            and the full size).
        teacher: a function embedding texts, e.g. a sentence-transformers model's `encode`, of the
            model's dimension. The loss then adds `distillation` x the mean cosine distance between
            the model's and the teacher's embeddings of each query and its positive, so the model
            learns the teacher's sense of language while it learns the task.
    """

    def __init__(
        self,
        model: DenseRetriever,
        *,
        temperature: float = 0.05,
        symmetric: bool = False,
        matryoshka_dims: list[int] | None = None,
        query_max_length: int | None = None,
        teacher: Teacher | None = None,
        distillation: float = 1.0,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if distillation < 0:
            raise ValueError(f"distillation weight must not be negative, got {distillation}")
        for dim in matryoshka_dims or []:
            if not 0 < dim <= model.dim:
                raise ValueError(f"matryoshka dim {dim} must be between 1 and the model's {model.dim}")
        self.model = model
        self.temperature = temperature
        self.symmetric = symmetric
        self.dims = sorted(set(matryoshka_dims or []) | {model.dim}, reverse=True)
        self.query_max_length = query_max_length or model.max_length
        self.teacher = teacher
        self.distillation = distillation

    def tokenize(self, examples: list[Example]) -> list[Tokenized]:
        tokenized = self._tokenize(examples)
        if self.teacher is not None:
            for item, vectors in zip(tokenized, self._teacher_embeddings(examples)):
                item.teacher = vectors
        return tokenized

    def _teacher_embeddings(self, examples: list[Example]) -> np.ndarray:
        """[n, 2, dim]: the teacher's embeddings of each query and its positive."""
        texts = [e.query for e in examples] + [e.documents[0] for e in examples]
        vectors = np.asarray(self.teacher(texts), dtype=np.float32)
        if vectors.shape != (len(texts), self.model.dim):
            raise ValueError(
                f"the teacher gives embeddings of shape {tuple(vectors.shape[1:])}, the model "
                f"{self.model.dim} dims: distillation needs the same size"
            )
        return np.stack([vectors[: len(examples)], vectors[len(examples) :]], axis=1)

    def _tokenize(self, examples: list[Example]) -> list[Tokenized]:
        model = self.model
        queries = model.tokenize_texts(
            [e.query for e in examples],
            range(len(examples)),
            max_length=self.query_max_length,
            prefix=model.query_prefix,
        )[2]

        def tokenize_documents(texts):
            return model.tokenize_texts(
                texts, range(len(texts)), max_length=model.max_length, prefix=model.document_prefix
            )[2]

        documents = _split_documents([e.documents for e in examples], tokenize_documents)
        return [Tokenized(q, d, e.scores) for q, d, e in zip(queries, documents, examples)]

    def inputs(self, batch, chunk_tokens):
        def encode(chunk: Sequences) -> torch.Tensor:
            return self.model.forward_packed(chunk.input_ids, chunk.cu_seqlens, chunk.max_seqlen, False)

        return [(encode, batch.queries.chunks(chunk_tokens)), (encode, batch.documents.chunks(chunk_tokens))]

    def loss(self, representations, batch):
        queries, documents = representations
        all_documents = all_gather_with_grad(documents, batch.rank_documents)
        all_queries = all_gather_with_grad(queries, batch.rank_examples) if self.symmetric else None
        targets = batch.document_offset + batch.positives
        own = batch.example_offset + torch.arange(batch.num_examples, device=queries.device)
        normalize = self.model.normalize
        total = 0.0
        for dim in self.dims:
            q = losses.truncate_embeddings(queries, dim, normalize)
            d = losses.truncate_embeddings(all_documents, dim, normalize)
            loss = losses.info_nce(q @ d.T, targets, self.temperature)
            if self.symmetric:
                positives = losses.truncate_embeddings(documents[batch.positives], dim, normalize)
                every_query = losses.truncate_embeddings(all_queries, dim, normalize)
                loss = (loss + losses.info_nce(positives @ every_query.T, own, self.temperature)) / 2
            total = total + loss
        total = total / (len(self.dims) * batch.global_examples)
        if self.teacher is not None and batch.teacher is not None:
            total = total + self.distillation * self._distillation_loss(queries, documents, batch)
        return total

    def _distillation_loss(self, queries, documents, batch) -> torch.Tensor:
        """Cosine distance to the teacher, summed over query and positive, scaled like InfoNCE."""
        student = torch.stack([queries, documents[batch.positives]], dim=1).float()
        cosine = torch.nn.functional.cosine_similarity(student, batch.teacher, dim=-1)
        return (1 - cosine).sum() / (2 * batch.global_examples)

    @torch.no_grad()
    def score(self, queries, documents):
        q = self.model.encode_queries(queries, convert_to_tensor=True)
        d = self.model.encode_documents(documents, convert_to_tensor=True)
        return (q @ d.T).numpy()


# -- ColBERT -----------------------------------------------------------------------------------------


class ColBERTTask(RetrievalTask):
    """ColBERT with MaxSim scores: `loss="contrastive"` (InfoNCE over in-batch and hard negatives,
    all ranks' documents under torchrun) or `loss="distillation"` (KL divergence between the
    teacher's and the student's score distributions over each query's own documents; needs
    examples with teacher `scores`)."""

    def __init__(
        self,
        model: ColBERT,
        *,
        loss: Literal["contrastive", "distillation"] = "contrastive",
        temperature: float = 1.0,
    ):
        if loss not in ("contrastive", "distillation"):
            raise ValueError(f"ColBERT loss must be 'contrastive' or 'distillation', got {loss!r}")
        self.model = model
        self.kind = loss
        self.temperature = temperature
        self.skiplist = torch.from_numpy(model.skiplist)
        self.masked_keys = model.do_query_expansion and not model.attend_to_expansion_tokens

    def tokenize(self, examples: list[Example]) -> list[Tokenized]:
        if self.kind == "distillation" and any(e.scores is None for e in examples):
            raise ValueError("ColBERT distillation needs teacher 'scores' for every training example")
        model = self.model
        queries, keys, _ = model.tokenize_queries([e.query for e in examples])
        documents = _split_documents([e.documents for e in examples], model.tokenize_documents)
        return [
            Tokenized(q, d, e.scores, query_keys=k) for q, k, d, e in zip(queries, keys, documents, examples)
        ]

    def inputs(self, batch, chunk_tokens):
        model = self.model
        device = batch.documents.input_ids.device
        query_length = all_reduce_max(batch.queries.max_seqlen, device)
        document_length = all_reduce_max(batch.documents.max_seqlen, device)

        def encode_queries(chunk: Sequences) -> torch.Tensor:
            # [MASK] expansion tokens compute states but nothing attends to them (the key mask).
            keys = chunk.per_token["keys"] if self.masked_keys else None
            hidden = model.encoder.forward_packed(
                chunk.input_ids, chunk.cu_seqlens, chunk.max_seqlen, check_inputs=False, key_mask=keys
            )
            return losses.pad_packed(model.project(hidden), chunk.cu_seqlens, query_length)[0]

        def encode_documents(chunk: Sequences) -> torch.Tensor:
            vectors = model.forward_packed(chunk.input_ids, chunk.cu_seqlens, chunk.max_seqlen, False)
            return losses.pad_packed(vectors, chunk.cu_seqlens, document_length)[0]

        return [
            (encode_queries, batch.queries.chunks(chunk_tokens)),
            (encode_documents, batch.documents.chunks(chunk_tokens)),
        ]

    def masks(self, batch: ContrastiveBatch, queries: torch.Tensor, documents: torch.Tensor):
        """Which padded query / document positions take part in MaxSim (not padding, not skiplisted)."""
        query_mask = losses.pad_packed(
            batch.queries.input_ids[:, None], batch.queries.cu_seqlens, queries.shape[1]
        )[1]
        ids, document_mask = losses.pad_packed(
            batch.documents.input_ids[:, None], batch.documents.cu_seqlens, documents.shape[1]
        )
        kept = ~torch.isin(ids[..., 0], self.skiplist.to(ids.device))
        return query_mask, document_mask & kept

    def loss(self, representations, batch):
        queries, documents = representations
        query_mask, document_mask = self.masks(batch, queries, documents)
        if self.kind == "distillation":
            scores = losses.maxsim_scores(queries, query_mask, documents, document_mask)
            own = scores[
                torch.repeat_interleave(
                    torch.arange(batch.num_examples, device=scores.device), batch.group_sizes
                ),
                torch.arange(documents.shape[0], device=scores.device),
            ]
            student, valid = losses.group_rows(own, batch.doc_offsets, 0.0)
            teacher, _ = losses.group_rows(batch.scores, batch.doc_offsets, 0.0)
            return losses.kl_distillation(student, teacher, valid) / batch.global_examples
        all_documents = all_gather_with_grad(documents, batch.rank_documents)
        all_masks = all_gather_with_grad(document_mask.to(torch.uint8), batch.rank_documents).bool()
        scores = losses.maxsim_scores(queries, query_mask, all_documents, all_masks)
        targets = batch.document_offset + batch.positives
        return losses.info_nce(scores, targets, self.temperature) / batch.global_examples

    @torch.no_grad()
    def score(self, queries, documents):
        q = self.model.encode_queries(queries, convert_to_tensor=True)
        d = self.model.encode_documents(documents, convert_to_tensor=True, packed=True)
        return self.model.score(q, d).numpy()


# -- cross-encoder -----------------------------------------------------------------------------------


class CrossEncoderTask(RetrievalTask):
    """A reranker on (query, document) pairs: `loss="bce"` (each pair labelled 1 for the positive, 0
    for a negative) or `loss="listwise"` (softmax cross-entropy over each query's positive and
    negatives). Needs hard negatives; pairs are never mixed across queries."""

    def __init__(self, model: CrossEncoder, *, loss: Literal["bce", "listwise"] = "bce"):
        if loss not in ("bce", "listwise"):
            raise ValueError(f"cross-encoder loss must be 'bce' or 'listwise', got {loss!r}")
        if model.num_labels != 1:
            raise ValueError(f"a reranker needs one output; this model has {model.num_labels} labels")
        self.model = model
        self.kind = loss

    def tokenize(self, examples: list[Example]) -> list[Tokenized]:
        if any(len(e.documents) < 2 for e in examples):
            raise ValueError(
                "cross-encoder training needs hard negatives: every example must have 'negatives'"
            )
        pairs = [(e.query, d) for e in examples for d in e.documents]
        ids = self.model.tokenize_pairs([q for q, _ in pairs], [d for _, d in pairs])
        out, start = [], 0
        for e in examples:
            out.append(Tokenized(None, ids[start : start + len(e.documents)], e.scores))
            start += len(e.documents)
        return out

    def inputs(self, batch, chunk_tokens):
        def encode(chunk: Sequences) -> torch.Tensor:
            return self.model.forward_packed(chunk.input_ids, chunk.cu_seqlens, chunk.max_seqlen, False)[:, 0]

        return [(encode, batch.documents.chunks(chunk_tokens))]

    def loss(self, representations, batch):
        (logits,) = representations
        if self.kind == "bce":
            labels = torch.zeros_like(logits)
            labels[batch.positives] = 1.0
            return losses.binary_cross_entropy(logits, labels) / batch.global_documents
        rows, mask = losses.group_rows(logits, batch.doc_offsets, 0.0)
        return losses.listwise_softmax(rows, mask) / batch.global_examples

    @torch.no_grad()
    def score(self, queries, documents):
        pairs = [(q, d) for q in queries for d in documents]
        scores = self.model.predict(pairs, apply_activation=False)
        return np.asarray(scores).reshape(len(queries), len(documents))
