"""Every time a loss trains on: flow matching's single ``t`` and the mean-flow ``(s, t)`` pairs.

Convention (docs/design.md, "Time convention"): noise at 0, data at 1, ``0 <= s <= t <= 1``.
The published MeanFlow code runs the other way (noise at 1, a pair ``(t, r)`` with ``t >= r``):
``s = 1 - t_paper``, ``t = 1 - r_paper``. The pair samplers' logit-normal parameters
(``mean``, ``std``, ``r_mean``, ``r_std``) are in the published convention, so a paper's or a
script's numbers copy over unchanged. ``ratio`` is always the fraction of pairs with
``s != t`` (py-meanflow's ``--ratio``; the JAX code's ``data_proportion`` is ``1 - ratio``).

A pair sampler named after a published code base reproduces that code's order of draws,
masking and ordering; the two named after what they do are this project's earlier
samplers, kept so old runs can be repeated. A config ``time: {name: ..., **options}``
(``configs/loss/``) gives every key but ``name`` to the constructor.
"""

import inspect
import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


def _check_law(what: str, mean: float, std: float) -> None:
    if not math.isfinite(mean):
        raise ValueError(f"{what} logit-normal mean must be a finite number, got {mean}")
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"{what} logit-normal std must be a positive number, got {std}")


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio (fraction of pairs with s != t) must be in [0, 1], got {ratio}")


def logit_normal(n: int, mean: float, std: float, device: torch.device) -> Tensor:
    """``sigmoid(N(mean, std^2))``, shape (n,), float32 (Esser et al. 2024, Sec. 3.1)."""
    return torch.sigmoid(torch.randn(n, device=device) * std + mean)


# ---------------------------------------------------------------------------------
# Flow matching: one time per sample.
# ---------------------------------------------------------------------------------


class TimeSampler(ABC):
    """Draws flow-matching times ``t`` in [0, 1] (noise at 0, data at 1)."""

    @abstractmethod
    def sample(self, n: int, device: torch.device) -> Tensor:
        """Return ``n`` times, shape (n,), float32, on ``device``."""


class UniformTimeSampler(TimeSampler):
    """``t ~ U[0, 1]`` (Lipman et al. 2023)."""

    def sample(self, n: int, device: torch.device) -> Tensor:
        return torch.rand(n, device=device)


class LogitNormalTimeSampler(TimeSampler):
    """``t = sigmoid(N(mean, std^2))`` directly in this project's convention (Esser et
    al. 2024, "Scaling rectified flow", Sec. 3.1): ``mean > 0`` puts more times near the
    data end."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        _check_law("flow-matching", mean, std)
        self.mean = mean
        self.std = std

    def sample(self, n: int, device: torch.device) -> Tensor:
        return logit_normal(n, self.mean, self.std, device)


# ---------------------------------------------------------------------------------
# Mean flows: (s, t) pairs.
# ---------------------------------------------------------------------------------


class PairSampler(ABC):
    """Draws mean-flow time pairs ``(s, t)`` with ``0 <= s <= t <= 1`` (noise at 0)."""

    @abstractmethod
    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Return ``(s, t)``, each shape (n,), float32, on ``device``."""


def _from_paper(t_paper: Tensor, r_paper: Tensor) -> tuple[Tensor, Tensor]:
    # t_paper >= r_paper (noise at 1)  ->  s = 1 - t_paper <= t = 1 - r_paper (noise at 0);
    # float subtraction from 1 is monotone, so the order survives rounding.
    return 1 - t_paper, 1 - r_paper


