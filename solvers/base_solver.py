"""ODE solvers for ``dx/dt = v(x, t)`` from noise (t=0) to data (t=1): fixed-grid and adaptive."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # v(x (B, ...), t (B,)) -> (B, ...)
Integrated = tuple[Tensor, list[Tensor] | None, Tensor]  # final state, trajectory (or None), times reported


@dataclass
class SolverResult:
    """x: the final state; trajectory: the states at every grid time (including the
    start) when asked for, else None; nfe: velocity evaluations used (for the whole
    batch: one call evaluates every sample); times: the grid (an adaptive solver
    without a trajectory reports only its two ends)."""

    x: Tensor
    trajectory: list[Tensor] | None
    nfe: int
    times: Tensor


def uniform_grid(num_steps: int, t0: float = 0.0, t1: float = 1.0) -> Tensor:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(t0, t1, num_steps + 1, dtype=torch.float64)


def time_grid(num_steps: int, times: Tensor | None) -> Tensor:
    """``times`` in float64, or ``num_steps`` uniform steps on [0, 1] when it is None."""
    return uniform_grid(num_steps) if times is None else times.to(torch.float64)


class BaseSolver(ABC):
    """An ODE solver for ``dx/dt = fn(x, t)`` from ``times[0]`` to ``times[-1]``.

    ``adaptive`` solvers choose their own steps (the NFE is known only afterwards, in
    ``SolverResult.nfe``); fixed-grid solvers take ``evals_per_step`` evaluations per
    grid step. Subclasses implement ``integrate``; ``solve`` makes the grid and counts
    the calls.
    """

    name: str = "base"
    adaptive: bool = False

    @torch.no_grad()
    def solve(
        self,
        fn: VelocityFn,
        x0: Tensor,
        num_steps: int = 100,
        times: Tensor | None = None,
        return_trajectory: bool = False,
    ) -> SolverResult:
        """Integrate from ``times[0]`` to ``times[-1]`` (default a uniform grid on [0, 1]).

        Args:
            fn: the velocity field ``v(x, t)``: x (B, ...), t (B,) -> (B, ...).
            x0: the start state, shape (B, ...).
            num_steps: number of uniform steps when ``times`` is not given.
            times: an increasing 1-D grid to step along (or, for an adaptive solver,
                to report the trajectory at) instead.
            return_trajectory: keep the state at every grid time.
        """
        calls = 0

        def counted(x: Tensor, t: Tensor) -> Tensor:
            nonlocal calls
            calls += 1
            return fn(x, t)

        x, trajectory, reported = self.integrate(counted, x0, time_grid(num_steps, times), return_trajectory)
        return SolverResult(x=x, trajectory=trajectory, nfe=calls, times=reported)

    @abstractmethod
    def integrate(self, fn: VelocityFn, x0: Tensor, grid: Tensor, return_trajectory: bool) -> Integrated:
        """The final state, the states at every ``grid`` time (float64, (T + 1,)) when
        ``return_trajectory`` else None, and the times the result reports."""


class FixedGridSolver(BaseSolver):
    """A one-step method applied on a time grid.

    Subclasses implement ``step``; ``integrate`` walks the grid and optionally keeps
    the whole trajectory (for the visualizers).
    """

    evals_per_step: int = 1

    @abstractmethod
    def step(self, fn: VelocityFn, x: Tensor, t: Tensor, h: Tensor) -> Tensor:
        """Advance ``x`` (B, ...) from time ``t`` (B,) by ``h`` (a 0-dim tensor)."""

    def integrate(self, fn: VelocityFn, x0: Tensor, grid: Tensor, return_trajectory: bool) -> Integrated:
        x = x0
        trajectory = [x0] if return_trajectory else None
        for k in range(len(grid) - 1):
            t = torch.full((x.shape[0],), float(grid[k]), dtype=x.dtype, device=x.device)
            h = torch.tensor(float(grid[k + 1] - grid[k]), dtype=x.dtype, device=x.device)
            x = self.step(fn, x, t, h)
            if trajectory is not None:
                trajectory.append(x)
        return x, trajectory, grid
