"""One entry point for drawing samples from a trained mean-velocity field.

Flow-matching models are integrated by the solvers with ``v(x, t) = u(x, t, t)``;
MeanFlow models jump along a time grid with ``x_{k+1} = x_k + (t_{k+1} - t_k)
u(x_k, t_k, t_{k+1})`` (DESIGN.md), one network evaluation per step: one step is
``x_1 = x_0 + u(x_0, 0, 1)``.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dataloaders.base_dataloaders import make_unified_flow_matching_input
from helpers_cfg import guided_velocity
from models.checkpoint import load_model_from_checkpoint
from solvers.base_solver import uniform_grid
from solvers.runge_kutta import make_solver


@dataclass
class SampleResult:
    """samples: the final states (B, ...); trajectory: states at each grid time
    (including the noise) when asked for; nfe: network evaluations per sample."""

    samples: Tensor
    trajectory: list[Tensor] | None
    nfe: int


def load_checkpoint_model(path: str, device: str | torch.device = "cpu"):
    """The EMA model of a checkpoint (eval mode) and its resolved config."""
    model, cfg, _ = load_model_from_checkpoint(path, device)
    return model, cfg


@torch.no_grad()
def sample_flow(
    model: nn.Module,
    x0: Tensor,
    solver: str = "euler",
    num_steps: int = 100,
    label: Tensor | None = None,
    guidance_scale: float = 1.0,
    num_classes: int = 0,
    return_trajectory: bool = False,
) -> SampleResult:
    """Integrate ``dx/dt = u(x, t, t)`` from ``x0`` at t=0 to t=1 with a fixed-grid solver.

    ``guidance_scale`` != 1 applies classifier-free guidance (needs ``label`` and the
    model's ``num_classes``).
    """

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        z = make_unified_flow_matching_input(x, t, t)
        return guided_velocity(model, z, label, guidance_scale, num_classes)

    result = make_solver(solver).solve(velocity, x0, num_steps=num_steps, return_trajectory=return_trajectory)
    return SampleResult(samples=result.x, trajectory=result.trajectory, nfe=result.nfe)


@torch.no_grad()
def sample_meanflow(
    model: nn.Module,
    x0: Tensor,
    num_steps: int = 1,
    times: Tensor | None = None,
    label: Tensor | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Few-step MeanFlow sampling on ``times`` (default: ``num_steps`` uniform steps on [0, 1]).

    Guidance for MeanFlow is learned into the model at training time (MeanFlow paper,
    Sec. 4.2), so sampling reads the conditional model once per step.
    """
    grid = uniform_grid(num_steps) if times is None else times.to(torch.float64)
    x = x0
    trajectory = [x0] if return_trajectory else None
    for k in range(len(grid) - 1):
        s = torch.full((x.shape[0],), float(grid[k]), dtype=x.dtype, device=x.device)
        t = torch.full_like(s, float(grid[k + 1]))
        x = x + (t - s).reshape(-1, *([1] * (x.dim() - 1))) * model(make_unified_flow_matching_input(x, s, t), label)
        if trajectory is not None:
            trajectory.append(x)
    return SampleResult(samples=x, trajectory=trajectory, nfe=len(grid) - 1)
