"""Sample generation for users of a trained run: load a checkpoint's EMA model, draw
fixed noise, then sample with ``sample_flow`` (a solver on the diagonal ``u(x, t, t)``),
``sample_meanflow`` (k-step mean-flow jumps) or ``sample_consistency`` (jumps to the data,
re-noised with fresh noise between them), all from ``solvers/sampling.py``.
"""

import torch
from omegaconf import DictConfig
from torch import Tensor

from runs.machine import RENOISE
from runs.stored import load_model_from_checkpoint
from solvers.sampling import SampleResult, sample_consistency, sample_flow, sample_meanflow

__all__ = ["SampleResult", "fixed_noise", "load_checkpoint_model", "renoise_seed", "sample_consistency", "sample_flow",
           "sample_meanflow"]



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


def renoise_seed(seed: int) -> int:
    """The seed of the fresh noise a re-noising sampler (``ConsistencySampler.reseed``) draws
    for the samples whose ``x_0`` came from ``seed``: another stream than ``x_0``'s."""
    return seed + RENOISE
