"""Consistency sampling against a flow whose mean velocity is known in closed form.

Data ``x_1 ~ N(mu, sigma^2 I)``, noise ``x_0 ~ N(0, I)``, independent, on the straight path
``x_t = (1 - t) x_0 + t x_1``: every marginal is Gaussian, ``N(m(t), sd(t)^2 I)`` with
``m(t) = t mu`` and ``sd(t)^2 = (1 - t)^2 + t^2 sigma^2``. Per coordinate the marginal
velocity is affine in x, so its flow keeps order and maps marginal to marginal by the
affine map ``T_{s->t}(x) = m(t) + sd(t) / sd(s) (x - m(s))``; the exact mean velocity is
``u(x, s, t) = (T_{s->t}(x) - x) / (t - s)`` (``v = mu + sd'(t) / sd(t) (x - m(t))`` at s = t).

With that u, a jump from any time lands on the data law, and re-noising a data sample onto
the straight path at t gives the marginal at t: each step of consistency sampling keeps the
laws exact, whatever the grid, while its fresh noise makes the sample depend on x_0 only
through the first step (correlation ``t_1 sigma / sd(t_1)`` per coordinate for two steps).
"""

import math

import pytest
import torch
from torch import Tensor, nn

from models.unified_input import split_unified_input
from solvers.sampling import ConsistencySampler, JumpSampler, sample_consistency, sample_meanflow

MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
SIGMA = 0.3
GRIDS = [2, [0, 0.45, 1], [0, 0.2, 0.5, 0.9, 1]]


def mean(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1) * MU


def sd(t: Tensor | float) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    return ((1 - t) ** 2 + (t * SIGMA) ** 2).sqrt()


class GaussianFlow(nn.Module):
    """The exact mean velocity ``u(x_s, s, t)`` of the Gaussian flow (module docstring); it
    records the (s, t) pairs it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[float, float]] = []

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        x, s, t = split_unified_input(z)
        self.calls.append((float(s[0]), float(t[0])))
        standard = (x - mean(s)) / sd(s)
        h = (t - s).reshape(-1, 1)
        jump = (mean(t) + sd(t) * standard - x) / torch.where(h == 0, 1.0, h)
        t_col = t.reshape(-1, 1)
        velocity = MU + (t_col * SIGMA**2 - (1 - t_col)) / sd(t) * standard  # d/dt T at s = t
        return torch.where(h == 0, velocity, jump)


def noise(n: int, seed: int = 0) -> Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_one_step_of_the_exact_mean_velocity_lands_on_the_data_law_exactly():
    x0 = noise(64)
    model = GaussianFlow()
    result = sample_consistency(model, x0, num_steps=1)
    torch.testing.assert_close(result.samples, MU + SIGMA * x0, rtol=1e-12, atol=1e-12)  # T_{0->1}(x_0)
    assert result.nfe == 1 and model.calls == [(0.0, 1.0)]
    torch.testing.assert_close(sample_meanflow(model, x0, num_steps=1).samples, result.samples, rtol=0, atol=0)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_every_step_is_the_closed_form_map_of_the_fresh_noise(grid):
    """Given the noise, the whole chain is exact: jump to T_{t_k->1}(x), re-noise on the path."""
    times = torch.linspace(0, 1, grid + 1, dtype=torch.float64) if isinstance(grid, int) else torch.tensor(grid, dtype=torch.float64)
    x0, steps = noise(32), len(times) - 1
    fresh = torch.randn(steps - 1, 32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = GaussianFlow()
    result = sample_consistency(model, x0, times=times, noise=fresh, return_trajectory=True)
    x = x0
    for k in range(steps):
        t = float(times[k])
        data = MU + SIGMA * (x - t * MU) / sd(t)  # T_{t->1}(x)
        x = data if k + 1 == steps else (1 - times[k + 1]) * fresh[k] + times[k + 1] * data
        torch.testing.assert_close(result.trajectory[k + 1], x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.samples, x, rtol=1e-12, atol=1e-12)
    assert model.calls == [(float(t), 1.0) for t in times[:-1]] and result.nfe == steps and len(result.trajectory) == steps + 1


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_each_step_keeps_the_data_law(grid):
    """Mean and variance of every state against the marginal at its time, for many samples."""
    n = 50_000
    sampler = ConsistencySampler(grid)
    sampler.keep_trajectory = True
    sampler.reseed(3)
    samples = sampler(GaussianFlow(), noise(n), None)
    times = sampler.times
    for state, t in zip(sampler.trajectory, times, strict=True):
        expected_mean, expected_var = mean(float(t))[0], sd(float(t))[0, 0] ** 2
        # standard errors of the mean and of the variance of n normal draws, 5 of each
        assert (state.mean(0) - expected_mean).abs().max() < 5 * math.sqrt(expected_var / n), (t, state.mean(0))
        assert (state.var(0) - expected_var).abs().max() < 5 * expected_var * math.sqrt(2 / n), (t, state.var(0))
    assert samples is sampler.trajectory[-1] and sampler.nfe == len(times) - 1


def test_the_re_noising_draws_fresh_noise():
    """Two steps: the sample depends on x_0 through the first jump only, with correlation
    ``t_1 sigma / sd(t_1)`` per coordinate; the jump chain keeps correlation 1."""
    n, t1 = 50_000, 0.45
    x0 = noise(n)
    sampler = ConsistencySampler([0, t1, 1])
    sampler.reseed(5)
    samples = sampler(GaussianFlow(), x0, None)
    expected = t1 * SIGMA / float(sd(t1))
    for d in range(2):
        rho = float(torch.corrcoef(torch.stack([samples[:, d], x0[:, d]]))[0, 1])
        assert abs(rho - expected) < 5 * (1 - expected**2) / math.sqrt(n), (d, rho, expected)
    chain = JumpSampler([0, t1, 1])(GaussianFlow(), x0, None)
    torch.testing.assert_close(chain, MU + SIGMA * x0, rtol=1e-12, atol=1e-12)


def test_the_noise_is_the_seeds_alone():
    """After ``reseed`` the same samples come back, in one call or in chunks, whatever the
    global RNG did in between; another seed gives other samples."""
    x0 = noise(40)
    sampler = ConsistencySampler(3)
    sampler.reseed(11)
    whole = sampler(GaussianFlow(), x0, None)
    torch.manual_seed(123)
    torch.randn(7)
    sampler.reseed(11)
    chunks = torch.cat([sampler(GaussianFlow(), x0[i:j], None) for i, j in ((0, 3), (3, 20), (20, 40))])
    assert torch.equal(whole, chunks)
    sampler.reseed(12)
    assert not torch.allclose(sampler(GaussianFlow(), x0, None), whole)


def test_one_consistency_step_is_the_one_step_jump():
    x0 = noise(16)
    torch.testing.assert_close(ConsistencySampler(1)(GaussianFlow(), x0, None), JumpSampler(1)(GaussianFlow(), x0, None),
                               rtol=0, atol=0)
    assert ConsistencySampler([0, 0.45, 1]).metric == "2step_t0-0.45-1_consistency"
    assert ConsistencySampler(2).metric == "2step_consistency"


def test_noise_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"expected \(1, 4, 2\) for 2 steps"):
        sample_consistency(GaussianFlow(), noise(4), num_steps=2, noise=torch.zeros(2, 4, 2, dtype=torch.float64))
