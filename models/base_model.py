"""The contract every velocity model keeps: ``u = model(z, y=None)``.

``z`` is the unified input (``models/unified_input.py``): the state and both times of
``u(x_s, s, t)`` in one tensor,

- dense data: ``(B, D + 2)`` laid out ``[x, s, t]``;
- images: ``(B, C + 2, H, W)``, the last two channels constant planes ``s`` and ``t``.

``u`` has the state's shape, ``(B, D)`` or ``(B, C, H, W)``. ``y`` holds class ids
``(B,)`` (int64) for a class-conditional model (``num_classes > 0``), which also has a
learned null class at index ``num_classes`` (classifier-free guidance): ``y=None``
means "no label", every sample the null class. An unconditional model
(``num_classes = 0``) takes no labels.

The base class owns the label rules, so that a model's ``forward`` starts with

    x, s, t = split_unified_input(z)
    y = self.labels(y, z)          # None, or (B,) with the null class filled in
    aug = self.augment_labels(aug, z)  # None, or (B, augment_dim): zeros where not augmented
"""

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class BaseModel(nn.Module, ABC):
    """A mean-velocity field ``u(x_s, s, t | y)`` on the unified input (module docstring).

    Args:
        num_classes: 0 for an unconditional model; otherwise the real classes are
            ``0 .. num_classes - 1`` and index ``num_classes`` is the null class.
        augment_dim: size of the EDM augment label the model is conditioned on (6 for
            the CIFAR-10 recipe's pipe; 0: none). Sampling passes no label: all zeros,
            i.e. "not augmented" (Karras et al. 2022, Appendix C.4).
    """

    def __init__(self, num_classes: int = 0, augment_dim: int = 0) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes}: expected 0 (unconditional) or the number of classes")
        if augment_dim < 0:
            raise ValueError(f"augment_dim={augment_dim}: expected 0 (no augment label) or its size (6 for dataloaders/augment.py)")
        self.num_classes = num_classes
        self.augment_dim = augment_dim

    @abstractmethod
    def forward(self, z: Tensor, y: Tensor | None = None, aug: Tensor | None = None) -> Tensor:
        """``u(x_s, s, t | y)``.

        Args:
            z: unified input, (B, D + 2) or (B, C + 2, H, W).
            y: class ids (B,) int64, or None (the null class; required for an
                unconditional model).
            aug: augment labels (B, augment_dim) of augmented training data, or None
                (not augmented; required for a model with ``augment_dim = 0``).

        Returns:
            (B, D) or (B, C, H, W): the state's shape.
        """

    def null_labels(self, n: int, device: torch.device | str) -> Tensor:
        """``n`` null-class labels (index ``num_classes``), (n,) int64."""
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def labels(self, y: Tensor | None, z: Tensor) -> Tensor | None:
        """The labels the model embeds for the batch ``z``: None for an unconditional
        model, the null class where ``y`` is None. Checks shapes only (no value check:
        it would synchronise the device on every forward)."""
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("this model is unconditional (num_classes=0) but got class labels; pass y=None")
            return None
        if y is None:
            return self.null_labels(z.shape[0], z.device)
        if y.shape != (z.shape[0],):
            raise ValueError(f"labels of shape {tuple(y.shape)} for a batch of {z.shape[0]}: expected ({z.shape[0]},)")
        return y

    def augment_labels(self, aug: Tensor | None, z: Tensor) -> Tensor | None:
        """The augment labels the model embeds: None without an augment input, zeros
        (no augmentation) where ``aug`` is None."""
        if self.augment_dim == 0:
            if aug is not None:
                raise ValueError(f"this model has no augment input (augment_dim=0) but got augment labels of width "
                                 f"{aug.shape[-1]}: set model.augment_dim={aug.shape[-1]} to train on dataloaders.augment")
            return None
        if aug is None:
            return z.new_zeros(z.shape[0], self.augment_dim)
        if aug.shape != (z.shape[0], self.augment_dim):
            raise ValueError(f"augment labels of shape {tuple(aug.shape)}: expected ({z.shape[0]}, {self.augment_dim}) (model.augment_dim)")
        return aug.to(z.dtype)
