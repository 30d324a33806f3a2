"""Training losses. Each returns a sum over its queries (or pairs, or tokens); the caller divides
by the global count, so losses computed on several ranks or chunks add up to the batch mean."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAXSIM_CHUNK_ELEMENTS = 1 << 27  # similarity entries materialised at once by maxsim_scores


def info_nce(scores: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: cross-entropy of scores [Q, D] / temperature against each query's positive column;
    every other column (in-batch and hard negatives) is a negative. Summed over queries."""
    return F.cross_entropy(scores.float() / temperature, targets, reduction="sum")


def truncate_embeddings(embeddings: torch.Tensor, dim: int | None, normalize: bool) -> torch.Tensor:
    """The first `dim` components (Matryoshka), re-normalised when the model normalises."""
    if dim is None or dim == embeddings.shape[-1]:
        return embeddings
    embeddings = embeddings[..., :dim]
    return F.normalize(embeddings, dim=-1) if normalize else embeddings


def pad_packed(
    values: torch.Tensor, cu_seqlens: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows [N, ...] -> padded [B, length, ...] (zeros after each sequence) and mask [B, length]."""
    from mbert_retrieval.modeling.packing import sequence_ids

    sequence = sequence_ids(cu_seqlens, values.shape[0]).long()
    position = torch.arange(values.shape[0], device=values.device) - cu_seqlens.long()[sequence]
    batch = cu_seqlens.shape[0] - 1
    padded = values.new_zeros((batch, length, *values.shape[1:]))
    padded[sequence, position] = values
    mask = torch.zeros(batch, length, dtype=torch.bool, device=values.device)
    mask[sequence, position] = True
    return padded, mask


def maxsim_scores(
    queries: torch.Tensor, query_mask: torch.Tensor, documents: torch.Tensor, document_mask: torch.Tensor
) -> torch.Tensor:
    """Late-interaction scores [Q, D]: for each query token, the best dot product with any kept
    token of the document, summed over the query's kept tokens.

    queries [Q, Lq, d] with mask [Q, Lq]; documents [D, Ld, d] with mask [D, Ld]. Differentiable.
    """
    queries = queries * query_mask[..., None]
    per_chunk = max(
        1, MAXSIM_CHUNK_ELEMENTS // max(1, queries.shape[0] * queries.shape[1] * documents.shape[1])
    )
    out = []
    for start in range(0, documents.shape[0], per_chunk):
        docs, mask = documents[start : start + per_chunk], document_mask[start : start + per_chunk]
        sims = torch.einsum("qid,mjd->qmij", queries.float(), docs.float())
        sims = sims.masked_fill(~mask[None, :, None, :], float("-inf"))
        best = sims.max(dim=-1).values
        out.append(torch.where(torch.isinf(best), 0.0, best).sum(dim=-1))
    return torch.cat(out, dim=1)


def group_rows(
    values: torch.Tensor, doc_offsets: torch.Tensor, fill: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document values [D] -> per-example rows [B, G] (G the largest group) and a validity mask.

    Example i owns documents doc_offsets[i]..doc_offsets[i + 1] - 1, its positive first.
    """
    sizes = doc_offsets[1:] - doc_offsets[:-1]
    width = int(sizes.max())
    column = torch.arange(width, device=values.device)
    mask = column[None, :] < sizes[:, None]
    index = (doc_offsets[:-1, None] + column[None, :]).clamp(max=values.shape[0] - 1)
    return values[index].masked_fill(~mask, fill), mask


def kl_distillation(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over each query's documents, both as softmax distributions over the
    valid entries of their rows [Q, G]. Summed over queries."""
    student = student.float().masked_fill(~mask, float("-inf"))
    teacher = teacher.float().masked_fill(~mask, float("-inf"))
    log_student = F.log_softmax(student, dim=-1)
    log_teacher = F.log_softmax(teacher, dim=-1)
    terms = log_teacher.exp() * (log_teacher - log_student)
    return torch.where(mask, terms, 0.0).sum()


def binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pointwise BCE on pair logits [P] with 0/1 labels. Summed over pairs."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum")


def listwise_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each query's list [Q, G] with the positive in column 0. Summed."""
    logits = logits.float().masked_fill(~mask, float("-inf"))
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, targets, reduction="sum")


def masked_lm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits [M, vocab] at the masked positions against the original tokens."""
    return F.cross_entropy(logits.float(), labels, reduction="sum")
