"""MeanFlow loss (Geng et al. 2025, "Mean Flows for One-step Generative Modeling").

In this project's time convention (docs/design.md: noise at 0, data at 1) the model is the
average velocity ``u(x_s, s, t)`` over ``[s, t]``. Differentiating
``(t - s) u(x_s, s, t) = ∫_s^t v(x_τ, τ) dτ`` in ``s`` gives the MeanFlow identity
(paper Eq. 6, mapped with ``t_paper = 1 - s``, ``r_paper = 1 - t``, ``u = -u_paper``):

    u(x_s, s, t) = v(x_s, s) + (t - s) · d/ds u(x_s, s, t),
    d/ds u = ∂_x u · v + ∂_s u               (paper Eq. 8: tangent (v, 1, 0))

so the regression target is ``u_tgt = sg(v + (t - s) du/ds)`` (paper Eq. 10), with
``du/ds`` one ``torch.func.jvp`` of the model on the unified input along the tangent
``v`` on the state channels, 1 on the ``s`` channel and 0 on the ``t`` channel.

The per-sample loss ``||u_θ - u_tgt||²`` (summed over dimensions) is divided by the
detached ``(loss + eps)^p`` (adaptive weighting, paper Sec. 4.3).

Guidance (paper Eq. 13 and its two-scale form, Appendix "CFG with κ"): the
velocity inside the target becomes
``ṽ = ω v + κ u(x_s, s, s | c) + (1 - ω - κ) u(x_s, s, s | ∅)`` for samples whose
label is kept (dropped labels train the null class on plain ``v``), optionally only
for ``s`` in a time interval.
"""

import warnings

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem
from models.unified_input import broadcast_time, make_unified_flow_matching_input, straight_path
from helpers_cfg import conditional_and_null, training_labels
from losses.base_loss import BaseLoss, call_model
from losses.time_sampling import make_pair_sampler
from models.jvp import JVP_MODES as PASS_MODES
from models.jvp import primal_and_tangent
from runs.machine import rewound_rng
from solvers.sampling import JumpSampler, Sampler

# torch registers its own forward-AD decompositions with torch.jit.script on the first
# jvp and warns about its own deprecated call; nothing in this project can act on it.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

JVP_MODES = ("auto", *PASS_MODES)
# ``jvp_mode=auto`` picks ``fused`` for models of at least this many parameters. With
# the layers' own forward-mode rules (models/layers.py), ``fused`` is the faster mode for
# every model measured with ``python scripts/benchmark.py`` on the CPU, with memory within
# a few percent of ``separate``; the threshold stays for devices where that may differ.
AUTO_FUSED_MIN_PARAMS = 0
# ``configs/loss/meanflow.yaml``'s law, for a loss built in code without one.
DEFAULT_TIME = {"name": "order_then_mask_rows", "ratio": 0.75, "mean": -0.4, "std": 1.0}


