"""The one data interface every model and loss sees.

Time runs from noise to data (DESIGN.md): ``x_0 ~ N(0, I)`` is the source, ``x_1`` a
data sample, ``x_t = (1 - t) x_0 + t x_1`` and the velocity is ``v = x_1 - x_0``.

A *target dataset* returns ``(x_1, label)`` pairs like torchvision does. The
``DictDatasetAdapter`` turns it into flow-matching training items: it draws the
noise and the time, builds ``x_t`` and the unified input, and returns a batched
``BaseItem``. It implements ``__getitems__`` so that the DataLoader hands it a whole
list of indices at once and the noise is drawn in one vectorised call.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch
from torch import Tensor
from torch.utils.data import Dataset

# the inverse of make_unified_flow_matching_input lives with the model contract; re-exported here
from models.base_model import split_unified_input  # noqa: F401


def make_unified_flow_matching_input(x: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """Pack the state and both times into one tensor (DESIGN.md, "unified input").

    Args:
        x: state, shape (B, D) for dense data or (B, C, H, W) for images.
        s: start time, shape (B,) (or anything broadcastable to it).
        t: end time, shape (B,).

    Returns:
        (B, D + 2) as ``[x, s, t]`` for dense data, or (B, C + 2, H, W) with two
        constant channels ``s`` and ``t`` appended for images.
    """
    batch = x.shape[0]
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device).reshape(-1).expand(batch)
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(batch)
    if x.dim() == 2:
        return torch.cat([x, s[:, None], t[:, None]], dim=1)
    if x.dim() == 4:
        _, _, h, w = x.shape
        times = torch.stack([s, t], dim=1)[:, :, None, None].expand(batch, 2, h, w)
        return torch.cat([x, times], dim=1)
    raise ValueError(f"state must be (B, D) or (B, C, H, W), got shape {tuple(x.shape)}")


def broadcast_time(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample times (B,) so they broadcast against ``x`` (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


@dataclass
class BaseItem:
    """A batch of flow-matching training data (all tensors share the batch dim B).

    unified_input: ``[x_t, t, t]`` packed as DESIGN.md says, (B, D+2) or (B, C+2, H, W).
    target: the velocity ``x_1 - x_0``, shaped like the state.
    t: the time of ``x_t``, (B,).
    input: the state ``x_t`` alone.
    raw_source: the noise ``x_0``.
    raw_target: the data sample ``x_1``.
    label: class ids (B,) int64, or None for unlabelled data.
    """

    unified_input: Tensor
    target: Tensor
    t: Tensor
    input: Tensor
    raw_source: Tensor
    raw_target: Tensor
    label: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BaseItem:
        moved = {
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return BaseItem(**moved)

    def pin_memory(self) -> BaseItem:
        pinned = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name).pin_memory() for f in fields(self)}
        return BaseItem(**pinned)

    def __len__(self) -> int:
        return self.raw_target.shape[0]


def make_base_item(x1: Tensor, x0: Tensor, t: Tensor, label: Tensor | None = None) -> BaseItem:
    """Build the straight-path training item from data ``x1``, noise ``x0`` and times ``t`` (B,)."""
    tb = broadcast_time(t, x1)
    xt = (1 - tb) * x0 + tb * x1
    return BaseItem(
        unified_input=make_unified_flow_matching_input(xt, t, t),
        target=x1 - x0,
        t=t,
        input=xt,
        raw_source=x0,
        raw_target=x1,
        label=label,
    )


# ---------------------------------------------------------------------------------
# Time samplers for flow matching (MeanFlow draws its (s, t) pairs in the loss).
# ---------------------------------------------------------------------------------


class TimeSampler(ABC):
    """Draws flow-matching times in [0, 1]."""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Return n times, shape (n,), float32."""


class UniformTimeSampler(TimeSampler):
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.rand(n, generator=generator)


class LogitNormalTimeSampler(TimeSampler):
    """``t = sigmoid(N(mean, std^2))`` (Esser et al. 2024, "Scaling rectified flow", Sec. 3.1)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if std <= 0 or not math.isfinite(std):
            raise ValueError(f"logit-normal std must be a positive number, got {std}")
        self.mean = mean
        self.std = std

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.sigmoid(torch.randn(n, generator=generator) * self.std + self.mean)


def make_time_sampler(name: str, mean: float = 0.0, std: float = 1.0) -> TimeSampler:
    if name == "uniform":
        return UniformTimeSampler()
    if name == "logit_normal":
        return LogitNormalTimeSampler(mean, std)
    raise ValueError(f"unknown time sampler {name!r}: expected 'uniform' or 'logit_normal'")


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
    """Turns a target dataset of ``(x_1, label)`` into batched flow-matching ``BaseItem``s.

    Use it with ``DataLoader(adapter, batch_size=B, collate_fn=collate_base_items)``:
    the loader calls ``__getitems__`` with the batch's indices and the adapter draws
    ``x_0 ~ N(0, I)`` and ``t`` from the time sampler for the whole batch at once.
    Randomness comes from the global torch RNG of the process doing the loading, so
    the training loop's saved RNG state reproduces it on resume.
    """

    def __init__(self, dataset: Dataset, time_sampler: TimeSampler, use_labels: bool = True) -> None:
        self.dataset = dataset
        self.time_sampler = time_sampler
        self.use_labels = use_labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> BaseItem:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> BaseItem:
        x1, label = stack_targets(self.dataset, indices)
        x1 = x1.float()
        x0 = torch.randn_like(x1)
        t = self.time_sampler.sample(x1.shape[0])
        return make_base_item(x1, x0, t, label if self.use_labels else None)


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
