"""CIFAR-10 read from the official python-pickle batches.

Expected on disk (what ``cifar-10-python.tar.gz`` unpacks to, and where torchvision
puts it)::

    <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5   (train, 50000 images)
    <root>/cifar-10-batches-py/test_batch                      (test, 10000 images)

Each batch is a pickled dict with ``b"data"`` uint8 (N, 3072) — 1024 red, then
1024 green, then 1024 blue values of a 32x32 image in row-major order — and
``b"labels"`` (N ints in 0..9).

The batches are read here rather than through torchvision, whose MD5 check rejects
anything but the full official files (tests write tiny batches in the same format).
A plain ``pickle.load`` would run whatever code a tampered batch names, so the batches
are read by ``BatchUnpickler``, which builds numpy arrays, dicts, lists, str and bytes
and refuses every other object: a data folder from someone else cannot run code.
``download=True`` fetches the official tarball once through torchvision, which
verifies the checksum.
"""

import codecs
import io
import pickle
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor

from dataloaders.base_dataloaders import TensorTargetDataset
from dataloaders.image_folder import SPLITS, random_hflip
from dataloaders.images import from_uint8

NUM_CLASSES = 10
BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array reconstructors, wherever this numpy version keeps them
FROMBUFFER = np.zeros(0).__reduce_ex__(5)[0]


class RefusedObject(pickle.UnpicklingError):
    """A pickle that names an object a CIFAR-10 batch does not hold."""


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that can build what a CIFAR-10 batch holds and nothing else.

    The containers and scalars (dict, list, str, bytes, int) are pickle opcodes that
    name no object; the only objects a batch names are numpy's array reconstruction
    (under its numpy 1 and numpy 2 module names) and ``_codecs.encode``, which
    protocol 2 uses for bytes. Any other name (``os.system``, ``builtins.eval``, a
    class with a ``__reduce__``) is refused before anything is called.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT,
        ("numpy.core.numeric", "_frombuffer"): FROMBUFFER,  # protocol 5's out-of-band arrays
        ("numpy._core.numeric", "_frombuffer"): FROMBUFFER,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str):
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise RefusedObject(f"it asks for the Python object {module}.{name}")
        return found


def read_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One pickle batch -> uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    try:
        entry = BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except RefusedObject as err:
        raise ValueError(f"{path} is refused: {err}, and a CIFAR-10 batch holds only numpy arrays, dicts, lists, "
                         "str and bytes (a tampered or foreign file?)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:  # malformed
        raise ValueError(f"{path} is not a readable CIFAR-10 batch (truncated or corrupt?): {type(err).__name__}: {err}") from None
    if not isinstance(entry, dict) or b"data" not in entry or b"labels" not in entry:
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a pickled dict with b'data' and b'labels'")
    data = torch.as_tensor(entry[b"data"])
    labels = torch.as_tensor(entry[b"labels"], dtype=torch.long)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: expected uint8 data (N, 3072) and N labels, got {data.dtype} {tuple(data.shape)} "
            f"and {tuple(labels.shape)} labels"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{path}: labels must lie in 0..9, got {labels.min().item()}..{labels.max().item()}")
    return data.reshape(-1, 3, 32, 32), labels  # channel planes are stored one after another


def batch_files(root: Path, split: str) -> list[Path]:
    """The batch files for ``split``, checked to exist (one-line error naming the expected layout)."""
    if split not in SPLITS:
        raise ValueError(f"CIFAR-10 split must be one of {SPLITS}, got {split!r}")
    folder = root / BATCH_FOLDER
    files = [folder / name for name in (TEST_FILES if split == "test" else TRAIN_FILES)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: expected {folder}/{{data_batch_1..5,test_batch}} (missing {', '.join(missing)}); "
            f"set dataloaders.download=true or unpack {URL} into {root}"
        )
    return files


class CIFAR10Dataset(TensorTargetDataset):
    """CIFAR-10 held as uint8 in memory; yields float32 (3, 32, 32) in [-1, 1] and a label 0..9.

    ``get_batch`` converts and flips a whole batch at once (the adapter uses it).
    """

    def __init__(self, images: Tensor, labels: Tensor, flip: bool) -> None:
        super().__init__(images, labels, num_classes=NUM_CLASSES)
        self.flip = flip

    def _prepare(self, x: Tensor) -> Tensor:
        x = from_uint8(x)
        return random_hflip(x) if self.flip else x

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self._prepare(self.data[index : index + 1])[0], int(self.labels[index])

    def get_batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self._prepare(self.data[idx]), self.labels[idx]


def make_dataset(root: str, split: str, flip: bool = True, download: bool = False) -> CIFAR10Dataset:
    """CIFAR-10 ``split`` ('train', 'test', or 'reference' = the training batches) from ``root``.

    ``flip`` applies random horizontal flips to the training split only; held-out
    data is returned as stored.
    """
    root_path = Path(root).expanduser()
    if download:
        # Fetches and unpacks the official tarball (MD5-checked); a no-op when it is already there.
        torchvision.datasets.CIFAR10(str(root_path), train=True, download=True)
    batches = [read_batch(path) for path in batch_files(root_path, split)]
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    return CIFAR10Dataset(images, labels, flip and split == "train")
