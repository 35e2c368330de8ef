"""AlphaFlow loss (Zhang, Siarohin, Menapace, Vasilkovsky, Tulyakov, Qu, Skorokhodov 2025,
"AlphaFlow: Understanding and Improving MeanFlow Models", arXiv 2510.20771; reference
code snap-research/alphaflow, ``src/training/loss.py::AlphaFlowLoss``).

α-Flow replaces MeanFlow's derivative by a finite step of relative size ``α``. With
``h = t - s`` and ``dt = α h``, ``h u(x_s, s, t) = dt u(x_s, s, s + dt) + (h - dt)
u(x_{s+dt}, s + dt, t)``; the short first piece taken as the velocity and ``x_{s+dt}`` as one
Euler step give the JVP-free target of the paper's α-Flow objective (the reference's
``_compute_mean_velocity_d``, in this convention: docs/design.md, "MeanFlow in this convention")

    u_tgt = sg(α ṽ + (1 - α) u_θ(x_s + dt ṽ, s + dt, t)),       0 < α <= 1

one extra no-grad forward per pair with ``s != t``. At ``α = 1`` it is ``ṽ`` (trajectory
flow matching); as ``α -> 0``, ``u_tgt = u + α (v + h du/ds - u) + O(α²)`` tends to
MeanFlow's target, which the reference takes at ``α = 0`` (``_compute_mean_velocity_c``).

Per-sample loss (reference): ``w ||u_θ - u_tgt||²_mean / sg(||u_θ - u_tgt||²_mean + eps)``,
averaged over dimensions, ``w = α`` on pairs that take the finite-step target and 1 on the
others; the reference fixes the power at 1, ``p`` keeps MeanFlow's knob. α follows the
reference's curriculum (``scheduled_alpha``) on the buffer ``step``, which ``state_dict()``
carries, so a resumed run continues the schedule exactly.

At α = 0 the JVP runs on the pairs with ``s != t`` only: on the others MeanFlow's term
``(t - s) du/ds`` is 0 and the target is ``ṽ`` (the reference skips the rows where
``isclose(r, t)``; here exactly equal times, so the loss and its gradient are those of the
JVP on every row).

Guidance is MeanFlow's ``ṽ = ω v + κ u(x_s, s, s | c) + (1 - ω - κ) u(x_s, s, s | ∅)`` on
``s`` in ``cfg_interval``. ``class_drop``: ``independent`` drops labels as MeanFlow does
(dropped rows train on ``v``); ``alphaflow`` as the reference's ``_compute_velocity_cfg``:
only rows inside the interval, and in place, so a dropped row keeps the guided target with
its label gone, ``ω v + (1 - ω) u(x_s, s, s | ∅)``, and every later forward sees ``∅``.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem
from helpers_cfg import training_labels
from losses.base_loss import call_model
from losses.meanflow_loss import MeanFlowLoss
from models.unified_input import broadcast_time, make_unified_flow_matching_input

# ``configs/loss/alphaflow.yaml``'s law (the reference's), for a loss built in code.
DEFAULT_TIME = {"name": "alphaflow"}
SCHEDULES = ("constant", "linear", "sigmoid")
CLASS_DROPS = ("independent", "alphaflow")


def scheduled_alpha(step: int, schedule: str, start: float, end: float, start_step: int, end_step: int,
                    gamma: float, clamp: float) -> float:
    """α at optimizer step ``step`` (reference ``AlphaFlowLoss.get_ratio``; its sigmoid
    scheduler, ``infra/experiments/experiments-alphaflow.yaml``: ``α = a0 + (a1 - a0)
    σ(γ (k - k_mid) / (k_end - k_start))``), snapped to 0 below ``clamp`` and to 1 above ``1 - clamp``."""
    if schedule == "constant" or step < start_step:
        alpha = start
    elif step > end_step:
        alpha = end
    elif schedule == "linear":
        alpha = start + (end - start) * (step - start_step) / (end_step - start_step)
    else:  # sigmoid, centred between the two steps
        middle = start_step + (end_step - start_step) / 2
        alpha = start + (end - start) / (1 + math.exp(-gamma * (step - middle) / (end_step - start_step)))
    if alpha < clamp:
        return 0.0
    if alpha > 1 - clamp:
        return 1.0
    return alpha


@dataclass(eq=False, kw_only=True)
class AlphaFlowLoss(MeanFlowLoss):
    """The α-Flow loss with its curriculum on a batch's ``raw_source`` / ``raw_target``:
    MeanFlow's fields (``eps`` on the dimension-averaged error; the JVP runs only once
    α = 0), then the schedule's."""

    alpha_schedule: str = "sigmoid"  # sigmoid (the reference's curriculum) | linear | constant
    alpha_start: float = 1.0  # α before alpha_start_step
    alpha_end: float = 0.0  # α after alpha_end_step
    alpha_start_step: int = 0  # the schedule runs from this optimizer step ...
    alpha_end_step: int = 400_000  # ... to this one (set it to the run's optimizer steps)
    alpha_gamma: float = 25.0  # sigmoid sharpness (reference: 25)
    alpha_clamp: float = 0.005  # α below it is 0 (MeanFlow's JVP target), above 1 - alpha_clamp 1
    clamp_target: float | None = None  # clip the finite-step target to [-c, c] (reference clamp_utgt); None: off
    class_drop: str = "independent"  # independent (MeanFlow's) | alphaflow (inside cfg_interval, in place: the reference's)

    default_time = DEFAULT_TIME

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha_schedule not in SCHEDULES:
            raise ValueError(f"loss.alpha_schedule={self.alpha_schedule!r}: expected one of {list(SCHEDULES)}")
        for key in ("alpha_start", "alpha_end"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"loss.{key}={getattr(self, key)}: expected α in [0, 1]")
        if self.alpha_schedule != "constant" and not 0 <= self.alpha_start_step < self.alpha_end_step:
            raise ValueError(f"loss.alpha_start_step={self.alpha_start_step}, loss.alpha_end_step={self.alpha_end_step}: "
                             "expected 0 <= start < end (set alpha_end_step to the run's optimizer steps)")
        if not 0.0 <= self.alpha_clamp < 0.5:
            raise ValueError(f"loss.alpha_clamp={self.alpha_clamp}: expected a value in [0, 0.5)")
        if self.clamp_target is not None and not self.clamp_target > 0:
            raise ValueError(f"loss.clamp_target={self.clamp_target}: expected a positive bound or null")
        if self.class_drop not in CLASS_DROPS:
            raise ValueError(f"loss.class_drop={self.class_drop!r}: expected one of {list(CLASS_DROPS)}")
        # optimizer steps taken with this loss: the schedule's clock, saved in state_dict()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def alpha(self, step: int | None = None) -> float:
        """α at ``step`` (default: this loss's own step count)."""
        return scheduled_alpha(int(self.step) if step is None else step, self.alpha_schedule, self.alpha_start,
                               self.alpha_end, self.alpha_start_step, self.alpha_end_step, self.alpha_gamma,
                               self.alpha_clamp)

    # --- labels and guidance -----------------------------------------------------------

    def training_labels(self, label: Tensor | None, s: Tensor) -> Tensor | None:
        """``alphaflow``: each row inside ``cfg_interval`` dropped with probability
        ``class_drop_prob`` (one draw per row, as the reference)."""
        within = self.in_interval(s) if self.class_drop == "alphaflow" else None
        return training_labels(label, self.num_classes, self.class_drop_prob, within=within)

    def guided_rows(self, s: Tensor, dropped: Tensor) -> Tensor:
        """``alphaflow``: every row in the interval, dropped ones included (their label is
        already ∅, so ``ṽ = ω v + (1 - ω) u(∅)``)."""
        return self.in_interval(s) if self.class_drop == "alphaflow" else super().guided_rows(s, dropped)

    # --- the target ------------------------------------------------------------------

    @torch.no_grad()
    def finite_step_target(self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, label: Tensor | None,
                           alpha: float, aug: Tensor | None = None) -> Tensor:
        """``α ṽ + (1 - α) u_θ(x + dt ṽ, s + dt, t)`` with ``dt = α (t - s)`` (no gradient;
        the reference's ``(dt ṽ + (t - s - dt) u_next) / (t - s)``), optionally clipped."""
        if alpha == 1.0:  # the reference skips the forward: its weight is 0
            target = v
        else:
            dt = alpha * (t - s)
            z_next = make_unified_flow_matching_input(x + broadcast_time(dt, x) * v, s + dt, t)
            u_next = call_model(model, z_next, label, aug).to(v.dtype)
            target = alpha * v + (1 - alpha) * u_next
        if self.clamp_target is not None:
            target = target.clamp(-self.clamp_target, self.clamp_target)
        return target

    def prediction_target_weight(self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, label: Tensor | None,
                                 alpha: float, aug: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``u_θ(x, s, t)`` (with gradient), its target and the per-sample weight numerator."""
        if alpha == 0.0:  # MeanFlow's JVP target on every pair (ṽ itself where s = t)
            u, target = self.jvp_where_distinct(model, x, s, t, v, label, aug)
            return u, target, torch.ones_like(s)
        wide = torch.promote_types(x.dtype, torch.float32)
        x, s, t, v = x.to(wide), s.to(wide), t.to(wide), v.to(wide)
        distinct = s != t
        target, weight = v.clone(), torch.ones_like(s)
        if bool(distinct.any()):
            sub, sub_aug = (None if c is None else c[distinct] for c in (label, aug))
            target[distinct] = self.finite_step_target(model, x[distinct], s[distinct], t[distinct], v[distinct], sub, alpha,
                                                       sub_aug)
            weight = torch.where(distinct, torch.full_like(s, alpha), weight)
        u = call_model(model, make_unified_flow_matching_input(x, s, t), label, aug).to(wide)
        return u, target, weight

    def jvp_where_distinct(self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, label: Tensor | None,
                           aug: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """MeanFlow's ``prediction_and_target`` with the JVP on the rows with ``s != t``
        only; the others take a plain forward and the target ``ṽ``, which is what the
        JVP gives there (its term is multiplied by ``t - s = 0``)."""
        wide = torch.promote_types(x.dtype, torch.float32)
        x, s, t, v = x.to(wide), s.to(wide), t.to(wide), v.to(wide)
        equal = s == t
        rows_jvp, rows_fm = (~equal).nonzero().squeeze(1), equal.nonzero().squeeze(1)
        if rows_fm.numel() == 0:
            return self.prediction_and_target(model, x, s, t, v, label, aug)

        def rows(c: Tensor | None, index: Tensor) -> Tensor | None:
            return None if c is None else c[index]

        z_fm = make_unified_flow_matching_input(x[rows_fm], s[rows_fm], t[rows_fm])
        u_fm = call_model(model, z_fm, rows(label, rows_fm), rows(aug, rows_fm)).to(wide)
        u = torch.zeros_like(v).index_copy(0, rows_fm, u_fm)
        target = v
        if rows_jvp.numel() > 0:
            u_jvp, target_jvp = self.prediction_and_target(model, x[rows_jvp], s[rows_jvp], t[rows_jvp], v[rows_jvp],
                                                           rows(label, rows_jvp), rows(aug, rows_jvp))
            u, target = u.index_copy(0, rows_jvp, u_jvp), target.index_copy(0, rows_jvp, target_jvp)
        return u, target.detach()

    # --- the loss --------------------------------------------------------------------

    def loss_at(self, model: nn.Module, batch: BaseItem, alpha: float) -> Tensor:
        """The loss of ``batch`` at a given α (``forward`` takes α from the schedule)."""
        x_s, s, t, v_tgt, label = self.training_pairs(model, batch)
        with torch.autocast(batch.raw_target.device.type, enabled=False):
            u, target, numerator = self.prediction_target_weight(model, x_s, s, t, v_tgt, label, alpha, batch.aug_label)
            per_sample = (u - target).pow(2).flatten(1).mean(dim=1)  # reference: mean over dimensions
            weight = numerator / (per_sample.detach() + self.eps).pow(self.p) if self.p > 0 else numerator
            loss = (weight * per_sample).mean()
        self.metrics = {"mse": per_sample.detach().mean(), "alpha": torch.tensor(alpha)}
        return loss

    def forward(self, model: nn.Module, batch: BaseItem) -> Tensor:
        loss = self.loss_at(model, batch, self.alpha())
        if model.training:  # one optimizer step: advance the schedule's clock
            self.step += 1
        return loss

    def probe(self, model: nn.Module, batch: BaseItem) -> None:
        """What ``check_model`` runs: the JVP the curriculum reaches at its end, and today's
        α; ``loss_at`` leaves the step count alone."""
        self.loss_at(model, batch, 0.0)
        self.loss_at(model, batch, self.alpha())
