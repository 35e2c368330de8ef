"""The time samplers against independent formulas: the analytic CDF of each marginal
(Kolmogorov-Smirnov on 200k seeded draws), the equal-pair fraction, the ordering, and
where the equal pairs sit (per-sample mask vs the first rows of the batch).

Notation in the formulas: ``a`` is the first logit-normal draw (the paper's ``t``
law), ``b`` the second (the paper's ``r`` law), both in the published convention
(noise at 1); this project's pair is ``s = 1 - t_paper``, ``t = 1 - r_paper``, so
``P(s <= x) = 1 - F_{t_paper}(1 - x)`` and ``P(t <= x) = 1 - F_{r_paper}(1 - x)``.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from losses.time_sampling import (
    PAIR_SAMPLERS,
    IMeanflowPairSampler,
    LogitNormalTimeSampler,
    MeanflowJaxPairSampler,
    make_pair_sampler,
    make_time_sampler,
)

N = 200_000
CPU = torch.device("cpu")
KS_P_MIN = 1e-3  # seeded draws: a correct law passes with p far above this, a wrong one fails by many orders

V1 = {"ratio": 0.75, "mean": -0.6, "std": 1.6, "r_mean": -4.0, "r_std": 1.6}  # py-meanflow scripts/cifar10_v1.sh
V0 = {"ratio": 0.75, "mean": -2.0, "std": 2.0, "r_mean": -2.0, "r_std": 2.0}  # py-meanflow scripts/cifar10_v0.sh
IMAGENET = {"ratio": 0.25, "mean": -0.4, "std": 1.0}  # the JAX reference's ImageNet setting


def ln_cdf(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """CDF of sigmoid(N(mean, std^2)) on [0, 1]: Phi((logit x - mean) / std)."""
    x = np.clip(x, 1e-300, 1 - 1e-16)
    return stats.norm.cdf((np.log(x) - np.log1p(-x) - mean) / std)


def draw(name: str, seed: int = 0, n: int = N, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    torch.manual_seed(seed)
    s, t = make_pair_sampler(name, **kwargs).sample(n, CPU)
    assert s.shape == t.shape == (n,) and s.dtype == t.dtype == torch.float32
    return s.double().numpy(), t.double().numpy()


def ks_p(values: np.ndarray, cdf) -> float:
    return stats.kstest(values, cdf).pvalue


def binomial_ok(count: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


def paper_cdfs(kw: dict):
    fa = lambda x: ln_cdf(x, kw["mean"], kw["std"])
    fb = lambda x: ln_cdf(x, kw.get("r_mean", kw["mean"]), kw.get("r_std", kw["std"]))
    fmax = lambda x: fa(x) * fb(x)
    fmin = lambda x: fa(x) + fb(x) - fa(x) * fb(x)
    return fa, fb, fmax, fmin


def s_cdf(f_t_paper):
    return lambda x: 1 - f_t_paper(1 - x)


def p_second_above_first(kw: dict) -> float:
    """P(b >= a) for a ~ LN(mean, std), b ~ LN(r_mean, r_std): sigmoid is monotone, so
    it is P(N(r_mean - mean, std^2 + r_std^2) >= 0)."""
    return stats.norm.cdf((kw["r_mean"] - kw["mean"]) / math.hypot(kw["std"], kw["r_std"]))


@pytest.mark.parametrize("name", list(PAIR_SAMPLERS))
def test_every_pair_sampler_is_ordered_in_unit_interval(name):
    kwargs = IMAGENET if name in ("meanflow_jax", "imeanflow") else V1
    if name == "alphaflow":  # one law for the mean-flow pairs, another for the flow-matching ones
        kwargs = {"ratio": 0.75, "mean": -0.4, "std": 1.0, "fm_mean": 0.3, "fm_std": 0.7}
    s, t = draw(name, **kwargs)
    assert (s >= 0).all() and (t <= 1).all() and (s <= t).all()
    assert 0 < (s == t).mean() < 1


def test_py_meanflow_v1_marginals_and_equal_fraction():
    s, t = draw("py_meanflow_v1", **V1)
    fa, _, _, fmin = paper_cdfs(V1)
    # t_paper keeps its own law: a ~ LN(-0.6, 1.6).
    assert ks_p(s, s_cdf(fa)) > KS_P_MIN
    # r_paper: a with prob 1 - ratio (the mask), min(a, b) otherwise.
    f_r = lambda x: (1 - V1["ratio"]) * fa(x) + V1["ratio"] * fmin(x)
    assert ks_p(t, s_cdf(f_r)) > KS_P_MIN
    # equal pairs: the mask, plus the unmasked pairs whose second draw lands above the first.
    p_equal = (1 - V1["ratio"]) + V1["ratio"] * p_second_above_first(V1)
    assert abs(p_equal - 0.300) < 1e-3  # the number in issue 10
    assert binomial_ok(int((s == t).sum()), N, p_equal)


def test_py_meanflow_v0_marginals_and_equal_fraction():
    kw = dict(V0, r_mean=-1.0, r_std=1.5)  # distinct laws, so a swapped draw order would show
    s, t = draw("py_meanflow_v0", **kw)
    _, _, fmax, fmin = paper_cdfs(kw)
    assert ks_p(s, s_cdf(fmax)) > KS_P_MIN  # t_paper = max(a, b) always
    f_r = lambda x: kw["ratio"] * fmin(x) + (1 - kw["ratio"]) * fmax(x)
    assert ks_p(t, s_cdf(f_r)) > KS_P_MIN
    assert binomial_ok(int((s == t).sum()), N, 1 - kw["ratio"])


def test_py_meanflow_draw_order_matches_the_reference_recipe():
    """The draw order of py-meanflow: randn (t), randn (r), rand (mask), on one generator:
    the same seed gives the same pairs as that recipe written out by hand."""
    n = 1000
    for name in ("py_meanflow_v0", "py_meanflow_v1"):
        s, t = draw(name, seed=7, n=n, **V1)
        g = torch.Generator().manual_seed(7)
        a = torch.sigmoid(torch.randn(n, generator=g) * V1["std"] + V1["mean"])
        b = torch.sigmoid(torch.randn(n, generator=g) * V1["r_std"] + V1["r_mean"])
        equal = torch.rand(n, generator=g) < 1 - V1["ratio"]
        if name == "py_meanflow_v0":
            t_p, r_p = torch.maximum(a, b), torch.where(equal, torch.maximum(a, b), torch.minimum(a, b))
        else:
            t_p, r_p = a, torch.minimum(a, torch.where(equal, a, b))
        np.testing.assert_allclose(s, (1 - t_p).double().numpy(), atol=1e-6)
        np.testing.assert_allclose(t, (1 - r_p).double().numpy(), atol=1e-6)


def test_per_sample_mask_has_no_row_structure():
    s, t = draw("py_meanflow_v0", **V0)
    first, second = (s[: N // 2] == t[: N // 2]).sum(), (s[N // 2 :] == t[N // 2 :]).sum()
    assert binomial_ok(int(first), N // 2, 0.25) and binomial_ok(int(second), N // 2, 0.25)


@pytest.mark.parametrize("cls, ratio", [(MeanflowJaxPairSampler, 0.25), (IMeanflowPairSampler, 0.5)])
def test_jax_and_imf_first_rows_equal(cls, ratio):
    n = 1000
    torch.manual_seed(0)
    s, t = cls(ratio=ratio).sample(n, CPU)
    k = int(n * (1 - ratio))  # the source's data_size = int(bz * data_proportion)
    assert cls(ratio=ratio).equal_rows(n) == k
    assert (s[:k] == t[:k]).all() and (s[k:] < t[k:]).all()
    # a batch size where int() and round() differ: 10 rows, 0.25 distinct -> int(7.5) = 7 equal
    torch.manual_seed(0)
    s, t = MeanflowJaxPairSampler(ratio=0.25).sample(10, CPU)
    assert int((s == t).sum()) == 7


def test_imf_defaults_are_its_source_defaults():
    sampler = make_pair_sampler("imeanflow")
    assert (sampler.ratio, sampler.mean, sampler.std) == (0.5, -0.4, 1.0)


def test_meanflow_jax_marginals():
    n = 200_000
    s, t = draw("meanflow_jax", n=n, **IMAGENET)
    _, _, fmax, fmin = paper_cdfs(IMAGENET)
    k = int(n * (1 - IMAGENET["ratio"]))
    assert ks_p(s, s_cdf(fmax)) > KS_P_MIN
    assert ks_p(t[:k], s_cdf(fmax)) > KS_P_MIN  # equal rows: r = t = max
    assert ks_p(t[k:], s_cdf(fmin)) > KS_P_MIN  # distinct rows: r = min


def test_order_then_mask_rows_is_the_old_paper_sampler():
    s, t = draw("order_then_mask_rows", **V1)
    _, _, fmax, fmin = paper_cdfs(V1)
    k = round(V1["ratio"] * N)
    assert (s[:k] < t[:k]).all() and (s[k:] == t[k:]).all()
    assert ks_p(s, s_cdf(fmax)) > KS_P_MIN
    assert ks_p(t[:k], s_cdf(fmin)) > KS_P_MIN


def test_mask_rows_then_order_is_the_old_improved_sampler_and_not_v1():
    s, t = draw("mask_rows_then_order", **V1)
    fa, _, fmax, fmin = paper_cdfs(V1)
    k = round(V1["ratio"] * N)
    assert (s[:k] < t[:k]).all() and (s[k:] == t[k:]).all()
    assert ks_p(s[:k], s_cdf(fmax)) > KS_P_MIN  # distinct rows: (max, min) of the two draws
    assert ks_p(t[:k], s_cdf(fmin)) > KS_P_MIN
    assert ks_p(s[k:], s_cdf(fa)) > KS_P_MIN  # equal rows: one plain first draw
    # the difference issue 10 measured: equal fraction 0.25 here, t_paper not v1's law
    assert (s == t).mean() == pytest.approx(1 - V1["ratio"], abs=1e-5)
    assert ks_p(s, s_cdf(fa)) < 1e-10


def test_flow_matching_samplers():
    torch.manual_seed(0)
    t = LogitNormalTimeSampler(0.5, 1.2).sample(N, CPU)
    assert t.dtype == torch.float32 and t.shape == (N,)
    # this project's convention directly: no flip
    assert ks_p(t.double().numpy(), lambda x: ln_cdf(x, 0.5, 1.2)) > KS_P_MIN
    torch.manual_seed(0)
    u = make_time_sampler("uniform").sample(N, CPU).double().numpy()
    assert ks_p(u, stats.uniform.cdf) > KS_P_MIN


def test_bad_names_and_options_fail_in_one_line():
    with pytest.raises(ValueError, match="unknown pair sampler 'paper': expected one of py_meanflow_v0"):
        make_pair_sampler("paper")
    with pytest.raises(ValueError, match="unknown time sampler 'beta': expected one of uniform, logit_normal"):
        make_time_sampler("beta")
    with pytest.raises(ValueError, match=r"got unknown \['time_mean'\]"):
        make_pair_sampler("py_meanflow_v1", time_mean=-0.6)
    with pytest.raises(ValueError, match="ratio .* must be in \\[0, 1\\], got 1.5"):
        make_pair_sampler("py_meanflow_v0", ratio=1.5)
    with pytest.raises(ValueError, match="std must be a positive number, got 0.0"):
        make_time_sampler("logit_normal", std=0.0)
    with pytest.raises(ValueError, match="leave them null"):
        make_pair_sampler("meanflow_jax", r_mean=-4.0)


def test_uniform_law_pairs_are_order_statistics_of_two_uniforms():
    """``law=uniform`` with every pair distinct: s = 1 - max, t = 1 - min of two U(0, 1),
    so E[s] = 1/3, E[t] = 2/3 and P(s < 0.1) = 1 - 0.9^2 = 0.19."""
    torch.manual_seed(0)
    s, t = make_pair_sampler("order_then_mask_rows", ratio=1.0, law="uniform").sample(40000, torch.device("cpu"))
    assert ((0 <= s) & (s <= t) & (t <= 1)).all()
    assert s.mean().item() == pytest.approx(1 / 3, abs=0.01) and t.mean().item() == pytest.approx(2 / 3, abs=0.01)
    assert (s < 0.1).float().mean().item() == pytest.approx(0.19, abs=0.01)
    with pytest.raises(ValueError, match="law='beta'"):
        make_pair_sampler("order_then_mask_rows", law="beta")
