"""Exponential moving average of the weights (EDM, Karras et al. 2022, training_loop).

The EMA copy is a frozen deep copy of the un-compiled, un-wrapped module updated with
``lerp``; evaluation and sampling use it. The decay is either fixed or derived from
a half-life measured in training samples, which makes it independent of the batch
size (EDM's ``ema_halflife_kimg``): ``decay = 0.5 ** (batch_size / halflife_samples)``.
"""

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, halflife_samples: float = 0.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        if halflife_samples < 0:
            raise ValueError(f"ema halflife_samples must be >= 0, got {halflife_samples}")
        self.decay = decay
        self.halflife_samples = halflife_samples
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_for(self, batch_size: int) -> float:
        if self.halflife_samples > 0:
            return 0.5 ** (batch_size / self.halflife_samples)
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int) -> None:
        beta = self.decay_for(batch_size)
        for p_ema, p in zip(self.module.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
