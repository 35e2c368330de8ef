"""A user's own point cloud as the target distribution: a ``.npy`` or ``.pt`` file
holding a float array of shape (N, D). ``.pt`` files are read with
``weights_only=True`` (a tensor, or a dict with a ``points`` tensor). The held-out
split is a fixed random ``test_fraction`` of the rows (chosen by ``seed``).
"""

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from dataloaders.base_dataloaders import TensorTargetDataset


def load_points(path: str | Path) -> torch.Tensor:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"points file {str(path)!r} does not exist: expected a .npy or .pt array of shape (N, D)")
    if path.suffix == ".npy":
        try:
            array = torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as err:
            raise ValueError(f"points file {str(path)!r} is not a plain numeric .npy array ({err})") from None
    elif path.suffix == ".pt":
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives; refuse anything else unread
            raise ValueError(f"points file {str(path)!r} is not a torch.save file: expected a tensor of shape (N, D)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
            raise ValueError(f"points file {str(path)!r} is not a tensor file readable with weights_only=True ({err})") from None
        array = obj["points"] if isinstance(obj, dict) and "points" in obj else obj
        if not isinstance(array, torch.Tensor):
            raise ValueError(f"points file {str(path)!r} holds {type(array).__name__}: expected a tensor of shape (N, D)")
    else:
        raise ValueError(f"points file {str(path)!r} has suffix {path.suffix!r}: expected .npy or .pt")
    if array.dim() != 2 or array.shape[0] < 2 or array.shape[1] < 1:
        raise ValueError(f"points file {str(path)!r} has shape {tuple(array.shape)}: expected (N, D) with N >= 2")
    if not array.dtype.is_floating_point and array.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"points file {str(path)!r} has dtype {array.dtype}: expected a float array")
    array = array.float()
    if not torch.isfinite(array).all():
        raise ValueError(f"points file {str(path)!r} contains NaN or infinite values")
    return array


def make_dataset(split: str, path: str, test_fraction: float = 0.1, seed: int = 0, dim: int | None = None) -> TensorTargetDataset:
    """``split`` is 'train', 'test' or 'reference' (the floor's second draw, taken from
    the training rows). ``dim`` (if set) must match the file's second axis."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"points test_fraction must lie in (0, 1), got {test_fraction}")
    points = load_points(path)
    if dim is not None and points.shape[1] != dim:
        raise ValueError(
            f"points file {path!r} has D={points.shape[1]} but dataloaders.data_shape=[{dim}]: "
            f"set dataloaders.data_shape=[{points.shape[1]}]"
        )
    perm = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * points.shape[0])))
    rows = {"test": perm[:n_test], "train": perm[n_test:], "reference": perm[n_test:]}
    if split not in rows:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(rows)}")
    return TensorTargetDataset(points[rows[split]])
