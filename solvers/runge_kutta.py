"""Explicit Runge-Kutta methods on a fixed grid (Hairer, Nørsett & Wanner, Sec. II.1).

Global error after integrating to t=1 with step h: Euler O(h), midpoint and Heun
O(h²), classic RK4 O(h⁴). ``make_solver`` also finds the adaptive embedded pairs of
``solvers/adaptive.py`` (dopri5, ...) by name.
"""

import inspect

from torch import Tensor

from solvers.adaptive import ADAPTIVE_SOLVERS
from solvers.base_solver import BaseSolver, FixedGridSolver, VelocityFn


class EulerSolver(FixedGridSolver):
    name = "euler"
    evals_per_step = 1

    def step(self, fn: VelocityFn, x: Tensor, t: Tensor, h: Tensor) -> Tensor:
        return x + h * fn(x, t)


class MidpointSolver(FixedGridSolver):
    name = "midpoint"
    evals_per_step = 2

    def step(self, fn: VelocityFn, x: Tensor, t: Tensor, h: Tensor) -> Tensor:
        k1 = fn(x, t)
        return x + h * fn(x + 0.5 * h * k1, t + 0.5 * h)


class HeunSolver(FixedGridSolver):
    """Explicit trapezoid (Heun's second-order method, as in EDM's sampler)."""

    name = "heun"
    evals_per_step = 2

    def step(self, fn: VelocityFn, x: Tensor, t: Tensor, h: Tensor) -> Tensor:
        k1 = fn(x, t)
        k2 = fn(x + h * k1, t + h)
        return x + 0.5 * h * (k1 + k2)


class RK4Solver(FixedGridSolver):
    """The classic fourth-order Runge-Kutta method."""

    name = "rk4"
    evals_per_step = 4

    def step(self, fn: VelocityFn, x: Tensor, t: Tensor, h: Tensor) -> Tensor:
        k1 = fn(x, t)
        k2 = fn(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = fn(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = fn(x + h * k3, t + h)
        return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


SOLVERS: dict[str, type[BaseSolver]] = {
    cls.name: cls for cls in (EulerSolver, MidpointSolver, HeunSolver, RK4Solver, *ADAPTIVE_SOLVERS)
}


def make_solver(name: str, **options) -> BaseSolver:
    """The solver ``name`` with its options (the solver config group's keys other than
    ``name``: ``rtol``, ``atol`` for the adaptive ones; none for the fixed-grid ones)."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: expected one of {sorted(SOLVERS)}")
    accepted = list(inspect.signature(SOLVERS[name]).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"it takes {accepted}" if accepted else "it takes none"
        raise ValueError(f"solver {name!r} has no option {unknown[0]!r}: {takes}")
    return SOLVERS[name](**options)
