"""Dense (single-vector) retrieval: pool the token states, optionally project, L2-normalise.

Saved as a sentence-transformers folder (Transformer, Pooling, optional Dense, Normalize), so
`sentence_transformers.SentenceTransformer(folder)` loads it and gives the same embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from mbert_retrieval.modeling import ModernBert
from mbert_retrieval.modeling.io import CheckpointError
from mbert_retrieval.models import folders
from mbert_retrieval.models.base import Devices, EncodeOptions, PooledModel, as_output, single_or_list
from mbert_retrieval.models.encoding import (
    Chunking,
    PackedBatch,
    check_texts,
    l2_normalize,
)

Pooling = Literal["mean", "cls"]
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


@dataclass
class ChunkEmbeddings:
    """One vector per window of each document: `embeddings [n_windows, dim]`, and for each window
    the `document` it comes from and its `window` number within that document (in text order)."""

    embeddings: np.ndarray | torch.Tensor
    document: np.ndarray
    window: np.ndarray


class DenseRetriever(PooledModel):
    """ModernBERT -> mean or CLS pooling -> optional linear projection -> L2 normalisation.

    Example:
        >>> model = DenseRetriever.from_pretrained("path/to/checkpoint")
        >>> q = model.encode_queries(["how to sort a list"])          # [1, dim] float32
        >>> d = model.encode_documents(["sorted(xs) returns a new list"])
        >>> model.similarity(q, d)                                     # [1, 1]
    """

    def __init__(
        self,
        encoder: ModernBert,
        tokenizer,
        *,
        pooling: Pooling = "mean",
        projection: nn.Linear | None = None,
        normalize: bool = True,
        query_prefix: str = "",
        document_prefix: str = "",
        max_length: int | None = None,
    ):
        super().__init__(encoder, tokenizer, pooling, max_length)
        if projection is not None and projection.in_features != self.hidden_size:
            raise ValueError(
                f"projection takes {projection.in_features} features but the encoder gives {self.hidden_size}"
            )
        self.projection = projection
        self.normalize = normalize
        self.query_prefix = query_prefix
        self.document_prefix = document_prefix

    @property
    def dim(self) -> int:
        """Size of the embeddings (before any Matryoshka truncation)."""
        return self.projection.out_features if self.projection is not None else self.hidden_size

    # -- forward -----------------------------------------------------------------------------------

    def from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled float32 states [B, H] -> embeddings [B, dim] float32."""
        if self.projection is not None:
            pooled = self.projection(pooled.to(self.projection.weight.dtype)).float()
        return l2_normalize(pooled) if self.normalize else pooled

    # -- encoding ----------------------------------------------------------------------------------

    def tokenize(self, texts: list[str], prefix: str = "") -> list[np.ndarray]:
        """Token ids as the model sees them (prefix added, truncated to `max_length`)."""
        texts = check_texts(texts)
        return self.tokenize_texts(texts, range(len(texts)), max_length=self.max_length, prefix=prefix)[2]

    def encode(
        self,
        texts: str | list[str],
        *,
        prefix: str = "",
        dim: int | None = None,
        convert_to_tensor: bool = False,
        chunking: Chunking | dict | None = None,
        max_tokens_per_batch: int | None = None,
        devices: Devices = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Texts -> embeddings [n, dim] (float32 numpy, or a CPU tensor with `convert_to_tensor`).

        Args:
            texts: a list of strings (one string gives one vector [dim]). An empty list gives an
                array of shape [0, dim]; an empty string is encoded like any text ([CLS] [SEP]).
            prefix: text put before every input (e.g. "search_query: ").
            dim: keep only the first `dim` components (Matryoshka), re-normalised.
            chunking: split texts longer than `chunking.size` tokens into overlapping windows and
                return, per text, the normalised mean of its window vectors (see
                `encode_document_chunks` for the window vectors themselves). Without it, long texts
                are truncated to `max_length` and the count is logged.
            max_tokens_per_batch: real tokens per packed batch; None: 16384, or 4096 when every
                device is a CPU (faster there).
            devices: spread the batches over several devices, e.g. ["cuda:0", "cuda:1"]; from
                `PROCESS_MIN_TEXTS` texts on, several CUDA devices get one process each
                (`models.processes`).
            show_progress_bar: None shows it from 1024 texts on.
        """
        texts, single = single_or_list(texts)
        texts = check_texts(texts)
        run = EncodeOptions(max_tokens_per_batch, devices, show_progress_bar)
        if run.uses_processes(len(texts)):
            return run.in_processes(
                self,
                "encode",
                texts,
                prefix=prefix,
                dim=dim,
                convert_to_tensor=convert_to_tensor,
                chunking=chunking,
            )
        embeddings = self._per_document(self._chunks(texts, prefix, dim, chunking, run), len(texts))
        embeddings = as_output(embeddings, convert_to_tensor)
        return embeddings[0] if single else embeddings

    def encode_queries(self, texts: str | list[str], **kwargs) -> np.ndarray | torch.Tensor:
        """`encode` with the query prefix."""
        return self.encode(texts, prefix=self.query_prefix, **kwargs)

    def encode_documents(self, texts: str | list[str], **kwargs) -> np.ndarray | torch.Tensor:
        """`encode` with the document prefix."""
        return self.encode(texts, prefix=self.document_prefix, **kwargs)

    def encode_document_chunks(
        self,
        texts: list[str],
        *,
        prefix: str | None = None,
        dim: int | None = None,
        chunking: Chunking | dict | None = None,
        convert_to_tensor: bool = False,
        max_tokens_per_batch: int | None = None,
        devices: Devices = None,
        show_progress_bar: bool | None = None,
    ) -> ChunkEmbeddings:
        """One vector per window: texts that fit in `chunking.size` tokens give one window (encoded
        exactly as without chunking); longer ones give overlapping windows, each framed by the
        special tokens and the prefix. Without chunking, every text is one (truncated) window."""
        prefix = self.document_prefix if prefix is None else prefix
        run = EncodeOptions(max_tokens_per_batch, devices, show_progress_bar)
        chunks = self._chunks(texts, prefix, dim, chunking, run)
        return replace(chunks, embeddings=as_output(chunks.embeddings, convert_to_tensor))

    def _chunks(self, texts, prefix: str, dim, chunking, run: EncodeOptions) -> ChunkEmbeddings:
        """`encode_document_chunks` with the embeddings as a float32 tensor."""
        texts = check_texts(texts)
        dim = self._check_dim(dim)
        chunking = Chunking.parse(chunking)
        if not texts:
            none = np.zeros(0, dtype=np.int64)
            return ChunkEmbeddings(torch.zeros(0, dim), none, none)

        def tokenize(indices):
            return self.tokenize_texts(
                texts, indices, max_length=self.max_length, prefix=prefix, chunking=chunking
            )

        def compute(model: DenseRetriever, batch: PackedBatch):
            embeddings = model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, False)
            return (model._truncate(embeddings, dim),)

        results = self.run_encoding([len(t) for t in texts], tokenize, compute, run)
        document = np.concatenate([batch.rows for batch, _ in results])
        window = np.concatenate([batch.windows for batch, _ in results])
        embeddings = torch.cat([out[0] for _, out in results])
        order = np.lexsort((window, document))
        return ChunkEmbeddings(embeddings[torch.from_numpy(order)], document[order], window[order])

    def _check_dim(self, dim: int | None) -> int:
        if dim is None:
            return self.dim
        if not isinstance(dim, int) or not 0 < dim <= self.dim:
            raise ValueError(f"dim must be an integer between 1 and {self.dim}, got {dim!r}")
        return dim

    def _truncate(self, embeddings: torch.Tensor, dim: int) -> torch.Tensor:
        if dim == embeddings.shape[-1]:
            return embeddings
        embeddings = embeddings[:, :dim]
        return l2_normalize(embeddings) if self.normalize else embeddings

    def _per_document(self, chunks: ChunkEmbeddings, num_documents: int) -> torch.Tensor:
        """Mean of each document's window vectors (re-normalised); documents are sorted already."""
        embeddings = chunks.embeddings
        if len(chunks.document) == num_documents:
            return embeddings
        sums = embeddings.new_zeros(num_documents, embeddings.shape[-1])
        sums.index_add_(0, torch.from_numpy(chunks.document), embeddings)
        counts = torch.bincount(torch.from_numpy(chunks.document), minlength=num_documents)
        means = sums / counts[:, None].to(sums.dtype)
        return l2_normalize(means) if self.normalize else means

    def similarity(self, a, b):
        """Cosine similarities [n, m] between two sets of embeddings (numpy or torch)."""
        as_numpy = isinstance(a, np.ndarray)
        a, b = torch.as_tensor(np.asarray(a) if as_numpy else a), torch.as_tensor(b)
        a, b = torch.atleast_2d(a).float(), torch.atleast_2d(b).float()
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(f"embeddings of different sizes: {a.shape[-1]} and {b.shape[-1]}")
        scores = l2_normalize(a) @ l2_normalize(b).T
        return scores.numpy() if as_numpy else scores

    # -- checkpoints -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike | None = None,
        *,
        tokenizer=None,
        pooling: Pooling | None = None,
        projection_dim: int | None = None,
        normalize: bool | None = None,
        query_prefix: str | None = None,
        document_prefix: str | None = None,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        attn_backend: str = "auto",
    ) -> DenseRetriever:
        """Load a sentence-transformers folder whose Transformer is ModernBERT (ours or anyone's), or
        start from a bare ModernBERT checkpoint (encoder or masked-LM) with a fresh head: `pooling`
        (default mean), a new projection to `projection_dim` if given, normalisation on.

        Arguments other than the path override what the folder says. The model goes to CUDA when
        available, in bfloat16 there and float32 on the CPU, unless `device` / `dtype` say otherwise.
        With no path, the model shipped with the package (`default_model_dir()`).
        """
        if path_or_hub_id is None:
            path_or_hub_id = default_model_dir()
            if path_or_hub_id is None:
                raise CheckpointError(
                    "no default model is shipped with this installation: pass a model folder or hub id"
                )
        model_dir = cls.resolve(path_or_hub_id)
        saved = cls._read_folder(model_dir) if folders.has_modules(model_dir) else {}
        encoder, device, dtype = cls.load_encoder(
            saved.get("transformer_dir", model_dir), device=device, dtype=dtype, attn_backend=attn_backend
        )
        projection = saved.get("projection")
        if projection_dim is not None:
            if projection is not None:
                raise ValueError(
                    f"{model_dir} already has a projection; projection_dim applies to new heads only"
                )
            projection = nn.Linear(encoder.config.hidden_size, projection_dim)
        if projection is not None:
            projection = projection.to(device=device, dtype=dtype)
        model = cls(
            encoder,
            cls.load_tokenizer_for(saved.get("transformer_dir", model_dir), tokenizer),
            pooling=pooling or saved.get("pooling", "mean"),
            projection=projection,
            normalize=saved.get("normalize", True) if normalize is None else normalize,
            query_prefix=saved.get("query_prefix", "") if query_prefix is None else query_prefix,
            document_prefix=saved.get("document_prefix", "") if document_prefix is None else document_prefix,
            max_length=max_length or saved.get("max_length"),
        )
        return model.eval()

    @staticmethod
    def _read_folder(model_dir: Path) -> dict:
        modules = folders.read_modules(model_dir)
        if any(m.type == folders.PYLATE_DENSE for m in modules):
            raise CheckpointError(
                f"{model_dir} is a PyLate ColBERT folder; load it with ColBERT.from_pretrained"
            )
        folders.check_supported(model_dir, modules, {"Transformer", "Pooling", "Dense", "Normalize"})
        kinds = [m.kind for m in modules]
        if kinds.count("Pooling") != 1 or kinds[1] != "Pooling":
            raise CheckpointError(f"{model_dir}: expected one Pooling module right after the Transformer")
        if kinds.count("Dense") > 1:
            raise CheckpointError(f"{model_dir}: more than one Dense module is not supported")
        if "Normalize" in kinds and kinds[-1] != "Normalize":
            raise CheckpointError(f"{model_dir}: Normalize must be the last module")
        saved = {
            "transformer_dir": modules[0].path,
            "pooling": folders.read_pooling(modules[1].path),
            "normalize": "Normalize" in kinds,
            "max_length": folders.read_max_seq_length(modules[0].path),
        }
        for module in modules:
            if module.kind == "Dense":
                saved["projection"] = folders.read_dense(module.path)
        prompts = folders.read_settings(model_dir).get("prompts") or {}
        if not isinstance(prompts, dict) or not all(isinstance(p, str) for p in prompts.values()):
            raise CheckpointError(
                f"{model_dir / folders.SETTINGS_FILE}: 'prompts' must map names to strings, not {prompts!r}"
            )
        saved["query_prefix"] = prompts.get("query", "")
        saved["document_prefix"] = next((prompts[n] for n in DOCUMENT_PROMPT_NAMES if n in prompts), "")
        return saved

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write a sentence-transformers folder (with the tokenizer): module 0 is the ModernBERT
        checkpoint at the root, then 1_Pooling, 2_Dense if projected, and Normalize."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(directory)
        folders.save_tokenizer(self.tokenizer, directory, self.max_length)
        folders.write_transformer_config(directory, self.max_length)
        modules = [("", folders.ST_TRANSFORMER), ("1_Pooling", folders.ST_POOLING)]
        folders.write_pooling(directory / "1_Pooling", self.pooling, self.hidden_size)
        if self.projection is not None:
            modules.append(("2_Dense", folders.ST_DENSE))
            folders.write_dense(directory / "2_Dense", self.projection)
        if self.normalize:
            name = f"{len(modules)}_Normalize"
            modules.append((name, folders.ST_NORMALIZE))
            folders.write_normalize(directory / name)
        folders.write_modules(directory, modules)
        prompts = {"query": self.query_prefix, "document": self.document_prefix}
        folders.write_json(
            directory / folders.SETTINGS_FILE,
            {
                "__version__": folders.versions(),
                "model_type": "SentenceTransformer",
                "prompts": prompts,
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
        )


DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default_model"


def default_model_dir() -> Path | None:
    """The dense model shipped inside the package, when this installation has one."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "modules.json").exists() else None
