"""Fixed-grid solvers against ODEs with closed-form solutions, in float64.

dx/dt = a x          ->  x(1) = x0 e^a
dx/dt = x cos(t)     ->  x(1) = x0 e^{sin 1}     (time-dependent field)
dx/dt = cos(t)       ->  x(1) = x0 + sin 1       (no x: the methods become quadrature rules)

The convergence order p is the slope of log(error) against log(h) over a range of
step sizes: Euler 1, midpoint and Heun 2, RK4 4.
"""

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from dataloaders.base_dataloaders import split_unified_input
from evaluation.sample import sample_flow, sample_meanflow
from solvers.base_solver import uniform_grid
from solvers.runge_kutta import SOLVERS, make_solver

ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
X0 = torch.tensor([[1.0, -0.5], [2.0, 0.25]], dtype=torch.float64)

FIELDS = {
    "linear": (lambda x, t: 1.3 * x, lambda x0: x0 * math.exp(1.3)),
    "x_cos_t": (lambda x, t: x * torch.cos(t)[:, None], lambda x0: x0 * math.exp(math.sin(1.0))),
    "cos_t": (lambda x, t: torch.cos(t)[:, None].expand_as(x), lambda x0: x0 + math.sin(1.0)),
}


def test_every_registered_solver_is_tested():
    assert set(SOLVERS) == set(ORDERS)


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("name", sorted(ORDERS))
def test_convergence_order_matches_theory(name, field):
    fn, exact = FIELDS[field]
    steps = [4, 8, 16, 32, 64]
    errors = [float((make_solver(name).solve(fn, X0, num_steps=n).x - exact(X0)).abs().max()) for n in steps]
    slope = np.polyfit(np.log([1.0 / n for n in steps]), np.log(errors), 1)[0]
    assert abs(slope - ORDERS[name]) < 0.3, (name, field, slope, errors)
    assert errors[-1] < {1: 0.2, 2: 2e-3, 4: 1e-6}[ORDERS[name]]  # converges to the right answer


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_nfe_trajectory_and_times_seen(name):
    seen: list[Tensor] = []

    def fn(x: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        seen.append(t[0].clone())
        return -x

    result = make_solver(name).solve(fn, X0, num_steps=5, return_trajectory=True)
    assert result.nfe == 5 * EVALS_PER_STEP[name] == len(seen)
    assert len(result.trajectory) == 6
    assert result.trajectory[0] is X0  # the start comes first, untouched
    assert torch.equal(result.trajectory[-1], result.x)
    assert torch.allclose(result.times, torch.linspace(0, 1, 6, dtype=torch.float64))
    assert float(seen[0]) == 0.0 and all(0.0 <= float(t) <= 1.0 for t in seen)
    assert make_solver(name).solve(fn, X0, num_steps=5).trajectory is None


def test_custom_grid_is_followed():
    times = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    result = make_solver("euler").solve(lambda x, t: torch.ones_like(x), X0, times=times, return_trajectory=True)
    for k, t in enumerate(times):
        assert torch.allclose(result.trajectory[k], X0 + t)
    assert result.nfe == 3


def test_float32_state_stays_float32():
    x0 = torch.randn(3, 2)
    assert make_solver("rk4").solve(lambda x, t: -x, x0, num_steps=3).x.dtype == torch.float32


def test_bad_names_and_grids_are_refused():
    with pytest.raises(ValueError, match="unknown solver 'rk5'"):
        make_solver("rk5")
    with pytest.raises(ValueError, match="num_steps"):
        uniform_grid(0)


class FieldModel(nn.Module):
    """A 'network' on the unified input that returns a known mean velocity u(x_s, s, t)
    of dx/dt = a x: (e^{a(t-s)} - 1) / (t - s) x_s, which is a x_s at s = t."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        x, s, t = split_unified_input(z)
        dt = (t - s)[:, None]
        rate = torch.where(dt == 0, torch.full_like(dt, self.a), torch.expm1(self.a * dt) / torch.where(dt == 0, 1.0, dt))
        return rate * x


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_sample_flow_integrates_the_instantaneous_velocity(name):
    result = sample_flow(FieldModel(0.7), X0, solver=name, num_steps=64)
    assert torch.allclose(result.samples, X0 * math.exp(0.7), rtol={1: 2e-2, 2: 1e-4, 4: 1e-9}[ORDERS[name]])
    assert result.nfe == 64 * EVALS_PER_STEP[name]


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_meanflow_sampling_is_exact_with_the_exact_mean_velocity(steps):
    result = sample_meanflow(FieldModel(0.7), X0, num_steps=steps, return_trajectory=True)
    assert torch.allclose(result.samples, X0 * math.exp(0.7), rtol=1e-12)
    assert result.nfe == steps and len(result.trajectory) == steps + 1
