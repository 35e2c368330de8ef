"""MLP mean-velocity field for dense (B, D) data.

The unified input ``[x, s, t]`` (docs/design.md) goes straight into the first layer, with
the times ``time_cond`` reads (``models/embeddings.py``; s and t - s by default) also
fed through a small sinusoidal embedding so that the network can resolve fine
structure in time; with ``time_cond="h"`` the first layer sees ``[x, t - s]`` alone.
Extra conditions enter the first layer the same way, raw and embedded. Output:
``u(x_s, s, t)`` of shape (B, D), and with ``aux_head`` a second output layer on the
same body gives the auxiliary velocity.
"""

import math

import torch
from torch import Tensor, nn

from models.base_model import BaseModel
from models.embeddings import TIME_CONDS, time_inputs
from models.layers import GELU, Linear, SiLU

ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": SiLU, "gelu": GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def fourier_time_features(t: Tensor, dim: int, max_freq: float = 16.0) -> Tensor:
    """Sines and cosines of times (B,) at ``dim // 2`` frequencies geometric in
    [1, max_freq] rad per unit time -> (B, dim).

    The band is kept low on purpose: the MeanFlow target contains ``(t - s) du/ds``,
    and the 1000x-scaled DDPM embedding (frequencies up to 1000) makes ``du/ds`` so
    large at initialisation that the target feeds back and training diverges on 2-D
    data (measured: the loss grows 1000x within 300 steps; with max_freq <= 16 it
    trains). Computed in float32 at least (float64 when the times are).
    """
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half, dtype=dtype, device=t.device))
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(t.dtype)


class MLP(BaseModel):
    """``u(x, s, t)`` for dense data.

    Args:
        data_dim: D, the dimension of one sample.
        hidden: width of the hidden layers.
        depth: number of hidden layers (>= 1).
        activation: one of ``silu``, ``gelu``, ``relu``, ``tanh``.
        time_embed_dim: size of each Fourier time embedding (0 feeds raw times only).
        max_freq: highest time frequency of the embedding (rad per unit time).
        num_classes: 0 for an unconditional model; otherwise a learned class
            embedding with a null class at index ``num_classes`` (for guidance).
        dropout: dropout after each hidden activation.
        num_conds, aux_head, time_cond: extra conditions, the auxiliary output layer,
            the times embedded (``models/base_model.py``).
    """

    def __init__(
        self,
        data_dim: int,
        hidden: int = 256,
        depth: int = 4,
        activation: str = "silu",
        time_embed_dim: int = 32,
        max_freq: float = 16.0,
        num_classes: int = 0,
        dropout: float = 0.0,
        num_conds: int = 0,
        aux_head: bool = False,
        time_cond: str = "s_h",
    ) -> None:
        super().__init__(num_classes, num_conds=num_conds, aux_head=aux_head, time_cond=time_cond)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: expected one of {sorted(ACTIVATIONS)}")
        if depth < 1 or hidden < 1 or data_dim < 1:
            raise ValueError(f"MLP needs data_dim, hidden, depth >= 1, got {data_dim}, {hidden}, {depth}")
        self.data_dim = data_dim
        self.time_embed_dim = time_embed_dim
        self.max_freq = max_freq
        raw_times = 1 if time_cond == "h" else 2  # [s, t] of the unified input, or h alone
        in_dim = data_dim + raw_times + len(TIME_CONDS[time_cond]) * time_embed_dim + num_conds * (1 + time_embed_dim)
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [Linear(in_dim if i == 0 else hidden, hidden), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers[:2])  # first layer; the class embedding is added after it
        self.rest = nn.Sequential(*layers[2:])
        self.out = Linear(hidden, data_dim)
        self.aux_out = Linear(hidden, data_dim) if aux_head else None

    def forward(self, z: Tensor, y: Tensor | None = None, aug: Tensor | None = None, cond: Tensor | None = None,
                head: str = "u") -> Tensor | tuple[Tensor, Tensor]:
        x, s, t, y, aug, cond = self.inputs(z, y, aug, cond, head)
        times = time_inputs(s, t, self.time_cond)  # each (B,)
        raw = torch.cat([x, times[0][:, None]], dim=1) if self.time_cond == "h" else z  # [x, h] or [x, s, t]
        feats, scalars = ([raw], times) if cond is None else ([raw, cond], times + list(cond.unbind(1)))
        if self.time_embed_dim > 0:
            feats += [fourier_time_features(c, self.time_embed_dim, self.max_freq) for c in scalars]
        h = self.body(torch.cat(feats, dim=1))  # (B, hidden)
        if self.class_embed is not None:
            h = h + self.class_embed(y)
        return self.outputs(head, self.rest(h), self.out, self.aux_out)  # (B, D), or two
