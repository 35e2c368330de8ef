"""Conditional flow-matching loss (Lipman et al. 2023, Eq. 23; Liu et al. 2023).

With the straight path ``x_t = (1 - t) x_0 + t x_1`` the conditional velocity is
``v = x_1 - x_0``, and the model is read on the diagonal ``s = t`` (DESIGN.md):
``L = E || u_θ(x_t, t, t) - (x_1 - x_0) ||²``.
"""

from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem
from helpers_cfg import training_labels
from losses.base_loss import BaseLoss


class FlowMatchingMSELoss(BaseLoss):
    """Mean over batch and dimensions of the squared velocity error.

    Args:
        num_classes: the model's number of classes (0: unconditional, labels ignored).
        class_drop_prob: probability of replacing a label by the null class, so the
            model also learns the unconditional velocity for guidance at sampling.
    """

    def __init__(self, num_classes: int = 0, class_drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= class_drop_prob <= 1.0:
            raise ValueError(f"class_drop_prob must lie in [0, 1], got {class_drop_prob}")
        self.num_classes = num_classes
        self.class_drop_prob = class_drop_prob

    def forward(self, model: nn.Module, batch: BaseItem) -> Tensor:
        label = training_labels(batch.label, self.num_classes, self.class_drop_prob)
        pred = model(batch.unified_input, label)
        loss = (pred.float() - batch.target.float()).pow(2).mean()
        self.metrics = {"mse": loss.detach()}
        return loss
