"""Drawing samples from a mean-velocity field ``u(x_s, s, t)`` (docs/design.md, "Sampling").

Three ways, and a ``Sampler`` for each that a loss hands to the evaluator (a loss says how
its model samples; the evaluator only calls what it is given):

- ``DiagonalSampler``: integrate ``dx/dt = v(x, t) = u(x, t, t)`` from noise at t=0 to
  t=1 with a solver (Euler, RK4, ...), optionally with classifier-free guidance.
- ``JumpSampler``: ``x_{k+1} = x_k + (t_{k+1} - t_k) u(x_k, t_k, t_{k+1})`` on a grid,
  one network evaluation per step; one step is ``x_1 = x_0 + u(x_0, 0, 1)``.
- ``ConsistencySampler``: from each grid time jump to the data, then re-noise the result
  with fresh noise onto the straight path at the next grid time (AlphaFlow's few-step
  sampler); one evaluation per step, and one step is the jump chain's.

A few-step grid is ``k`` (k uniform steps) or an explicit time list from noise to data,
``[0, ..., 1]`` (``few_step_grid``). Published grids run from noise at 1: AlphaFlow XL's
``[1, 0.55, 0]`` is ``[0, 0.45, 1]`` here (``t = 1 - t_paper``).
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor, nn

from helpers_cfg import guided_velocity
from models.unified_input import broadcast_time, make_unified_flow_matching_input
from solvers.base_solver import time_grid, uniform_grid
from solvers.runge_kutta import make_solver

Grid = int | Sequence[float]  # k uniform steps, or the times [0, ..., 1]


def few_step_grid(grid: Grid, key: str) -> Tensor:
    """The times (float64, (k + 1,)) of a few-step sampler: ``k`` uniform steps on [0, 1], or
    an explicit list that starts at 0 (noise), ends at 1 (data) and increases. ``key`` names
    the setting in the one-line error."""
    if isinstance(grid, bool | str) or not isinstance(grid, int | Sequence):
        raise ValueError(f"{key} entry {grid!r}: expected a step count >= 1 or a time list such as [0, 0.45, 1]")
    if isinstance(grid, int):
        if grid < 1:
            raise ValueError(f"{key} entry {grid}: expected a step count >= 1 or a time list such as [0, 0.45, 1]")
        return uniform_grid(grid)
    times = list(grid)
    if not all(isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) for t in times):
        raise ValueError(f"{key} entry {times}: expected a list of numbers such as [0, 0.45, 1]")
    if len(times) < 2 or times[0] != 0 or times[-1] != 1:
        raise ValueError(f"{key} entry {times}: a time list runs from 0 (noise) to 1 (data), e.g. [0, 0.45, 1] "
                         "(a published [1, 0.55, 0] with noise at 1, reversed: t = 1 - t_paper)")
    if any(b <= a for a, b in pairwise(times)):
        raise ValueError(f"{key} entry {times}: the times must increase from 0 (noise) to 1 (data)")
    return torch.tensor([float(t) for t in times], dtype=torch.float64)


def grid_label(grid: Grid) -> str:
    """``"2step"`` for 2 uniform steps, ``"2step_t0-0.45-1"`` for the time list [0, 0.45, 1]."""
    if isinstance(grid, int):
        return f"{grid}step"
    times = [float(t) for t in grid]
    return f"{len(times) - 1}step_t" + "-".join(f"{t:g}" for t in times)


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


def mean_flow_jump(model: nn.Module, x: Tensor, s: float, t: float, label: Tensor | None) -> Tensor:
    """``x_t = x_s + (t - s) u(x_s, s, t)``: one network evaluation."""
    s_b = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
    t_b = torch.full_like(s_b, t)
    return x + broadcast_time(t_b - s_b, x) * model(make_unified_flow_matching_input(x, s_b, t_b), label)


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
        x = mean_flow_jump(model, x, float(grid[k]), float(grid[k + 1]), label)
        if trajectory is not None:
            trajectory.append(x)
    return SampleResult(samples=x, trajectory=trajectory, nfe=len(grid) - 1)


def fresh_noise(generator: torch.Generator, draws: int, like: Tensor) -> Tensor:
    """``draws`` standard normal tensors shaped like ``like`` (B, ...), as (draws, B, ...) on its
    device and dtype, drawn on the CPU one row at a time: row i gets the same noise whether
    the rows come in one call or in chunks (an evaluation's batch size changes nothing)."""
    if draws == 0:
        return like.new_empty((0, *like.shape))
    rows = [torch.randn(draws, *like.shape[1:], generator=generator, dtype=like.dtype) for _ in range(like.shape[0])]
    return torch.stack(rows, dim=1).to(like.device)


@torch.no_grad()
def sample_consistency(
    model: nn.Module,
    x0: Tensor,
    num_steps: int = 1,
    times: Tensor | None = None,
    label: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Consistency sampling on ``times`` (default ``num_steps`` uniform steps on [0, 1]).

    Consistency models' multistep sampler (Song et al. 2023, Algorithm 1), which AlphaFlow
    uses for its few-step results, in this time convention: at each grid time ``t_k`` jump to
    the data, ``x̂ = x + (1 - t_k) u(x, t_k, 1)``; then put ``x̂`` back on the straight path at
    ``t_{k+1}`` with fresh noise, ``x = (1 - t_{k+1}) ε_k + t_{k+1} x̂``. The last ``x̂`` is the
    sample; one step is the jump chain's ``x_0 + u(x_0, 0, 1)``.

    ``noise``: the fresh noise (K - 1, B, ...) for K steps; else it is drawn from ``generator``
    (``fresh_noise``; a CPU generator, None: the global one). The trajectory holds the states
    at the grid times: ``x_0``, each re-noised ``x``, and the sample.
    """
    grid = time_grid(num_steps, times)
    steps = len(grid) - 1
    if noise is None:
        noise = fresh_noise(generator if generator is not None else torch.default_generator, steps - 1, x0)
    if noise.shape != (steps - 1, *x0.shape):
        raise ValueError(f"noise of shape {tuple(noise.shape)}: expected {(steps - 1, *x0.shape)} for {steps} steps")
    x = x0
    trajectory = [x0] if return_trajectory else None
    for k in range(steps):
        data = mean_flow_jump(model, x, float(grid[k]), 1.0, label)
        if k + 1 < steps:
            t = float(grid[k + 1])
            x = (1 - t) * noise[k] + t * data  # x_t on the straight path from fresh noise to x̂
        else:
            x = data
        if trajectory is not None:
            trajectory.append(x)
    return SampleResult(samples=x, trajectory=trajectory, nfe=steps)


def plain(value: object) -> bool:
    """Whether ``value`` is JSON-like data (numbers, strings, None, lists and dicts of them)."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(plain(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and plain(v) for k, v in value.items())


class Sampler(ABC):
    """One way of drawing samples, as a loss describes it to the evaluator.

    Attributes:
        metric: suffix of the metric names (``""`` gives ``eval/energy_distance``,
            ``"2step"`` gives ``eval/energy_distance_2step``).
        fid: whether FID is computed for these samples (the samplers a researcher ships).
        nfe: network evaluations per sample in the last call (a guided evaluation counts
            once: both branches go through one batched pass).
        keep_trajectory: keep the states at the grid times of each call in ``trajectory``
            (the visualizers draw them); None where a sampler has no grid.
    """

    metric: str = ""
    fid: bool = True
    nfe: int = 0
    keep_trajectory: bool = False
    trajectory: list[Tensor] | None = None

    @abstractmethod
    def __call__(self, model: nn.Module, x0: Tensor, label: Tensor | None) -> Tensor:
        """Samples (B, ...) from noise ``x0`` (B, ...) and labels (B,) or None."""

    def reseed(self, seed: int) -> None:
        """Called before each set of samples (an evaluation, a picture), whose rows then come in
        order: a sampler that draws noise of its own restarts it at ``seed``, so that the set
        is the same at every call. Most draw none."""

    def settings(self) -> dict:
        """The sampler's own settings as plain data, a grid as its list of times
        (``evaluate_checkpoint`` records them)."""
        found = {k: v.tolist() if isinstance(v, Tensor) else v for k, v in vars(self).items() if k != "trajectory"}
        return {k: v for k, v in found.items() if plain(v)}

    def keep(self, result: SampleResult) -> Tensor:
        """Note a call's NFE (and trajectory, when kept); return its samples."""
        self.nfe, self.trajectory = result.nfe, result.trajectory
        return result.samples


class DiagonalSampler(Sampler):
    """``solver`` with ``steps`` steps on ``u(x, t, t)``; guidance scale w (1: none)."""

    def __init__(self, solver: str, steps: int, guidance_scale: float = 1.0, num_classes: int = 0,
                 metric: str = "", fid: bool = True, options: dict | None = None) -> None:
        self.solver, self.steps, self.guidance_scale, self.num_classes = solver, steps, guidance_scale, num_classes
        self.metric, self.fid, self.options = metric, fid, dict(options or {})

    def __call__(self, model: nn.Module, x0: Tensor, label: Tensor | None) -> Tensor:
        return self.keep(sample_flow(model, x0, self.solver, self.steps, label, self.guidance_scale, self.num_classes,
                                     self.keep_trajectory, self.options))


class JumpSampler(Sampler):
    """Mean-flow jumps (``sample_meanflow``) on ``grid``: ``k`` uniform steps or a time list
    ``[0, ..., 1]`` (``few_step_grid``); metric ``grid_label(grid)``, e.g. ``"2step"``."""

    def __init__(self, grid: Grid, fid: bool = True, key: str = "eval.meanflow_steps") -> None:
        self.times = few_step_grid(grid, key)
        self.steps = self.nfe = len(self.times) - 1
        self.metric, self.fid = grid_label(grid), fid

    def __call__(self, model: nn.Module, x0: Tensor, label: Tensor | None) -> Tensor:
        return self.keep(sample_meanflow(model, x0, times=self.times, label=label, return_trajectory=self.keep_trajectory))


class ConsistencySampler(Sampler):
    """Consistency sampling (``sample_consistency``) on ``grid``, as ``JumpSampler``'s; metric
    ``"{grid_label(grid)}_consistency"``. Its fresh noise comes from a CPU generator of its
    own, restarted by ``reseed`` (the evaluator and the visualizers reseed it before each set)."""

    def __init__(self, grid: Grid, fid: bool = True, key: str = "eval.consistency_steps", seed: int = 0) -> None:
        self.times = few_step_grid(grid, key)
        self.steps = self.nfe = len(self.times) - 1
        self.metric, self.fid = f"{grid_label(grid)}_consistency", fid
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __call__(self, model: nn.Module, x0: Tensor, label: Tensor | None) -> Tensor:
        return self.keep(sample_consistency(model, x0, times=self.times, label=label, generator=self.generator,
                                            return_trajectory=self.keep_trajectory))


def few_step_samplers(meanflow_steps: Sequence[Grid], consistency_steps: Sequence[Grid] = ()) -> dict[str, Sampler]:
    """The jump chains of ``eval.meanflow_steps`` (``meanflow{k}``, or ``meanflow_{label}`` for a
    time list) and the consistency samplers of ``eval.consistency_steps`` (``consistency...``),
    each grid a step count or a time list."""

    def name(prefix: str, grid: Grid) -> str:
        return f"{prefix}{grid}" if isinstance(grid, int) else f"{prefix}_{grid_label(grid)}"

    jumps = {name("meanflow", g): JumpSampler(g) for g in meanflow_steps}
    return jumps | {name("consistency", g): ConsistencySampler(g) for g in consistency_steps}
