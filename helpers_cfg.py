"""Classifier-free guidance (Ho & Salimans 2022): label dropping for training and
guided velocities for sampling.

A conditional model has ``num_classes`` real classes and a learned null class with
index ``num_classes``; ``y=None`` means "all null". MeanFlow's guided training target
lives in ``losses/meanflow_loss.py`` (it needs the JVP); it uses ``training_labels``.
"""

import torch
from torch import Tensor, nn


def training_labels(label: Tensor | None, num_classes: int, drop_prob: float) -> Tensor | None:
    """The labels a conditional model trains on: each replaced by the null class with
    probability ``drop_prob``. Unconditional models (``num_classes == 0``) get None."""
    if num_classes == 0:
        return None
    if label is None:
        raise ValueError("the model is class-conditional (num_classes > 0) but the data set has no labels")
    if drop_prob <= 0:
        return label
    drop = torch.rand(label.shape, device=label.device) < drop_prob
    return torch.where(drop, torch.full_like(label, num_classes), label)


def null_labels(batch: int, num_classes: int, device: torch.device | str) -> Tensor:
    return torch.full((batch,), num_classes, dtype=torch.long, device=device)


def conditional_and_null(model: nn.Module, z: Tensor, label: Tensor, num_classes: int,
                         aug: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(u(z | label), u(z | ∅))`` from one batched forward of twice the batch (with the
    batch's augment labels, if any, on both halves)."""
    labels = torch.cat([label, null_labels(label.shape[0], num_classes, label.device)])
    both = model(torch.cat([z, z]), labels) if aug is None else model(torch.cat([z, z]), labels, torch.cat([aug, aug]))
    cond, uncond = both.chunk(2)
    return cond, uncond


def guided_velocity(model: nn.Module, z: Tensor, label: Tensor | None, scale: float, num_classes: int = 0) -> Tensor:
    """Classifier-free guided velocity (Ho & Salimans 2022, Eq. 6, in velocity form):
    ``v = v(∅) + w (v(c) - v(∅))``. ``w = 1`` (or no label) is the plain model and
    skips the unconditional pass; otherwise both passes share one batched forward."""
    if scale == 1.0 or label is None:
        return model(z, label)
    if num_classes <= 0:
        raise ValueError(f"guidance scale {scale} needs a class-conditional model, but num_classes={num_classes}")
    cond, uncond = conditional_and_null(model, z, label, num_classes)
    return uncond + scale * (cond - uncond)
