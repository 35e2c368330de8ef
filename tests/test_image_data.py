"""Image data sets read small files written here in each data set's real on-disk format; the
uint8 <-> [-1, 1] maps they share."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader

from dataloaders import celeba, cifar10, digits, imagenet
from dataloaders.base_dataloaders import DictDatasetAdapter, collate_base_items
from dataloaders.image_folder import seeded_split
from dataloaders.images import from_uint8, to_uint8

# ---------------------------------------------------------------------------------
# The two image ranges
# ---------------------------------------------------------------------------------


def test_uint8_levels_round_trip_and_round_to_the_nearest():
    levels = torch.arange(256, dtype=torch.uint8)
    x = from_uint8(levels)
    assert x.dtype == torch.float32 and x[0] == -1 and x[-1] == 1
    assert torch.equal(to_uint8(x), levels)
    step = 2 / 255  # one level in [-1, 1]
    assert torch.equal(to_uint8(x[:-1] + 0.4 * step), levels[:-1])  # under half a level: kept
    assert torch.equal(to_uint8(x[:-1] + 0.6 * step), levels[1:])  # over half: the next (not floored)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # outside [-1, 1]: clamped


# ---------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------


def write_cifar(root: Path, per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Tiny CIFAR-10 in the official pickle format; returns what was written per file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for i, name in enumerate([*cifar10.TRAIN_FILES, *cifar10.TEST_FILES]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        with (folder / name).open("wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, f)
        written[name] = (data, labels)
    return written


def test_cifar10_values_and_labels_exact(tmp_path):
    written = write_cifar(tmp_path)
    train = cifar10.make_dataset(str(tmp_path), split="train", flip=False)
    test = cifar10.make_dataset(str(tmp_path), split="test", flip=False)
    assert len(train) == 15 and len(test) == 3
    data, labels = written["data_batch_2"]
    x, y = train[3]  # first image of the second batch
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == labels[0]
    # Plane order: red (1024 values), green, blue, each row-major 32x32.
    expected = torch.from_numpy(data[0].astype(np.float32)).reshape(3, 32, 32) / 127.5 - 1
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    assert x[1, 2, 5].item() == pytest.approx(data[0, 1024 + 2 * 32 + 5] / 127.5 - 1)
    xb, yb = train.get_batch([0, 3])
    torch.testing.assert_close(xb[1], expected, rtol=0, atol=1e-6)
    assert yb.tolist() == [written["data_batch_1"][1][0], labels[0]]
    assert test[2][1] == written["test_batch"][1][2]
    assert float(train.data.float().min()) >= 0 and x.min() >= -1 and x.max() <= 1


def test_cifar10_flip(tmp_path):
    write_cifar(tmp_path)
    plain = cifar10.make_dataset(str(tmp_path), split="train", flip=False)
    flipped = cifar10.make_dataset(str(tmp_path), split="train", flip=True)
    torch.manual_seed(0)
    xb, _ = flipped.get_batch(list(range(15)))
    ref, _ = plain.get_batch(list(range(15)))
    is_flip = [bool(torch.equal(a, r.flip(-1))) for a, r in zip(xb, ref)]
    is_same = [bool(torch.equal(a, r)) for a, r in zip(xb, ref)]
    assert all(f or s for f, s in zip(is_flip, is_same))
    assert any(is_flip) and any(is_same)
    # Held-out data is never augmented.
    test = cifar10.make_dataset(str(tmp_path), split="test", flip=True)
    assert not test.flip


def test_cifar10_through_adapter(tmp_path):
    write_cifar(tmp_path)
    adapter = DictDatasetAdapter(cifar10.make_dataset(str(tmp_path), split="train"))
    batch = next(iter(DataLoader(adapter, batch_size=4, collate_fn=collate_base_items)))
    assert batch.raw_target.shape == batch.raw_source.shape == (4, 3, 32, 32) and batch.label.dtype == torch.long
    assert batch.at_time(torch.rand(4)).unified_input.shape == (4, 5, 32, 32)


def test_cifar10_bad_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataloaders.download=true") as info:
        cifar10.make_dataset(str(tmp_path / "nowhere"), split="train")
    assert "\n" not in str(info.value) and "cifar-10-python.tar.gz" in str(info.value)


def test_cifar10_wrong_contents(tmp_path):
    write_cifar(tmp_path)
    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="test_batch"):
        cifar10.make_dataset(str(tmp_path), split="test")


# ---------------------------------------------------------------------------------
# CelebA and ImageNet class folders (real JPEG / PNG files)
# ---------------------------------------------------------------------------------


def solid_image(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_celeba_crop_resize_and_split(tmp_path):
    folder = tmp_path / "img_align_celeba"
    for i in range(10):
        solid_image(folder / f"{i + 1:06d}.jpg", (178, 218), (10 * i, 100, 200))
    train = celeba.make_dataset(str(tmp_path), split="train", image_size=32, test_fraction=0.2)
    test = celeba.make_dataset(str(tmp_path), split="test", image_size=32, test_fraction=0.2)
    assert len(train) == 8 and len(test) == 2
    assert not set(train.files) & set(test.files)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and y == -1 and x.min() >= -1 and x.max() <= 1
    # A solid colour survives crop + resize (up to JPEG rounding).
    assert x[2].mean().item() == pytest.approx(200 / 127.5 - 1, abs=0.03)


def test_celeba_official_partition_and_flat_folder(tmp_path):
    for i in range(6):
        solid_image(tmp_path / f"{i + 1:06d}.png", (60, 80), (i, i, i))
    lines = [f"{i + 1:06d}.png {p}" for i, p in enumerate([0, 0, 0, 1, 2, 2])]
    (tmp_path / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    train = celeba.make_dataset(str(tmp_path), split="train", image_size=16, crop_size=48)
    test = celeba.make_dataset(str(tmp_path), split="test", image_size=16, crop_size=48)
    assert [p.name for p in train.files] == ["000001.png", "000002.png", "000003.png"]
    assert [p.name for p in test.files] == ["000005.png", "000006.png"]
    assert train[1][0].shape == (3, 16, 16)


def test_celeba_bad_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="img_align_celeba") as info:
        celeba.make_dataset(str(tmp_path / "missing"), split="train")
    assert "\n" not in str(info.value)


def test_imagenet_class_folders(tmp_path):
    colours = {"n02": (255, 0, 0), "n01": (0, 255, 0), "n03": (0, 0, 255)}
    for wnid, colour in colours.items():
        solid_image(tmp_path / wnid / f"{wnid}_1.JPEG", (80, 60), colour)
        solid_image(tmp_path / wnid / f"{wnid}_2.png", (50, 70), colour)
    ds = imagenet.make_dataset(split="train", mode="images", image_dir=str(tmp_path), image_size=32, num_classes=3)
    assert ds.classes == ["n01", "n02", "n03"] and len(ds) == 6
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 32, 32)
        channel = int(x.mean(dim=(1, 2)).argmax())  # the saturated colour channel
        assert channel == {"n01": 1, "n02": 0, "n03": 2}[ds.classes[y]]


def test_adm_center_crop_shapes():
    img = Image.new("RGB", (1000, 600))
    assert imagenet.adm_center_crop(img, 256).size == (256, 256)
    assert imagenet.adm_center_crop(Image.new("RGB", (40, 90)), 64).size == (64, 64)


def test_imagenet_bad_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="wnid") as info:
        imagenet.make_dataset(split="train", mode="images", image_dir=str(tmp_path / "none"))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="image_dir"):
        imagenet.make_dataset(split="train", mode="images")
    with pytest.raises(FileNotFoundError, match="precompute_latents"):
        imagenet.make_dataset(split="train", mode="latents", latent_dir=str(tmp_path))
    solid_image(tmp_path / "a" / "x.png", (8, 8), (0, 0, 0))
    with pytest.raises(ValueError, match="num_classes=1000"):
        imagenet.make_dataset(split="train", mode="images", image_dir=str(tmp_path), num_classes=1000)


# ---------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------


def test_digits_shapes_range_classes_split():
    train = digits.make_dataset("train")
    test = digits.make_dataset("test")
    assert train.data.shape[1:] == (1, 8, 8) and len(train) + len(test) == 1797
    assert train.data.min() == -1 and train.data.max() == 1
    assert set(train.labels.tolist()) == set(range(10)) and train.num_classes == 10
    # Disjoint: no held-out image equals a training image at the same index set.
    all_images, _ = digits.load_digit_images()
    train_idx = seeded_split(1797, "train", 0.2, 0)
    test_idx = seeded_split(1797, "test", 0.2, 0)
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    torch.testing.assert_close(test.data, all_images[test_idx])
    assert torch.equal(digits.make_dataset("train").data, train.data)  # the split is fixed by the seed
    assert not torch.equal(digits.make_dataset("train", seed=1).data, train.data)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_digits_upsampled(mode):
    ds = digits.make_dataset("test", image_size=16, upsample_mode=mode)
    assert ds.data.shape[1:] == (1, 16, 16)
    assert ds.data.min() >= -1 and ds.data.max() <= 1
    if mode == "nearest":
        native = digits.make_dataset("test").data
        torch.testing.assert_close(ds.data[:, :, ::2, ::2], native)


def test_digits_bad_size():
    with pytest.raises(ValueError, match="image_size"):
        digits.make_dataset("train", image_size=12)


# ---------------------------------------------------------------------------------
# Configs: every image data config composes and builds its three splits
# ---------------------------------------------------------------------------------


def compose_data(choice: str, overrides: list[str]):
    config_dir = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose("train", overrides=[f"dataloaders={choice}", "run_name=test", *overrides])
    return cfg, {split: instantiate(cfg.dataloaders.dataset, split=split) for split in ("train", "test", "reference")}


def test_configs_build_datasets(tmp_path):
    write_cifar(tmp_path / "cifar")
    for i in range(4):
        solid_image(tmp_path / "celeba" / "img_align_celeba" / f"{i:06d}.jpg", (178, 218), (i, i, i))
    for wnid in ("n1", "n2"):
        solid_image(tmp_path / "inet" / wnid / "a.JPEG", (300, 260), (9, 9, 9))
    cases = {
        "digits": [],
        "cifar10": [f"dataloaders.root={tmp_path / 'cifar'}"],
        "celeba": [f"dataloaders.root={tmp_path / 'celeba'}", "dataloaders.dataset.test_fraction=0.25"],
        "imagenet": [
            f"dataloaders.image_dir={tmp_path / 'inet'}",
            "dataloaders.mode=images",
            "dataloaders.num_classes=2",
        ],
    }
    for choice, overrides in cases.items():
        cfg, splits = compose_data(choice, overrides)
        x, label = splits["train"][0]
        expected = list(cfg.dataloaders.data_shape) if choice != "imagenet" else [3, 256, 256]  # images mode
        assert list(x.shape) == expected, choice
        assert (label == -1) == (cfg.dataloaders.num_classes == 0), choice
        assert all(len(s) > 0 for s in splits.values()), choice
