"""Residual compression of token embeddings, as in ColBERTv2 / PLAID.

A token embedding x is stored as the id of its nearest centroid c plus its residual r = x - c quantized to
`nbits` bits per dimension. The 2**nbits buckets split the residual values at their quantiles (fitted on
a sample), and each bucket decodes to the median value of its range. Packed codes hold 8 / nbits
dimensions per byte, first dimension in the highest bits; decoding goes through a 256-row lookup table
that turns one byte into its 8 / nbits residual values at once.
"""

from __future__ import annotations

import torch

NBITS = (1, 2, 4)


class ResidualCodec:
    def __init__(self, centroids: torch.Tensor, bucket_cutoffs: torch.Tensor, bucket_weights: torch.Tensor):
        self.nbits = {2: 1, 4: 2, 16: 4}.get(len(bucket_weights))
        if self.nbits is None or len(bucket_cutoffs) != len(bucket_weights) - 1:
            raise ValueError(f"bucket tables of {len(bucket_weights)} weights match no nbits in {NBITS}")
        self.centroids = centroids.float()
        self.bucket_cutoffs = bucket_cutoffs.float()
        self.bucket_weights = bucket_weights.float()
        self.dim = centroids.shape[1]
        _check_packable(self.dim, self.nbits)
        self.values_per_byte = 8 // self.nbits
        self.shifts = self.nbits * torch.arange(self.values_per_byte - 1, -1, -1, device=centroids.device)
        self.byte_table = self._byte_table()

    @classmethod
    def fit(cls, centroids: torch.Tensor, sample: torch.Tensor, nbits: int) -> ResidualCodec:
        """Bucket cutoffs and weights from the residual quantiles of `sample` [n, dim]."""
        if nbits not in NBITS:
            raise ValueError(f"nbits must be one of {NBITS}, got {nbits}")
        _check_packable(centroids.shape[1], nbits)
        centroids = centroids.float()
        residuals = sample.float() - centroids[nearest_centroids(sample, centroids)]
        values = residuals.flatten()
        if len(values) > 1 << 22:  # quantiles of a random subset are as good and far cheaper
            generator = torch.Generator().manual_seed(0)
            values = values[torch.randint(len(values), (1 << 22,), generator=generator).to(values.device)]
        n_buckets = 2**nbits
        cutoffs = _quantiles(values, torch.arange(1, n_buckets) / n_buckets)
        weights = _quantiles(values, (torch.arange(n_buckets) + 0.5) / n_buckets)
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
            buckets = torch.bucketize(block - self.centroids[block_codes], self.bucket_cutoffs)
            codes.append(block_codes)
            packed.append(self.pack(buckets.to(torch.uint8)))
        return torch.cat(codes), torch.cat(packed)

    def decode(self, codes: torch.Tensor, packed: torch.Tensor, dtype: torch.dtype = torch.float32):
        """(centroid ids [n], packed residuals [n, bytes]) -> embeddings [n, dim] in `dtype`."""
        embedding = torch.nn.functional.embedding  # a plain row gather, faster than indexing on CPU
        decoded = embedding(packed.long(), self.byte_table.to(dtype)).view(len(packed), self.dim)
        decoded += embedding(codes.long(), self.centroids.to(dtype))
        return decoded

    def pack(self, buckets: torch.Tensor) -> torch.Tensor:
        """Bucket indices uint8 [n, dim] -> bytes [n, dim * nbits / 8]."""
        grouped = buckets.view(len(buckets), -1, self.values_per_byte).to(torch.int32)
        return (grouped << self.shifts).sum(-1).to(torch.uint8)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Bytes [n, dim * nbits / 8] -> bucket indices uint8 [n, dim]."""
        mask = 2**self.nbits - 1
        buckets = (packed.to(torch.int32)[..., None] >> self.shifts) & mask
        return buckets.view(len(packed), self.dim).to(torch.uint8)

    def _byte_table(self) -> torch.Tensor:
        every_byte = torch.arange(256, device=self.centroids.device, dtype=torch.int32)
        buckets = (every_byte[:, None] >> self.shifts) & (2**self.nbits - 1)
        return self.bucket_weights[buckets]  # [256, values_per_byte]

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "centroids": self.centroids,
            "bucket_cutoffs": self.bucket_cutoffs,
            "bucket_weights": self.bucket_weights,
        }


def nearest_centroids(
    embeddings: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 16
) -> torch.Tensor:
    """Index of the highest inner-product centroid for each row (centroids are unit vectors)."""
    dtype = torch.float16 if centroids.device.type == "cuda" else torch.float32
    weights = centroids.to(dtype)
    out = [(block.to(centroids.device, dtype) @ weights.T).argmax(1) for block in embeddings.split(chunk)]
    return torch.cat(out)


def _quantiles(values: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    ordered = values.sort().values
    positions = (fractions * (len(ordered) - 1)).round().long().to(values.device)
    return ordered[positions]


def _check_packable(dim: int, nbits: int) -> None:
    if (dim * nbits) % 8:
        raise ValueError(f"dim * nbits must be a multiple of 8 to pack residuals (dim={dim}, nbits={nbits})")
