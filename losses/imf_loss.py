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
  learns the guided field, so ``(v_c - v_u) / ω`` is the unguided class direction. ω and the
  interval are fixed settings, as in MeanFlow (iMF feeds per-sample ones to the network);
- the law is ``imeanflow``, eps = 0.01, p = 1 (the reference's ``configs/default.py``).

Not here: iMF's auxiliary velocity head (``loss_v``) needs a model with two outputs.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem
from helpers_cfg import conditional_and_null
from losses.base_loss import call_model
from losses.meanflow_loss import MeanFlowLoss
from models.unified_input import broadcast_time, make_unified_flow_matching_input

# ``configs/loss/imf.yaml``'s law (Lyy-iiis/imeanflow configs/default.py), for a loss built in code.
DEFAULT_TIME = {"name": "imeanflow", "ratio": 0.5, "mean": -0.4, "std": 1.0}
TANGENTS = ("predicted", "conditional")


@dataclass(eq=False, kw_only=True)
class IMFLoss(MeanFlowLoss):
    """The iMF v-loss on a batch's ``raw_source`` (noise) and ``raw_target`` (data).

    MeanFlow's fields (``p``, ``eps``: the reference's ``norm_p``, ``norm_eps``; ``cfg_kappa``
    stays 0; ``cfg_interval`` applies to pairs with ``s != t``, iMF's ``t_p`` in
    ``[t_min, t_max]`` being ``s`` in ``[1 - t_max, 1 - t_min]``) and the JVP's tangent.
    """

    eps: float = 0.01
    tangent: str = "predicted"  # predicted (iMF: u(x_s, s, s | c)) | conditional (MeanFlow's x_1 - x_0)

    default_time = DEFAULT_TIME

    def __post_init__(self) -> None:
        if self.cfg_kappa != 0.0:
            raise ValueError(f"loss.cfg_kappa={self.cfg_kappa}: iMF's guidance v + (1 - 1/ω)(v_c - v_u) has no κ; leave it 0")
        super().__post_init__()
        if self.cfg_omega < 1.0:
            raise ValueError(f"loss.cfg_omega={self.cfg_omega}: iMF's guidance v + (1 - 1/ω)(v_c - v_u) expects ω >= 1")
        if self.tangent not in TANGENTS:
            raise ValueError(f"loss.tangent={self.tangent!r}: expected one of {list(TANGENTS)}")

    # --- the velocities ----------------------------------------------------------------

    @torch.no_grad()
    def tangent_and_guided_velocity(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, v: Tensor, label: Tensor | None, dropped: Tensor | None,
        aug: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(v_c, v_g)``: the JVP's state tangent and the regression target (no gradient).

        ``label`` is the label before dropping: iMF computes ``v_c`` with it for every
        sample (``imf.py`` calls ``guidance_fn`` before ``cond_drop``).
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
        apply = ((s >= lo) & (s <= hi)) | (s == t)  # imf.py: v_g_fm (s = t) has no interval
        v_guided = v + (1 - 1 / self.cfg_omega) * (v_c - v_u)  # imf.py::guidance_fn
        v_g = torch.where(broadcast_time(apply & ~dropped, v), v_guided, v)
        return (v_c if self.tangent == "predicted" else v_g), v_g  # conditional: MeanFlow's guided tangent

    def compound_prediction(
        self, model: nn.Module, x: Tensor, s: Tensor, t: Tensor, tangent: Tensor, label: Tensor | None,
        aug: Tensor | None = None,
    ) -> Tensor:
        """``V = u_θ(x, s, t) - (t - s) sg(du/ds)`` along ``(tangent, 1, 0)``, with ``u``'s
        gradient (the paper's ``V = u + (t - r) sg(du/dt)``)."""
        u, dudt = self.mean_flow_jvp(model, x, s, t, tangent, label, aug)
        return u - broadcast_time(t.to(u.dtype) - s.to(u.dtype), u) * dudt

    # --- the loss --------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: BaseItem) -> Tensor:
        x1 = batch.raw_target
        x_s, s, t, v, label = self.draw(batch)
        dropped = None if label is None else label == self.num_classes
        wide = torch.promote_types(x1.dtype, torch.float32)
        with torch.autocast(x1.device.type, enabled=False):
            x_w, s_w, t_w = x_s.to(wide), s.to(wide), t.to(wide)
            kept = batch.label if label is not None else None  # the label before dropping, for v_c
            tangent, v_g = self.tangent_and_guided_velocity(model, x_w, s_w, t_w, v, kept, dropped, batch.aug_label)
            big_v = self.compound_prediction(model, x_w, s_w, t_w, tangent, label, batch.aug_label)
            per_sample = (big_v - v_g).pow(2).flatten(1).sum(dim=1)  # ||V - v_g||² per sample (imf.py loss_u)
            loss = self.weighted_mean(per_sample)
        self.metrics = {"mse": per_sample.detach().mean() / x1[0].numel()}
        return loss
