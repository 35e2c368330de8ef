"""Energy distance against independent computations.

The project's value is the V-statistic 2 E|X-Y| - E|X-X'| - E|Y-Y'| over all pairs
(Székely & Rizzo 2013, Eq. 1). It is checked against explicit double loops in plain
Python, against scipy's pairwise distances, and in 1-D against scipy.stats, which
computes the square root of the same quantity from the empirical CDFs.
"""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.stats import energy_distance as scipy_energy_distance_1d

from evaluation.energy_distance import energy_distance


def loops(x: np.ndarray, y: np.ndarray) -> float:
    def mean_dist(a, b):
        return sum(math.dist(p, q) for p in a for q in b) / (len(a) * len(b))

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def test_matches_explicit_double_loops():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(loc=0.5, size=(5, 3))
    assert energy_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(loops(x, y), rel=1e-12)


def test_matches_scipy_cdist_on_larger_sets():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 4)), rng.standard_t(df=3, size=(200, 4))
    expected = 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
    # rel 1e-8: torch.cdist switches to the Gram-matrix form on large sets
    assert energy_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-8)


def test_one_dimensional_value_is_the_square_of_scipys():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=400), rng.exponential(size=300)
    ours = energy_distance(torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None])
    assert ours == pytest.approx(scipy_energy_distance_1d(x, y) ** 2, rel=1e-9)


def test_zero_for_identical_sets_and_symmetric():
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(3))
    y = torch.randn(80, 2, generator=torch.Generator().manual_seed(4))
    assert energy_distance(x, x.clone()) == 0.0
    assert energy_distance(x, y) == pytest.approx(energy_distance(y, x), rel=1e-12)
    assert energy_distance(x, y) > 0.0


def test_rises_monotonically_with_a_shift():
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(5))
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    values = [energy_distance(x, x + torch.tensor([s, 0.0])) for s in shifts]
    assert values[0] == 0.0
    assert all(a < b for a, b in zip(values, values[1:])), values
    # With Y = X + s the value is 2 (E|X - X' - s| - E|X - X'|): at most 2|s| by the
    # triangle inequality, and at least 2|s| - 2 E|X - X'|.
    within = float(torch.cdist(x.double(), x.double()).mean())
    assert 2 * 4.0 - 2 * within <= values[-1] <= 2 * 4.0


def test_images_are_flattened():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(20, 1, 4, 4, generator=g), torch.randn(30, 1, 4, 4, generator=g) + 0.3
    assert energy_distance(x, y) == pytest.approx(energy_distance(x.reshape(20, -1), y.reshape(30, -1)), rel=1e-12)
    xn, yn = x.reshape(20, -1).double().numpy(), y.reshape(30, -1).double().numpy()
    expected = 2 * cdist(xn, yn).mean() - cdist(xn, xn).mean() - cdist(yn, yn).mean()
    assert energy_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_float32_input_is_computed_in_float64():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(7))
    y = x + 1e-3
    expected = energy_distance(x.double(), y.double())
    assert energy_distance(x, y) == pytest.approx(expected, rel=1e-6)


def test_dimension_mismatch_is_refused():
    with pytest.raises(ValueError, match="2 and 3"):
        energy_distance(torch.zeros(4, 2), torch.zeros(4, 3))
