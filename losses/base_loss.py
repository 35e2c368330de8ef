"""The loss interface: ``loss(model, batch) -> scalar Tensor``.

A loss owns everything between a batch and the scalar that is back-propagated; the
training loop knows nothing model- or loss-specific. ``metrics`` holds detached
extra values from the last call that the loop may log (e.g. the unweighted MSE).
"""

from abc import ABC, abstractmethod

from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem


class BaseLoss(nn.Module, ABC):
    """Subclasses implement ``forward(model, batch) -> Tensor`` (a scalar)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, Tensor] = {}

    @abstractmethod
    def forward(self, model: nn.Module, batch: BaseItem) -> Tensor:
        """Args:
            model: a mean-velocity field ``u(z, y)`` on the unified input.
            batch: a ``BaseItem`` on the model's device.

        Returns:
            The scalar training loss.
        """

    def check_model(self, model: nn.Module, batch: BaseItem) -> None:
        """Called once before training with a real batch: raise a one-line ValueError if
        this loss cannot work with ``model``. Must leave the RNG streams untouched."""
