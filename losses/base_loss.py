"""The loss interface: ``loss(model, batch) -> scalar Tensor``, and how its model samples.

A loss owns everything between a batch and the scalar that is back-propagated: its times
(``losses/time_sampling.py``), its samplers and its logged ``metrics``. The loop and the
evaluator know nothing else of it, so a new loss is a file here and a yaml in ``configs/loss/``.
"""

from abc import ABC, abstractmethod

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dataloaders.base_dataloaders import BaseItem
from helpers_cfg import call_model  # noqa: F401  (re-exported: the losses call their models through it)
from runs.build import instantiate_allowed
from solvers.sampling import DiagonalSampler, Sampler


class BaseLoss(nn.Module, ABC):
    """Subclasses implement ``forward(model, batch) -> Tensor`` (a scalar).

    Attributes:
        metrics: detached scalars of the last call, logged as ``train/<key>`` (averaged
            over the logging interval).
        passes_augment_labels: whether ``forward`` hands ``batch.aug_label`` to the model;
            a loss that does not refuses augmented data, so that no model trains on
            augmented images without knowing it.
    """

    passes_augment_labels: bool = False

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

    def samplers(self, eval_cfg: DictConfig, solver_cfg: DictConfig, num_classes: int) -> dict[str, Sampler]:
        """How the evaluator samples a model trained with this loss, by sampler name: by
        default the configured solver on the diagonal ``u(x, t, t)``, which every model has."""
        options = {k: v for k, v in solver_cfg.items() if k != "name"}
        name = f"{solver_cfg.name}{eval_cfg.steps}"
        return {name: DiagonalSampler(solver_cfg.name, eval_cfg.steps, self.guidance_scale(eval_cfg), num_classes, options=options)}

    def guidance_scale(self, eval_cfg: DictConfig) -> float:
        """``eval.guidance_scale``, or this loss's default where it is null (1: none)."""
        scale = eval_cfg.guidance_scale
        return 1.0 if scale is None else float(scale)

    def check(self, model: nn.Module, batch: BaseItem) -> None:
        """What the loop calls once before training, with a real batch: the checks every
        loss shares, then the loss's own ``check_model``."""
        if batch.aug_label is not None and not self.passes_augment_labels:
            raise ValueError(f"{type(self).__name__} does not pass augment labels to the model: "
                             "drop dataloaders.augment (set it to null) for this loss")
        self.check_model(model, batch)

    def check_model(self, model: nn.Module, batch: BaseItem) -> None:
        """Called once before training with a real batch: raise a one-line ValueError if
        this loss cannot work with ``model``. Must leave the RNG streams untouched."""


class LossModule(nn.Module):
    """Model and loss in one module whose ``forward(batch)`` returns the loss: what gets
    compiled and DDP-wrapped, so that every parameter use, the MeanFlow JVP's included,
    runs inside the wrapper's forward where DDP's gradient hooks see it."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch) -> Tensor:
        return self.loss_fn(self.model, batch)


# Loss configs written before the time laws moved into ``loss.time`` (``sampler``,
# ``ratio``, ``time_mean``, ...): mapped so that old checkpoints still evaluate and resume.
LEGACY_PAIR_SAMPLERS = {"paper": "order_then_mask_rows", "improved": "mask_rows_then_order"}
LEGACY_TIME_KEYS = {"ratio": "ratio", "time_mean": "mean", "time_std": "std", "r_mean": "r_mean", "r_std": "r_std"}


def upgrade_loss_config(node: dict) -> dict:
    """A loss config in today's layout (a copy; today's configs pass through unchanged)."""
    node = dict(node)
    if "sampler" in node and "time" not in node:
        time = {"name": LEGACY_PAIR_SAMPLERS[node.pop("sampler")]}
        time |= {new: node.pop(old) for old, new in LEGACY_TIME_KEYS.items() if old in node}
        node["time"] = time
    return node


def build_loss(loss_cfg: DictConfig | dict) -> BaseLoss:
    """The loss of a config group node (``name`` is the group's label, not an argument),
    through the allowlist: the node may come from someone else's checkpoint."""
    node = OmegaConf.to_container(loss_cfg, resolve=True) if isinstance(loss_cfg, DictConfig) else dict(loss_cfg)
    node = upgrade_loss_config({k: v for k, v in node.items() if k != "name"})
    return instantiate_allowed(node, ("losses.",), "loss", base=BaseLoss)
