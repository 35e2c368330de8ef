"""FID through clean-fid's own pipeline, with a small feature network instead of Inception."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cleanfid import fid as cleanfid_fid
from scipy import linalg
from torch import Tensor, nn

from evaluation.fid import (
    MISSING_REFERENCE,
    compute_fid,
    feature_statistics,
    frechet_distance,
    sample_features,
    to_rgb_uint8,
    write_png_folder,
)


class PoolFeatures(nn.Module):
    """Deterministic stand-in for Inception: 3x3 average-pooled RGB (27 features) of the
    (B, 3, 299, 299) input in [0, 255], mixed by a fixed random matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mix", torch.randn(27, 12, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[1:] == (3, 299, 299)
        pooled = F.adaptive_avg_pool2d(x / 255.0, 3).flatten(1)  # (B, 27)
        return torch.tanh(pooled @ self.mix)  # (B, 12), nonlinear so shifts change the covariance too


def smooth_images(n: int, seed: int, channels: int = 3, size: int = 16) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g) * 1.6 - 0.8
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    # Means only: the squared distance of the means.
    assert frechet_distance(mu, sigma, mu + 2.0, sigma) == pytest.approx(4.0 * 6, rel=1e-10)
    # Isotropic covariances: d (s1 - s2)^2 in standard deviations.
    d = 5
    assert frechet_distance(np.zeros(d), 4 * np.eye(d), np.zeros(d), 9 * np.eye(d)) == pytest.approx(d * 1.0)
    # Against scipy's general matrix square root on non-commuting covariances.
    b = rng.normal(size=(6, 6))
    sigma2 = b @ b.T + 0.5 * np.eye(6)
    covmean = linalg.sqrtm(sigma @ sigma2).real
    expected = np.sum((mu - 1) ** 2) + np.trace(sigma + sigma2 - 2 * covmean)
    assert frechet_distance(mu, sigma, np.ones(6), sigma2) == pytest.approx(expected, rel=1e-9)


def test_fid_equals_independent_distance_on_same_features(tmp_path):
    extractor = PoolFeatures()
    real = smooth_images(48, seed=1)
    fake = smooth_images(40, seed=2) * 0.9 + 0.05
    write_png_folder(real, tmp_path / "real")
    score = compute_fid(fake, str(tmp_path / "real"), feature_extractor=extractor, device="cpu", batch_size=16)
    # The same features, gathered separately: clean-fid's folder reader for the reference and
    # the generator path for the samples; then the independent eigh-based distance.
    real_feats = cleanfid_fid.get_folder_features(
        str(tmp_path / "real"), extractor, num_workers=0, batch_size=16, device=torch.device("cpu"), verbose=False
    )
    fake_feats = sample_features(fake, feature_extractor=extractor, device="cpu", batch_size=16)
    assert real_feats.shape == (48, 12) and fake_feats.shape == (40, 12)
    expected = frechet_distance(*feature_statistics(fake_feats), *feature_statistics(real_feats))
    assert score > 0.01
    assert score == pytest.approx(expected, rel=1e-6)


# The in-memory and PNG paths run the same uint8 images through the same resize and
# network, so their features agree up to float32 summation order, which varies by CPU.
# A real pipeline mistake moves them by orders of magnitude more (the cases below
# assert 100 tolerances), so a tolerance between the two tells them apart.
FEATURE_ATOL = 1e-5


def max_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def test_sample_path_matches_png_folder_path(tmp_path):
    """Samples fed from memory give the features of the same images saved as PNG."""
    extractor = PoolFeatures()
    images = smooth_images(10, seed=3)
    write_png_folder(images, tmp_path)
    from_png = cleanfid_fid.get_folder_features(
        str(tmp_path), extractor, num_workers=0, batch_size=4, device=torch.device("cpu"), verbose=False
    )
    from_memory = sample_features(images, feature_extractor=extractor, device="cpu", batch_size=4)
    assert from_memory.shape == from_png.shape == (10, 12)
    assert max_gap(from_memory, from_png) < FEATURE_ATOL

    # What the tolerance still catches: each mistake lies far outside it.
    def resized_by_torch(mode: str) -> np.ndarray:  # not clean-fid's PIL bicubic resize
        x = F.interpolate(to_rgb_uint8(images).float(), size=(299, 299), mode=mode, align_corners=False)
        return extractor(x).numpy()

    wrong = {
        "channels swapped (BGR)": sample_features(images[:, [2, 1, 0]], feature_extractor=extractor, device="cpu"),
        "one grey level brighter": sample_features((images + 2 / 255).clamp(-1, 1), feature_extractor=extractor, device="cpu"),
        "torch bicubic resize": resized_by_torch("bicubic"),
        "bilinear resize": resized_by_torch("bilinear"),
    }  # fmt: skip
    for mistake, feats in wrong.items():
        assert max_gap(feats, from_png) > 100 * FEATURE_ATOL, mistake


def test_fid_zero_for_identical_sets_and_grows_with_shift(tmp_path):
    extractor = PoolFeatures()
    real = smooth_images(40, seed=4)
    write_png_folder(real, tmp_path)
    kwargs = {"feature_extractor": extractor, "device": "cpu", "batch_size": 20}
    same = compute_fid(real, str(tmp_path), **kwargs)
    small = compute_fid((real + 0.1).clamp(-1, 1), str(tmp_path), **kwargs)
    large = compute_fid((real + 0.3).clamp(-1, 1), str(tmp_path), **kwargs)
    assert abs(same) < 1e-6
    assert 0 < small < large


def test_grey_samples_repeat_to_rgb(tmp_path):
    extractor = PoolFeatures()
    grey = smooth_images(12, seed=5, channels=1)
    write_png_folder(grey.expand(-1, 3, -1, -1), tmp_path)
    assert abs(compute_fid(grey, str(tmp_path), feature_extractor=extractor, device="cpu")) < 1e-6


def test_rng_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    sample_features(smooth_images(5, seed=6), feature_extractor=PoolFeatures(), device="cpu", batch_size=2)
    torch.testing.assert_close(torch.rand(3), expected)


def test_npz_reference(tmp_path):
    extractor = PoolFeatures()
    images = smooth_images(20, seed=7)
    mu, sigma = feature_statistics(sample_features(images, feature_extractor=extractor, device="cpu"))
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    assert abs(compute_fid(images, str(tmp_path / "stats.npz"), feature_extractor=extractor, device="cpu")) < 1e-6


def test_reference_errors(tmp_path):
    images = smooth_images(4, seed=8)
    for reference in (None, ""):
        with pytest.raises(ValueError) as info:
            compute_fid(images, reference, feature_extractor=PoolFeatures(), device="cpu")
        assert str(info.value) == MISSING_REFERENCE and "\n" not in MISSING_REFERENCE
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compute_fid(images, str(tmp_path / "absent"), feature_extractor=PoolFeatures(), device="cpu")
    with pytest.raises(ValueError, match="custom feature extractor"):
        compute_fid(images, "cifar10", feature_extractor=PoolFeatures(), device="cpu")
    with pytest.raises(ValueError, match="shape"):
        compute_fid(torch.zeros(4, 4, 8, 8), str(tmp_path), feature_extractor=PoolFeatures(), device="cpu")
    with pytest.raises(ValueError, match="holds 0 images"):
        compute_fid(images, str(tmp_path), feature_extractor=PoolFeatures(), device="cpu")
