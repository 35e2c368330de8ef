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
    """The (N, D) float tensor in ``path``; every refusal is one ``ValueError`` (or
    ``FileNotFoundError``) line naming the config key that holds the path."""
    path = Path(path).expanduser()
    key = f"dataloaders.dataset.path={str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{key}: the points file does not exist: expected a .npy or .pt array of shape (N, D)")
    if path.stat().st_size == 0:
        raise ValueError(f"{key}: the points file is empty (0 bytes): expected a .npy or .pt array of shape (N, D)")
    if path.suffix == ".npy":
        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as err:  # EOFError: a header cut short
            raise ValueError(f"{key}: not a plain numeric .npy array ({err})") from None
        if loaded.dtype.kind not in "fiu":  # strings, booleans, complex, records: torch.from_numpy refuses or misreads them
            raise ValueError(f"{key}: the points file has dtype {loaded.dtype}: expected a float array of shape (N, D)")
        array = torch.from_numpy(loaded)
    elif path.suffix == ".pt":
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives; refuse anything else unread
            raise ValueError(f"{key}: not a torch.save file: expected a tensor of shape (N, D)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
            raise ValueError(f"{key}: not a tensor file readable with weights_only=True ({err})") from None
        array = obj["points"] if isinstance(obj, dict) and "points" in obj else obj
        if not isinstance(array, torch.Tensor):
            raise ValueError(f"{key}: the points file holds {type(array).__name__}: expected a tensor of shape (N, D)")
    else:
        raise ValueError(f"{key}: the points file has suffix {path.suffix!r}: expected .npy or .pt")
    if array.dim() != 2 or array.shape[0] < 2 or array.shape[1] < 1:
        raise ValueError(f"{key}: the points file has shape {tuple(array.shape)}: expected (N, D) with N >= 2")
    if not array.dtype.is_floating_point and array.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{key}: the points file has dtype {array.dtype}: expected a float array")
    array = array.float()
    if not torch.isfinite(array).all():
        raise ValueError(f"{key}: the points file contains NaN or infinite values")
    return array


def make_dataset(split: str, path: str, test_fraction: float = 0.1, seed: int = 0, dim: int | None = None) -> TensorTargetDataset:
    """``split`` is 'train', 'test' or 'reference' (the floor's second draw, taken from
    the training rows). ``dim`` (if set) must match the file's second axis."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"dataloaders.dataset.test_fraction={test_fraction}: expected a fraction in (0, 1)")
    points = load_points(path)
    if dim is not None and points.shape[1] != dim:
        raise ValueError(
            f"dataloaders.dataset.path={path!r} has D={points.shape[1]} but dataloaders.data_shape=[{dim}]: "
            f"set dataloaders.data_shape=[{points.shape[1]}]"
        )
    perm = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * points.shape[0])))
    rows = {"test": perm[:n_test], "train": perm[n_test:], "reference": perm[n_test:]}
    if split not in rows:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(rows)}")
    return TensorTargetDataset(points[rows[split]])
