"""Fixed-grid solvers against ODEs with closed-form solutions, in float64.

dx/dt = a x          ->  x(1) = x0 e^a
dx/dt = x cos(t)     ->  x(1) = x0 e^{sin 1}     (time-dependent field)
dx/dt = cos(t)       ->  x(1) = x0 + sin 1       (no x: the methods become quadrature rules)

The convergence order p is the slope of log(error) against log(h) over a range of
step sizes: Euler 1, midpoint and Heun 2, RK4 4. The adaptive solvers (torchdiffeq)
are held to their tolerance instead: the error at t=1 stays within a few times
``atol + rtol |x(1)|`` from loose to tight tolerances, at a cost (NFE) that grows as
the tolerance tightens.
"""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from evaluation.sample import sample_flow, sample_meanflow
from models.unified_input import split_unified_input
from solvers.base_solver import uniform_grid
from solvers.runge_kutta import SOLVERS, make_solver
from solvers.sampling import JumpSampler, few_step_samplers

ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
ADAPTIVE = ["adaptive_heun", "bosh3", "dopri5", "dopri8"]
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
X0 = torch.tensor([[1.0, -0.5], [2.0, 0.25]], dtype=torch.float64)

FIELDS = {
    "linear": (lambda x, t: 1.3 * x, lambda x0: x0 * math.exp(1.3)),
    "x_cos_t": (lambda x, t: x * torch.cos(t)[:, None], lambda x0: x0 * math.exp(math.sin(1.0))),
    "cos_t": (lambda x, t: torch.cos(t)[:, None].expand_as(x), lambda x0: x0 + math.sin(1.0)),
}
# The same solutions at any time t, for the adaptive solvers' trajectories.
AT = {
    "linear": lambda x0, t: x0 * math.exp(1.3 * t),
    "x_cos_t": lambda x0, t: x0 * math.exp(math.sin(t)),
    "cos_t": lambda x0, t: x0 + math.sin(t),
}


def test_every_registered_solver_is_tested():
    assert set(SOLVERS) == set(ORDERS) | set(ADAPTIVE)
    assert all(SOLVERS[name].adaptive for name in ADAPTIVE) and not any(SOLVERS[name].adaptive for name in ORDERS)


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


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="solver 'euler' has no option 'rtol': it takes none"):
        make_solver("euler", rtol=1e-3)
    with pytest.raises(ValueError, match=r"solver 'dopri5' has no option 'tol': it takes \['rtol', 'atol'\]"):
        make_solver("dopri5", tol=1e-3)
    for bad in (0.0, -1e-3, "1e-3", True):
        with pytest.raises(ValueError, match="rtol=.*expected a positive number"):
            make_solver("dopri5", rtol=bad)


# ---------------------------------------------------------------------------------
# Adaptive solvers
# ---------------------------------------------------------------------------------


