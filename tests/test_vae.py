"""SDVAE wrapper against a tiny AutoencoderKL saved to and loaded from a local folder."""

from pathlib import Path

import hydra
import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf

from models.vae.vae import SDVAE

TINY_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 16,
    "scaling_factor": 0.5,  # differs from the SD value, to tell the two apart
}


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_vae")
    AutoencoderKL.from_config(TINY_CONFIG).save_pretrained(folder)
    return folder


def test_round_trip_shapes_and_exact_scaling(vae_folder):
    wrapper = SDVAE(str(vae_folder), scaling_factor=0.18215)
    reference = AutoencoderKL.from_pretrained(vae_folder).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = wrapper.encode(images)
    assert latents.shape == (2, 4, 8, 8)  # two encoder blocks: one 2x downsampling
    with torch.no_grad():
        mean = reference.encode(images).latent_dist.mean
        torch.testing.assert_close(latents, mean * 0.18215)
        decoded = wrapper.decode(latents)
        assert decoded.shape == (2, 3, 16, 16)
        torch.testing.assert_close(decoded, reference.decode(latents / 0.18215).sample)


def test_frozen_and_stays_in_eval_mode(vae_folder):
    wrapper = SDVAE(str(vae_folder)).train()
    assert not wrapper.vae.training
    assert not any(p.requires_grad for p in wrapper.parameters())
    assert not wrapper.encode(torch.zeros(1, 3, 16, 16)).requires_grad


def test_scaling_factor_none_reads_the_vae_config_and_sampling_is_an_option(vae_folder):
    wrapper = SDVAE(str(vae_folder), scaling_factor=None, sample_posterior=True)
    assert wrapper.scaling_factor == 0.5
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    a = wrapper.encode(images, generator=torch.Generator().manual_seed(0))
    b = wrapper.encode(images, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)


def test_config_instantiates_with_a_local_folder(vae_folder):
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "vae" / "sd_ema.yaml")
    assert cfg.pretrained == "stabilityai/sd-vae-ft-ema" and cfg.scaling_factor == 0.18215
    cfg.pretrained = str(vae_folder)
    wrapper = hydra.utils.instantiate(cfg)
    assert wrapper.scaling_factor == 0.18215


def test_missing_folder_gives_a_one_line_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vae\.pretrained=/path/to/sd-vae-ft-ema") as info:
        SDVAE(str(tmp_path / "no_such_vae"))
    assert "\n" not in str(info.value)


def test_hub_id_not_in_the_cache_gives_the_hint():
    # local_files_only: resolve from the cache alone, as with HF_HUB_OFFLINE=1 (no network in tests)
    with pytest.raises(FileNotFoundError, match=r"could not load the VAE .*vae\.pretrained="):
        SDVAE("denoising-zoo-tests/no-such-vae", local_files_only=True)
