"""Energy distance between two samples (Székely & Rizzo 2013, Eq. 1).

    E(X, Y) = 2 E||X - Y|| - E||X - X'|| - E||Y - Y'||

estimated with the V-statistic (all pairs, the zero diagonal included), so it is
exactly zero for identical sets and non-negative in general (the V-statistic is a
squared MMD with the distance kernel). Images are flattened.
"""

import torch
from torch import Tensor


def _mean_pairwise_distance(a: Tensor, b: Tensor, chunk: int = 4096) -> Tensor:
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], chunk):
        total += torch.cdist(a[i : i + chunk], b).sum()
    return total / (a.shape[0] * b.shape[0])


@torch.no_grad()
def energy_distance(x: Tensor, y: Tensor) -> float:
    """Args: x (N, ...) and y (M, ...) samples; returns the (squared-form) energy distance."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"energy distance needs samples of one dimension, got {x.shape[1]} and {y.shape[1]}")
    value = 2 * _mean_pairwise_distance(x, y) - _mean_pairwise_distance(x, x) - _mean_pairwise_distance(y, y)
    return float(value.clamp_min(0.0))