class _TwoLawPairSampler(PairSampler):
    """A first draw (the paper's ``t``) ~ LN(mean, std) and a second (the paper's ``r``)
    ~ LN(r_mean, r_std), ``None`` repeating the first law; ``law="uniform"``: both U(0, 1)."""

    def __init__(
        self,
        ratio: float = 0.75,
        mean: float = -0.4,
        std: float = 1.0,
        r_mean: float | None = None,
        r_std: float | None = None,
        law: str = "logit_normal",
    ) -> None:
        _check_ratio(ratio)
        if law not in ("logit_normal", "uniform"):
            raise ValueError(f"law={law!r}: expected logit_normal (mean, std, r_mean, r_std) or uniform")
        self.ratio, self.law = ratio, law
        self.mean, self.std = mean, std
        self.r_mean = mean if r_mean is None else r_mean
        self.r_std = std if r_std is None else r_std
        _check_law("first (paper t)", self.mean, self.std)
        _check_law("second (paper r)", self.r_mean, self.r_std)

    def _draw(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.law == "uniform":
            # mass everywhere in the triangle, the few-step grid's pairs (0, 1), (0, 1/2), (1/2, 1)
            # included, where logit-normal(-0.4, 1) puts almost none (EXPERIMENT_LOG.md, 2026-12-01)
            return torch.rand(n, device=device), torch.rand(n, device=device)
        t = logit_normal(n, self.mean, self.std, device)
        r = logit_normal(n, self.r_mean, self.r_std, device)
        return t, r

    def _per_sample_equal(self, n: int, device: torch.device) -> Tensor:
        # A Bernoulli(1 - ratio) draw per sample, as py-meanflow's ``prob < 1 - ratio``.
        return torch.rand(n, device=device) < 1 - self.ratio


class PyMeanflowV0PairSampler(_TwoLawPairSampler):
    """The MeanFlow paper's sampler (Gsunshine/py-meanflow,
    ``meanflow/models/time_sampler.py::sample_two_timesteps_t_r_v0``; ``scripts/cifar10_v0.sh``).

    Paper convention: ``t ~ LN(mean, std)``, ``r ~ LN(r_mean, r_std)`` (two ``randn``, in
    that order), ``t, r = max, min``, then ``r = t`` where a per-sample ``rand`` is below
    ``1 - ratio``: the equal pairs sit at the larger draw, their count is binomial.
    """

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t, r = self._draw(n, device)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        r = torch.where(self._per_sample_equal(n, device), t, r)
        return _from_paper(t, r)


class PyMeanflowV1PairSampler(_TwoLawPairSampler):
    """The sampler py-meanflow's README recommends (Gsunshine/py-meanflow,
    ``meanflow/models/time_sampler.py::sample_two_timesteps_t_r_v1``; ``scripts/cifar10_v1.sh``).

    Paper convention: ``t ~ LN(mean, std)``, ``r ~ LN(r_mean, r_std)``, ``r = t`` where a
    per-sample ``rand`` is below ``1 - ratio``, then ``r = min(t, r)``. ``t_paper`` keeps its
    own law, and the equal fraction is ``(1 - ratio) + ratio * P(r_draw >= t_draw)``.
    """

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t, r = self._draw(n, device)
        r = torch.where(self._per_sample_equal(n, device), t, r)
        r = torch.minimum(t, r)
        return _from_paper(t, r)


class MeanflowJaxPairSampler(_TwoLawPairSampler):
    """The JAX reference's sampler, used for its ImageNet runs (Gsunshine/meanflow,
    ``meanflow.py::MeanFlow.sample_tr``).

    Paper convention: two draws of one law (``P_mean``, ``P_std``), ``t, r = max, min``,
    then ``r = t`` on the FIRST ``int(n * data_proportion)`` rows (``data_proportion =
    1 - ratio``): a fixed count, by row. The JAX code's label drop (``cond_drop``) takes the
    first rows too, so there dropped labels fall on equal pairs (``equal_rows``).
    """

    def __init__(
        self,
        ratio: float = 0.25,
        mean: float = -0.4,
        std: float = 1.0,
        r_mean: float | None = None,
        r_std: float | None = None,
    ) -> None:
        if r_mean is not None or r_std is not None:
            raise ValueError(
                f"{type(self).__name__} draws both times from one law (mean, std) as its source does; "
                f"got r_mean={r_mean}, r_std={r_std}: leave them null"
            )
        super().__init__(ratio, mean, std)

    def equal_rows(self, n: int) -> int:
        """The number of leading rows with ``s == t``: ``int(n * data_proportion)``."""
        return int(n * (1 - self.ratio))

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t, r = self._draw(n, device)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        equal = torch.arange(n, device=device) < self.equal_rows(n)
        r = torch.where(equal, t, r)
        return _from_paper(t, r)


class IMeanflowPairSampler(MeanflowJaxPairSampler):
    """Improved MeanFlow's sampler (Lyy-iiis/imeanflow, ``imf.py::iMeanFlow.sample_tr``): the
    JAX MeanFlow sampler with that code's defaults, ``data_proportion = 0.5``, LN(-0.4, 1.0)."""

    def __init__(
        self,
        ratio: float = 0.5,
        mean: float = -0.4,
        std: float = 1.0,
        r_mean: float | None = None,
        r_std: float | None = None,
    ) -> None:
        super().__init__(ratio, mean, std, r_mean, r_std)


class OrderThenMaskRowsPairSampler(_TwoLawPairSampler):
    """This project's earlier ``sampler: paper`` (``losses/base_loss.py::LEGACY_PAIR_SAMPLERS``).

    Two draws, ordered, then the FIRST ``round(ratio * n)`` rows keep ``s != t`` and the
    rest get ``r = t``: py-meanflow v0's law with a fixed count like the JAX code, but the
    distinct pairs first, ``round(ratio n)`` distinct (JAX: ``n - int((1 - ratio) n)``) and
    a second law allowed.
    """

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t, r = self._draw(n, device)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        distinct = torch.arange(n, device=device) < round(self.ratio * n)
        r = torch.where(distinct, r, t)
        return _from_paper(t, r)


class MaskRowsThenOrderPairSampler(_TwoLawPairSampler):
    """This project's earlier ``sampler: improved`` (``losses/base_loss.py::LEGACY_PAIR_SAMPLERS``).

    The FIRST ``round(ratio * n)`` rows keep both draws, the others repeat the first, then
    each pair is ordered: equal pairs are one draw of the first law, distinct pairs
    ``(max, min)``, and the equal fraction is exactly ``1 - ratio``. No published code does
    this (py-meanflow v1 masks first too, but then clips ``r = min(t, r)``).
    """

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t, r = self._draw(n, device)
        distinct = torch.arange(n, device=device) < round(self.ratio * n)
        r = torch.where(distinct, r, t)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        return _from_paper(t, r)


class AlphaflowPairSampler(PairSampler):
    """AlphaFlow's law (snap-research/alphaflow, ``AlphaFlowLoss.sample_traj_params``).

    Paper convention: the first ``int(n * ratio_fm)`` rows are ``t = r ~ LN(fm_mean,
    fm_std)`` (drawn first), the others two draws of ``LN(mean, std)`` ordered ``t, r = max,
    min`` (``distrib_t_t_next_mf: minmax``); ``ratio = 1 - ratio_fm``.
    """

    def __init__(self, ratio: float = 0.5, mean: float = -0.4, std: float = 1.0,
                 fm_mean: float = -0.4, fm_std: float = 1.0) -> None:
        _check_ratio(ratio)
        _check_law("mean-flow pairs", mean, std)
        _check_law("flow-matching pairs", fm_mean, fm_std)
        self.ratio, self.mean, self.std, self.fm_mean, self.fm_std = ratio, mean, std, fm_mean, fm_std

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        n_fm = int(n * (1 - self.ratio))
        t_fm = logit_normal(n_fm, self.fm_mean, self.fm_std, device)
        a = logit_normal(n - n_fm, self.mean, self.std, device)
        b = logit_normal(n - n_fm, self.mean, self.std, device)
        t = torch.cat([t_fm, torch.maximum(a, b)])
        r = torch.cat([t_fm, torch.minimum(a, b)])
        return _from_paper(t, r)


# ---------------------------------------------------------------------------------
# Construction from a config.
# ---------------------------------------------------------------------------------

TIME_SAMPLERS: dict[str, type[TimeSampler]] = {
    "uniform": UniformTimeSampler,
    "logit_normal": LogitNormalTimeSampler,
}

PAIR_SAMPLERS: dict[str, type[PairSampler]] = {
    "py_meanflow_v0": PyMeanflowV0PairSampler,
    "py_meanflow_v1": PyMeanflowV1PairSampler,
    "meanflow_jax": MeanflowJaxPairSampler,
    "imeanflow": IMeanflowPairSampler,
    "order_then_mask_rows": OrderThenMaskRowsPairSampler,
    "mask_rows_then_order": MaskRowsThenOrderPairSampler,
    "alphaflow": AlphaflowPairSampler,
}


def _build(kind: str, registry: dict[str, type], name: str, kwargs: dict):
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}: expected one of {', '.join(registry)}")
    cls = registry[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{kind} {name!r} takes {accepted or 'no options'}, got unknown {unknown}")
    return cls(**kwargs)


def make_time_sampler(name: str, **kwargs) -> TimeSampler:
    """A flow-matching time sampler by name (``uniform``, ``logit_normal``)."""
    return _build("time sampler", TIME_SAMPLERS, name, kwargs)


def make_pair_sampler(name: str, **kwargs) -> PairSampler:
    """A mean-flow pair sampler by name (see ``PAIR_SAMPLERS``)."""
    return _build("pair sampler", PAIR_SAMPLERS, name, kwargs)
