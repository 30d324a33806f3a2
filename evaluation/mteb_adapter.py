"""Our single-vector models as MTEB encoders (mteb >= 2: `encode(DataLoader, task_metadata=..., ...)`).

    import mteb
    model = MtebEncoder(DenseRetriever.from_pretrained("path/to/dense"), name="me/my-dense")
    mteb.evaluate(model, mteb.get_tasks(["SciFact"]))

Queries go through `encode_queries` and documents through `encode_documents` (so each side gets its
own prefix); similarity is the dot product of the normalised vectors (cosine).
"""

from __future__ import annotations

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType


class MtebEncoder(AbsEncoder):
    """Wraps anything with `encode_queries` / `encode_documents` returning [n, dim] arrays."""

    def __init__(self, model, name: str = "mbert-retrieval/dense", revision: str | None = None):
        self.model = model
        self.mteb_model_meta = ModelMeta.create_empty(
            overwrites={
                "name": name,
                "revision": revision,
                "embed_dim": getattr(model, "dim", None),
                "similarity_fn_name": ScoringFunction.COSINE,
                "framework": ["PyTorch"],
            }
        )

    def encode(
        self,
        inputs,
        *,
        task_metadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        encode = self.model.encode_queries if prompt_type == PromptType.query else self.model.encode_documents
        vectors = encode(texts, show_progress_bar=kwargs.get("show_progress_bar", False))
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.cpu().numpy()
        return np.asarray(vectors, dtype=np.float32)
