"""Sample generation for users of a trained run: load a checkpoint's EMA model, draw
fixed noise, then sample with ``sample_flow`` (a solver on the diagonal ``u(x, t, t)``)
or ``sample_meanflow`` (k-step mean-flow jumps), both from ``solvers/sampling.py``.
"""

import torch
from omegaconf import DictConfig
from torch import Tensor

from runs.stored import load_model_from_checkpoint
from solvers.sampling import SampleResult, sample_flow, sample_meanflow

__all__ = ["SampleResult", "fixed_noise", "load_checkpoint_model", "sample_flow", "sample_meanflow"]


def load_checkpoint_model(path: str, device: str | torch.device = "cpu"):
    """The EMA model of a checkpoint (eval mode) and its resolved config."""
    model, cfg, _ = load_model_from_checkpoint(path, device)
    return model, cfg


def fixed_noise(cfg: DictConfig, n: int, seed: int) -> tuple[Tensor, Tensor | None]:
    """``n`` noise samples ``x_0 ~ N(0, I)`` of the run's data shape and, for a conditional
    model, uniform class labels (else None), from one CPU generator seeded with ``seed``:
    the same draw at every call, so evaluations compare weights, not noise."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *cfg.dataloaders.data_shape, generator=gen)
    labels = torch.randint(cfg.model.num_classes, (n,), generator=gen) if cfg.model.num_classes > 0 else None
    return x0, labels
