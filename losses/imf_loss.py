"""Improved MeanFlow loss (Geng, Lu, Wu, Shechtman, Kolter, He 2025, "Improved Mean Flows:
On the Challenges of Fastforward Generative Models", arXiv 2512.02012; reference code
Lyy-iiis/imeanflow, ``imf.py::iMeanFlow.forward``).

MeanFlow regresses ``u`` on a target built from the network's own derivative. iMF
rewrites the same identity as a regression of a *velocity* (the paper's "v-loss"): the
MeanFlow identity ``v = u + (t_p - r_p) du/dt_p`` (paper convention, noise at 1) says
that the compound function

    V_θ = u_θ + (t_p - r_p) · sg(du_θ/dt_p)

is an estimate of the instantaneous velocity, so it is regressed on the (guided)
velocity ``v_g`` with an adaptive weight. In this project's convention (docs/design.md:
``t_p = 1 - s``, ``r_p = 1 - t``, ``u = -u_p``, and ``du/ds = du_p/dt_p``) that is

    V_θ(x_s, s, t) = u_θ(x_s, s, t) - (t - s) · sg(d/ds u_θ(x_s, s, t)),
    L = ||V_θ - sg(v_g)||² / sg(||V_θ - v_g||² + eps)^p          (summed over dimensions)

and, since only ``u_θ`` carries a gradient, ``L`` is MeanFlow's loss with the target
``sg(v_g + (t - s) du/ds)``. What changes against MeanFlow:

- the tangent of the JVP: ``d/ds u = ∂_x u · v_c + ∂_s u``, along the model's OWN
  predicted instantaneous velocity ``v_c = u_θ(x_s, s, s | c)`` (no gradient) instead
  of the conditional ``x_1 - x_0`` (``imf.py``: ``jax.jvp(u_fn, (z_t, t, r), (v_c, 1, 0))``,
  "different from original MeanFlow, we use predicted v in the jvp"). The marginal
  velocity, which the identity is about, is what ``v_c`` estimates; ``x_1 - x_0`` is a
  one-sample estimate of it. ``tangent: conditional`` gives MeanFlow's tangent back
  (an ablation; with it this loss is MeanFlow's).
- guidance in iMF's form (``imf.py::guidance_fn``): ``v_g = v + (1 - 1/ω)(v_c - v_u)``
  with ``v_c``, ``v_u`` the model's conditional and null velocities. The model learns the
  guided field, so its conditional output is already guided; ``(v_c - v_u) / ω`` is the
  unguided class direction and ``v_g`` adds ``(ω - 1)`` of it to the sample's velocity.
  Pairs with ``s = t`` are guided at every time, the others only inside the interval;
  dropped labels (null class) train on plain ``v``. iMF samples ω and the interval per
  sample and gives them to the network as conditions; the models here take only
  ``[x, s, t]`` and a label, so ω and the interval are fixed training settings, as in
  MeanFlow's training-time guidance.
- the (s, t) law: ``imeanflow`` in ``losses/time_sampling.py`` (half the batch with
  ``s = t``, logit-normal(-0.4, 1.0)), eps = 0.01, p = 1 (``configs/default.py``).

Not here: iMF's auxiliary velocity head (a second output of the network, trained with
the same weighted v-loss at ``s = t``-free inputs, ``loss_v``) needs a model with two
outputs; the models here have one.
"""

import torch
from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem
from models.unified_input import broadcast_time, make_unified_flow_matching_input, straight_path
from helpers_cfg import conditional_and_null, training_labels
from losses.base_loss import call_model
from losses.meanflow_loss import MeanFlowLoss

# ``configs/loss/imf.yaml``'s law (Lyy-iiis/imeanflow configs/default.py), for a loss built in code.
DEFAULT_TIME = {"name": "imeanflow", "ratio": 0.5, "mean": -0.4, "std": 1.0}
TANGENTS = ("predicted", "conditional")


