"""CelebA aligned faces from an image folder (unlabelled).

``root`` is either the unpacked official archive, holding ``img_align_celeba/*.jpg``
(178x218 aligned faces), or any flat folder of images. Each image is center-cropped
to ``crop_size`` (178: the full width of the aligned faces, the usual choice) and
resized to ``image_size`` with PIL's antialiased bicubic filter. Labels are -1.

Split: when ``<root>/list_eval_partition.txt`` (the official partition, lines
``000001.jpg 0`` with 0 train, 1 validation, 2 test) is present, 'train' is
partition 0 and 'test' partition 2 ('reference' is the train part); otherwise a fixed seeded hold-out of
``test_fraction`` of the files.
"""

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dataloaders.image_folder import center_crop, list_images, load_rgb, pil_to_tensor, seeded_split

IMAGE_FOLDER = "img_align_celeba"
PARTITION_FILE = "list_eval_partition.txt"
PARTITION_OF_SPLIT = {"train": "0", "test": "2", "reference": "0"}


class ImageFileDataset(Dataset):
    """Center crop + resize of a list of image files; returns ((3, S, S) in [-1, 1], -1)."""

    def __init__(self, files: list[Path], crop_size: int, image_size: int, flip: bool) -> None:
        self.files = files
        self.crop_size = crop_size
        self.image_size = image_size
        self.flip = flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.files[index]
        img = load_rgb(path)
        if min(img.size) < self.crop_size:
            raise ValueError(f"{path} is {img.size[0]}x{img.size[1]}, smaller than crop_size={self.crop_size}")
        img = center_crop(img, self.crop_size)
        if self.crop_size != self.image_size:
            img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        x = pil_to_tensor(img)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, -1


def find_image_folder(root: Path) -> Path:
    """``root/img_align_celeba`` if present, else ``root`` itself; it must hold images."""
    folder = root / IMAGE_FOLDER if (root / IMAGE_FOLDER).is_dir() else root
    if not folder.is_dir() or not list_images(folder):
        raise FileNotFoundError(
            f"CelebA not found: expected {root}/{IMAGE_FOLDER}/*.jpg (from img_align_celeba.zip of the official "
            f"release, https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html) or a flat folder of images at {root}"
        )
    return folder


def read_partition(path: Path, split: str) -> set[str]:
    """File names of ``split`` from the official ``list_eval_partition.txt``."""
    names = set()
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ValueError(f"{path} line {line_no}: expected '<file name> <0|1|2>', got {line!r}")
        if parts[1] == PARTITION_OF_SPLIT[split]:
            names.add(parts[0])
    return names


def make_dataset(
    root: str,
    split: str,
    image_size: int = 64,
    crop_size: int = 178,
    flip: bool = True,
    test_fraction: float = 0.02,
    seed: int = 0,
) -> ImageFileDataset:
    """CelebA ``split`` ('train', 'test', or 'reference' = the training images).

    ``flip`` applies random horizontal flips to the train split only.
    """
    if split not in PARTITION_OF_SPLIT:
        raise ValueError(f"CelebA split must be one of {sorted(PARTITION_OF_SPLIT)}, got {split!r}")
    if image_size > crop_size:
        raise ValueError(f"CelebA image_size={image_size} must not exceed crop_size={crop_size}")
    root_path = Path(root).expanduser()
    folder = find_image_folder(root_path)
    files = list_images(folder)
    partition = root_path / PARTITION_FILE
    if partition.is_file():
        keep = read_partition(partition, split)
        files = [f for f in files if f.name in keep]
    else:
        files = [files[i] for i in seeded_split(len(files), split, test_fraction, seed).tolist()]
    augment = flip and split == "train"
    return ImageFileDataset(files, crop_size, image_size, augment)
