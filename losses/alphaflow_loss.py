"""AlphaFlow loss (Zhang, Siarohin, Menapace, Vasilkovsky, Tulyakov, Qu, Skorokhodov 2025,
"AlphaFlow: Understanding and Improving MeanFlow Models", arXiv 2510.20771; reference
code snap-research/alphaflow, ``src/training/loss.py::AlphaFlowLoss``).

The α-Flow family replaces MeanFlow's derivative by a finite step of relative size
``α`` along the interval. With ``h = t - s`` and ``dt = α h``, the mean velocity over
``[s, t]`` splits into the first ``dt`` of it and the rest:
``h u(x_s, s, t) = dt u(x_s, s, s + dt) + (h - dt) u(x_{s+dt}, s + dt, t)``. Replacing the
short first piece by the velocity and ``x_{s+dt}`` by one Euler step gives the
JVP-free target of the paper's α-Flow objective (the reference's
``_compute_mean_velocity_d``, written in this convention: ``t_p = 1 - s``, ``r_p = 1 - t``,
``u = -u_p``, docs/design.md)

    u_tgt = sg(α ṽ + (1 - α) u_θ(x_s + dt ṽ, s + dt, t)),       0 < α <= 1

one extra no-grad forward per pair with ``s != t``. Its limits:

- ``α = 1``: ``u_tgt = ṽ``, trajectory flow matching (no extra forward);
- ``α -> 0``: ``u_tgt = u + α (v + h du/ds - u) + O(α²)``, so ``(u_tgt - u)/α + u`` tends
  to MeanFlow's target ``v + h du/ds`` and the loss to MeanFlow's; at ``α = 0`` the
  reference switches to MeanFlow's JVP target (``_compute_mean_velocity_c``). The
  schedule snaps α to 0 below ``alpha_clamp`` (and to 1 above ``1 - alpha_clamp``).

Per-sample loss (reference): ``w ||u_θ - u_tgt||²_mean / sg(||u_θ - u_tgt||²_mean + eps)``,
the squared error averaged over dimensions, ``w = α`` on pairs with ``s != t`` that take
the finite-step target and ``w = 1`` on the others (pairs with ``s = t``, and every pair
once α = 0). Its power is fixed at 1 in the reference; ``p`` keeps MeanFlow's knob.

The curriculum (reference ``get_ratio``, the sigmoid scheduler of its
``infra/experiments/experiments-alphaflow.yaml``): from ``alpha_start`` (1) to
``alpha_end`` (0) between steps ``alpha_start_step`` and ``alpha_end_step``,
``α = a0 + (a1 - a0) σ(γ (k - k_mid) / (k_end - k_start))``, γ = 25.

The step ``k`` is a buffer of this module (``step``), counted by every forward with the
model in training mode, so ``loss.state_dict()`` carries it: a checkpoint that saves and
restores it resumes the schedule exactly.

Guidance and label dropping are MeanFlow's (``losses/meanflow_loss.py``): ṽ mixes ω v,
κ u(c) and (1 - ω - κ) u(∅) inside the interval, dropped labels train on plain v. (The
reference drops labels only inside its guidance interval; with its non-guided presets,
label_dropout 0, the two agree.)
"""

import math

import torch
from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem
from models.unified_input import broadcast_time, make_unified_flow_matching_input
from losses.base_loss import call_model
from losses.meanflow_loss import MeanFlowLoss
from runs.machine import rewound_rng

SCHEDULES = ("constant", "linear", "sigmoid")


def scheduled_alpha(step: int, schedule: str, start: float, end: float, start_step: int, end_step: int,
                    gamma: float, clamp: float) -> float:
    """α at optimizer step ``step`` (reference ``AlphaFlowLoss.get_ratio``), snapped to
    0 below ``clamp`` and to 1 above ``1 - clamp``."""
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


