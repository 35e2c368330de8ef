"""A mixture of K Gaussian clusters in D dimensions (the built-in 2-D demo data).

Cluster centres are drawn once from the ``seed`` (uniform on a sphere of radius
``radius``, or evenly on a circle in 2-D so the demo picture is a clean ring); each
sample is ``centre_k + spread * N(0, I)`` with k uniform. The cluster id is kept as the
label for class-conditional work. The train and test splits share the centres and
use different sample seeds, so held-out data is a fresh draw of the same mixture.
"""

import math

import torch

from dataloaders.base_dataloaders import TensorTargetDataset


def kmeans_centres(num_clusters: int, dim: int, radius: float, seed: int) -> torch.Tensor:
    if dim == 2:
        angles = 2 * math.pi * torch.arange(num_clusters, dtype=torch.float64) / num_clusters
        return (radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)).float()
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_clusters, dim, generator=g)
    return radius * directions / directions.norm(dim=1, keepdim=True)


def sample_kmeans(
    num_samples: int, centres: torch.Tensor, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` points and their cluster ids from the mixture with ``centres`` (K, D)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(centres.shape[0], (num_samples,), generator=g)
    points = centres[labels] + spread * torch.randn(num_samples, centres.shape[1], generator=g)
    return points, labels


SPLIT_OFFSETS = {"train": 1, "test": 2, "reference": 3}


def make_dataset(
    split: str,
    num_samples: int = 50_000,
    num_clusters: int = 8,
    dim: int = 2,
    radius: float = 4.0,
    spread: float = 0.5,
    seed: int = 0,
) -> TensorTargetDataset:
    """The ``split`` ('train', 'test', or 'reference' for the floor's second draw)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(SPLIT_OFFSETS)}")
    if num_clusters < 1 or dim < 1 or num_samples < 1:
        raise ValueError(f"kmeans needs num_clusters, dim, num_samples >= 1, got {num_clusters}, {dim}, {num_samples}")
    if spread <= 0:
        raise ValueError(f"kmeans spread must be > 0, got {spread}")
    # Separate streams per split; the centres come from ``seed`` alone.
    centres = kmeans_centres(num_clusters, dim, radius, seed)
    points, labels = sample_kmeans(num_samples, centres, spread, seed * 1000 + SPLIT_OFFSETS[split])
    return TensorTargetDataset(points, labels, num_classes=num_clusters)
