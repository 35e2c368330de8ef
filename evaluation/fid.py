"""FID (Heusel et al. 2017) through clean-fid (Parmar et al. 2022).

Generated samples (float, [-1, 1], (N, C, H, W)) are quantised to uint8 exactly as
saving them to PNG would, then fed to clean-fid's own feature pipeline for
generators (``get_model_features``: per-image resize to 299x299 with PIL bicubic in
mode 'clean', then the feature network). Nothing is written to disk; the features
are identical to those of the same images saved as PNG and read back by
``get_folder_features``.

The reference is one of:

* a folder of real images (clean-fid's folder features, all image files below it);
* a ``.npz`` file with ``mu`` and ``sigma`` (e.g. statistics saved earlier);
* a clean-fid dataset name such as ``cifar10`` (its published Inception statistics
  for ``dataset_split`` / ``dataset_res``, downloaded once into clean-fid's package).

``feature_extractor`` replaces clean-fid's Inception network (clean-fid's
``custom_feat_extractor``): any module mapping float (B, 3, 299, 299) in [0, 255] to
features (B, D). Tests use a small deterministic one; Inception's weights are
downloaded on first use. Published statistics are Inception features, so they
cannot be paired with a custom extractor.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.features import build_feature_extractor, get_reference_statistics
from cleanfid.utils import EXTENSIONS
from PIL import Image
from scipy import linalg
from torch import Tensor, nn

from dataloaders.images import from_uint8, to_uint8

MISSING_REFERENCE = (
    "FID needs a reference: set eval.fid.reference=/path/to/real/images or a clean-fid dataset name such as cifar10"
)
MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")

# Loaded once per process: the Inception network, and reference statistics of folders
# (a 50k-image folder takes minutes to featurise, and evaluation repeats every few epochs).
_inception_cache: dict[tuple[str, str], Callable[[Tensor], Tensor]] = {}
_folder_stats_cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (Heusel et al. 2017, Eq. 6), in float64.

    ``Tr (S1 S2)^{1/2}`` is taken as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix ``S1^{1/2} S2 S1^{1/2}``, which has the same spectrum as
    ``S1 S2``; both square roots come from ``eigh``, so the result is real without
    the imaginary-part clean-up a general ``sqrtm`` needs.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"FID statistics disagree: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    evals1, evecs1 = linalg.eigh(sigma1)
    sqrt_sigma1 = (evecs1 * np.sqrt(np.clip(evals1, 0.0, None))) @ evecs1.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    tr_covmean = np.sqrt(np.clip(linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), as clean-fid computes them."""
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def check_images(samples: Tensor) -> None:
    if samples.dim() != 4 or samples.shape[1] not in (1, 3) or samples.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images (N, 1 or 3, H, W) in [-1, 1], got shape {tuple(samples.shape)}")


def to_rgb_uint8(samples: Tensor) -> Tensor:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, 3, H, W) on the CPU, rounded as a PNG save would;
    grey images (C = 1) are repeated to three channels."""
    check_images(samples)
    x = to_uint8(samples.detach().float().cpu())
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def write_png_folder(samples: Tensor, folder: Path) -> list[Path]:
    """Save samples ([-1, 1], (N, C, H, W)) as ``000000.png`` ... in ``folder`` (e.g. to build a reference)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = to_rgb_uint8(samples).permute(0, 2, 3, 1).numpy()
    paths = [folder / f"{i:06d}.png" for i in range(images.shape[0])]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
    return paths


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_feature_extractor(mode: str, device: torch.device) -> Callable[[Tensor], Tensor]:
    """clean-fid's Inception network for ``mode`` (weights downloaded on first use), cached."""
    key = (mode, str(device))
    if key not in _inception_cache:
        _inception_cache[key] = build_feature_extractor(mode, device, use_dataparallel=False)
    return _inception_cache[key]


class _SampleFeeder:
    """A clean-fid "generator" that ignores its latent and returns the next stored images as
    float (B, 3, H, W) in [0, 255]. clean-fid always asks for whole batches and trims the
    features to ``num_gen`` afterwards, so the last batch is padded by repetition."""

    def __init__(self, images: Tensor, batch_size: int) -> None:
        self.images = images
        self.batch_size = batch_size
        self.position = 0

    def __call__(self, z: Tensor) -> Tensor:
        index = torch.arange(self.position, self.position + self.batch_size).clamp(max=self.images.shape[0] - 1)
        self.position += self.batch_size
        return self.images[index].float()


def sample_features(
    samples: Tensor,
    mode: str = "clean",
    feature_extractor: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    verbose: bool = False,
) -> np.ndarray:
    """Features (N, D) of generated samples ([-1, 1], (N, C, H, W)) through clean-fid."""
    if mode not in MODES:
        raise ValueError(f"FID mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device) if device is not None else default_device()
    model = feature_extractor if feature_extractor is not None else get_feature_extractor(mode, device)
    images = to_rgb_uint8(samples)
    feeder = _SampleFeeder(images, batch_size)
    # clean-fid draws a latent per batch from the global RNG; keep the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        return cleanfid_fid.get_model_features(
            feeder, model, mode=mode, z_dim=1, num_gen=images.shape[0], batch_size=batch_size,
            device=device, verbose=verbose,
        )