class AlphaFlowLoss(MeanFlowLoss):
    """The α-Flow loss with its curriculum on a batch's ``raw_source`` / ``raw_target``.

    Args:
        time: the (s, t) law: ``{name: alphaflow, ratio, mean, std, fm_mean, fm_std}``
            (the reference's) or any pair sampler of ``losses/time_sampling.py``.
        alpha_schedule: ``sigmoid`` (the reference's curriculum), ``linear`` or ``constant``.
        alpha_start, alpha_end: α before ``alpha_start_step`` and after ``alpha_end_step``.
        alpha_start_step, alpha_end_step: the optimizer steps the schedule runs between.
        alpha_gamma: sigmoid sharpness (reference: 25).
        alpha_clamp: α below it is 0 (MeanFlow's JVP target), above ``1 - alpha_clamp`` 1.
        clamp_target: clip the finite-step target to ``[-c, c]`` (reference ``clamp_utgt``;
            null: no clipping).
        p, eps: adaptive weight ``1/(loss + eps)^p`` on the dimension-averaged error.
        num_classes, class_drop_prob, cfg_omega, cfg_kappa, cfg_interval, jvp_mode: as
            ``MeanFlowLoss`` (the JVP runs only once α = 0).
    """

    passes_augment_labels = True  # call_model(..., batch.aug_label) in every forward

    def __init__(
        self,
        time: dict | None = None,
        alpha_schedule: str = "sigmoid",
        alpha_start: float = 1.0,
        alpha_end: float = 0.0,
        alpha_start_step: int = 0,
        alpha_end_step: int = 400_000,
        alpha_gamma: float = 25.0,
        alpha_clamp: float = 0.005,
        clamp_target: float | None = None,
        p: float = 1.0,
        eps: float = 1e-3,
        num_classes: int = 0,
        class_drop_prob: float = 0.0,
        cfg_omega: float = 1.0,
        cfg_kappa: float = 0.0,
        cfg_interval: tuple[float, float] | list[float] = (0.0, 1.0),
        jvp_mode: str = "auto",
    ) -> None:
        super().__init__(time={"name": "alphaflow"} if time is None else time, p=p, eps=eps, num_classes=num_classes,
                         class_drop_prob=class_drop_prob, cfg_omega=cfg_omega, cfg_kappa=cfg_kappa,
                         cfg_interval=cfg_interval, jvp_mode=jvp_mode)
        if alpha_schedule not in SCHEDULES:
            raise ValueError(f"loss.alpha_schedule={alpha_schedule!r}: expected one of {list(SCHEDULES)}")
        for key, value in (("alpha_start", alpha_start), ("alpha_end", alpha_end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"loss.{key}={value}: expected α in [0, 1]")
        if alpha_schedule != "constant" and not 0 <= alpha_start_step < alpha_end_step:
            raise ValueError(f"loss.alpha_start_step={alpha_start_step}, loss.alpha_end_step={alpha_end_step}: "
                             "expected 0 <= start < end (set alpha_end_step to the run's optimizer steps)")
        if not 0.0 <= alpha_clamp < 0.5:
            raise ValueError(f"loss.alpha_clamp={alpha_clamp}: expected a value in [0, 0.5)")
        if clamp_target is not None and not clamp_target > 0:
            raise ValueError(f"loss.clamp_target={clamp_target}: expected a positive bound or null")
        self.schedule = (alpha_schedule, alpha_start, alpha_end, alpha_start_step, alpha_end_step, alpha_gamma, alpha_clamp)
        self.clamp_target = clamp_target
        # optimizer steps taken with this loss: the schedule's clock, saved in state_dict()
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def alpha(self, step: int | None = None) -> float:
        """α at ``step`` (default: this loss's own step count)."""
        return scheduled_alpha(int(self.step) if step is None else step, *self.schedule)

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
            u, target = self.prediction_and_target(model, x, s, t, v, label, aug)
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

    def check_model(self, model: nn.Module, batch: BaseItem) -> None:
        """Fail at start-up if the model cannot go through the JVP that the curriculum
        reaches at its end; the probe leaves the step count and the RNG as they were."""
        small = BaseItem(**{k: None if v is None else v[:2] for k, v in vars(batch).items()})
        try:
            with rewound_rng(small.raw_target.device):
                self.loss_at(model, small, 0.0)
                self.loss_at(model, small, self.alpha())
        except (NotImplementedError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"loss={type(self).__name__} needs forward-mode AD through the model, which failed: {first}") from None
