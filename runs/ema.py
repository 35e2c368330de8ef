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
    """One EMA. With ``warmup`` the decay at update ``n`` (0-based, the optimizer steps
    taken before it) is capped at ``(1 + n) / (10 + n)`` (the warm-up of TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)``), so a short run's average forgets the
    initial weights within a few hundred steps instead of keeping ``decay ** n`` of them
    (0.999 keeps 38% of the zero-output initial model after the 970 steps of 10 epochs of
    the 2-D demo)."""

    def __init__(self, model: nn.Module, decay: float = 0.999, halflife_samples: float = 0.0, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        if halflife_samples < 0:
            raise ValueError(f"ema halflife_samples must be >= 0, got {halflife_samples}")
        self.decay = decay
        self.halflife_samples = halflife_samples
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_for(self, batch_size: int, step: int = 0) -> float:
        beta = 0.5 ** (batch_size / self.halflife_samples) if self.halflife_samples > 0 else self.decay
        return min(beta, (1 + step) / (10 + step)) if self.warmup else beta

    @torch.no_grad()
    def update(self, model: nn.Module, batch_size: int, step: int = 0) -> None:
        """``step``: the optimizer steps taken before this update (the warm-up's clock)."""
        beta = self.decay_for(batch_size, step)
        for p_ema, p in zip(self.module.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


class EMASet:
    """Every EMA a run keeps, updated together (the MeanFlow reference keeps three).

    The main one (``ema.decay``, or ``ema.halflife_samples``) is what evaluation samples
    and ``eval_checkpoint`` loads by default; it is saved under ``ema`` so checkpoints
    written before there were several still load. ``ema.decays`` lists every decay to
    keep: the ones other than the main are saved under ``emas`` by decay and evaluated
    under their own metric prefix (``eval_ema0.99995/...``). Each costs one copy of the
    weights in memory and in the checkpoint.
    """

    def __init__(self, model: nn.Module, decay: float, halflife_samples: float = 0.0, decays: list[float] | None = None,
                 warmup: bool = False) -> None:
        self.main = EMA(model, decay, halflife_samples, warmup)
        main_decay = None if halflife_samples > 0 else decay
        self.extra = {f"{d:g}": EMA(model, d, warmup=warmup) for d in dict.fromkeys(decays or []) if d != main_decay}

    @property
    def module(self) -> nn.Module:
        return self.main.module

    def extra_modules(self) -> dict[str, nn.Module]:
        """The EMAs other than the main one by metric prefix: ``{"eval_ema0.99995": module, ...}``."""
        return {f"eval_ema{decay}": ema.module for decay, ema in self.extra.items()}

    def update(self, model: nn.Module, batch_size: int, step: int = 0) -> None:
        for ema in (self.main, *self.extra.values()):
            ema.update(model, batch_size, step)

    def load_broadcast(self, model: nn.Module) -> None:
        """Start every EMA from ``model``'s weights (DDP broadcast rank 0's)."""
        for ema in (self.main, *self.extra.values()):
            ema.module.load_state_dict(model.state_dict())

    def checkpoint_entries(self) -> dict:
        return {"ema": self.main.state_dict(), "emas": {decay: ema.state_dict() for decay, ema in self.extra.items()}}

    def load_checkpoint(self, state: dict) -> None:
        """Restore from a checkpoint; an EMA it lacks (a decay added on resume) starts from its main EMA."""
        self.main.load_state_dict(state["ema"])
        for decay, ema in self.extra.items():
            ema.load_state_dict(state["emas"].get(decay, state["ema"]))
