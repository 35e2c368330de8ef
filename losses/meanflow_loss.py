"""MeanFlow loss (Geng et al. 2025, "Mean Flows for One-step Generative Modeling").

The model is the average velocity ``u(x_s, s, t)`` over ``[s, t]`` (docs/design.md, "MeanFlow
in this convention": ``t_paper = 1 - s``, ``r_paper = 1 - t``, ``u = -u_paper``).
Differentiating ``(t - s) u(x_s, s, t) = ∫_s^t v(x_τ, τ) dτ`` in ``s`` gives the MeanFlow
identity (paper Eq. 6) and the target (Eq. 10):

    u(x_s, s, t) = v(x_s, s) + (t - s) · d/ds u(x_s, s, t),
    d/ds u = ∂_x u · v + ∂_s u                 (Eq. 8: one JVP along (v, 1, 0) on (x, s, t))
    u_tgt = sg(v + (t - s) du/ds)

The per-sample ``||u_θ - u_tgt||²`` (summed over dimensions) is divided by
``sg(||u_θ - u_tgt||² + eps)^p`` (adaptive weighting, Sec. 4.3). Guidance (Eq. 13 and
Appendix "CFG with κ"): for kept labels with ``s`` in ``cfg_interval``, ``v`` becomes
``ṽ = ω v + κ u(x_s, s, s | c) + (1 - ω - κ) u(x_s, s, s | ∅)``; dropped labels train the
null class on ``v``.
"""

import warnings
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem
from helpers_cfg import conditional_and_null, training_labels
from losses.base_loss import BaseLoss, call_model
from losses.time_sampling import make_pair_sampler
from models.jvp import JVP_MODES, primal_and_tangent
from models.unified_input import broadcast_time, make_unified_flow_matching_input, straight_path
from runs.machine import rewound_rng
from solvers.sampling import Sampler, few_step_samplers

# torch registers its own forward-AD decompositions with torch.jit.script on the first
# jvp and warns about its own deprecated call; nothing in this project can act on it.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

# ``configs/loss/meanflow.yaml``'s law, for a loss built in code without one.
DEFAULT_TIME = {"name": "order_then_mask_rows", "ratio": 0.75, "mean": -0.4, "std": 1.0}


