"""Every time a loss trains on is drawn here: flow matching's single ``t`` and the
mean-flow ``(s, t)`` pairs.

Convention (docs/design.md): noise at 0, data at 1, and ``0 <= s <= t <= 1``. The published
MeanFlow code runs the other way (noise at 1) and names its pair ``(t, r)`` with
``t >= r``; a published pair maps here as ``s = 1 - t_paper``, ``t = 1 - r_paper``.
The logit-normal parameters of the pair samplers (``mean``, ``std``, ``r_mean``,
``r_std``) are given in the published convention, so numbers from a paper or a script
copy over unchanged: ``mean=-0.4`` puts the mode of ``t_paper`` near noise there and
near data here.

``ratio`` is always the fraction of pairs with ``s != t`` (py-meanflow's ``--ratio``;
the JAX code's ``data_proportion`` is ``1 - ratio``).

Each pair sampler named after a published code base reproduces that code's order of
draws, masking and ordering; the two named after what they do are this project's
earlier samplers, kept so old runs can be repeated. Config shape (``configs/loss/``)::

    time: {name: logit_normal, mean: 0.0, std: 1.0}                         # flow matching
    time: {name: py_meanflow_v1, ratio: 0.75, mean: -0.6, std: 1.6, r_mean: -4.0, r_std: 1.6}

every key but ``name`` goes to the constructor (``make_time_sampler`` /
``make_pair_sampler``).
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
    """Shared state: a first draw (the paper's ``t``) ~ logit-normal(mean, std) and a
    second draw (the paper's ``r``) ~ logit-normal(r_mean, r_std); ``None`` repeats the
    first law. ``law="uniform"`` draws both from U(0, 1) instead (this project's 2-D
    default; every published recipe uses its logit-normal laws)."""

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
            # Both draws U(0, 1): mass everywhere in the triangle, the few-step grid's pairs
            # (0, 1), (0, 1/2), (1/2, 1) included; logit-normal(-0.4, 1) leaves about 0.03%
            # of pairs near (0, 1) (EXPERIMENT_LOG.md, 2026-12-01, the 2-D investigation).
            return torch.rand(n, device=device), torch.rand(n, device=device)
        t = logit_normal(n, self.mean, self.std, device)
        r = logit_normal(n, self.r_mean, self.r_std, device)
        return t, r

    def _per_sample_equal(self, n: int, device: torch.device) -> Tensor:
        # A Bernoulli(1 - ratio) draw per sample, as py-meanflow's ``prob < 1 - ratio``.
        return torch.rand(n, device=device) < 1 - self.ratio


class PyMeanflowV0PairSampler(_TwoLawPairSampler):
    """The PyTorch reference's "v0" sampler, the one of the MeanFlow paper
    (Gsunshine/py-meanflow, ``meanflow/models/time_sampler.py::sample_two_timesteps_t_r_v0``).

    In the paper's convention: ``t ~ LN(mean, std)``, ``r ~ LN(r_mean, r_std)`` (two
    ``randn`` draws, in that order), then ``t, r = max(t, r), min(t, r)``, then one
    ``rand`` per sample and ``r = t`` where it is below ``1 - ratio``. So ``t_paper`` is
    always the larger draw, and the equal pairs sit at the larger draw too; the number of
    equal pairs in a batch is binomial, not fixed.
    Published settings: ``scripts/cifar10_v0.sh`` (ratio 0.75, LN(-2, 2) for both).
    """

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t, r = self._draw(n, device)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        r = torch.where(self._per_sample_equal(n, device), t, r)
        return _from_paper(t, r)


class PyMeanflowV1PairSampler(_TwoLawPairSampler):
    """The PyTorch reference's "v1" sampler (Gsunshine/py-meanflow,
    ``meanflow/models/time_sampler.py::sample_two_timesteps_t_r_v1``), the one its README
    recommends (``scripts/cifar10_v1.sh``: ratio 0.75, t ~ LN(-0.6, 1.6), r ~ LN(-4, 1.6)).

    In the paper's convention: ``t ~ LN(mean, std)``, ``r ~ LN(r_mean, r_std)``, one
    ``rand`` per sample and ``r = t`` where it is below ``1 - ratio``, then
    ``r = min(t, r)``. ``t_paper`` keeps its own law; a pair is equal either by the mask
    or because the second draw came out above the first, so the equal fraction is
    ``(1 - ratio) + ratio * P(r_draw >= t_draw)``, more than ``1 - ratio``.
    """

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t, r = self._draw(n, device)
        r = torch.where(self._per_sample_equal(n, device), t, r)
        r = torch.minimum(t, r)
        return _from_paper(t, r)


class MeanflowJaxPairSampler(_TwoLawPairSampler):
    """The JAX reference's sampler (Gsunshine/meanflow, ``meanflow.py::MeanFlow.sample_tr``),
    used for its ImageNet runs.

    In the paper's convention: ``t, r`` two draws of one logit-normal law
    (``P_mean``, ``P_std``; no separate law for ``r``), ``t, r = max, min``, then
    ``r = t`` on the FIRST ``int(n * data_proportion)`` rows of the batch
    (``data_proportion = 1 - ratio``): a fixed count, placed by row, not a per-sample
    draw. The equal pairs therefore sit at the start of the batch; the JAX code's label
    drop (``cond_drop``) also takes the first rows, so there the dropped labels fall on
    equal pairs (for a loss that wants to mirror that, see ``equal_rows``).
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
    """Improved MeanFlow's sampler (Lyy-iiis/imeanflow, ``imf.py::iMeanFlow.sample_tr``):
    the same law and row placement as the JAX MeanFlow sampler (one logit-normal law,
    ordered, the first ``int(n * data_proportion)`` rows equal), with that code's
    defaults: ``data_proportion = 0.5`` (``ratio = 0.5``), LN(-0.4, 1.0). iMF also uses
    the equal-row mask for its guidance interval; ``equal_rows`` gives it.
    """

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
    """This project's earlier ``sampler: paper`` (``losses/meanflow_loss.py::sample_time_pairs``).

    Two draws (each with its own law), ordered, then the FIRST ``round(ratio * n)`` rows
    keep ``s != t`` and the rest get ``r = t``. Its law of ``(s, t)`` is py-meanflow v0's,
    but with a fixed count of distinct pairs like the JAX code; it differs from the JAX
    sampler in putting the distinct pairs (not the equal ones) first, in rounding
    (``round(ratio n)`` vs ``n - int((1 - ratio) n)``) and in allowing a second law.
    """

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t, r = self._draw(n, device)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        distinct = torch.arange(n, device=device) < round(self.ratio * n)
        r = torch.where(distinct, r, t)
        return _from_paper(t, r)


