"""Latent pipeline end to end: tiny AutoencoderKL on disk -> precompute_latents.py -> shards -> dataset."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from dataloaders import imagenet
from models.vae.vae import SDVAE

REPO = Path(__file__).resolve().parents[1]


def tiny_vae(folder: Path) -> None:
    """A four-level (8x down-sampling) AutoencoderKL with 8 channels, saved like a hub checkpoint."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(folder)


def class_folders(root: Path) -> None:
    rng = np.random.default_rng(0)
    for wnid, count in (("n002", 3), ("n001", 2)):
        for i in range(count):
            (root / wnid).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"{wnid}_{i}.png")


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("latents")
    paths = {"vae": base / "vae", "images": base / "images", "out": base / "out"}
    tiny_vae(paths["vae"])
    class_folders(paths["images"])
    command = [
        sys.executable, "scripts/precompute_latents.py",
        "--data-root", str(paths["images"]), "--out", str(paths["out"]), "--vae", str(paths["vae"]),
        "--image-size", "32", "--batch-size", "2", "--shard-size", "3", "--num-workers", "0", "--device", "cpu",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return paths


@pytest.mark.slow
def test_shards_equal_direct_encoding(encoded):
    meta = json.loads((encoded["out"] / "meta.json").read_text())
    assert meta["latent_shape"] == [4, 4, 4] and meta["num_samples"] == 5 and meta["classes"] == ["n001", "n002"]
    assert [s["count"] for s in meta["shards"]] == [3, 2]
    assert sorted(p.name for p in encoded["out"].iterdir()) == ["meta.json", "shard_00000.pt", "shard_00001.pt"]

    latents = imagenet.make_dataset(
        split="train", mode="latents", latent_dir=str(encoded["out"]), flip=False, num_classes=2, latent_shape=[4, 4, 4]
    )
    images = imagenet.make_dataset(
        split="train", mode="images", image_dir=str(encoded["images"]), image_size=32, flip=False
    )
    vae = SDVAE(str(encoded["vae"]))
    assert len(latents) == len(images) == 5
    for i in range(5):
        z, label = latents[i]
        x, image_label = images[i]
        direct = vae.encode(x[None])[0]
        assert label == image_label and z.dtype == torch.float32 and z.shape == (4, 4, 4)
        torch.testing.assert_close(z, direct.half().float(), rtol=2e-3, atol=1e-4)
    assert [latents[i][1] for i in range(5)] == [0, 0, 1, 1, 1]


@pytest.mark.slow
def test_latent_flip(encoded):
    plain = imagenet.make_dataset(split="train", mode="latents", latent_dir=str(encoded["out"]), flip=False)
    flipping = imagenet.make_dataset(split="train", mode="latents", latent_dir=str(encoded["out"]), flip=True)
    torch.manual_seed(0)
    outcomes = set()
    for _ in range(6):
        for i in range(5):
            z, ref = flipping[i][0], plain[i][0]
            assert torch.equal(z, ref) or torch.equal(z, ref.flip(-1))
            outcomes.add(torch.equal(z, ref))
    assert outcomes == {True, False}
    assert not imagenet.make_dataset(split="test", mode="latents", latent_dir=str(encoded["out"])).flip


@pytest.mark.slow
def test_refuses_to_overwrite(encoded):
    from scripts.precompute_latents import main

    argv = ["--data-root", str(encoded["images"]), "--out", str(encoded["out"]), "--vae", str(encoded["vae"])]
    with pytest.raises(SystemExit, match="--overwrite"):
        main(argv)


@pytest.mark.slow
def test_bad_shards(encoded, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(encoded["out"], folder)
    shard = folder / "shard_00001.pt"
    good = torch.load(shard, weights_only=True)

    torch.save({**good, "latents": good["latents"][:, :, :2]}, shard)  # wrong shape
    with pytest.raises(ValueError, match="shard_00001.pt") as info:
        imagenet.make_dataset(split="train", mode="latents", latent_dir=str(folder))
    assert "\n" not in str(info.value)

    torch.save({**good, "latents": good["latents"].float()}, shard)  # wrong dtype
    with pytest.raises(ValueError, match="shard_00001.pt.*float16"):
        imagenet.make_dataset(split="train", mode="latents", latent_dir=str(folder))

    torch.save({**good, "scaling_factor": 1.0}, shard)  # disagrees with meta.json
    with pytest.raises(ValueError, match="shard_00001.pt.*meta.json"):
        imagenet.make_dataset(split="train", mode="latents", latent_dir=str(folder))

    torch.save(good, shard)
    with pytest.raises(ValueError, match="data_shape"):
        imagenet.make_dataset(split="train", mode="latents", latent_dir=str(folder), latent_shape=[4, 32, 32])
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard_00001.pt"):
        imagenet.make_dataset(split="train", mode="latents", latent_dir=str(folder))
