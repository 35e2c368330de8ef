"""The loss interface: ``loss(model, batch) -> scalar Tensor``.

A loss owns everything between a batch and the scalar that is back-propagated; the
training loop knows nothing model- or loss-specific. ``metrics`` holds detached
extra values from the last call that the loop may log (e.g. the unweighted MSE).
"""

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
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


@contextmanager
def rewound_rng(device: torch.device) -> Iterator[None]:
    """Run the block, then put the RNG back where it was, so whatever runs next draws
    the same numbers (one dropout mask for two passes; probes that must not shift
    the stream that exact resume depends on)."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
