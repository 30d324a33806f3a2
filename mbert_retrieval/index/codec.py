"""Residual compression of token embeddings, as in ColBERTv2 / PLAID.

A token embedding x is stored as the id of its nearest centroid c plus its residual r = x - c quantized to
`nbits` bits per dimension. Each dimension has its own 2**nbits buckets: a Lloyd-Max quantizer fitted on
a sample of residuals, so each bucket decodes to the mean of the values that fall in it and the cutoffs
lie halfway between neighbouring bucket values. That is the least squared error a scalar quantizer can
have, below ColBERTv2's equal-count (quantile) buckets shared by all dimensions, at the same size.

Packed codes hold 8 / nbits dimensions per byte, first dimension in the highest bits. Decoding goes
through a lookup table with one 256-row block per byte position, turning one byte into its 8 / nbits
residual values at once.
"""

from __future__ import annotations

import torch

NBITS = (1, 2, 4)
LLOYD_ITERS = 20


class ResidualCodec:
    def __init__(self, centroids: torch.Tensor, bucket_cutoffs: torch.Tensor, bucket_weights: torch.Tensor):
        """`bucket_cutoffs` [dim, 2**nbits - 1] and `bucket_weights` [dim, 2**nbits] per dimension, or
        1-D tables shared by every dimension."""
        self.dim = centroids.shape[1]
        n_buckets = bucket_weights.shape[-1]
        self.nbits = {2: 1, 4: 2, 16: 4}.get(n_buckets)
        if self.nbits is None or bucket_cutoffs.shape[-1] != n_buckets - 1:
            raise ValueError(f"bucket tables of {n_buckets} weights match no nbits in {NBITS}")
        _check_packable(self.dim, self.nbits)
        for table in (bucket_cutoffs, bucket_weights):
            if table.ndim not in (1, 2) or (table.ndim == 2 and len(table) != self.dim):
                raise ValueError(
                    f"bucket tables must be 1-D or have one row per dimension ({self.dim}), "
                    f"got shape {tuple(table.shape)}"
                )
        self.centroids = centroids.float()
        self.bucket_cutoffs = bucket_cutoffs.float().expand(self.dim, n_buckets - 1).contiguous()
        self.bucket_weights = bucket_weights.float().expand(self.dim, n_buckets).contiguous()
        self.values_per_byte = 8 // self.nbits
        self.shifts = self.nbits * torch.arange(self.values_per_byte - 1, -1, -1, device=centroids.device)
        self.byte_table = self._byte_table()
        self.byte_offsets = 256 * torch.arange(self.bytes_per_token, device=centroids.device)

    @classmethod
    def fit(cls, centroids: torch.Tensor, sample: torch.Tensor, nbits: int) -> ResidualCodec:
        """Per-dimension Lloyd-Max buckets for the residuals of `sample` [n, dim] from their centroids."""
        if nbits not in NBITS:
            raise ValueError(f"nbits must be one of {NBITS}, got {nbits}")
        _check_packable(centroids.shape[1], nbits)
        centroids = centroids.float()
        residuals = sample.float() - centroids[nearest_centroids(sample, centroids)]
        cutoffs, weights = lloyd_max(residuals.T.contiguous(), 2**nbits)
        return cls(centroids, cutoffs, weights)

    def to(self, device: torch.device | str) -> ResidualCodec:
        return ResidualCodec(
            self.centroids.to(device), self.bucket_cutoffs.to(device), self.bucket_weights.to(device)
        )

    @property
    def bytes_per_token(self) -> int:
        return self.dim * self.nbits // 8

    def encode(self, embeddings: torch.Tensor, chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings [n, dim] -> (centroid ids int64 [n], packed residuals uint8 [n, dim*nbits/8])."""
        codes, packed = [], []
        for block in embeddings.split(chunk):
            block = block.to(self.centroids.device, torch.float32)
            block_codes = nearest_centroids(block, self.centroids)
            residuals = (block - self.centroids[block_codes]).T.contiguous()
            buckets = torch.searchsorted(self.bucket_cutoffs, residuals).T  # per-dimension cutoffs
            codes.append(block_codes)
            packed.append(self.pack(buckets.to(torch.uint8)))
        return torch.cat(codes), torch.cat(packed)

    def decode(self, codes: torch.Tensor, packed: torch.Tensor, dtype: torch.dtype = torch.float32):
        """(centroid ids [n], packed residuals [n, bytes]) -> embeddings [n, dim] in `dtype`."""
        embedding = torch.nn.functional.embedding  # a plain row gather, faster than indexing on CPU
        rows = packed.long() + self.byte_offsets  # each byte position has its own block of the table
        decoded = embedding(rows, self.byte_table.to(dtype)).view(len(packed), self.dim)
        decoded += embedding(codes.long(), self.centroids.to(dtype))
        return decoded

    def pack(self, buckets: torch.Tensor) -> torch.Tensor:
        """Bucket indices uint8 [n, dim] -> bytes [n, dim * nbits / 8]."""
        grouped = buckets.reshape(len(buckets), -1, self.values_per_byte).to(torch.int32)
        return (grouped << self.shifts).sum(-1).to(torch.uint8)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Bytes [n, dim * nbits / 8] -> bucket indices uint8 [n, dim]."""
        mask = 2**self.nbits - 1
        buckets = (packed.to(torch.int32)[..., None] >> self.shifts) & mask
        return buckets.view(len(packed), self.dim).to(torch.uint8)

    def _byte_table(self) -> torch.Tensor:
        """[bytes_per_token * 256, values_per_byte]: row 256 * p + b decodes byte value b at position p."""
        every_byte = torch.arange(256, device=self.centroids.device, dtype=torch.int32)
        buckets = (every_byte[:, None] >> self.shifts) & (2**self.nbits - 1)  # [256, values_per_byte]
        weights = self.bucket_weights.view(self.bytes_per_token, self.values_per_byte, -1)
        per_position = torch.arange(self.values_per_byte, device=self.centroids.device)
        table = weights[:, per_position, buckets]  # [bytes_per_token, 256, values_per_byte]
        return table.reshape(-1, self.values_per_byte)

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "centroids": self.centroids,
            "bucket_cutoffs": self.bucket_cutoffs,
            "bucket_weights": self.bucket_weights,
        }


