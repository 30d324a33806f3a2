"""ColBERT (late interaction): one L2-normalised 128-d vector per token, scored by MaxSim.

Follows PyLate's conventions so folders move both ways: a `[Q] ` / `[D] ` marker token right after
[CLS]; queries padded with [MASK] to `query_length` (query augmentation); document tokens in the
punctuation skiplist dropped; documents truncated to `document_length` tokens.

Query augmentation: with `attend_to_expansion_tokens=False` (PyLate's default) the [MASK] tokens
compute their own states but no token attends to them, which is what a padded `transformers` batch
does with those positions masked out. The packed kernels cannot express that, so such queries run
through the encoder's `key_mask` (reference attention; queries are short).
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mbert_retrieval.index.maxsim import maxsim
from mbert_retrieval.modeling import ModernBert
from mbert_retrieval.modeling.io import CheckpointError
from mbert_retrieval.models import folders
from mbert_retrieval.models.base import (
    Devices,
    EncodeOptions,
    EncoderModel,
    as_output,
    grow_embeddings,
    single_or_list,
)
from mbert_retrieval.models.encoding import (
    Chunking,
    PackedBatch,
    PackedEmbeddings,
    check_texts,
    l2_normalize,
)

PYLATE_SETTINGS = (
    "query_prefix",
    "document_prefix",
    "query_length",
    "document_length",
    "do_query_expansion",
    "attend_to_expansion_tokens",
    "skiplist_words",
)


class ColBERT(EncoderModel):
    """ModernBERT -> linear projection (no bias) to 128 -> L2 norm per token.

    Example:
        >>> model = ColBERT.from_pretrained("path/to/checkpoint")
        >>> q = model.encode_queries(["how to sort a list"])     # [1, 32, 128]
        >>> d = model.encode_documents(["sorted(xs) returns a new list"])  # [array [n_tokens, 128]]
        >>> model.score(q, d)                                     # [1, 1] MaxSim
    """

    def __init__(
        self,
        encoder: ModernBert,
        tokenizer,
        projection: nn.Linear,
        *,
        query_prefix: str = "[Q] ",
        document_prefix: str = "[D] ",
        query_length: int = 32,
        document_length: int = 180,
        do_query_expansion: bool = True,
        attend_to_expansion_tokens: bool = False,
        skiplist_words: list[str] | None = None,
    ):
        super().__init__(encoder, tokenizer, max_length=document_length)
        if projection.in_features != self.hidden_size:
            raise ValueError(
                f"projection takes {projection.in_features} features but the encoder gives {self.hidden_size}"
            )
        if not 0 < query_length <= encoder.config.max_position_embeddings:
            raise ValueError(f"query_length={query_length} must be between 1 and the model's positions")
        self.projection = projection
        self.query_prefix, self.document_prefix = query_prefix, document_prefix
        self.query_length, self.document_length = query_length, document_length
        self.do_query_expansion = do_query_expansion
        self.attend_to_expansion_tokens = attend_to_expansion_tokens and do_query_expansion
        self.skiplist_words = list(string.punctuation) if skiplist_words is None else list(skiplist_words)
        self._add_marker_tokens()
        self.query_marker = self._token_id(query_prefix)
        self.document_marker = self._token_id(document_prefix)
        self.skiplist = np.asarray(
            sorted({tokenizer.convert_tokens_to_ids(w) for w in self.skiplist_words}), dtype=np.int64
        )
        self.expansion_id = tokenizer.mask_token_id
        if do_query_expansion and self.expansion_id is None:
            raise ValueError("query expansion needs a [MASK] token, and the tokenizer has none")

    def _add_marker_tokens(self) -> None:
        """Add the prefixes as tokens (as PyLate does) and grow the embeddings if they need rows."""
        markers = [p for p in (self.query_prefix, self.document_prefix) if p]
        if markers and self.tokenizer.add_tokens(markers):
            self.refresh_tokenizer()
        grow_embeddings(self.encoder, len(self.tokenizer))

    def _token_id(self, token: str) -> int | None:
        return self.tokenizer.convert_tokens_to_ids(token) if token else None

    @property
    def dim(self) -> int:
        return self.projection.out_features

    # -- forward -----------------------------------------------------------------------------------

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token states [..., H] -> unit vectors [..., dim] float32."""
        return l2_normalize(self.projection(hidden.to(self.projection.weight.dtype)))

    def forward_packed(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, check_inputs: bool = True
    ) -> torch.Tensor:
        """Packed ids [N] -> token vectors [N, dim] float32 (differentiable; skiplist not applied)."""
        hidden = self.encoder.forward_packed(input_ids, cu_seqlens, max_seqlen, check_inputs=check_inputs)
        return self.project(hidden)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Padded ids [B, L] -> token vectors [B, L, dim], zeros where attention_mask is 0.

        With `key_mask`, every position of `attention_mask` computes a state but attends only to
        the positions in `key_mask` (query augmentation with un-attended expansion tokens).
        """
        if key_mask is None:
            hidden = self.encoder(input_ids, attention_mask)
        else:
            hidden = encode_with_key_mask(self.encoder, input_ids, key_mask.bool())
        return self.project(hidden) * attention_mask[..., None].to(torch.float32)

    # -- tokenization ------------------------------------------------------------------------------

    def tokenize_queries(
        self, texts: list[str], indices=None
    ) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """Query ids (marker after [CLS], truncated to query_length, [MASK]-padded to it when
        expanding), per query which positions other tokens attend to, and how many were truncated."""
        indices = range(len(texts)) if indices is None else indices
        _, _, ids, truncated = self.tokenize_texts(
            texts, indices, max_length=self.query_length, marker=self.query_marker
        )
        if not self.do_query_expansion:
            return ids, [np.ones(len(s), dtype=bool) for s in ids], truncated
        padded, keys = [], []
        for seq in ids:
            expansion = np.full(self.query_length - len(seq), self.expansion_id, dtype=np.int64)
            padded.append(np.concatenate([seq, expansion]))
            keys.append(
                np.arange(self.query_length)
                < (self.query_length if self.attend_to_expansion_tokens else len(seq))
            )
        return padded, keys, truncated

    def tokenize_documents(self, texts: list[str]) -> list[np.ndarray]:
        """Document ids: marker after [CLS], truncated to document_length."""
        return self.tokenize_texts(
            texts, range(len(texts)), max_length=self.document_length, marker=self.document_marker
        )[2]

    def kept(self, input_ids: np.ndarray) -> np.ndarray:
        """Which document tokens survive the skiplist."""
        return ~np.isin(input_ids, self.skiplist)

    # -- encoding ----------------------------------------------------------------------------------

    def encode_queries(
        self,
        texts: str | list[str],
        *,
        convert_to_tensor: bool = False,
        max_tokens_per_batch: int | None = None,
        devices: Devices = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Queries -> [n, query_length, dim] float32 (one string gives [query_length, dim]).

        With query expansion every position holds a vector (the [MASK] ones included). Without it,
        positions after a query's last token are zero vectors, which add nothing to MaxSim.
        An empty list gives shape [0, query_length, dim].
        """
        texts, single = single_or_list(texts)
        texts = check_texts(texts, "queries")
        run = EncodeOptions(max_tokens_per_batch, devices, show_progress_bar)
        if run.uses_processes(len(texts)):
            return run.in_processes(self, "encode_queries", texts, convert_to_tensor=convert_to_tensor)
        out = torch.zeros(len(texts), self.query_length, self.dim)
        if texts:
            for batch, (vectors,) in self._run_queries(texts, run):
                starts = batch.cu_seqlens[:-1].tolist()
                for row, start, length in zip(batch.rows, starts, batch.lengths):
                    out[row, :length] = vectors[start : start + length]
        out = as_output(out, convert_to_tensor)
        return out[0] if single else out

    def _run_queries(self, texts, run: EncodeOptions):
        masked_keys = self.do_query_expansion and not self.attend_to_expansion_tokens
        keys_by_row: dict[int, np.ndarray] = {}  # filled and read on the tokenizing thread

        def tokenize(indices):
            ids, keys, truncated = self.tokenize_queries(texts, indices)
            keys_by_row.update(zip(map(int, indices), keys))
            return list(indices), [0] * len(ids), ids, truncated

        def extras(sequences, rows):
            if not masked_keys:
                return {}
            return {"keys": torch.from_numpy(np.concatenate([keys_by_row.pop(int(r)) for r in rows]))}

        def compute(model: ColBERT, batch: PackedBatch):
            if not masked_keys:
                return (model.forward_packed(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, False),)
            shape = (batch.num_sequences, model.query_length)
            hidden = encode_with_key_mask(
                model.encoder, batch.input_ids.view(shape), batch.extras["keys"].view(shape)
            )
            return (model.project(hidden).flatten(0, 1),)

        sizes = [len(t) for t in texts]
        return self.run_encoding(
            sizes, tokenize, compute, run, extras=extras, max_length=self.query_length, what="queries"
        )

    def encode_documents(
        self,
        texts: str | list[str],
        *,
        convert_to_tensor: bool = False,
        packed: bool = False,
        chunking: Chunking | dict | None = None,
        max_tokens_per_batch: int | None = None,
        devices: Devices = None,
        show_progress_bar: bool | None = None,
    ) -> list | PackedEmbeddings:
        """Documents -> one [n_tokens_i, dim] float32 matrix each, skiplisted tokens left out, no
        padding (one string gives one matrix).

        Args:
            packed: return one `PackedEmbeddings` (all vectors in one array plus offsets) instead
                of a list.
            chunking: documents longer than `chunking.size` tokens become overlapping windows whose
                token vectors are concatenated, in text order, into the document's matrix (MaxSim
                takes the best match anywhere in it). Without it, documents are truncated to
                `document_length` tokens and the count is logged.
        """
        texts, single = single_or_list(texts)
        texts = check_texts(texts, "documents")
        run = EncodeOptions(max_tokens_per_batch, devices, show_progress_bar)
        if run.uses_processes(len(texts)):
            settings = {"convert_to_tensor": convert_to_tensor, "packed": packed, "chunking": chunking}
            return run.in_processes(self, "encode_documents", texts, **settings)
        chunking = Chunking.parse(chunking)
        counts = np.zeros(len(texts), dtype=np.int64)
        pieces: list[tuple[int, int, torch.Tensor]] = []
        if texts:
            for batch, (vectors,) in self._run_documents(texts, chunking, run):
                kept = self.kept(batch.input_ids.numpy())
                per_sequence = np.add.reduceat(kept, batch.cu_seqlens[:-1].numpy().astype(np.int64))
                for row, window, part in zip(
                    batch.rows, batch.windows, torch.split(vectors, per_sequence.tolist())
                ):
                    pieces.append((int(row), int(window), part))
                    counts[row] += len(part)
        pieces.sort(key=lambda p: (p[0], p[1]))
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        embeddings = torch.cat([p[2] for p in pieces]) if pieces else torch.zeros(0, self.dim)
        result = PackedEmbeddings(as_output(embeddings, convert_to_tensor), offsets)
        if single:
            return result[0]
        return result if packed else result.to_list()

    def _run_documents(self, texts, chunking: Chunking | None, run: EncodeOptions):
        def tokenize(indices):
            return self.tokenize_texts(
                texts,
                indices,
                max_length=self.document_length,
                marker=self.document_marker,
                chunking=chunking,
            )

        def extras(sequences, rows):
            keep = self.kept(np.concatenate(sequences))
            return {"keep": torch.from_numpy(np.flatnonzero(keep))}

        def compute(model: ColBERT, batch: PackedBatch):
            hidden = model.encoder.forward_packed(
                batch.input_ids, batch.cu_seqlens, batch.max_seqlen, check_inputs=False
            )
            return (model.project(hidden.index_select(0, batch.extras["keep"])),)

        sizes = [len(t) for t in texts]
        return self.run_encoding(
            sizes, tokenize, compute, run, extras=extras, max_length=self.document_length, what="documents"
        )

    # -- scoring -----------------------------------------------------------------------------------

    def score(self, queries, documents):
        """MaxSim scores [n_queries, n_documents]: for each query token, the best dot product with any
        token of the document, summed over the query tokens.

        `queries` is [n, query_length, dim] (or one query [query_length, dim], giving [n_documents]);
        `documents` a list of [n_tokens_i, dim] matrices or a PackedEmbeddings. numpy in, numpy out.
        """
        return maxsim(queries, documents)

    # -- checkpoints -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        tokenizer=None,
        embedding_size: int = 128,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        attn_backend: str = "auto",
        **settings,
    ) -> ColBERT:
        """Load a PyLate ColBERT folder (ours or PyLate's) whose Transformer is ModernBERT, or start
        from a bare ModernBERT checkpoint (encoder or masked-LM) or a sentence-transformers dense
        retriever (its Transformer) with a fresh projection to `embedding_size` (no bias) and the
        [Q] / [D] marker tokens added.

        `settings` override the folder's (or PyLate's default) query_prefix, document_prefix,
        query_length, document_length, do_query_expansion, attend_to_expansion_tokens and
        skiplist_words.
        """
        unknown = set(settings) - set(PYLATE_SETTINGS)
        if unknown:
            raise TypeError(f"unknown ColBERT settings: {', '.join(sorted(unknown))}")
        model_dir = cls.resolve(path_or_hub_id)
        transformer_dir, projection, saved = model_dir, None, {}
        if folders.has_modules(model_dir):
            transformer_dir, projection, saved = cls._read_folder(model_dir)
        encoder, device, dtype = cls.load_encoder(
            transformer_dir, device=device, dtype=dtype, attn_backend=attn_backend
        )
        if projection is None:
            projection = nn.Linear(encoder.config.hidden_size, embedding_size, bias=False)
        model = cls(
            encoder,
            cls.load_tokenizer_for(transformer_dir, tokenizer),
            projection.to(device=device, dtype=dtype),
            **{**saved, **settings},
        )
        return model.eval()

    @staticmethod
    def _read_folder(model_dir: Path) -> tuple[Path, nn.Linear | None, dict]:
        """(Transformer folder, projection, settings) of a PyLate folder. A sentence-transformers
        single-vector folder (one with Pooling) gives its Transformer alone, as PyLate starts from one:
        its pooling and any Dense or Normalize after it make one vector, not token vectors."""
        modules = folders.read_modules(model_dir)
        if any(module.kind == "Pooling" for module in modules):
            return modules[0].path, None, {}
        folders.check_supported(model_dir, modules, {"Transformer", "Dense"})
        if [m.kind for m in modules] != ["Transformer", "Dense"]:
            raise CheckpointError(
                f"{model_dir}: expected a Transformer and one Dense module (PyLate's layout)"
            )
        settings = folders.read_settings(model_dir)
        saved = {key: settings[key] for key in PYLATE_SETTINGS if settings.get(key) is not None}
        return modules[0].path, folders.read_dense(modules[1].path), saved

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write PyLate's folder layout (with the tokenizer): the ModernBERT checkpoint at the root,
        the projection in 1_Dense, and PyLate's settings in config_sentence_transformers.json."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(directory)
        folders.save_tokenizer(self.tokenizer, directory, self.document_length - 1)
        # PyLate stores the length without its marker token.
        folders.write_transformer_config(directory, self.document_length - 1)
        folders.write_dense(directory / "1_Dense", self.projection, extra={"use_residual": False})
        folders.write_modules(directory, [("", folders.ST_TRANSFORMER), ("1_Dense", folders.PYLATE_DENSE)])
        settings = {key: getattr(self, key) for key in PYLATE_SETTINGS}
        folders.write_json(
            directory / folders.SETTINGS_FILE,
            {
                "__version__": folders.versions(),
                "model_type": "ColBERT",
                "prompts": {"query": "", "document": ""},
                "default_prompt_name": None,
                "similarity_fn_name": "MaxSim",
                **settings,
            },
        )


def encode_with_key_mask(
    encoder: ModernBert, input_ids: torch.Tensor, key_mask: torch.Tensor
) -> torch.Tensor:
    """Padded ids [B, L] -> hidden states [B, L, H] where every position computes a state but
    attends only to the positions in `key_mask` [B, L] (and, in local layers, within the window)."""
    return encoder(input_ids, torch.ones_like(input_ids), key_mask=key_mask)
