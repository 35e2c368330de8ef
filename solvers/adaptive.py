"""Adaptive embedded Runge-Kutta solvers through torchdiffeq (Chen et al. 2018).

Each step pairs two methods of orders p and p-1 (Hairer, Nørsett & Wanner, Sec.
II.4); their difference estimates the local error, and a step is accepted when

    || err / (atol + rtol * max(|x_k|, |x_{k+1}|)) || <= 1

after which the next step size follows from the error ratio. The velocity is called
on the whole batch at once, so the steps are shared by the batch; the norm above is
taken per sample (RMS over its elements) and then the largest over the batch, so
every sample meets the tolerance, however many easy samples share its batch.

The integration ends exactly at ``times[-1]`` (torchdiffeq would otherwise step past
it and interpolate back, calling the model at t > 1). Without a trajectory, only the
two ends of ``times`` matter and the solver picks every step; with one, a step also
ends on each time of the grid (``num_steps`` uniform steps, or ``times``), so the
reported states are error-controlled too, at the price of extra steps where the grid
is finer than the solver's own. ``SolverResult.nfe`` counts the calls made.

torchdiffeq's ``fehlberg2`` is left out: its global error lies far above the tolerance
(on dx/dt = 1.3 x), where the methods here stay within a small multiple of it
(``tests/test_solvers.py``).
"""

from torch import Tensor
from torchdiffeq import odeint

from solvers.base_solver import BaseSolver, Integrated, VelocityFn


def per_sample_max_rms(ratio: Tensor) -> Tensor:
    """The step-size norm: RMS over each sample's elements, then the largest over the batch."""
    return ratio.reshape(ratio.shape[0], -1).pow(2).mean(dim=1).sqrt().max()


def check_tolerance(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"solver option {name}={value!r}: expected a positive number such as 1e-5")
    return float(value)


class AdaptiveSolver(BaseSolver):
    """torchdiffeq's ``method`` with relative and absolute tolerances ``rtol``, ``atol``.

    Float32 states resolve tolerances down to about 1e-6 (float32 keeps about seven
    digits, and rounding adds up over the steps); tighter ones need float64.
    """

    adaptive = True
    method: str = ""  # torchdiffeq's name of the method

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5) -> None:
        self.rtol = check_tolerance("rtol", rtol)
        self.atol = check_tolerance("atol", atol)

    def integrate(self, fn: VelocityFn, x0: Tensor, grid: Tensor, return_trajectory: bool) -> Integrated:
        report = (grid if return_trajectory else grid[[0, -1]]).to(x0.device)

        def velocity(t: Tensor, x: Tensor) -> Tensor:  # torchdiffeq's order: (t, x), t a scalar tensor
            return fn(x, t.to(x.dtype).expand(x.shape[0]))

        # step_t: a step ends on every reported time, so each reported state is an
        # error-controlled solution rather than an interpolant between steps.
        states = odeint(
            velocity, x0, report, rtol=self.rtol, atol=self.atol, method=self.method,
            options={"norm": per_sample_max_rms, "step_t": report[1:]},
        )  # fmt: skip
        trajectory = [x0, *states[1:]] if return_trajectory else None
        return states[-1], trajectory, report


class Dopri5Solver(AdaptiveSolver):
    """Dormand-Prince 5(4) (Dormand & Prince 1980), the usual choice for flow models."""

    name = method = "dopri5"


class Dopri8Solver(AdaptiveSolver):
    """Dormand-Prince 8(7) (Prince & Dormand 1981), for tight tolerances in float64."""

    name = method = "dopri8"


class Bosh3Solver(AdaptiveSolver):
    """Bogacki-Shampine 3(2) (Bogacki & Shampine 1989)."""

    name = method = "bosh3"


class AdaptiveHeunSolver(AdaptiveSolver):
    """Heun's method with an Euler error estimate, 2(1)."""

    name = method = "adaptive_heun"


ADAPTIVE_SOLVERS: tuple[type[AdaptiveSolver], ...] = (
    Dopri5Solver, Dopri8Solver, Bosh3Solver, AdaptiveHeunSolver,
)  # fmt: skip
