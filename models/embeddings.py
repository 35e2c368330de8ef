"""Time embeddings shared by the image models (SmallCNN, UNet, DiT).

Every model is a mean-velocity field ``u(x_s, s, t)`` (docs/design.md). The image models
embed the start time ``s`` and the interval ``t - s`` (not ``t`` itself): the
MeanFlow paper (Geng et al. 2025, Table 1c) found the pair (time, interval) the
best of the choices it tried, and with ``s = t`` (flow matching) the interval
embedding is a constant, so a flow-matching model is the ``t - s = 0`` slice of a
MeanFlow model. Each time gets its own embedder and the two are summed.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import Linear, SiLU


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer sinusoidal embedding (Vaswani et al. 2017, Sec. 3.5) of times (B,) -> (B, dim).

    Times in [0, 1] are scaled by 1000, the range DDPM/DiT embedders were designed
    for, so that the lowest frequencies still vary across the unit interval. Computed
    in float32 at least, and in float64 when the times are float64 (finite-difference
    tests need that precision).
    """
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = 1000.0 * t.to(dtype)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb.to(t.dtype)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP: (B,) -> (B, out_dim)."""

    def __init__(self, out_dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(Linear(frequency_dim, out_dim), SiLU(), Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.frequency_dim))  # (B, out_dim)


class IntervalTimeEmbedder(nn.Module):
    """Embeds both times of ``u(x_s, s, t)``: ``emb(s) + emb'(t - s)``, (B,), (B,) -> (B, out_dim)."""

    def __init__(self, out_dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.s_embedder = TimestepEmbedder(out_dim, frequency_dim)
        self.interval_embedder = TimestepEmbedder(out_dim, frequency_dim)

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        return self.s_embedder(s) + self.interval_embedder(t - s)  # (B, out_dim)


class ClassEmbedder(nn.Module):
    """Class embedding with a learned null class at index ``num_classes`` (for guidance):
    (B,) int64 -> (B, out_dim). The labels come resolved from ``BaseModel.labels``
    (the null class already filled in where there was none)."""

    def __init__(self, num_classes: int, out_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, out_dim)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)  # (B, out_dim)


class AugmentEmbedder(nn.Module):
    """The EDM augment label's bias-free linear map into the embedding (EDM's
    ``map_augment``, used by py-meanflow's UNet): (B, augment_dim) -> (B, out_dim), so
    the zero label of sampling adds nothing. A plain parameter, not an ``nn.Linear``, so
    the models' init loops (which zero every Linear bias) leave it alone."""

    def __init__(self, augment_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, augment_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, aug: Tensor) -> Tensor:
        return F.linear(aug, self.weight)  # (B, out_dim)


def check_levels(model: str, image_size: int, channel_mult: tuple[int, ...]) -> None:
    """A down/up-sampling model with ``len(channel_mult)`` levels halves the image
    ``levels - 1`` times: the size must divide evenly (one-line error otherwise)."""
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor != 0:
        raise ValueError(
            f"{model} image_size={image_size} is not divisible by 2**(levels-1)={factor} "
            f"for channel_mult={list(channel_mult)}: use a multiple of {factor} or fewer levels"
        )