class MeanFlowLoss(BaseLoss):
    """The MeanFlow training loss on a batch's ``raw_source`` (noise) and ``raw_target`` (data).

    Args:
        time: the (s, t) law: ``{name: <pair sampler>, ratio, mean, std, ...}``, keys
            other than ``name`` go to ``losses/time_sampling.py::make_pair_sampler``
            (``ratio``: fraction of pairs with ``s != t``; logit-normal parameters in
            the paper's convention, noise at 1).
        p: adaptive-weight power (>= 0; 0 is the plain squared error).
        eps: adaptive-weight offset (> 0 keeps the weight finite).
        num_classes: the model's classes (0: unconditional).
        class_drop_prob: label -> null class probability.
        cfg_omega, cfg_kappa: guidance scales ω, κ (ω = 1, κ = 0: no guidance).
        cfg_interval: ``[lo, hi]`` range of ``s`` where guidance applies.
        jvp_mode: ``fused`` (one JVP whose primal output is back-propagated),
            ``separate`` (a no-grad JVP plus a separate forward), or ``auto``: chosen
            per model at the first step, see ``AUTO_FUSED_MIN_PARAMS````
    """

    passes_augment_labels = True  # call_model(..., batch.aug_label) in forward

    def __init__(
        self,
        time: dict | None = None,
        p: float = 1.0,
        eps: float = 1e-3,
        num_classes: int = 0,
        class_drop_prob: float = 0.0,
        cfg_omega: float = 1.0,
        cfg_kappa: float = 0.0,
        cfg_interval: tuple[float, float] | list[float] = (0.0, 1.0),
        jvp_mode: str = "auto",
    ) -> None:
        super().__init__()
        time = dict(DEFAULT_TIME if time is None else time)
        try:  # name the config key: the sampler does not know where its settings came from
            self.pair_sampler = make_pair_sampler(time.pop("name"), **time)
        except ValueError as err:
            raise ValueError(f"loss.time: {err}") from None
        if p < 0:
            raise ValueError(f"loss.p={p}: expected >= 0")
        if eps < 0:
            raise ValueError(f"loss.eps={eps}: expected >= 0")
        if p > 0 and eps == 0:
            raise ValueError(f"loss.eps=0 with loss.p={p}: the adaptive weight 1/(loss+eps)^p needs eps > 0")
        if not 0.0 <= class_drop_prob <= 1.0:
            raise ValueError(f"loss.class_drop_prob={class_drop_prob}: expected a probability in [0, 1]")
        guided = cfg_omega != 1.0 or cfg_kappa != 0.0
        if guided and num_classes == 0:
            raise ValueError(
                f"loss.cfg_omega={cfg_omega}, loss.cfg_kappa={cfg_kappa} ask for guidance but the model is unconditional: "
                "set model.num_classes=${dataloaders.num_classes} or drop the guidance scales"
            )
        if guided and class_drop_prob == 0.0:
            raise ValueError("guidance needs a learned null class: set loss.class_drop_prob > 0 (paper: 0.1)")
        lo, hi = cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"loss.cfg_interval={list(cfg_interval)}: expected 0 <= lo <= hi <= 1")
        if jvp_mode not in JVP_MODES:
            raise ValueError(f"loss.jvp_mode={jvp_mode!r}: expected one of {list(JVP_MODES)}")
        self.p, self.eps = p, eps
        self.num_classes, self.class_drop_prob = num_classes, class_drop_prob
        self.cfg_omega, self.cfg_kappa, self.cfg_interval = cfg_omega, cfg_kappa, (lo, hi)
        self.guided = guided
        self.jvp_mode = jvp_mode

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
        lo, hi = self.cfg_interval
        apply = (s >= lo) & (s <= hi) & ~dropped
        return torch.where(broadcast_time(apply, v), v_guided, v)

    def prediction_and_target(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, label: Tensor | None, aug: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``u_θ(x, s, t)`` (with gradient) and ``sg(v + (t - s) du/ds)`` (paper Eq. 10).

        All in float32 with autocast off: the tangent of a half-precision forward
        overflows, and the target is a difference of nearly equal terms.
        """
        wide = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for exactness tests
        v = v.to(wide)
        u, dudt = self.mean_flow_jvp(model, x, s, t, v, label, aug)
        target = v + broadcast_time(t.to(wide) - s.to(wide), v) * dudt
        return u, target.detach()

    def mean_flow_jvp(self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, tangent: Tensor, label: Tensor | None,
                      aug: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``u_θ(x, s, t)`` (with gradient) and ``du/ds`` along ``(tangent, 1, 0)`` on
        ``(x, s, t)`` (detached), in float32 (float64 for float64 inputs), autocast off.
        The one forward-mode pass of the family (iMF takes another tangent)."""
        wide = torch.promote_types(x.dtype, torch.float32)
        s, t = s.to(wide), t.to(wide)
        z = make_unified_flow_matching_input(x.to(wide), s, t)
        tangent_z = make_unified_flow_matching_input(tangent.to(wide), torch.ones_like(s), torch.zeros_like(t))

        def u_fn(z_in: Tensor) -> Tensor:  # labels and augment labels are constants of the JVP
            return call_model(model, z_in, label, aug)

        if self.jvp_mode == "auto":  # decided once, on the first model seen
            n_params = sum(p.numel() for p in model.parameters())
            self.jvp_mode = "fused" if n_params >= AUTO_FUSED_MIN_PARAMS else "separate"
        with torch.autocast(x.device.type, enabled=False):
            u, dudt = primal_and_tangent(u_fn, z, tangent_z, self.jvp_mode)
        return u.to(wide), dudt.to(wide)

    def training_pairs(self, model: nn.Module, batch: BaseItem) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """``(x_s, s, t, ṽ, label)`` of a batch: the pair times, the straight path at ``s``,
        the (guided) velocity in float32 and the training labels (dropped to the null class
        with ``class_drop_prob``)."""
        x0, x1 = batch.raw_source, batch.raw_target
        s, t = self.pair_sampler.sample(x1.shape[0], x1.device)
        x_s = straight_path(x0, x1, s)
        v = x1 - x0  # conditional velocity
        label = training_labels(batch.label, self.num_classes, self.class_drop_prob)
        dropped = None if label is None else label == self.num_classes
        v_tgt = self.guided_velocity(model, x_s, s, v.to(torch.promote_types(v.dtype, torch.float32)), label, dropped,
                                     batch.aug_label)
        return x_s, s, t, v_tgt, label

    # --- the loss --------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: BaseItem) -> Tensor:
        x1 = batch.raw_target
        x_s, s, t, v_tgt, label = self.training_pairs(model, batch)
        with torch.autocast(x1.device.type, enabled=False):
            u, u_tgt = self.prediction_and_target(model, x_s, s, t, v_tgt, label, batch.aug_label)
            per_sample = (u - u_tgt).pow(2).flatten(1).sum(dim=1)  # ||Δ||² per sample
            weight = (per_sample.detach() + self.eps).pow(-self.p) if self.p > 0 else torch.ones_like(per_sample)
            loss = (weight * per_sample).mean()
        self.metrics = {"mse": per_sample.detach().mean() / x1[0].numel()}
        return loss

    def samplers(self, eval_cfg: DictConfig, solver_cfg: DictConfig, num_classes: int) -> dict[str, Sampler]:
        """The solver on the diagonal (no FID: not what a one-step model ships) and the
        k-step jumps of ``eval.meanflow_steps`` (guidance is learned into the model, so
        they read the conditional model once per step)."""
        diagonal = super().samplers(eval_cfg, solver_cfg, num_classes)
        for sampler in diagonal.values():
            sampler.fid = False
        return diagonal | {f"meanflow{k}": JumpSampler(int(k)) for k in eval_cfg.meanflow_steps}

    def check_model(self, model: nn.Module, batch: BaseItem) -> None:
        """Fail at start-up, not mid-run, if the model cannot go through the JVP."""
        small = BaseItem(**{k: None if v is None else v[:2] for k, v in vars(batch).items()})
        try:
            with rewound_rng(small.raw_target.device):  # the probe must not shift the RNG stream
                self.forward(model, small)
        except (NotImplementedError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"loss={type(self).__name__} needs forward-mode AD through the model, which failed: {first}") from None