class MaskRowsThenOrderPairSampler(_TwoLawPairSampler):
    """This project's earlier ``sampler: improved`` (``losses/meanflow_loss.py::sample_time_pairs``).

    The FIRST ``round(ratio * n)`` rows keep both draws; the others replace the second
    draw by the first; then the pair is ordered. Equal pairs are thus one plain draw of
    the first law, and distinct pairs are ``(max, min)``. No published code does this:
    py-meanflow v1 masks first too but then keeps ``t_paper`` and clips ``r`` to it
    (``r = min(t, r)``), so its ``t_paper`` has the first law and its equal fraction
    grows by ``ratio * P(r_draw >= t_draw)``; here ``t_paper`` is the max of the two draws
    and the equal fraction is exactly ``1 - ratio``.
    """

    def sample(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t, r = self._draw(n, device)
        distinct = torch.arange(n, device=device) < round(self.ratio * n)
        r = torch.where(distinct, r, t)
        t, r = torch.maximum(t, r), torch.minimum(t, r)
        return _from_paper(t, r)


class AlphaflowPairSampler(PairSampler):
    """The reference's (s, t) law (``AlphaFlowLoss.sample_traj_params``).

    In the paper's convention: the first ``int(n * ratio_fm)`` rows are flow-matching
    pairs ``t = r ~ LN(fm_mean, fm_std)`` (one draw, drawn first), the others two draws
    of ``LN(mean, std)`` ordered ``t, r = max, min`` (``distrib_t_t_next_mf: minmax``).
    ``ratio`` is the fraction with ``s != t``, ``1 - ratio_fm``, as everywhere here.
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
