"""MLP mean-velocity field for dense (B, D) data.

The unified input ``[x, s, t]`` (DESIGN.md) goes straight into the first layer, with
the two times also fed through a small sinusoidal embedding so that the network
can resolve fine structure in time. Output: ``u(x_s, s, t)`` of shape (B, D).
"""

import math

import torch
from torch import Tensor, nn

from dataloaders.base_dataloaders import split_unified_input

ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer-style embedding of scalar times (B,) -> (B, dim); times in [0, 1] are
    scaled by 1000 so the lowest frequencies still vary across the unit interval."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(t.dtype)


class MLP(nn.Module):
    """``u(x, s, t)`` for dense data.

    Args:
        data_dim: D, the dimension of one sample.
        hidden: width of the hidden layers.
        depth: number of hidden layers (>= 1).
        activation: one of ``silu``, ``gelu``, ``relu``, ``tanh``.
        time_embed_dim: size of each sinusoidal time embedding (0 feeds raw times only).
        num_classes: 0 for an unconditional model; otherwise a learned class
            embedding with a null class at index ``num_classes`` (for guidance).
        dropout: dropout after each hidden activation.
    """

    def __init__(
        self,
        data_dim: int,
        hidden: int = 256,
        depth: int = 4,
        activation: str = "silu",
        time_embed_dim: int = 32,
        num_classes: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: expected one of {sorted(ACTIVATIONS)}")
        if depth < 1 or hidden < 1 or data_dim < 1:
            raise ValueError(f"MLP needs data_dim, hidden, depth >= 1, got {data_dim}, {hidden}, {depth}")
        self.data_dim = data_dim
        self.time_embed_dim = time_embed_dim
        self.num_classes = num_classes
        in_dim = data_dim + 2 + 2 * time_embed_dim
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers[:2])  # first layer; the class embedding is added after it
        self.rest = nn.Sequential(*layers[2:])
        self.out = nn.Linear(hidden, data_dim)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        x, s, t = split_unified_input(z)  # (B, D), (B,), (B,)
        feats = [z]
        if self.time_embed_dim > 0:
            feats += [sinusoidal_embedding(s, self.time_embed_dim), sinusoidal_embedding(t - s, self.time_embed_dim)]
        h = self.body(torch.cat(feats, dim=1))  # (B, hidden)
        if self.class_embed is not None:
            if y is None:
                y = torch.full((z.shape[0],), self.num_classes, dtype=torch.long, device=z.device)
            h = h + self.class_embed(y)
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes=0) but got class labels")
        return self.out(self.rest(h))  # (B, D)
