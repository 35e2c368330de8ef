"""The one data interface every model and loss sees.

Time runs from noise to data (docs/design.md): ``x_0 ~ N(0, I)`` is the source, ``x_1`` a
data sample, ``x_t = (1 - t) x_0 + t x_1`` and the velocity is ``v = x_1 - x_0``.

A *target dataset* returns ``(x_1, label)`` pairs like torchvision does. The
``DictDatasetAdapter`` turns it into training items: it draws the noise and returns a
batched ``BaseItem``; the loss draws its own times (``losses/time_sampling.py``) and,
for flow matching, asks the item for its straight-path fields (``BaseItem.at_time``).
The adapter implements ``__getitems__`` so that the DataLoader hands it a whole list of
indices at once and the noise is drawn in one vectorised call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from models.unified_input import make_unified_flow_matching_input, straight_path
from runs.build import instantiate_allowed
from runs.machine import data_order_seed


@dataclass
class BaseItem:
    """A batch of training data (all tensors share the batch dim B).

    What the loader gives every loss:

    raw_source: the noise ``x_0``.
    raw_target: the data sample ``x_1``.
    label: class ids (B,) int64, or None for unlabelled data.
    aug_label: the EDM augment label of each sample (B, 6) when ``dataloaders.augment``
        is on (what was applied: flip, scalings, translation), else None; a model
        conditioned on it is sampled with a zero label (no augmentation).

    The straight-path fields, filled by ``at_time`` for the losses that read the path at
    one time (flow matching); a loss that draws its own times (MeanFlow draws pairs)
    never pays for them:

    t: the time of ``x_t``, (B,).
    input: the state ``x_t = (1 - t) x_0 + t x_1`` alone.
    unified_input: ``[x_t, t, t]`` packed as docs/design.md says, (B, D+2) or (B, C+2, H, W).
    target: the velocity ``x_1 - x_0``, shaped like the state.
    """

    raw_source: Tensor
    raw_target: Tensor
    label: Tensor | None = None
    aug_label: Tensor | None = None
    t: Tensor | None = None
    input: Tensor | None = None
    unified_input: Tensor | None = None
    target: Tensor | None = None

    def at_time(self, t: Tensor) -> BaseItem:
        """This batch with the straight-path fields at times ``t`` (B,)."""
        return replace(make_base_item(self.raw_target, self.raw_source, t, self.label), aug_label=self.aug_label)

    def map(self, fn) -> BaseItem:
        """Apply ``fn`` to every tensor field (None stays None)."""
        return BaseItem(**{f.name: None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BaseItem:
        return self.map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> BaseItem:
        return self.map(lambda v: v.pin_memory())

    def __len__(self) -> int:
        return self.raw_target.shape[0]


def make_base_item(x1: Tensor, x0: Tensor, t: Tensor, label: Tensor | None = None) -> BaseItem:
    """Build the straight-path training item from data ``x1``, noise ``x0`` and times ``t`` (B,)."""
    xt = straight_path(x0, x1, t)
    return BaseItem(
        raw_source=x0,
        raw_target=x1,
        label=label,
        t=t,
        input=xt,
        unified_input=make_unified_flow_matching_input(xt, t, t),
        target=x1 - x0,
    )


# ---------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------


class BatchedTargetDataset(Dataset, ABC):
    """A target dataset that can fetch a whole batch at once (vectorised indexing,
    batched encoding); ``stack_targets`` uses ``get_batch`` instead of a Python loop."""

    @abstractmethod
    def get_batch(self, indices: list[int]) -> tuple[Tensor, Tensor | None]:
        """``(x_1 (B, ...), labels (B,) or None)`` for ``indices``."""


class TensorTargetDataset(BatchedTargetDataset):
    """In-memory data samples ``(N, ...)`` with optional labels ``(N,)``; returns ``(x_1, label)``.

    ``get_batch`` gathers a whole batch with one index operation, so small dense
    data sets load at memory speed.
    """

    def __init__(self, data: Tensor, labels: Tensor | None = None, num_classes: int = 0) -> None:
        if labels is not None and labels.shape[0] != data.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} rows but data has {data.shape[0]}")
        self.data = data
        self.labels = labels
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = -1 if self.labels is None else int(self.labels[index])
        return self.data[index], label

    def get_batch(self, indices: list[int]) -> tuple[Tensor, Tensor | None]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.data[idx], None if self.labels is None else self.labels[idx]


class EncodedTargetDataset(BatchedTargetDataset):
    """Wraps an image dataset and encodes each fetched batch with ``encoder`` (e.g. the
    SD-VAE's ``encode``), so a latent model trains on images encoded on the fly.
    Use it with ``num_workers=0`` when the encoder lives on a GPU."""

    def __init__(self, dataset: Dataset, encoder, device: torch.device | str = "cpu", num_classes: int = 0) -> None:
        self.dataset = dataset
        self.encoder = encoder
        self.device = torch.device(device)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x, label = self.dataset[index]
        return self.encoder(torch.as_tensor(x)[None].to(self.device))[0].cpu(), label

    def get_batch(self, indices: list[int]) -> tuple[Tensor, Tensor | None]:
        images, labels = stack_targets(self.dataset, indices)
        return self.encoder(images.to(self.device)).float().cpu(), labels


def stack_targets(dataset: Dataset, indices: list[int]) -> tuple[Tensor, Tensor | None]:
    """Fetch ``(x_1, label)`` for ``indices`` as batched tensors; labels None if unlabelled (-1)."""
    if isinstance(dataset, BatchedTargetDataset):
        return dataset.get_batch(indices)
    pairs = [dataset[i] for i in indices]
    x1 = torch.stack([torch.as_tensor(p[0]) for p in pairs])
    labels = torch.as_tensor([int(p[1]) for p in pairs], dtype=torch.long)
    return x1, None if bool((labels < 0).all()) else labels


class DictDatasetAdapter(Dataset):
    """Turns a target dataset of ``(x_1, label)`` into batched ``BaseItem``s.

    Use it with ``DataLoader(adapter, batch_size=B, collate_fn=collate_base_items)``:
    the loader calls ``__getitems__`` with the batch's indices and the adapter draws
    ``x_0 ~ N(0, I)`` for the whole batch at once. Times are the loss's business
    (``losses/time_sampling.py``). Randomness comes from the global torch RNG of the
    process doing the loading, so the training loop's saved RNG state reproduces it on
    resume.
    """

    def __init__(self, dataset: Dataset, use_labels: bool = True, augment=None) -> None:
        self.dataset = dataset
        self.use_labels = use_labels
        self.augment = augment  # an image augment pipe ``x -> (x, aug_label)`` (dataloaders/augment.py), or None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> BaseItem:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> BaseItem:
        x1, label = stack_targets(self.dataset, indices)
        x1, aug_label = (x1.float(), None) if self.augment is None else self.augment(x1.float())
        return BaseItem(raw_source=torch.randn_like(x1), raw_target=x1, label=label if self.use_labels else None,
                        aug_label=aug_label)


def collate_base_items(batch: BaseItem | list[BaseItem]) -> BaseItem:
    """Collate for ``DictDatasetAdapter``: a batch from ``__getitems__`` passes through;
    a list of single items (from ``__getitem__``) is concatenated."""
    if isinstance(batch, BaseItem):
        return batch
    merged = {}
    for f in fields(BaseItem):
        values = [getattr(item, f.name) for item in batch]
        merged[f.name] = None if values[0] is None else torch.cat(values)
    return BaseItem(**merged)


# ---------------------------------------------------------------------------------
# Building the data of a run
# ---------------------------------------------------------------------------------


def make_dataset(data_cfg, split: str, encoder: nn.Module | None = None) -> Dataset:
    """The target dataset of ``split`` from the ``dataloaders`` config group.

    ``encoder`` (the run's one VAE, in ImageNet's ``mode=images``) encodes each fetched
    batch, so the model trains on latents; the caller builds it once for every split
    and for the evaluator's decoder.
    """
    # Through the checkpoint allowlist (the config may come from someone else's file):
    # only the project's own loaders, plain arguments; a loader's own one-line error (a
    # missing file, a wrong shape) reaches the launcher as itself.
    dataset = instantiate_allowed(data_cfg.dataset, ("dataloaders.",), "dataset", functions=True, extra={"split": split})
    if data_cfg.get("mode") == "images":
        dataset = EncodedTargetDataset(dataset, encoder.encode, next(encoder.parameters()).device, data_cfg.num_classes)
    return dataset


class EpochSampler(Sampler[int]):
    """The indices of one epoch: a permutation fixed by ``(seed, epoch)``, this rank's
    share of it (every ``world``-th index, the tail that does not fill a global batch
    dropped), from batch ``start_batch`` on. This is what makes resume exact, at an epoch
    boundary or in the middle of one: the epoch is re-drawn and continues at the next batch.
    Batches listed in ``skip`` (their positions in the epoch, the same on every rank) are
    left out: a batch whose loss was not finite, after a rollback. ``positions`` lists the
    position of each batch handed out, so the loop knows where it stands in the epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 start_batch: int = 0, skip: Collection[int] = ()) -> None:
        self.batches = n // (batch_size * world)  # full batches per rank
        gen = torch.Generator().manual_seed(data_order_seed(seed, epoch))
        perm = torch.randperm(n, generator=gen)[: self.batches * batch_size * world]
        self.positions = [b for b in range(start_batch, self.batches) if b not in skip]
        self.indices = perm[rank::world].reshape(self.batches, batch_size)[self.positions].flatten().tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def make_train_loader(cfg, dataset: Dataset, epoch: int, rank: int = 0, world: int = 1, start_batch: int = 0,
                      skip: Collection[int] = ()) -> DataLoader:
    """The loader of ``epoch`` for this rank, starting at batch ``start_batch``, without the batches in ``skip``."""
    sampler = EpochSampler(len(dataset), cfg.batch_size, cfg.seed, epoch, rank, world, start_batch, skip)
    augment_cfg = cfg.dataloaders.get("augment")  # training batches only: held-out and reference data stay as they are
    augment = None if augment_cfg is None else instantiate_allowed(augment_cfg, ("dataloaders.",), "augment")
    return DataLoader(
        DictDatasetAdapter(dataset, augment=augment),
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_base_items,
        num_workers=cfg.num_workers,
        pin_memory=bool(cfg.dataloaders.get("pin_memory", False)),
        # The iterator draws its workers' base seed from this generator, not from the
        # global RNG: a loader made mid-epoch on resume must not shift the noise stream.
        generator=torch.Generator().manual_seed(data_order_seed(cfg.seed, epoch)),
    )