class IMFLoss(MeanFlowLoss):
    """The iMF v-loss on a batch's ``raw_source`` (noise) and ``raw_target`` (data).

    Args:
        time: the (s, t) law (``losses/time_sampling.py``; default ``imeanflow``).
        p: adaptive-weight power (the reference's ``norm_p``).
        eps: adaptive-weight offset (the reference's ``norm_eps``).
        num_classes: the model's classes (0: unconditional).
        class_drop_prob: label -> null class probability (reference: 0.1).
        cfg_omega: guidance scale ω (1: no guidance); iMF's form, see the module docstring.
        cfg_interval: ``[lo, hi]`` range of ``s`` where pairs with ``s != t`` are guided
            (iMF: ``t_p`` in ``[t_min, t_max]``, i.e. ``s`` in ``[1 - t_max, 1 - t_min]``).
        tangent: ``predicted`` (iMF: the model's own ``u(x_s, s, s | c)``) or
            ``conditional`` (MeanFlow's ``x_1 - x_0``).
        jvp_mode: ``fused`` | ``separate`` | ``auto`` (``losses/meanflow_loss.py``).
    """

    passes_augment_labels = True  # call_model(..., batch.aug_label) in every forward

    def __init__(
        self,
        time: dict | None = None,
        p: float = 1.0,
        eps: float = 0.01,
        num_classes: int = 0,
        class_drop_prob: float = 0.0,
        cfg_omega: float = 1.0,
        cfg_interval: tuple[float, float] | list[float] = (0.0, 1.0),
        tangent: str = "predicted",
        jvp_mode: str = "auto",
    ) -> None:
        super().__init__(
            time=dict(DEFAULT_TIME if time is None else time), p=p, eps=eps, num_classes=num_classes,
            class_drop_prob=class_drop_prob, cfg_omega=cfg_omega, cfg_kappa=0.0, cfg_interval=cfg_interval,
            jvp_mode=jvp_mode,
        )
        if cfg_omega < 1.0:
            raise ValueError(f"loss.cfg_omega={cfg_omega}: iMF's guidance v + (1 - 1/ω)(v_c - v_u) expects ω >= 1")
        if tangent not in TANGENTS:
            raise ValueError(f"loss.tangent={tangent!r}: expected one of {list(TANGENTS)}")
        self.tangent = tangent

    # --- the velocities ----------------------------------------------------------------

    @torch.no_grad()
    def tangent_and_guided_velocity(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, label: Tensor | None, dropped: Tensor | None,
        aug: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(v_c, v_g)``: the JVP's state tangent and the regression target (no gradient).

        ``label`` is the label before dropping: iMF computes ``v_c`` with it for every
        sample (``imf.py`` calls ``guidance_fn`` before ``cond_drop``), and the dropped
        samples' target falls back to ``v``.
        """
        z_diag = make_unified_flow_matching_input(x, s, s)
        if self.guided:  # one batched forward gives v_c and v_u
            v_c, v_u = (out.to(v.dtype) for out in conditional_and_null(model, z_diag, label, self.num_classes, aug))
        elif self.tangent == "predicted":
            v_c, v_u = call_model(model, z_diag, label, aug).to(v.dtype), None
        else:  # MeanFlow's tangent, nothing to evaluate
            v_c, v_u = None, None
        if v_u is None:
            return (v_c if self.tangent == "predicted" else v), v
        lo, hi = self.cfg_interval
        # pairs with s = t are guided everywhere (imf.py: v_g_fm has no interval)
        apply = ((s >= lo) & (s <= hi)) | (s == t)
        v_guided = v + (1 - 1 / self.cfg_omega) * (v_c - v_u)  # imf.py::guidance_fn
        v_g = torch.where(broadcast_time(apply & ~dropped, v), v_guided, v)
        return (v_c if self.tangent == "predicted" else v_g), v_g  # conditional: MeanFlow's guided tangent

    def compound_prediction(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, tangent: Tensor, label: Tensor | None,
        aug: Tensor | None = None,
    ) -> Tensor:
        """``V = u_θ(x, s, t) - (t - s) sg(du/ds)`` along ``(tangent, 1, 0)`` on ``(x, s, t)``
        (the paper's ``V = u + (t - r) sg(du/dt)``), with ``u``'s gradient; float32 (or
        float64), autocast off, as MeanFlow's target."""
        u, dudt = self.mean_flow_jvp(model, x, s, t, tangent, label, aug)
        return u - broadcast_time(t.to(u.dtype) - s.to(u.dtype), u) * dudt

    # --- the loss --------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: BaseItem) -> Tensor:
        x0, x1 = batch.raw_source, batch.raw_target
        n, device = x1.shape[0], x1.device
        s, t = self.pair_sampler.sample(n, device)
        x_s = straight_path(x0, x1, s)
        wide = torch.promote_types(x1.dtype, torch.float32)
        v = (x1 - x0).to(wide)  # conditional velocity
        label = training_labels(batch.label, self.num_classes, self.class_drop_prob)
        dropped = None if label is None else label == self.num_classes
        with torch.autocast(device.type, enabled=False):
            x_w, s_w, t_w = x_s.to(wide), s.to(wide), t.to(wide)
            kept = batch.label if label is not None else None  # the label before dropping, for v_c
            tangent, v_g = self.tangent_and_guided_velocity(model, x_w, s_w, t_w, v, kept, dropped, batch.aug_label)
            big_v = self.compound_prediction(model, x_w, s_w, t_w, tangent, label, batch.aug_label)
            per_sample = (big_v - v_g).pow(2).flatten(1).sum(dim=1)  # ||V - v_g||² per sample (imf.py loss_u)
            weight = (per_sample.detach() + self.eps).pow(-self.p) if self.p > 0 else torch.ones_like(per_sample)
            loss = (weight * per_sample).mean()
        self.metrics = {"mse": per_sample.detach().mean() / x1[0].numel()}
        return loss
