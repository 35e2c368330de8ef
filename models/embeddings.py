"""Time and condition embeddings shared by the image models (SmallCNN, UNet, DiT).

Every model is a mean-velocity field ``u(x_s, s, t)`` (docs/design.md). Which
functions of the two times it embeds is ``time_cond`` (``TIME_CONDS``), each time
with its own embedder and the results summed. In the MeanFlow paper's convention
(noise at time 1) its ``(t, r)`` is ``(1 - s, 1 - t)`` here and its interval
``t - r`` is ``h = t - s``:

- ``s_h``: s and h, the paper's (t, t - r), which it found best (Geng et al. 2025,
  Table 1c); the default. With ``s = t`` (flow matching) the h embedding is a
  constant, so a flow-matching model is the ``h = 0`` slice of a MeanFlow model;
- ``s_t``: s and t, the paper's (t, r);
- ``t_h``: t and h, the paper's (r, t - r);
- ``s_t_h``: all three, the paper's (t, r, t - r);
- ``h``: h alone, the paper's t - r, as iMF's DiT ("Improved Mean Flows", Geng et
  al. 2025): the noise level is left to be read from the state.

Extra scalar conditions (``num_conds``: a guidance scale, an interval's bounds) are
embedded like a time, one embedder each.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers import Linear, SiLU


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1.0) -> Tensor:
    """Transformer sinusoidal embedding (Vaswani et al. 2017, Sec. 3.5) of ``scale * t``
    (B,) -> (B, dim): frequencies from 1 down to ``1 / max_period`` per unit of ``scale * t``.

    ``scale`` 1 embeds a time in [0, 1] as it is, as the one-step references do
    (py-meanflow's UNet ``PositionalEmbedding``; the DiTs of the MeanFlow JAX code, of
    imeanflow and of AlphaFlow); DDPM and DiT embed integer steps 0..999, which
    ``scale`` 1000 imitates. The scale multiplies the embedding's derivative in time,
    and so the JVP ``du/ds`` that MeanFlow's target carries. Computed in float32 at
    least, and in float64 when the times are float64 (finite-difference tests need that
    precision).
    """
    dtype = torch.promote_types(t.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = scale * t.to(dtype)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb.to(t.dtype)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP: (B,) -> (B, out_dim)."""

    def __init__(self, out_dim: int, frequency_dim: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        self.frequency_dim, self.scale = frequency_dim, scale
        self.mlp = nn.Sequential(Linear(frequency_dim, out_dim), SiLU(), Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.frequency_dim, scale=self.scale))  # (B, out_dim)


# time_cond -> the times it embeds, in the order their embedders are built
TIME_CONDS: dict[str, tuple[str, ...]] = {"s_h": ("s", "h"), "s_t": ("s", "t"), "t_h": ("t", "h"),
                                          "s_t_h": ("s", "t", "h"), "h": ("h",)}


def check_time_cond(time_cond: str) -> None:
    if time_cond not in TIME_CONDS:
        raise ValueError(f"time_cond={time_cond!r}: expected one of {list(TIME_CONDS)} (models/embeddings.py)")


def check_time_scale(time_scale: float) -> None:
    """The factor on times before their embedding: a finite number > 0 (0 would make every time alike)."""
    if not (isinstance(time_scale, int | float) and math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"time_scale={time_scale!r}: expected a finite number > 0 (1: times as they are, as the "
                         "one-step references; 1000: DDPM's integer-step range)")


def time_inputs(s: Tensor, t: Tensor, time_cond: str) -> list[Tensor]:
    """The times ``time_cond`` reads from ``(s, t)``, each (B,), in ``TIME_CONDS`` order."""
    named = {"s": s, "t": t, "h": t - s}
    return [named[name] for name in TIME_CONDS[time_cond]]


class TimeEmbedder(nn.Module):
    """Embeds the times ``time_cond`` reads (module docstring), each with its own
    ``TimestepEmbedder``: (B,), (B,) -> (B, out_dim), their sum. The embedders are
    ``s_embedder``, ``t_embedder`` and ``interval_embedder`` (for h)."""

    NAMES = {"s": "s_embedder", "t": "t_embedder", "h": "interval_embedder"}

    def __init__(self, out_dim: int, frequency_dim: int = 256, time_cond: str = "s_h", time_scale: float = 1.0) -> None:
        super().__init__()
        check_time_cond(time_cond)
        check_time_scale(time_scale)
        self.time_cond = time_cond
        for name in TIME_CONDS[time_cond]:
            setattr(self, self.NAMES[name], TimestepEmbedder(out_dim, frequency_dim, time_scale))

    def embedders(self) -> list[TimestepEmbedder]:
        return [getattr(self, self.NAMES[name]) for name in TIME_CONDS[self.time_cond]]

    def embeddings(self, s: Tensor, t: Tensor) -> list[Tensor]:
        """One (B, out_dim) embedding per time read (the DiT's in-context tokens)."""
        return [embed(time) for embed, time in zip(self.embedders(), time_inputs(s, t, self.time_cond))]

    def forward(self, s: Tensor, t: Tensor) -> Tensor:
        first, *rest = self.embeddings(s, t)
        for emb in rest:
            first = first + emb
        return first  # (B, out_dim)


class ConditionEmbedder(nn.Module):
    """Extra scalar conditions (guidance scale, interval bounds), each embedded like a
    time by its own ``TimestepEmbedder``: (B, num_conds) -> list of (B, out_dim).
    The embedding is scaled for values in [0, 1]: a guidance scale ω >= 1 fits as
    1 - 1/ω, the form iMF's DiT embeds."""

    def __init__(self, num_conds: int, out_dim: int, frequency_dim: int = 256, time_scale: float = 1.0) -> None:
        super().__init__()
        self.embedders = nn.ModuleList([TimestepEmbedder(out_dim, frequency_dim, time_scale) for _ in range(num_conds)])

    def forward(self, cond: Tensor) -> list[Tensor]:
        return [embed(cond[:, i]) for i, embed in enumerate(self.embedders)]


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
