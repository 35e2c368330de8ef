"""Drawing samples from a mean-velocity field ``u(x_s, s, t)`` (docs/design.md, "Sampling").

Two ways, and a ``Sampler`` for each that a loss hands to the evaluator (a loss says how
its model samples; the evaluator only calls what it is given):

- ``DiagonalSampler``: integrate ``dx/dt = v(x, t) = u(x, t, t)`` from noise at t=0 to
  t=1 with a solver (Euler, RK4, ...), optionally with classifier-free guidance.
- ``JumpSampler``: ``x_{k+1} = x_k + (t_{k+1} - t_k) u(x_k, t_k, t_{k+1})`` on a grid,
  one network evaluation per step; one step is ``x_1 = x_0 + u(x_0, 0, 1)``.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from helpers_cfg import guided_velocity
from models.unified_input import make_unified_flow_matching_input
from solvers.base_solver import time_grid
from solvers.runge_kutta import make_solver


@dataclass
class SampleResult:
    """samples: the final states (B, ...); trajectory: states at each grid time
    (including the noise) when asked for; nfe: network evaluations per sample."""

    samples: Tensor
    trajectory: list[Tensor] | None
    nfe: int


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
    solver_options: dict | None = None,
) -> SampleResult:
    """Integrate ``dx/dt = u(x, t, t)`` from ``x0`` at t=0 to t=1 with ``solver``.

    ``guidance_scale`` != 1 applies classifier-free guidance (needs ``label`` and the
    model's ``num_classes``). ``solver_options`` go to the solver's constructor (the
    tolerances of an adaptive solver).
    """

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        z = make_unified_flow_matching_input(x, t, t)
        return guided_velocity(model, z, label, guidance_scale, num_classes)

    result = make_solver(solver, **(solver_options or {})).solve(velocity, x0, num_steps=num_steps, return_trajectory=return_trajectory)
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
    """Few-step mean-flow jumps on ``times`` (default: ``num_steps`` uniform steps on [0, 1]).

    Guidance for MeanFlow is learned into the model at training time (MeanFlow paper,
    Sec. 4.2), so sampling reads the conditional model once per step.
    """
    grid = time_grid(num_steps, times)
    x = x0
    trajectory = [x0] if return_trajectory else None
    for k in range(len(grid) - 1):
        s = torch.full((x.shape[0],), float(grid[k]), dtype=x.dtype, device=x.device)
        t = torch.full_like(s, float(grid[k + 1]))
        x = x + (t - s).reshape(-1, *([1] * (x.dim() - 1))) * model(make_unified_flow_matching_input(x, s, t), label)
        if trajectory is not None:
            trajectory.append(x)
    return SampleResult(samples=x, trajectory=trajectory, nfe=len(grid) - 1)


class Sampler(ABC):
    """One way of drawing samples, as a loss describes it to the evaluator.

    Attributes:
        metric: suffix of the metric names (``""`` gives ``eval/energy_distance``,
            ``"2step"`` gives ``eval/energy_distance_2step``).
        fid: whether FID is computed for these samples (the samplers a researcher ships).
        nfe: network evaluations per sample in the last call (a guided evaluation counts
            once: both branches go through one batched pass).
    """

    metric: str = ""
    fid: bool = True
    nfe: int = 0

    @abstractmethod
    def __call__(self, model: nn.Module, x0: Tensor, label: Tensor | None) -> Tensor:
        """Samples (B, ...) from noise ``x0`` (B, ...) and labels (B,) or None."""


class DiagonalSampler(Sampler):
    """``solver`` with ``steps`` steps on ``u(x, t, t)``; guidance scale w (1: none)."""

    def __init__(self, solver: str, steps: int, guidance_scale: float = 1.0, num_classes: int = 0,
                 metric: str = "", fid: bool = True, options: dict | None = None) -> None:
        self.solver, self.steps, self.guidance_scale, self.num_classes = solver, steps, guidance_scale, num_classes
        self.metric, self.fid, self.options = metric, fid, dict(options or {})

    def __call__(self, model: nn.Module, x0: Tensor, label: Tensor | None) -> Tensor:
        result = sample_flow(model, x0, self.solver, self.steps, label, self.guidance_scale, self.num_classes,
                             solver_options=self.options)
        self.nfe = result.nfe
        return result.samples


class JumpSampler(Sampler):
    """``steps`` uniform mean-flow jumps (``sample_meanflow``); metric ``"{steps}step"``."""

    def __init__(self, steps: int, fid: bool = True) -> None:
        self.steps, self.metric, self.fid, self.nfe = steps, f"{steps}step", fid, steps

    def __call__(self, model: nn.Module, x0: Tensor, label: Tensor | None) -> Tensor:
        return sample_meanflow(model, x0, num_steps=self.steps, label=label).samples
