"""Classifier-free guidance (Ho & Salimans 2022): label dropping for training and
guided velocities for sampling.

A conditional model has ``num_classes`` real classes and a learned null class with
index ``num_classes``; ``y=None`` means "all null". MeanFlow's guided training target
lives in ``losses/meanflow_loss.py`` (it needs the JVP); it uses ``training_labels``.
"""

import torch
from torch import Tensor, nn


def training_labels(label: Tensor | None, num_classes: int, drop_prob: float, first_rows: bool = False,
                    within: Tensor | None = None) -> Tensor | None:
    """The labels a conditional model trains on, some replaced by the null class.

    Each row is dropped with probability ``drop_prob``; with ``first_rows`` the number of
    rows so drawn (Binomial(n, drop_prob)) is dropped from the top of the batch instead
    (iMF, Lyy-iiis/imeanflow ``imf.py::cond_drop``: the first rows are its s = t rows);
    ``within`` (B,) bool keeps the drop to those rows (AlphaFlow drops only inside its
    guidance interval). Unconditional models (``num_classes == 0``) get None.
    """
    if num_classes == 0:
        return None
    if label is None:
        raise ValueError("the model is class-conditional (num_classes > 0) but the data set has no labels")
    if drop_prob <= 0:
        return label
    drop = torch.rand(label.shape, device=label.device) < drop_prob
    if first_rows:  # the count alone is kept: no device sync
        drop = torch.arange(label.shape[0], device=label.device) < drop.sum()
    if within is not None:
        drop = drop & within
    return torch.where(drop, torch.full_like(label, num_classes), label)


def null_labels(batch: int, num_classes: int, device: torch.device | str) -> Tensor:
    return torch.full((batch,), num_classes, dtype=torch.long, device=device)


def call_model(model: nn.Module, z: Tensor, label: Tensor | None, aug: Tensor | None = None, cond: Tensor | None = None,
               head: str = "u") -> Tensor | tuple[Tensor, Tensor]:
    """``model(z, label)``, with the batch's augment labels when the data was augmented,
    the extra conditions ``cond`` (B, num_conds) of a model that takes them, and ``head``
    when not ``"u"``: a model that knows none of them is called as ``model(z, label)``."""
    kwargs = {} if cond is None else {"cond": cond}
    if head != "u":
        kwargs["head"] = head
    return model(z, label, **kwargs) if aug is None else model(z, label, aug, **kwargs)


def conditional_and_null(model: nn.Module, z: Tensor, label: Tensor, num_classes: int, aug: Tensor | None = None,
                         cond: Tensor | None = None, null_cond: Tensor | None = None, head: str = "u") -> tuple[Tensor, Tensor]:
    """``(u(z | label, cond), u(z | ∅, null_cond))`` from one batched forward of twice the
    batch (with the batch's augment labels, if any, on both halves); ``cond`` and
    ``null_cond`` (B, num_conds) are a model's extra conditions, ``head`` its output."""
    labels = torch.cat([label, null_labels(label.shape[0], num_classes, label.device)])
    both = call_model(model, torch.cat([z, z]), labels, None if aug is None else torch.cat([aug, aug]),
                      None if cond is None else torch.cat([cond, null_cond]), head)
    return both.chunk(2)


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
