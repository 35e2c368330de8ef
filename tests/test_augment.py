"""The EDM augment pipe on a real photograph (scikit-learn's bundled ``china.jpg``, no
download): each operation's geometry against an independent warp (``scipy.ndimage``,
bilinear, mirrored borders) driven only by the returned label, the label layout, and
how often each operation fires."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.datasets import load_sample_image

from dataloaders.augment import AugmentPipe

SIZE = 32
CHANNELS = 3


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A 3x32x32 crop of a real photograph in [-1, 1] (area-downsampled from 128x128)."""
    crop = torch.tensor(load_sample_image("china.jpg")[100:228, 200:328], dtype=torch.float32)
    return torch.nn.functional.avg_pool2d(crop.permute(2, 0, 1)[None], 4)[0] / 127.5 - 1


def batch(photo: torch.Tensor, n: int) -> torch.Tensor:
    # different content per row: the photo rolled by the row index, so a row mix-up shows
    return torch.stack([photo.roll(k, dims=2) for k in range(n)])


def scipy_warp(image: np.ndarray, g_inv: np.ndarray) -> np.ndarray:
    """Independent warp: output (y, x) reads input at g_inv applied to the centred (x, y)."""
    _, height, width = image.shape
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    a, t = g_inv[:2, :2], g_inv[:2, 2]
    matrix = np.array([[a[1, 1], a[1, 0]], [a[0, 1], a[0, 0]]])  # (x, y) -> (row, column)
    offset = t[::-1] + centre - matrix @ centre
    return np.stack([ndimage.affine_transform(c, matrix, offset=offset, order=1, mode="mirror") for c in image])


def rotation(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def scaling(sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0])


def translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])


def test_nothing_applied_leaves_images_and_label_zero(photo):
    images = batch(photo, 16)
    out, label = AugmentPipe.meanflow_cifar10(p=0.0)(images)
    assert torch.equal(out, images)
    assert label.shape == (16, 6) and label.dtype == torch.float32 and not label.any()


def test_meanflow_recipe_label_layout():
    pipe = AugmentPipe.meanflow_cifar10()
    assert pipe.label_dim == 6 and pipe.p == 0.12
    assert (pipe.xflip, pipe.scale, pipe.aniso, pipe.translate_frac, pipe.translate_int) == (1e8, 1, 1, 1, 0)
    assert AugmentPipe(xflip=1, translate_int=1).label_dim == 3


def test_a_flip_is_a_flip(photo):
    images = batch(photo, 64)
    out, label = AugmentPipe(p=1.0, xflip=1)(images, torch.Generator().manual_seed(0))
    flipped = label[:, 0] == 1
    assert 0 < flipped.sum() < 64 and set(label[:, 0].tolist()) <= {0.0, 1.0}
    assert torch.equal(out[flipped], images[flipped].flip(3))
    assert torch.equal(out[~flipped], images[~flipped])


def test_integer_translation_moves_content_by_the_labelled_offset(photo):
    images = batch(photo, 32)
    pipe = AugmentPipe(p=1.0, translate_int=1)
    out, label = pipe(images, torch.Generator().manual_seed(1))
    span = SIZE * pipe.translate_int_max
    tx, ty = (label[:, 0] * span).round().long(), (label[:, 1] * span).round().long()
    assert torch.allclose(label[:, 0] * span, tx.float()) and (tx.abs() <= 4).all()
    assert (tx != 0).any() and (ty != 0).any()
    for k in range(32):
        dx, dy = int(tx[k]), int(ty[k])
        # EDM's convention: content moves right by tx and up by ty (output (y, x) = input (y + ty, x - tx))
        ys, xs = slice(max(0, -dy), SIZE - max(0, dy)), slice(max(0, dx), SIZE - max(0, -dx))
        src_ys, src_xs = slice(ys.start + dy, ys.stop + dy), slice(xs.start - dx, xs.stop - dx)
        assert torch.equal(out[k][:, ys, xs], images[k][:, src_ys, src_xs])


