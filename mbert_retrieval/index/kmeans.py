"""k-means for index centroids: faiss where it can run on the data's device, plain torch otherwise.

faiss-cpu clusters CPU tensors (and faiss-gpu CUDA ones); with only faiss-cpu installed, a CUDA sample is
clustered by a short Lloyd loop in torch on the GPU, which is far faster than copying it to the CPU.
"""

from __future__ import annotations

import torch

from mbert_retrieval.index.faiss_index import faiss, faiss_has_gpu

MAX_POINTS_PER_CENTROID = 256


def train_kmeans(sample: torch.Tensor, n_centroids: int, n_iters: int = 4, seed: int = 0) -> torch.Tensor:
    """Cluster `sample` [n, dim] into `n_centroids` centroids (float32, on the sample's device)."""
    if sample.ndim != 2 or len(sample) < n_centroids:
        raise ValueError(f"k-means needs at least {n_centroids} points, got {len(sample)}")
    sample = _subsample(sample, n_centroids * MAX_POINTS_PER_CENTROID, seed)
    on_cpu = sample.device.type == "cpu"
    if faiss is not None and (on_cpu or faiss_has_gpu()):
        return _faiss_kmeans(sample, n_centroids, n_iters, seed, gpu=not on_cpu)
    return _torch_kmeans(sample, n_centroids, n_iters, seed)


def _subsample(sample: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    if len(sample) <= limit:
        return sample
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(sample), generator=generator)[:limit]
    return sample[keep.to(sample.device)]


def _faiss_kmeans(sample: torch.Tensor, n_centroids: int, n_iters: int, seed: int, gpu: bool):
    points = sample.float().cpu().numpy()
    kmeans = faiss.Kmeans(
        points.shape[1],
        n_centroids,
        niter=n_iters,
        seed=seed,
        gpu=gpu,
        max_points_per_centroid=MAX_POINTS_PER_CENTROID,
        verbose=False,
    )
    kmeans.train(points)
    return torch.from_numpy(kmeans.centroids).to(sample.device)


@torch.inference_mode()
def _torch_kmeans(sample: torch.Tensor, n_centroids: int, n_iters: int, seed: int, chunk: int = 1 << 16):
    generator = torch.Generator().manual_seed(seed)
    compute = torch.float16 if sample.device.type == "cuda" else torch.float32
    points = sample.to(compute)
    start = torch.randperm(len(points), generator=generator)[:n_centroids].to(sample.device)
    centroids = points[start].float()
    for _ in range(n_iters):
        # float64 sums: CUDA adds them in any order; in float64 that order no longer shows once
        # rounded to float32, so two builds from the same vectors (one process, or shards) agree
        sums = torch.zeros_like(centroids, dtype=torch.float64)
        counts = torch.zeros(n_centroids, device=sample.device)
        half_norms = 0.5 * centroids.pow(2).sum(1)
        for begin in range(0, len(points), chunk):
            block = points[begin : begin + chunk]
            # argmin ||x - c||^2 == argmax (x.c - ||c||^2 / 2)
            nearest = (block @ centroids.to(compute).T - half_norms.to(compute)).argmax(1)
            sums.index_add_(0, nearest, block.double())
            counts.index_add_(0, nearest, torch.ones_like(nearest, dtype=torch.float32))
        empty = counts == 0
        means = (sums / counts.clamp(min=1)[:, None]).float()
        centroids = torch.where(empty[:, None], centroids, means)
        if empty.any():  # restart empty clusters on random points
            restart = torch.randint(len(points), (int(empty.sum()),), generator=generator)
            centroids[empty] = points[restart.to(sample.device)].float()
    return centroids
