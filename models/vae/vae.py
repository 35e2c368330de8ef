"""Frozen Stable Diffusion VAE for latent-space models (Rombach et al. 2022).

``SDVAE`` wraps diffusers' ``AutoencoderKL``: images in [-1, 1], shape (B, 3, H, W),
map to latents (B, 4, H/8, W/8) multiplied by ``scaling_factor`` (0.18215 for the
SD VAE, chosen by LDM so the latents have roughly unit variance, which the
flow's N(0, I) source assumes), and back. The VAE is never trained here: its
weights are frozen and it stays in eval mode whatever ``train()`` is called with.

Weights come from the Hugging Face hub id ``pretrained`` (cached after the first
download) or from a local folder written by ``save_pretrained``; with
``HF_HUB_OFFLINE=1`` only the local cache is looked at.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from huggingface_hub import constants as hf_constants
from torch import Tensor, nn


def _looks_local(name: str) -> bool:
    """A filesystem path (absolute, ~, ./, ../ or an existing entry) rather than a hub id."""
    return name.startswith(("/", "~", ".")) or Path(name).exists()


def load_autoencoder(pretrained: str, subfolder: str | None = None, local_files_only: bool | None = None) -> AutoencoderKL:
    """Load ``AutoencoderKL`` from a local folder or a hub id, with a one-line error if impossible.

    ``local_files_only=None`` follows ``HF_HUB_OFFLINE`` (a hub id then resolves from the cache only).
    """
    hint = "point vae.pretrained at a local folder holding config.json and the weights (e.g. vae.pretrained=/path/to/sd-vae-ft-ema)"
    if _looks_local(pretrained):
        folder = Path(pretrained).expanduser()
        if not (folder / (subfolder or "") / "config.json").is_file():
            raise FileNotFoundError(f"no AutoencoderKL at {folder / (subfolder or '')} (config.json missing): {hint}")
        return AutoencoderKL.from_pretrained(folder, subfolder=subfolder, local_files_only=True, low_cpu_mem_usage=False)
    offline = hf_constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    # low_cpu_mem_usage=False (both calls): plain loading, no need for the optional accelerate package
    try:
        return AutoencoderKL.from_pretrained(pretrained, subfolder=subfolder, local_files_only=offline, low_cpu_mem_usage=False)
    except OSError as err:  # diffusers reports both "not on the hub" and "no network" as OSError
        raise FileNotFoundError(f"could not load the VAE {pretrained!r} from the hub or its cache ({type(err).__name__}): {hint}") from err


class SDVAE(nn.Module):
    """Frozen image <-> latent map.

    Args:
        pretrained: hub id (``stabilityai/sd-vae-ft-ema``) or local folder.
        subfolder: subfolder holding the VAE inside ``pretrained`` (``vae`` for a full
            pipeline repository), or None.
        scaling_factor: latents are ``posterior * scaling_factor``; None reads the
            VAE config's ``scaling_factor``.
        sample_posterior: encode to a sample of the posterior instead of its mean.
        local_files_only: for a hub id, use only the local cache; None follows
            ``HF_HUB_OFFLINE``.
    """

    def __init__(
        self,
        pretrained: str = "stabilityai/sd-vae-ft-ema",
        subfolder: str | None = None,
        scaling_factor: float | None = 0.18215,
        sample_posterior: bool = False,
        local_files_only: bool | None = None,
    ) -> None:
        super().__init__()
        self.vae = load_autoencoder(pretrained, subfolder, local_files_only)
        self.vae.eval().requires_grad_(False)
        self.scaling_factor = float(self.vae.config.scaling_factor if scaling_factor is None else scaling_factor)
        self.sample_posterior = sample_posterior

    def train(self, mode: bool = True) -> "SDVAE":
        # The VAE is a fixed feature map: keep it in eval mode inside training loops.
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled latents (B, 4, H/8, W/8)."""
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample(generator) if self.sample_posterior else posterior.mean
        return latents * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        return self.vae.decode(latents / self.scaling_factor).sample
