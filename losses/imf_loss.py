"""Improved MeanFlow loss (Geng, Lu, Wu, Shechtman, Kolter, He 2025, "Improved Mean Flows:
On the Challenges of Fastforward Generative Models", arXiv 2512.02012; reference code
Lyy-iiis/imeanflow, ``imf.py::iMeanFlow.forward``).

The MeanFlow identity read as a velocity regression (the paper's "v-loss", ``V = u + (t - r)
sg(du/dt)``), in this convention (docs/design.md, "MeanFlow in this convention"):

    V_θ(x_s, s, t) = u_θ(x_s, s, t) - (t - s) · sg(d/ds u_θ(x_s, s, t)),
    L = ||V_θ - sg(v_g)||² / sg(||V_θ - v_g||² + eps)^p          (summed over dimensions)

Only ``u_θ`` carries a gradient, so this is MeanFlow's loss with the target
``sg(v_g + (t - s) du/ds)``, except that:

- the JVP's tangent is the model's own velocity ``v_c = u_θ(x_s, s, s | c)``, an estimate of
  the marginal velocity the identity is about, not the one-sample ``x_1 - x_0`` (``imf.py``:
  ``jax.jvp(u_fn, (z_t, t, r), (v_c, 1, 0))``); ``tangent: conditional`` is MeanFlow's;
- guidance is iMF's ``v_g = v + (1 - 1/ω)(v_c - v_u)`` (``imf.py::guidance_fn``): the model
  learns the guided field, so ``(v_c - v_u) / ω`` is the unguided class direction;
- the law is ``imeanflow``, eps = 0.01, p = 1 (the reference's ``configs/default.py``).

Guidance as conditions (``num_conds = 3``, the reference's): each row draws its own ω and
interval and the model sees them, ``cond = [ω, lo, hi]`` (B, 3), so that sampling picks them.
The interval is the range of ``s`` where guidance applies, in this project's time: the
reference's ``[t_min, t_max]`` (noise at 1) is ``lo = 1 - t_max``, ``hi = 1 - t_min``. Laws
(``imf.py::sample_cfg_scale``, ``sample_cfg_interval``): ``ω = omega_max^U`` (``omega_beta = 1``;
a power law otherwise), ``t_min ~ U(t_min_range)``, ``t_max ~ U(t_max_range)`` in the paper's
time, and rows with ``s = t`` take the whole ``[0, 1]``. A row guides with ``w = ω`` when its
``s`` is inside its interval and ``w = 1`` outside; ``v_c`` and ``v_u`` are read at ``h = 0``
with ``cond = [w, 0, 1]`` and ``[1, 0, 1]``. (The reference reads ``v_c`` twice, at ω and at
``w``, and keeps the first on its ``s = t`` rows: their interval is ``[0, 1]``, so ``w = ω``
there and one read is the same.) With ``num_conds = 0`` ω and the interval are the fixed
``cfg_omega`` and ``cfg_interval``, applied to pairs with ``s != t`` (``s = t``: always).

The auxiliary head (``aux_head``, the reference's): a second output ``v_θ`` of the model,
trained at the same inputs as ``u_θ`` with equal weight, ``L_v = ||v_θ - sg(v_g)||² /
sg(... + eps)^p`` (``imf.py:389-392``); it, not ``u_θ(x, s, s)``, supplies ``v_c`` and ``v_u``.

Class dropping (``class_drop``): ``independent`` drops each row with probability
``class_drop_prob``; ``imeanflow`` (``imf.py::cond_drop``) draws that many and drops them from
the first rows (the ``s = t`` rows of the ``imeanflow`` law). Either way a dropped row trains
on ``v`` and its ``v_c`` uses the label before dropping, as the reference's.

Draws after the pairs, in the reference's order: ``t_min``, ``t_max``, ω, the class drop.
"""

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem
from helpers_cfg import conditional_and_null, training_labels
from losses.base_loss import call_model
from losses.meanflow_loss import MeanFlowLoss
from models.unified_input import broadcast_time, make_unified_flow_matching_input, split_unified_input
from solvers.sampling import ConsistencySampler, DiagonalSampler, JumpSampler, Sampler, few_step_samplers

# ``configs/loss/imf.yaml``'s law (Lyy-iiis/imeanflow configs/default.py), for a loss built in code.
DEFAULT_TIME = {"name": "imeanflow", "ratio": 0.5, "mean": -0.4, "std": 1.0}
TANGENTS = ("predicted", "conditional")
CLASS_DROPS = ("independent", "imeanflow")
NUM_CONDS = 3  # ω, lo, hi


