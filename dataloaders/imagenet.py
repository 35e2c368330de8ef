"""ImageNet for latent-space training: class-folder images, or pre-computed SD-VAE latent shards.

Two modes (``make_dataset(mode=...)``):

* ``images``: ``root/<wnid>/*.JPEG`` class folders (torchvision ImageFolder layout;
  labels are the indices of the sorted class-folder names). Images are resized and
  center-cropped ADM-style (Dhariwal & Nichol 2021) to ``image_size`` and returned
  as float32 (3, S, S) in [-1, 1]; the training loop encodes them with the VAE.
* ``latents``: a folder written by ``scripts/precompute_latents.py``::

      meta.json             format, sample count, latent shape, scaling factor, classes, shard list
      shard_00000.pt        torch.save({"latents": float16 (n, 4, S/8, S/8),
      shard_00001.pt ...               "labels": int64 (n,),
                                       "scaling_factor": float, "image_size": int})

  Latents are already multiplied by the scaling factor (0.18215 for SD-VAE), so
  they are roughly unit-variance. Shards are opened with ``torch.load(mmap=True,
  weights_only=True)``: nothing is read into memory until an item is used, and
  DataLoader workers share the pages.

Horizontal flip of latents (``flip=True``) flips the latent grid. The VAE encoder is
convolutional but not exactly mirror-symmetric, so this is close to, not equal to,
the latent of the flipped image; it is the usual cheap augmentation for latent
training.
"""

import bisect
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dataloaders.image_folder import center_crop, list_images, load_rgb, pil_to_tensor

META_FILE = "meta.json"
SHARD_FORMAT = "denoisingzoo-latent-shards/1"
SHARD_KEYS = frozenset({"latents", "labels", "scaling_factor", "image_size"})


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.pt"


# ---------------------------------------------------------------------------------
# Class-folder images
# ---------------------------------------------------------------------------------


def adm_center_crop(img: Image.Image, image_size: int) -> Image.Image:
    """ADM's preprocessing: halve with a box filter while the short side is at least
    twice the target (cheap, alias-free), bicubic-resize the short side to
    ``image_size``, then take the central square."""
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BICUBIC)
    return center_crop(img, image_size)