@dataclass(eq=False, kw_only=True)  # eq=False: a module hashes by identity
class MeanFlowLoss(BaseLoss):
    """The MeanFlow loss on a batch's ``raw_source`` (noise) and ``raw_target`` (data).

    Its fields are its constructor's arguments and the keys of ``configs/loss/meanflow.yaml``;
    ``IMFLoss`` and ``AlphaFlowLoss`` add theirs to the same list.
    """

    time: dict | None = None  # (s, t) law {name: <pair sampler>, ...} (losses/time_sampling.py); None: default_time
    p: float = 1.0  # adaptive-weight power (0: the plain squared error)
    eps: float = 1e-3  # adaptive-weight offset (> 0 keeps the weight finite)
    num_classes: int = 0  # the model's classes (0: unconditional)
    class_drop_prob: float = 0.0  # label -> null class probability
    cfg_omega: float = 1.0  # guidance scale ω (ω = 1, κ = 0: no guidance)
    cfg_kappa: float = 0.0  # guidance scale κ
    cfg_interval: tuple[float, float] | list[float] = (0.0, 1.0)  # [lo, hi]: the s where guidance applies
    jvp_mode: str = "auto"  # fused (one JVP, primal back-propagated) | separate (no-grad JVP + forward) | auto: fused

    default_time = DEFAULT_TIME  # the law of a loss built in code without one
    passes_augment_labels = True  # call_model(..., batch.aug_label) in forward

    def __post_init__(self) -> None:
        super().__init__()  # nn.Module's own state; the dataclass has set the plain fields
        time = dict(self.default_time if self.time is None else self.time)
        try:  # name the config key: the sampler does not know where its settings came from
            self.pair_sampler = make_pair_sampler(time.pop("name"), **time)
        except ValueError as err:
            raise ValueError(f"loss.time: {err}") from None
        if self.p < 0:
            raise ValueError(f"loss.p={self.p}: expected >= 0")
        if self.eps < 0:
            raise ValueError(f"loss.eps={self.eps}: expected >= 0")
        if self.p > 0 and self.eps == 0:
            raise ValueError(f"loss.eps=0 with loss.p={self.p}: the adaptive weight 1/(loss+eps)^p needs eps > 0")
        if not 0.0 <= self.class_drop_prob <= 1.0:
            raise ValueError(f"loss.class_drop_prob={self.class_drop_prob}: expected a probability in [0, 1]")
        self.guided = self.cfg_omega != 1.0 or self.cfg_kappa != 0.0
        if self.guided and self.num_classes == 0:
            raise ValueError(
                f"loss.cfg_omega={self.cfg_omega}, loss.cfg_kappa={self.cfg_kappa} ask for guidance but the model is "
                "unconditional: set model.num_classes=${dataloaders.num_classes} or drop the guidance scales"
            )
        if self.guided and self.class_drop_prob == 0.0:
            raise ValueError("guidance needs a learned null class: set loss.class_drop_prob > 0 (paper: 0.1)")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"loss.cfg_interval={list(self.cfg_interval)}: expected 0 <= lo <= hi <= 1")
        self.cfg_interval = (lo, hi)
        if self.jvp_mode not in ("auto", *JVP_MODES):
            raise ValueError(f"loss.jvp_mode={self.jvp_mode!r}: expected one of {['auto', *JVP_MODES]}")
        if self.jvp_mode == "auto":  # the configs' default: the mode scripts/benchmark.py finds faster
            self.jvp_mode = "fused"

    # --- the target ------------------------------------------------------------------

    def guided_velocity(self, model: nn.Module, x: Tensor, s: Tensor, v: Tensor, label: Tensor | None, dropped: Tensor | None,
                        aug: Tensor | None = None) -> Tensor:
        """``ṽ`` of the module docstring (no gradient); plain ``v`` when unguided."""
        if not self.guided or label is None:
            return v
        with torch.no_grad():
            z = make_unified_flow_matching_input(x, s, s)
            u_cond, u_null = conditional_and_null(model, z, label, self.num_classes, aug)
            u_cond, u_null = u_cond.to(v.dtype), u_null.to(v.dtype)
        v_guided = self.cfg_omega * v + self.cfg_kappa * u_cond + (1 - self.cfg_omega - self.cfg_kappa) * u_null
        return torch.where(broadcast_time(self.guided_rows(s, dropped), v), v_guided, v)

    def in_interval(self, s: Tensor) -> Tensor:
        """(B,) bool: the rows whose ``s`` lies in ``cfg_interval``."""
        lo, hi = self.cfg_interval
        return (s >= lo) & (s <= hi)

    def guided_rows(self, s: Tensor, dropped: Tensor) -> Tensor:
        """(B,) bool: the rows that take ``ṽ``: kept labels in ``cfg_interval`` (dropped
        ones train the null class on ``v``)."""
        return self.in_interval(s) & ~dropped

    def prediction_and_target(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, label: Tensor | None, aug: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``u_θ(x, s, t)`` (with gradient) and ``sg(v + (t - s) du/ds)`` (paper Eq. 10)."""
        wide = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for exactness tests
        v = v.to(wide)
        u, dudt = self.mean_flow_jvp(model, x, s, t, v, label, aug)
        target = v + broadcast_time(t.to(wide) - s.to(wide), v) * dudt
        return u, target.detach()

    def mean_flow_jvp(self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, tangent: Tensor, label: Tensor | None,
                      aug: Tensor | None = None, cond: Tensor | None = None, head: str = "u") -> tuple:
        """``u_θ(x, s, t)`` (with gradient) and ``du/ds`` along ``(tangent, 1, 0)`` (detached);
        pairs ``(u, v)``, ``(du/ds, dv/ds)`` for ``head="both"``.

        Float32 (float64 for float64 inputs) with autocast off: the tangent of a
        half-precision forward overflows, and the target is a difference of nearly equal terms.
        """
        wide = torch.promote_types(x.dtype, torch.float32)
        s, t = s.to(wide), t.to(wide)
        z = make_unified_flow_matching_input(x.to(wide), s, t)
        tangent_z = make_unified_flow_matching_input(tangent.to(wide), torch.ones_like(s), torch.zeros_like(t))

        def u_fn(z_in: Tensor) -> Tensor | tuple[Tensor, Tensor]:  # labels, aug labels, conditions: JVP constants
            return call_model(model, z_in, label, aug, cond, head)

        with torch.autocast(x.device.type, enabled=False):
            out, d_out = primal_and_tangent(u_fn, z, tangent_z, self.jvp_mode)
        if head == "both":
            return tuple(o.to(wide) for o in out), tuple(d.to(wide) for d in d_out)
        return out.to(wide), d_out.to(wide)

    def draw(self, batch: BaseItem) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """``(x_s, s, t, v, label)``: ``draw_pairs``, then the labels after dropping."""
        x_s, s, t, v = self.draw_pairs(batch)
        return x_s, s, t, v, self.training_labels(batch.label, s)

    def draw_pairs(self, batch: BaseItem) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x_s, s, t, v)``: the pair times, the straight path at ``s`` and the conditional
        velocity ``x_1 - x_0`` (float32 or wider)."""
        x0, x1 = batch.raw_source, batch.raw_target
        s, t = self.pair_sampler.sample(x1.shape[0], x1.device)
        v = x1 - x0
        v = v.to(torch.promote_types(v.dtype, torch.float32))
        return straight_path(x0, x1, s), s, t, v

    def training_labels(self, label: Tensor | None, s: Tensor) -> Tensor | None:
        """The labels after dropping: each row with probability ``class_drop_prob``."""
        return training_labels(label, self.num_classes, self.class_drop_prob)

    def training_pairs(self, model: nn.Module, batch: BaseItem) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """``draw`` with the guided velocity ``ṽ`` in place of ``v``."""
        x_s, s, t, v, label = self.draw(batch)
        dropped = None if label is None else label == self.num_classes
        return x_s, s, t, self.guided_velocity(model, x_s, s, v, label, dropped, batch.aug_label), label

    # --- the loss --------------------------------------------------------------------

    def weighted_mean(self, per_sample: Tensor) -> Tensor:
        """The batch mean of ``per_sample / sg(per_sample + eps)^p`` (paper Sec. 4.3)."""
        weight = (per_sample.detach() + self.eps).pow(-self.p) if self.p > 0 else torch.ones_like(per_sample)
        return (weight * per_sample).mean()

    def forward(self, model: nn.Module, batch: BaseItem) -> Tensor:
        x1 = batch.raw_target
        x_s, s, t, v_tgt, label = self.training_pairs(model, batch)
        with torch.autocast(x1.device.type, enabled=False):
            u, u_tgt = self.prediction_and_target(model, x_s, s, t, v_tgt, label, batch.aug_label)
            per_sample = (u - u_tgt).pow(2).flatten(1).sum(dim=1)  # ||Δ||² per sample
            loss = self.weighted_mean(per_sample)
        self.metrics = {"mse": per_sample.detach().mean() / x1[0].numel()}
        return loss

    def samplers(self, eval_cfg: DictConfig, solver_cfg: DictConfig, num_classes: int) -> dict[str, Sampler]:
        """The solver on the diagonal (no FID: not what a one-step model ships) and the
        k-step jumps of ``eval.meanflow_steps`` (guidance is trained into the model, so a
        jump reads the conditional model once)."""
        diagonal = super().samplers(eval_cfg, solver_cfg, num_classes)
        for sampler in diagonal.values():
            sampler.fid = False
        return diagonal | few_step_samplers(eval_cfg.meanflow_steps, eval_cfg.get("consistency_steps", []))

    def check_model(self, model: nn.Module, batch: BaseItem) -> None:
        """Fail at start-up, not mid-run, if the model cannot go through the JVP."""
        small = BaseItem(**{k: None if v is None else v[:2] for k, v in vars(batch).items()})
        try:
            with rewound_rng(small.raw_target.device):  # the probe must not shift the RNG stream
                self.probe(model, small)
        except (NotImplementedError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"loss={type(self).__name__} needs forward-mode AD through the model, which failed: {first}") from None

    def probe(self, model: nn.Module, batch: BaseItem) -> None:
        """What ``check_model`` runs: one loss."""
        self.forward(model, batch)