@dataclass(eq=False, kw_only=True)
class IMFLoss(MeanFlowLoss):
    """The iMF v-loss on a batch's ``raw_source`` (noise) and ``raw_target`` (data).

    MeanFlow's fields (``p``, ``eps``: the reference's ``norm_p``, ``norm_eps``; ``cfg_kappa``
    stays 0; with conditions, ``cfg_omega`` and ``cfg_interval`` are sampling's defaults),
    then the JVP's tangent, the model's conditions and head, their laws and the class drop.
    """

    eps: float = 0.01
    tangent: str = "predicted"  # predicted (iMF: the model's velocity at s = t) | conditional (MeanFlow's x_1 - x_0)
    num_conds: int = 0  # the model's extra conditions: 0 (ω and the interval fixed) | 3 (drawn per row: [ω, lo, hi])
    aux_head: bool = False  # the model's auxiliary velocity head: trained with loss_v, it supplies v_c and v_u
    omega_max: float = 8.0  # ω per row in [1, omega_max] (imf.py: 1 + s_max, s_max = 7)
    omega_beta: float = 1.0  # ω's law: 1 is log-uniform, ω = omega_max^U; else a power law (imf.py cfg_beta)
    t_min_range: tuple[float, float] | list[float] = (0.0, 0.5)  # the paper's t_min ~ U(a, b) (noise at 1)
    t_max_range: tuple[float, float] | list[float] = (0.5, 1.0)  # the paper's t_max ~ U(a, b)
    class_drop: str = "independent"  # independent (each row) | imeanflow (a binomial count on the first rows)

    default_time = DEFAULT_TIME

    def __post_init__(self) -> None:
        if self.cfg_kappa != 0.0:
            raise ValueError(f"loss.cfg_kappa={self.cfg_kappa}: iMF's guidance v + (1 - 1/ω)(v_c - v_u) has no κ; leave it 0")
        super().__post_init__()
        if self.cfg_omega < 1.0:
            raise ValueError(f"loss.cfg_omega={self.cfg_omega}: iMF's guidance v + (1 - 1/ω)(v_c - v_u) expects ω >= 1")
        if self.tangent not in TANGENTS:
            raise ValueError(f"loss.tangent={self.tangent!r}: expected one of {list(TANGENTS)}")
        if self.class_drop not in CLASS_DROPS:
            raise ValueError(f"loss.class_drop={self.class_drop!r}: expected one of {list(CLASS_DROPS)}")
        if self.num_conds not in (0, NUM_CONDS):
            raise ValueError(f"loss.num_conds={self.num_conds}: expected 0 (fixed guidance) or {NUM_CONDS} (ω, lo, hi per row)")
        if self.num_conds and self.num_classes == 0:
            raise ValueError(f"loss.num_conds={self.num_conds}: guidance conditions need a class-conditional model "
                             "(model.num_classes > 0), or set model.num_conds=0")
        if self.num_conds and self.class_drop_prob == 0.0:
            raise ValueError("guidance conditions need a learned null class: set loss.class_drop_prob > 0 (reference: 0.1)")
        if not (math.isfinite(self.omega_max) and self.omega_max >= 1.0):
            raise ValueError(f"loss.omega_max={self.omega_max}: expected a number >= 1")
        if not math.isfinite(self.omega_beta):
            raise ValueError(f"loss.omega_beta={self.omega_beta}: expected a finite number (1: log-uniform)")
        (a, b), (c, d) = self.t_min_range, self.t_max_range
        if not 0.0 <= a <= b <= c <= d <= 1.0:
            raise ValueError(f"loss.t_min_range={list(self.t_min_range)}, loss.t_max_range={list(self.t_max_range)}: "
                             "expected 0 <= t_min's range <= t_max's range <= 1")
        self.t_min_range, self.t_max_range = (a, b), (c, d)

    # --- the draws ---------------------------------------------------------------------

    def training_labels(self, label: Tensor | None, s: Tensor) -> Tensor | None:
        """``imeanflow``: as many rows as an independent draw drops, from the top (``imf.py::cond_drop``)."""
        return training_labels(label, self.num_classes, self.class_drop_prob, first_rows=self.class_drop == "imeanflow")

    def draw_conditions(self, equal: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(ω, t_min, t_max)`` (B,) each, float32, in the paper's time; rows where
        ``equal`` (``s = t``) take ``[0, 1]`` (``imf.py::sample_cfg_interval``, ``sample_cfg_scale``)."""
        n, device = equal.shape[0], equal.device
        (a, b), (c, d) = self.t_min_range, self.t_max_range
        t_min = torch.rand(n, device=device) * (b - a) + a
        t_max = torch.rand(n, device=device) * (d - c) + c
        t_min, t_max = torch.where(equal, 0.0, t_min), torch.where(equal, 1.0, t_max)
        u = torch.rand(n, device=device)
        log_max = math.log1p(self.omega_max - 1)  # the reference's log1p(s_max)
        if self.omega_beta == 1.0:
            omega = torch.exp(u * log_max)
        else:  # density ∝ ω^(-β) on [1, omega_max]
            power = 1.0 - self.omega_beta
            omega = torch.exp(torch.log1p(u * math.expm1(power * log_max)) / power)
        return omega, t_min, t_max

    @staticmethod
    def conditions(omega: Tensor, t_min: Tensor, t_max: Tensor) -> Tensor:
        """The model's ``cond = [ω, lo, hi]`` (B, 3) from the paper's interval: ``lo = 1 - t_max``,
        ``hi = 1 - t_min`` bound ``s``."""
        return torch.stack([omega, 1 - t_max, 1 - t_min], dim=1)

    # --- the velocities ----------------------------------------------------------------

    @torch.no_grad()
    def tangent_and_guided_velocity(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, label: Tensor | None, dropped: Tensor | None,
        aug: Tensor | None = None, cond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(v_c, v_g)``: the JVP's state tangent and the regression target (no gradient).

        ``label`` is the label before dropping: iMF computes ``v_c`` with it for every
        sample (``imf.py`` calls ``guidance_fn`` before ``cond_drop``). ``cond``: the rows'
        ``[ω, lo, hi]`` (``num_conds = 3``), else None.
        """
        z_diag = make_unified_flow_matching_input(x, s, s)
        head = "v" if self.aux_head else "u"
        if cond is not None:  # imf.py::guidance_fn with the rows' own ω and interval
            omega, lo, hi = cond.unbind(1)
            w = torch.where((s >= lo) & (s <= hi), omega, torch.ones_like(omega))
            zeros, ones = torch.zeros_like(w), torch.ones_like(w)
            v_c, v_u = (out.to(v.dtype) for out in conditional_and_null(
                model, z_diag, label, self.num_classes, aug, torch.stack([w, zeros, ones], 1), torch.stack([ones, zeros, ones], 1),
                head))
            v_g = torch.where(broadcast_time(dropped, v), v, v + broadcast_time(1 - 1 / w, v) * (v_c - v_u))
            return (v_c if self.tangent == "predicted" else v_g), v_g
        if self.guided:  # one batched forward gives v_c and v_u
            v_c, v_u = (out.to(v.dtype) for out in conditional_and_null(model, z_diag, label, self.num_classes, aug, head=head))
        elif self.tangent == "predicted":
            v_c, v_u = call_model(model, z_diag, label, aug, head=head).to(v.dtype), None
        else:  # MeanFlow's tangent, nothing to evaluate
            v_c, v_u = None, None
        if v_u is None:
            return (v_c if self.tangent == "predicted" else v), v
        apply = self.in_interval(s) | (s == t)  # imf.py: v_g_fm (s = t) has no interval
        v_guided = v + (1 - 1 / self.cfg_omega) * (v_c - v_u)  # imf.py::guidance_fn
        v_g = torch.where(broadcast_time(apply & ~dropped, v), v_guided, v)
        return (v_c if self.tangent == "predicted" else v_g), v_g  # conditional: MeanFlow's guided tangent

    def predictions(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, tangent: Tensor, label: Tensor | None,
        aug: Tensor | None = None, cond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``V = u_θ(x, s, t) - (t - s) sg(du/ds)`` along ``(tangent, 1, 0)`` (the paper's
        ``V = u + (t - r) sg(du/dt)``) and the auxiliary ``v_θ(x, s, t)`` at the same inputs
        (None without the head), both with gradient."""
        if self.aux_head:
            (u, v_aux), (dudt, _) = self.mean_flow_jvp(model, x, s, t, tangent, label, aug, cond, head="both")
        else:
            (u, dudt), v_aux = self.mean_flow_jvp(model, x, s, t, tangent, label, aug, cond), None
        return u - broadcast_time(t.to(u.dtype) - s.to(u.dtype), u) * dudt, v_aux

    def compound_prediction(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, tangent: Tensor, label: Tensor | None,
        aug: Tensor | None = None, cond: Tensor | None = None,
    ) -> Tensor:
        """``V`` of ``predictions``, with ``u``'s gradient."""
        return self.predictions(model, x, s, t, tangent, label, aug, cond)[0]

    # --- the loss --------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: BaseItem) -> Tensor:
        x1 = batch.raw_target
        x_s, s, t, v = self.draw_pairs(batch)
        draws = self.draw_conditions(s == t) if self.num_conds else None
        label = self.training_labels(batch.label, s)
        dropped = None if label is None else label == self.num_classes
        wide = torch.promote_types(x1.dtype, torch.float32)
        with torch.autocast(x1.device.type, enabled=False):
            x_w, s_w, t_w = x_s.to(wide), s.to(wide), t.to(wide)
            cond = None if draws is None else self.conditions(*(d.to(wide) for d in draws))
            kept = batch.label if label is not None else None  # the label before dropping, for v_c
            tangent, v_g = self.tangent_and_guided_velocity(model, x_w, s_w, t_w, v, kept, dropped, batch.aug_label, cond)
            big_v, v_aux = self.predictions(model, x_w, s_w, t_w, tangent, label, batch.aug_label, cond)
            per_sample = (big_v - v_g).pow(2).flatten(1).sum(dim=1)  # ||V - v_g||² per sample (imf.py loss_u)
            loss = self.weighted_mean(per_sample)
            self.metrics = {"mse": per_sample.detach().mean() / x1[0].numel()}
            if v_aux is not None:  # imf.py loss_v, the same weighting, added with weight 1
                per_sample_v = (v_aux - v_g).pow(2).flatten(1).sum(dim=1)
                loss = loss + self.weighted_mean(per_sample_v)
                self.metrics["mse_v"] = per_sample_v.detach().mean() / x1[0].numel()
        return loss

    # --- sampling ----------------------------------------------------------------------

    def samplers(self, eval_cfg: DictConfig, solver_cfg: DictConfig, num_classes: int) -> dict[str, Sampler]:
        """MeanFlow's samplers; a model that takes guidance as conditions is called with them
        (``WithConditions``): ω of ``eval.guidance_scale`` and ``[lo, hi]`` of
        ``eval.guidance_interval``, null taking ``cfg_omega`` and ``cfg_interval``."""
        if not self.num_conds:
            return super().samplers(eval_cfg, solver_cfg, num_classes)
        omega = self.cfg_omega if eval_cfg.guidance_scale is None else float(eval_cfg.guidance_scale)
        interval = eval_cfg.get("guidance_interval")  # absent from configs stored before the key
        lo, hi = self.cfg_interval if interval is None else (float(interval[0]), float(interval[1]))
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"eval.guidance_interval={[lo, hi]}: expected [lo, hi] with 0 <= lo <= hi <= 1 (the s where "
                             "guidance applies, noise at 0)")
        options = {k: v for k, v in solver_cfg.items() if k != "name"}
        diagonal = DiagonalSampler(solver_cfg.name, eval_cfg.steps, fid=False, options=options)
        plain = {f"{solver_cfg.name}{eval_cfg.steps}": diagonal} | few_step_samplers(eval_cfg.meanflow_steps, eval_cfg.get("consistency_steps", []))
        return {name: with_conditions(sampler, omega, (lo, hi)) for name, sampler in plain.items()}


class WithConditions(nn.Module):
    """``model(z, y)`` as samplers call it, with the guidance conditions added per row.

    A jump (``s < t``) takes ``[ω, lo, hi]`` (``imf.py::sample_one_step``); the velocity
    ``u(x, s, s)`` takes ``[w, 0, 1]``, ``w = ω`` for ``s`` in ``[lo, hi]`` and 1 outside: what
    training fits on its ``s = t`` rows, whose interval is the whole ``[0, 1]``.
    """

    def __init__(self, model: nn.Module, omega: float, interval: tuple[float, float]) -> None:
        super().__init__()
        self.model, self.omega, self.interval = model, omega, interval

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        _, s, t = split_unified_input(z)
        (lo, hi), omega = self.interval, torch.full_like(s, self.omega)
        diagonal = s == t
        w = torch.where((s >= lo) & (s <= hi), omega, torch.ones_like(s))
        cond = torch.stack([torch.where(diagonal, w, omega), torch.where(diagonal, 0.0, torch.full_like(s, lo)),
                            torch.where(diagonal, 1.0, torch.full_like(s, hi))], dim=1)
        return self.model(z, y, cond=cond)


class Conditioned:
    """A sampler of the kind it joins (the visualizers pick jumps by kind), built from one
    of that kind, whose model is called through ``WithConditions(model, omega, interval)``."""

    def __init__(self, sampler: Sampler, omega: float, interval: tuple[float, float]) -> None:
        vars(self).update(vars(sampler))  # its settings as built (grid, solver, noise generator, ...)
        self.omega, self.interval = omega, interval

    def __call__(self, model: nn.Module, x0: Tensor, label: Tensor | None) -> Tensor:
        return super().__call__(WithConditions(model, self.omega, self.interval), x0, label)


class ConditionedDiagonalSampler(Conditioned, DiagonalSampler):
    pass


class ConditionedJumpSampler(Conditioned, JumpSampler):
    pass


class ConditionedConsistencySampler(Conditioned, ConsistencySampler):
    pass


def with_conditions(sampler: Sampler, omega: float, interval: tuple[float, float]) -> Sampler:
    """``sampler``, conditioned (``Conditioned``)."""
    conditioned = {DiagonalSampler: ConditionedDiagonalSampler, JumpSampler: ConditionedJumpSampler,
                   ConsistencySampler: ConditionedConsistencySampler}[type(sampler)]
    return conditioned(sampler, omega, interval)