@pytest.mark.parametrize(
    "op, geometry",
    [
        ("translate_frac", lambda lab: translation(-lab[0] * SIZE * 0.125, -lab[1] * SIZE * 0.125)),
        ("scale", lambda lab: scaling(2 ** (-0.2 * lab[0]), 2 ** (-0.2 * lab[0]))),
        ("aniso", lambda lab: scaling(2 ** (-0.2 * lab[0]), 2 ** (0.2 * lab[0]))),  # axis x (no rotation)
    ],
)
def test_geometric_ops_match_an_independent_warp_from_the_label(photo, op, geometry):
    """Each op alone at p = 1: the image equals scipy's bilinear warp by the inverse map
    that the label describes, and not the warp by its inverse (the opposite direction)."""
    images = batch(photo, 8)
    pipe = AugmentPipe(p=1.0, aniso_rotate_prob=0.0, **{op: 1})
    out, label = pipe(images, torch.Generator().manual_seed(2))
    assert label.shape == (8, pipe.label_dim)
    for k in range(8):
        g_inv = geometry(label[k].double().numpy())
        expected = scipy_warp(images[k].double().numpy(), g_inv)
        opposite = scipy_warp(images[k].double().numpy(), np.linalg.inv(g_inv))
        err = np.abs(out[k].double().numpy() - expected).max()
        assert err < 1e-4, (k, err)
        if np.abs(label[k].numpy()).max() > 0.3:  # a visible move
            assert np.abs(out[k].double().numpy() - opposite).mean() > 0.02


def test_rotated_anisotropic_scaling_matches_its_label(photo):
    """With a rotated frame the label is (w cos r, w sin r); it fixes the stretch axis up
    to the sign of w, as in EDM, so the image must match one of the two readings."""
    images = batch(photo, 8)
    out, label = AugmentPipe(p=1.0, aniso=1, aniso_rotate_prob=1.0)(images, torch.Generator().manual_seed(3))
    for k in range(8):
        v = label[k].double().numpy()
        w, r = math.hypot(*v), math.atan2(v[1], v[0])
        errors = []
        for ws, rs in ((w, r), (-w, r + math.pi)):
            s = 2 ** (0.2 * ws)
            g_inv = rotation(-rs) @ scaling(1 / s, s) @ rotation(rs)
            errors.append(np.abs(out[k].double().numpy() - scipy_warp(images[k].double().numpy(), g_inv)).max())
        assert min(errors) < 1e-4, (k, errors)


def test_each_op_fires_with_probability_p():
    n, p = 40_000, 0.12
    images = torch.zeros(n, 1, 4, 4)
    _, label = AugmentPipe.meanflow_cifar10(p=p)(images, torch.Generator().manual_seed(4))

    def fraction_ok(applied: torch.Tensor, q: float) -> bool:
        return abs(applied.float().mean().item() - q) < 4.5 * math.sqrt(q * (1 - q) / n)

    assert fraction_ok(label[:, 0] == 1, 0.5)  # xflip=1e8 saturates: a fair coin on every image
    assert fraction_ok(label[:, 1] != 0, p)  # isotropic scale
    aniso = (label[:, 2:4] != 0).any(dim=1)
    assert fraction_ok(aniso, p)
    assert fraction_ok(label[aniso, 3] != 0, 0.5)  # rotated frame with probability aniso_rotate_prob
    assert fraction_ok((label[:, 4:6] != 0).any(dim=1), p)  # fractional translation
    # the three geometric ops are drawn independently
    assert fraction_ok((label[:, 1:] == 0).all(dim=1), (1 - p) ** 3)
    # the applied strengths are standard normal draws (EDM's label units)
    assert abs(label[label[:, 1] != 0, 1].std().item() - 1) < 0.05


def test_same_generator_same_augmentation(photo):
    images = batch(photo, 8)
    pipe = AugmentPipe.meanflow_cifar10(p=0.5)
    a = pipe(images, torch.Generator().manual_seed(5))
    b = pipe(images, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].min() >= -1 and a[0].max() <= 1  # bilinear on a mirrored image stays in range


def test_bad_settings_fail_in_one_line():
    with pytest.raises(ValueError, match="augment probability p must be in \\[0, 1\\], got 1.5"):
        AugmentPipe(p=1.5)
    with pytest.raises(ValueError, match="augment multiplier scale must be a number >= 0, got -1"):
        AugmentPipe(scale=-1)