def tolerance_scale(tol: float, exact: Tensor) -> Tensor:
    """``atol + rtol |x|`` with atol = rtol = tol: the error a step is allowed, per element."""
    return tol * (1.0 + exact.abs())


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_error_is_within_the_tolerance_and_nfe_grows_as_it_tightens(name, field):
    fn, exact = FIELDS[field]
    # A second-order pair needs ~tol^(-1/2) steps: looser tolerances keep its step count small.
    tolerances = [1e-3, 1e-4, 1e-5] if name == "adaptive_heun" else [1e-4, 1e-6, 1e-8]
    nfes = []
    seen: list[Tensor] = []

    def counted(x: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        seen.append(t[0].clone())
        return fn(x, t)

    for tol in tolerances:
        seen.clear()
        result = make_solver(name, rtol=tol, atol=tol).solve(counted, X0)
        ratio = float(((result.x - exact(X0)).abs() / tolerance_scale(tol, exact(X0))).max())
        # Local control bounds each step's error, not the global one: it may add up to a
        # small multiple of the tolerance (the failure message gives the ratio).
        assert ratio < 10.0, (name, field, tol, ratio)
        assert result.nfe == len(seen) > 0
        assert all(0.0 <= float(t) <= 1.0 for t in seen)  # never past t=1, where a model was not trained
        nfes.append(result.nfe)
    assert nfes == sorted(nfes) and nfes[-1] > nfes[0], (name, field, nfes)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_trajectory_is_error_controlled_at_every_reported_time(name):
    tol = 1e-6
    result = make_solver(name, rtol=tol, atol=tol).solve(FIELDS["x_cos_t"][0], X0, num_steps=4, return_trajectory=True)
    assert result.trajectory[0] is X0 and len(result.trajectory) == 5
    assert torch.allclose(result.times, torch.linspace(0, 1, 5, dtype=torch.float64))
    for x, t in zip(result.trajectory, result.times):
        exact = AT["x_cos_t"](X0, float(t))
        assert float(((x - exact).abs() / tolerance_scale(tol, exact)).max()) < 10.0, (name, float(t))
    assert torch.equal(result.trajectory[-1], result.x)  # the same stored state, not a recomputation
    assert make_solver(name).solve(FIELDS["linear"][0], X0, num_steps=4).trajectory is None


def test_adaptive_tolerance_holds_for_every_sample_of_a_batch():
    """One hard sample among easy ones gets the steps it needs alone: the step-size norm
    is the worst sample's, not the batch average (which would let it drift)."""
    rates = torch.zeros(64, 1, dtype=torch.float64)
    rates[0] = 4.0  # dx/dt = 4 x for the first sample, 0 for the rest
    batch = torch.ones(64, 2, dtype=torch.float64)
    solver = make_solver("dopri5", rtol=1e-6, atol=1e-6)
    together = solver.solve(lambda x, t: rates * x, batch)
    alone = solver.solve(lambda x, t: 4.0 * x, batch[:1])
    assert together.nfe == alone.nfe
    torch.testing.assert_close(together.x[:1], alone.x, rtol=1e-12, atol=0.0)
    assert float((together.x[0] - math.exp(4.0)).abs().max()) < 10 * 1e-6 * (1 + math.exp(4.0))


def test_adaptive_solvers_integrate_backward_too():
    """From data at t=1 back to noise at t=0 (a decreasing grid), as the fixed-grid solvers do."""
    x1 = X0 * math.exp(1.3)
    seen: list[float] = []

    def fn(x: Tensor, t: Tensor) -> Tensor:
        seen.append(float(t[0]))
        return 1.3 * x

    result = make_solver("dopri5", rtol=1e-8, atol=1e-8).solve(fn, x1, times=torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert float(((result.x - X0).abs() / tolerance_scale(1e-8, X0)).max()) < 10.0
    assert all(0.0 <= t <= 1.0 for t in seen)


def test_adaptive_float32_state_stays_float32():
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    result = make_solver("dopri5").solve(lambda x, t: -x, x0)
    assert result.x.dtype == torch.float32
    torch.testing.assert_close(result.x, x0 * math.exp(-1.0), rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("name", ADAPTIVE)
def test_sample_flow_with_an_adaptive_solver(name):
    result = sample_flow(FieldModel(0.7), X0, solver=name)
    exact = X0 * math.exp(0.7)
    assert float(((result.samples - exact).abs() / tolerance_scale(1e-5, exact)).max()) < 10.0
    assert result.nfe > 0


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


class RecordingField(FieldModel):
    """``FieldModel`` that records the (s, t) of every call."""

    def __init__(self, a: float) -> None:
        super().__init__(a)
        self.calls: list[tuple[float, float]] = []

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        _, s, t = split_unified_input(z)
        self.calls.append((float(s[0]), float(t[0])))
        return super().forward(z, y)


@pytest.mark.parametrize(("grid", "pairs", "metric"), [
    (2, [(0.0, 0.5), (0.5, 1.0)], "2step"),
    ([0, 0.45, 1], [(0.0, 0.45), (0.45, 1.0)], "2step_t0-0.45-1"),  # AlphaFlow XL's [1, 0.55, 0], noise at 1
    ([0, 0.1, 0.7, 1.0], [(0.0, 0.1), (0.1, 0.7), (0.7, 1.0)], "3step_t0-0.1-0.7-1"),
])
def test_jump_sampler_follows_its_time_list(grid, pairs, metric):
    model = RecordingField(0.7)
    sampler = JumpSampler(grid)
    sampler.keep_trajectory = True
    samples = sampler(model, X0, None)
    assert [(round(s, 12), round(t, 12)) for s, t in model.calls] == pairs
    assert torch.allclose(samples, X0 * math.exp(0.7), rtol=1e-12)
    assert sampler.metric == metric and sampler.nfe == sampler.steps == len(pairs) and len(sampler.trajectory) == len(pairs) + 1


@pytest.mark.parametrize(("grid", "message"), [
    (0, "eval.meanflow_steps entry 0: expected a step count >= 1 or a time list such as [0, 0.45, 1]"),
    (True, "eval.meanflow_steps entry True: expected a step count >= 1"),
    ("2", "eval.meanflow_steps entry '2': expected a step count >= 1"),
    ([1, 0.55, 0], "eval.meanflow_steps entry [1, 0.55, 0]: a time list runs from 0 (noise) to 1 (data), e.g. [0, 0.45, 1]"),
    ([0, 0.5], "entry [0, 0.5]: a time list runs from 0 (noise) to 1 (data)"),
    ([0.1, 0.5, 1], "entry [0.1, 0.5, 1]: a time list runs from 0 (noise) to 1 (data)"),
    ([0], "entry [0]: a time list runs from 0 (noise) to 1 (data)"),
    ([0, 0.6, 0.4, 1], "entry [0, 0.6, 0.4, 1]: the times must increase from 0 (noise) to 1 (data)"),
    ([0, 0.5, 0.5, 1], "entry [0, 0.5, 0.5, 1]: the times must increase"),
    ([0, "a", 1], "entry [0, 'a', 1]: expected a list of numbers such as [0, 0.45, 1]"),
    ([0, float("nan"), 1], "expected a list of numbers"),
])
def test_bad_time_lists_are_one_line(grid, message):
    with pytest.raises(ValueError) as err:
        JumpSampler(grid)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_time_lists_from_a_config_and_the_sampler_names():
    cfg = OmegaConf.create({"meanflow_steps": [1, [0, 0.45, 1]], "consistency_steps": [2, [0, 0.45, 1]]})
    samplers = few_step_samplers(cfg.meanflow_steps, cfg.consistency_steps)
    assert {name: type(s).__name__ for name, s in samplers.items()} == {
        "meanflow1": "JumpSampler", "meanflow_2step_t0-0.45-1": "JumpSampler",
        "consistency2": "ConsistencySampler", "consistency_2step_t0-0.45-1": "ConsistencySampler"}
    assert samplers["consistency_2step_t0-0.45-1"].settings() == {
        "steps": 2, "nfe": 2, "metric": "2step_t0-0.45-1_consistency", "fid": True, "times": [0.0, 0.45, 1.0]}
    with pytest.raises(ValueError, match=r"^eval.consistency_steps entry \[0, 1.2\]: a time list runs"):
        few_step_samplers([], OmegaConf.create([[0, 1.2]]))
