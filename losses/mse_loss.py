"""Conditional flow-matching loss (Lipman et al. 2023, Eq. 23; Liu et al. 2023) on the
straight path, read on the diagonal ``s = t`` (docs/design.md, "Unified input"):
``L = E_t E || u_θ(x_t, t, t) - (x_1 - x_0) ||²``, ``t`` from ``loss.time`` (default
logit-normal(0, 1): Esser et al. 2024, Sec. 3.1).
"""

from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem
from helpers_cfg import training_labels
from losses.base_loss import BaseLoss, call_model
from losses.time_sampling import make_time_sampler


class FlowMatchingMSELoss(BaseLoss):
    """Mean over batch and dimensions of the squared velocity error.

    Args:
        time: the law of ``t``, ``{name: uniform | logit_normal, ...}`` (losses/time_sampling.py).
        num_classes: the model's classes (0: unconditional, labels ignored).
        class_drop_prob: label -> null class probability (the null class serves guidance).
    """

    passes_augment_labels = True  # call_model(..., batch.aug_label) in forward

    def __init__(self, time: dict | None = None, num_classes: int = 0, class_drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= class_drop_prob <= 1.0:
            raise ValueError(f"loss.class_drop_prob={class_drop_prob}: expected a probability in [0, 1]")
        time = dict(time or {"name": "logit_normal", "mean": 0.0, "std": 1.0})
        try:  # name the config key: the sampler does not know where its settings came from
            self.time_sampler = make_time_sampler(time.pop("name"), **time)
        except ValueError as err:
            raise ValueError(f"loss.time: {err}") from None
        self.num_classes = num_classes
        self.class_drop_prob = class_drop_prob

    def forward(self, model: nn.Module, batch: BaseItem) -> Tensor:
        if batch.t is None:  # the loader gives data and noise; the times are this loss's
            batch = batch.at_time(self.time_sampler.sample(len(batch), batch.raw_target.device))
        label = training_labels(batch.label, self.num_classes, self.class_drop_prob)
        pred = call_model(model, batch.unified_input, label, batch.aug_label)
        return (pred.float() - batch.target.float()).pow(2).mean()
