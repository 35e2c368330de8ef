"""Sample generation for users of a trained run: load a checkpoint's EMA model, then
draw with ``sample_flow`` (a solver on the diagonal ``u(x, t, t)``) or
``sample_meanflow`` (k-step mean-flow jumps), both from ``solvers/sampling.py``.
"""

import torch

from runs.stored import load_model_from_checkpoint
from solvers.sampling import SampleResult, sample_flow, sample_meanflow

__all__ = ["SampleResult", "load_checkpoint_model", "sample_flow", "sample_meanflow"]


def load_checkpoint_model(path: str, device: str | torch.device = "cpu"):
    """The EMA model of a checkpoint (eval mode) and its resolved config."""
    model, cfg, _ = load_model_from_checkpoint(path, device)
    return model, cfg