def lloyd_max(values: torch.Tensor, n_buckets: int, iters: int = LLOYD_ITERS):
    """Scalar quantizers of least squared error for each row of `values` [rows, n].

    Starts from equal-count buckets, then alternates: each bucket value becomes the mean of the values in
    the bucket, each cutoff the midpoint of two neighbouring bucket values. Returns cutoffs
    [rows, n_buckets - 1] and bucket values [rows, n_buckets], both ascending.
    """
    fractions = (torch.arange(n_buckets, device=values.device) + 0.5) / n_buckets
    weights = values.sort(dim=1).values[:, (fractions * (values.shape[1] - 1)).round().long()]
    for _ in range(iters):
        cutoffs = (weights[:, 1:] + weights[:, :-1]) / 2
        buckets = torch.searchsorted(cutoffs, values)
        # float64 sums: the same buckets on any run, whatever order CUDA adds in (as in kmeans)
        sums = torch.zeros_like(weights, dtype=torch.float64).scatter_add_(1, buckets, values.double())
        counts = torch.zeros_like(weights).scatter_add_(1, buckets, torch.ones_like(values))
        means = (sums / counts.clamp(min=1)).float()
        weights = torch.where(counts > 0, means, weights)  # an empty bucket stays put
        weights = weights.sort(dim=1).values
    return (weights[:, 1:] + weights[:, :-1]) / 2, weights


def nearest_centroids(
    embeddings: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 16
) -> torch.Tensor:
    """Index of the highest inner-product centroid for each row (centroids are unit vectors)."""
    dtype = torch.float16 if centroids.device.type == "cuda" else torch.float32
    weights = centroids.to(dtype)
    out = [(block.to(centroids.device, dtype) @ weights.T).argmax(1) for block in embeddings.split(chunk)]
    return torch.cat(out)


def _check_packable(dim: int, nbits: int) -> None:
    if (dim * nbits) % 8:
        raise ValueError(f"dim * nbits must be a multiple of 8 to pack residuals (dim={dim}, nbits={nbits})")