def find_classes(root: Path) -> list[str]:
    """Sorted class-folder names under ``root`` (one-line error when there are none)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise FileNotFoundError(
            f"no ImageNet class folders in {root}: expected {root}/<wnid>/*.JPEG (ImageFolder layout, e.g. "
            f"ILSVRC2012 train unpacked into one folder per class)"
        )
    return classes


class ClassFolderDataset(Dataset):
    """``root/<class>/*`` images -> (float32 (3, S, S) in [-1, 1], class index)."""

    def __init__(self, root: Path, image_size: int, flip: bool, num_classes: int | None = None) -> None:
        self.classes = find_classes(root)
        if num_classes is not None and len(self.classes) != num_classes:
            raise ValueError(f"{root} has {len(self.classes)} class folders, expected num_classes={num_classes}")
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in list_images(root / name, recursive=True)
        ]
        if not self.samples:
            raise FileNotFoundError(f"no images found under the class folders of {root}")
        self.image_size = image_size
        self.flip = flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        x = pil_to_tensor(adm_center_crop(load_rgb(path), self.image_size))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, label


def encode_in_batches(
    dataset: Dataset, vae: nn.Module, batch_size: int, device: torch.device, num_workers: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """Encode a ``(image in [-1, 1], label)`` dataset in order; yields CPU ``(latents, labels)``
    batches. ``vae.encode`` must return latents already multiplied by the scaling factor."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, labels in loader:
        with torch.inference_mode():
            latents = vae.encode(images.to(device))
        yield latents.float().cpu(), labels.long()


# ---------------------------------------------------------------------------------
# Latent shards
# ---------------------------------------------------------------------------------


def write_shard(path: Path, latents: Tensor, labels: Tensor, scaling_factor: float, image_size: int) -> None:
    """Save one shard (latents stored as float16) atomically: temporary file, then rename."""
    payload = {
        "latents": latents.to(torch.float16).contiguous(),
        "labels": labels.to(torch.long).contiguous(),
        "scaling_factor": float(scaling_factor),
        "image_size": int(image_size),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def write_meta(folder: Path, meta: dict) -> None:
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(folder / META_FILE)


def read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no latent shards at {folder}: expected {path} and shard_XXXXX.pt files written by "
            f"scripts/precompute_latents.py --data-root IMAGENET_TRAIN --out {folder}"
        )
    meta = json.loads(path.read_text())
    required = {"format", "num_samples", "latent_shape", "scaling_factor", "image_size", "num_classes", "shards"}
    if meta.get("format") != SHARD_FORMAT or not required <= meta.keys():
        raise ValueError(f"{path}: expected format {SHARD_FORMAT!r} with keys {sorted(required)}")
    return meta


def load_shard(path: Path, meta: dict, count: int) -> tuple[Tensor, Tensor]:
    """Memory-map one shard and check it against meta.json (one-line ValueError naming the file)."""
    if not path.is_file():
        raise FileNotFoundError(f"latent shard {path} listed in {META_FILE} is missing")
    shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(shard, dict) or shard.keys() != SHARD_KEYS:
        raise ValueError(f"{path}: expected a dict with keys {sorted(SHARD_KEYS)}")
    latents, labels = shard["latents"], shard["labels"]
    expected = (count, *meta["latent_shape"])
    if latents.dtype != torch.float16 or tuple(latents.shape) != expected:
        raise ValueError(f"{path}: latents must be float16 {expected}, got {latents.dtype} {tuple(latents.shape)}")
    if labels.dtype != torch.long or tuple(labels.shape) != (count,):
        raise ValueError(f"{path}: labels must be int64 ({count},), got {labels.dtype} {tuple(labels.shape)}")
    if shard["scaling_factor"] != meta["scaling_factor"] or shard["image_size"] != meta["image_size"]:
        raise ValueError(
            f"{path}: scaling_factor={shard['scaling_factor']}, image_size={shard['image_size']} disagree with "
            f"{META_FILE} ({meta['scaling_factor']}, {meta['image_size']})"
        )
    if count and (labels.min() < 0 or labels.max() >= max(meta["num_classes"], 1)):
        raise ValueError(f"{path}: labels must lie in 0..{meta['num_classes'] - 1}")
    return latents, labels


class LatentShardDataset(Dataset):
    """Pre-computed latents -> (float32 (4, S/8, S/8), class index)."""

    def __init__(self, folder: Path, flip: bool, expected_shape: list[int] | None = None) -> None:
        self.meta = read_meta(folder)
        if expected_shape is not None and list(expected_shape) != list(self.meta["latent_shape"]):
            raise ValueError(
                f"{folder / META_FILE}: latent shape {self.meta['latent_shape']} differs from data_shape "
                f"{list(expected_shape)}; re-run precompute_latents.py with the matching --image-size"
            )
        self.num_classes = self.meta["num_classes"]
        self.latents: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.starts: list[int] = []  # index of each shard's first sample
        total = 0
        for entry in self.meta["shards"]:
            latents, labels = load_shard(folder / entry["file"], self.meta, entry["count"])
            self.latents.append(latents)
            self.labels.append(labels)
            self.starts.append(total)
            total += entry["count"]
        if total != self.meta["num_samples"]:
            raise ValueError(
                f"{folder / META_FILE}: shards hold {total} samples but num_samples={self.meta['num_samples']}"
            )
        self.total = total
        self.flip = flip

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        shard = bisect.bisect_right(self.starts, index) - 1
        offset = index - self.starts[shard]
        x = self.latents[shard][offset].float()
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[shard][offset])


def make_dataset(
    split: str,
    mode: str = "latents",
    latent_dir: str | None = None,
    image_dir: str | None = None,
    val_latent_dir: str | None = None,
    val_image_dir: str | None = None,
    image_size: int = 256,
    flip: bool = True,
    num_classes: int | None = None,
    latent_shape: list[int] | None = None,
) -> Dataset:
    """ImageNet ``split`` ('train', 'test', or 'reference' = the training folder) in ``mode`` 'latents' or 'images'.

    'test' reads ``val_latent_dir`` / ``val_image_dir``; when that is unset it reuses
    the training folder (held-out monitoring then sees training data; FID on
    ImageNet is taken against reference statistics, not this split). Flips apply to
    the train split only.
    """
    if split not in ("train", "test", "reference"):
        raise ValueError(f"ImageNet split must be 'train', 'test' or 'reference', got {split!r}")
    if mode not in ("latents", "images"):
        raise ValueError(f"ImageNet mode must be 'latents' or 'images', got {mode!r}")
    train_dir, val_dir = (latent_dir, val_latent_dir) if mode == "latents" else (image_dir, val_image_dir)
    folder = val_dir if split == "test" and val_dir else train_dir
    if not folder:
        key = "latent_dir" if mode == "latents" else "image_dir"
        raise ValueError(f"ImageNet mode={mode} needs a folder: set dataloaders.{key}=/path/to/folder")
    path = Path(folder).expanduser()
    augment = flip and split == "train"
    if mode == "latents":
        dataset = LatentShardDataset(path, augment, latent_shape)
        if num_classes is not None and dataset.num_classes != num_classes:
            raise ValueError(f"{path / META_FILE}: num_classes={dataset.num_classes}, config expects {num_classes}")
        return dataset
    return ClassFolderDataset(path, image_size, augment, num_classes)