def reference_statistics(
    reference: str | None,
    mode: str = "clean",
    feature_extractor: Callable[[Tensor], Tensor] | None = None,
    num_workers: int = 0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dataset_res: int = 32,
    dataset_split: str = "train",
    verbose: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of the reference: an image folder, a ``.npz`` with mu/sigma, or a clean-fid name."""
    if not reference:
        raise ValueError(MISSING_REFERENCE)
    if mode not in MODES:
        raise ValueError(f"FID mode must be one of {MODES}, got {mode!r}")
    path = Path(reference).expanduser()
    if path.is_dir():
        key = (str(path.resolve()), mode)
        if feature_extractor is None and key in _folder_stats_cache:
            return _folder_stats_cache[key]
        num_images = sum(1 for p in path.rglob("*") if p.suffix[1:] in EXTENSIONS)
        if num_images < 2:
            raise ValueError(f"FID reference folder {path} holds {num_images} images; it needs at least 2")
        device = torch.device(device) if device is not None else default_device()
        model = feature_extractor if feature_extractor is not None else get_feature_extractor(mode, device)
        feats = cleanfid_fid.get_folder_features(
            str(path), model, num_workers=num_workers, batch_size=batch_size, device=device, mode=mode,
            description=f"FID reference {path.name}: ", verbose=verbose,
        )
        stats = feature_statistics(feats)
        if feature_extractor is None:
            _folder_stats_cache[key] = stats
        return stats
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"FID reference statistics {path} do not exist")
        with np.load(path) as stats:
            if "mu" not in stats or "sigma" not in stats:
                raise ValueError(f"FID reference {path} must hold arrays 'mu' and 'sigma', found {sorted(stats.files)}")
            return stats["mu"], stats["sigma"]
    if "/" in reference or "\\" in reference or path.suffix:
        raise FileNotFoundError(f"FID reference folder {path} does not exist")
    if feature_extractor is not None:
        raise ValueError(
            f"FID reference {reference!r} names published Inception statistics; they cannot be compared with "
            f"a custom feature extractor: use a folder of real images instead"
        )
    return get_reference_statistics(reference, dataset_res, mode=mode, seed=0, split=dataset_split)


def compute_fid(
    samples: Tensor,
    reference: str | None,
    mode: str = "clean",
    feature_extractor: Callable[[Tensor], Tensor] | nn.Module | None = None,
    num_workers: int = 0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dataset_res: int | None = None,
    dataset_split: str = "train",
    verbose: bool = False,
) -> float:
    """FID between ``samples`` (float (N, C, H, W) in [-1, 1]; C = 1 is repeated to RGB) and ``reference``.

    Args:
        reference: folder of real images, ``.npz`` with ``mu``/``sigma``, or a clean-fid
            dataset name (``cifar10``).
        mode: clean-fid mode: 'clean' (PIL bicubic resize to 299), 'legacy_pytorch',
            'legacy_tensorflow'.
        feature_extractor: replaces Inception (clean-fid's ``custom_feat_extractor``);
            maps float (B, 3, 299, 299) in [0, 255] to (B, D).
        num_workers: DataLoader workers for reading the reference folder.
        batch_size: images per feature-network call.
        device: where the feature network runs (default: CUDA if available, else CPU).
        dataset_res: resolution of a named statistic (default: the samples' height).
        dataset_split: split of a named statistic ('train' or 'test').
    """
    check_images(samples)
    res = dataset_res if dataset_res is not None else samples.shape[-2]
    mu_ref, sigma_ref = reference_statistics(
        reference, mode, feature_extractor, num_workers, batch_size, device, res, dataset_split, verbose
    )
    feats = sample_features(samples, mode, feature_extractor, batch_size, device, verbose)
    mu, sigma = feature_statistics(feats)
    # clean-fid's own Frechet distance (scipy sqrtm), so scores match its published numbers.
    return float(cleanfid_fid.frechet_distance(mu, sigma, mu_ref, sigma_ref))



class PooledPixelFeatures(nn.Module):
    """A fixed, seeded stand-in for Inception that needs no download: 4x4 average-pooled
    RGB (48 values) of clean-fid's (B, 3, 299, 299) input in [0, 255], mixed by a fixed
    random matrix and a tanh (32 features). Scores from it are only comparable with
    each other: use it for CPU demos and tests, never to compare with published FID."""

    def __init__(self, seed: int = 0, dim: int = 32) -> None:
        super().__init__()
        self.register_buffer("mix", torch.randn(48, dim, generator=torch.Generator().manual_seed(seed)) / 48**0.5)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(from_uint8(x), 4).flatten(1)  # (B, 48)
        return torch.tanh(2.0 * pooled @ self.mix)  # (B, dim)


FEATURE_EXTRACTORS = ("inception", "pooled")


def make_feature_extractor(name: str) -> nn.Module | None:
    """``inception`` (None: clean-fid's own network) or ``pooled`` (``PooledPixelFeatures``)."""
    if name == "inception":
        return None
    if name == "pooled":
        return PooledPixelFeatures()
    raise ValueError(f"eval.fid.feature_extractor={name!r}: expected one of {list(FEATURE_EXTRACTORS)}")


def fid_against_images(
    samples: Tensor,
    real: Tensor,
    mode: str = "clean",
    feature_extractor: Callable[[Tensor], Tensor] | nn.Module | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> float:
    """FID between two image tensors in [-1, 1], both through clean-fid's sample pipeline
    (the reference ``heldout``: the data set's held-out images, no folder needed)."""
    check_images(samples)
    check_images(real)
    mu, sigma = feature_statistics(sample_features(samples, mode, feature_extractor, batch_size, device))
    mu_ref, sigma_ref = feature_statistics(sample_features(real, mode, feature_extractor, batch_size, device))
    return float(cleanfid_fid.frechet_distance(mu, sigma, mu_ref, sigma_ref))
