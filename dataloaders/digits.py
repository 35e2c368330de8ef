"""scikit-learn's bundled 8x8 handwritten digits: the CPU demo image set.

1797 grey images of the digits 0-9 ship inside scikit-learn (no download). Pixel
values 0..16 are scaled to [-1, 1]; images are (1, 8, 8), or (1, 16, 16) when
upsampled. The train / held-out split is a fixed seeded permutation.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from dataloaders.base_dataloaders import TensorTargetDataset
from dataloaders.image_folder import seeded_split

NUM_CLASSES = 10


def load_digit_images(image_size: int = 8, upsample_mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as float32 (N, 1, S, S) in [-1, 1] and int64 labels (N,)."""
    if image_size not in (8, 16):
        raise ValueError(f"digits image_size must be 8 (native) or 16 (upsampled), got {image_size}")
    if upsample_mode not in ("bilinear", "nearest"):
        raise ValueError(f"digits upsample_mode must be 'bilinear' or 'nearest', got {upsample_mode!r}")
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None]  # (N, 1, 8, 8), values 0..16
    images = images / 8.0 - 1.0  # 0..16 -> [-1, 1]
    if image_size == 16:
        # Bilinear weights are convex, so the upsampled values stay inside [-1, 1].
        align = False if upsample_mode == "bilinear" else None
        images = F.interpolate(images, size=(16, 16), mode=upsample_mode, align_corners=align)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    return images, labels


def make_dataset(
    split: str,
    image_size: int = 8,
    upsample_mode: str = "bilinear",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TensorTargetDataset:
    """The train or held-out part of the digits, as an in-memory target dataset of ``(x_1, label)``."""
    images, labels = load_digit_images(image_size, upsample_mode)
    idx = seeded_split(images.shape[0], split, test_fraction, seed)
    return TensorTargetDataset(images[idx], labels[idx], num_classes=NUM_CLASSES)
