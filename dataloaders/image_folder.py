"""Shared pieces for data sets read from image files (CelebA, ImageNet class folders).

Every image data set here returns ``(x_1, label)`` with ``x_1`` a float32 tensor
(C, H, W) in [-1, 1], the range the noise ``x_0 ~ N(0, I)`` is matched against.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dataloaders.images import from_uint8

# 'reference' is the evaluation's second draw from the data distribution (the floor
# of a sample metric); image data sets serve it from their training part, unflipped.
SPLITS = ("train", "test", "reference")

# Suffixes (lower-cased) that count as images when a folder is scanned.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"})


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """All image files in ``folder`` (sorted, so indices are stable across runs and machines)."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> Tensor:
    """uint8 RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    return from_uint8(torch.from_numpy(array.copy()).permute(2, 0, 1))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size`` x ``size`` square (the image must be at least that large)."""
    width, height = img.size
    left = (width - size) // 2
    top = (height - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_hflip(x: Tensor, p: float = 0.5) -> Tensor:
    """Flip each sample of a batch (B, C, H, W) left-right with probability p (global torch RNG)."""
    flip = torch.rand(x.shape[0]) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def seeded_split(num_items: int, split: str, test_fraction: float, seed: int) -> Tensor:
    """Indices of a fixed train / held-out split: a seeded permutation, the last
    ``test_fraction`` of it held out. The same seed gives the same split everywhere.
    'reference' (the evaluation's second draw from the data) is the training part."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    num_test = max(1, round(num_items * test_fraction))
    return perm[num_items - num_test :] if split == "test" else perm[: num_items - num_test]
