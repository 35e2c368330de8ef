"""Image models (SmallCNN, UNet, DiT) and the JVP-safe attention.

Full-size configs are built on the meta device (no memory, no time) to check their
parameter counts; everything that runs uses tiny sizes.
"""

import importlib.util
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.func import jvp

from models.embeddings import sinusoidal_embedding
from models.unified_input import make_unified_flow_matching_input
from models.attention import attention, jvp_safe_attention
from models.dit.dit import DiT
from models.flow_matching.cnn import SmallCNN
from models.unet.unet import UNet

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def build_from_config(name: str, data_shape: list[int], **overrides) -> torch.nn.Module:
    """Compose configs/model/<name>.yaml with a data config, as the training loop does."""
    cfg = OmegaConf.create({"dataloaders": {"data_shape": data_shape, "num_classes": 0}})
    cfg.model = OmegaConf.merge(OmegaConf.load(CONFIGS / f"{name}.yaml"), overrides)
    model_cfg = OmegaConf.to_container(cfg, resolve=True)["model"]
    assert model_cfg["name"] == name
    return hydra.utils.instantiate({k: v for k, v in model_cfg.items() if k != "name"})


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------
# Parameter counts of the published sizes
# ---------------------------------------------------------------------------------


def test_unet_cifar10_config_has_the_papers_size():
    with torch.device("meta"):
        model = build_from_config("unet", [3, 32, 32])
    assert 51e6 <= count(model) <= 56e6, count(model)  # MeanFlow CIFAR-10 UNet: ~55M


@pytest.mark.parametrize("name,target", [("dit_s", 33e6), ("dit_b", 130e6), ("dit_l", 458e6), ("dit_xl", 675e6)])
def test_dit_2_configs_have_the_papers_sizes(name, target):
    # The paper's counts are for the class-conditional ImageNet models on 4x32x32 latents.
    with torch.device("meta"):
        model = build_from_config(name, [4, 32, 32], num_classes=1000)
    assert model.patch_size == 2
    assert abs(count(model) / target - 1) < 0.02, count(model)


def test_small_cnn_config_is_about_half_a_million_parameters():
    model = build_from_config("cnn", [3, 32, 32])
    assert 0.4e6 <= count(model) <= 0.6e6, count(model)
    z = make_unified_flow_matching_input(torch.randn(2, 3, 32, 32), torch.rand(2), torch.rand(2))
    assert model(z).shape == (2, 3, 32, 32)


# ---------------------------------------------------------------------------------
# Tiny models: shapes, conditioning, JVP
# ---------------------------------------------------------------------------------


def tiny(kind: str, num_classes: int = 0) -> torch.nn.Module:
    if kind == "cnn":
        return SmallCNN(3, 8, hidden_channels=8, channel_mult=(1, 2), emb_dim=16, num_classes=num_classes, num_groups=4)
    if kind == "unet":
        return UNet(
            3, 8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
            num_classes=num_classes, num_heads=2,
        )  # fmt: skip
    return DiT(3, 8, patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=num_classes, frequency_dim=16)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every weight: the zero-initialised output layers would make the map
    (and its JVP) identically zero, which would test nothing."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


KINDS = ["cnn", "unet", "dit"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_classes", [0, 5])
def test_tiny_model_maps_unified_input_to_state_shape(kind, num_classes):
    model = randomize(tiny(kind, num_classes))
    z = make_unified_flow_matching_input(torch.randn(3, 3, 8, 8), torch.rand(3), torch.rand(3))
    y = torch.tensor([0, 4, 5]) if num_classes else None  # 5 is the null class
    out = model(z, y)
    assert out.shape == (3, 3, 8, 8)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_labels_condition_the_output_and_none_means_null_class(kind):
    model = randomize(tiny(kind, num_classes=5)).eval()
    z = make_unified_flow_matching_input(torch.randn(2, 3, 8, 8), torch.rand(2), torch.rand(2))
    null = model(z, torch.full((2,), 5))
    torch.testing.assert_close(model(z), null)
    assert not torch.allclose(model(z, torch.tensor([0, 1])), null)


@pytest.mark.parametrize("kind", KINDS)
def test_unconditional_model_rejects_labels(kind):
    z = make_unified_flow_matching_input(torch.randn(2, 3, 8, 8), torch.rand(2), torch.rand(2))
    with pytest.raises(ValueError, match="unconditional"):
        tiny(kind)(z, torch.tensor([0, 1]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_classes", [0, 5])
def test_jvp_matches_central_differences_in_float64(kind, num_classes):
    """The MeanFlow tangent (v on the state, 1 on s, 0 on t) through the whole model."""
    model = randomize(tiny(kind, num_classes)).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    s, t = torch.tensor([0.2, 0.5], dtype=torch.float64), torch.tensor([0.7, 0.9], dtype=torch.float64)
    z = make_unified_flow_matching_input(x, s, t)
    v = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    tangent = make_unified_flow_matching_input(v, torch.ones(2), torch.zeros(2)).double()
    y = torch.tensor([1, 3]) if num_classes else None

    def f(z_):
        return model(z_, y)

    with jvp_safe_attention():
        out, du = jvp(f, (z,), (tangent,))
    torch.testing.assert_close(out, f(z))
    h = 1e-7  # small enough for the truncation error of a model with time_scale 1000 too
    with torch.no_grad():
        fd = (f(z + h * tangent) - f(z - h * tangent)) / (2 * h)
    assert (du - fd).norm() / fd.norm() < 1e-6
    # the time tangent really reaches the output (the model reads s from its channel)
    s_only = make_unified_flow_matching_input(torch.zeros_like(v), torch.ones(2), torch.zeros(2)).double()
    with jvp_safe_attention():
        _, du_s = jvp(f, (z,), (s_only,))
    assert du_s.abs().max() > 1e-6


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_time_scale_is_the_steepest_rate_of_the_time_embedding(scale):
    """d/dt of the embedding of ``scale * t`` is at most ``scale`` (the top frequency is 1 rad per
    unit), reached at t = 0 by its sine: the references' scale 1 gives MeanFlow's JVP in time a
    slope of order 1, DDPM's 1000 one of order 1000."""
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    emb, slope = jvp(lambda t_: sinusoidal_embedding(t_, 64, scale=scale), (t,), (torch.ones_like(t),))
    assert emb.shape == (101, 64)
    torch.testing.assert_close(slope.abs().max(), torch.tensor(scale, dtype=torch.float64), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(sinusoidal_embedding(t, 64, scale=scale), sinusoidal_embedding(scale * t, 64))


@pytest.mark.parametrize("kind", KINDS)
def test_time_scale_reaches_every_time_and_condition_embedder(kind):
    model = {"cnn": SmallCNN(3, 8, hidden_channels=8, emb_dim=16, num_groups=4, num_conds=3, time_scale=1000.0),
             "unet": UNet(3, 8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                          num_heads=2, num_conds=3, time_scale=1000.0),
             "dit": DiT(3, 8, hidden_size=16, depth=2, num_heads=2, frequency_dim=16, num_conds=3, time_scale=1000.0)}[kind]
    scales = [m.scale for m in model.modules() if type(m).__name__ == "TimestepEmbedder"]
    assert len(scales) == 2 + 3 and set(scales) == {1000.0}  # s, h and the three conditions


# ---------------------------------------------------------------------------------
# Attention kernel and forward mode
# ---------------------------------------------------------------------------------


def qkv(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 5, 4, generator=gen, dtype=dtype) for _ in range(3)]


def test_fused_sdpa_has_no_forward_mode_rule_on_cpu():
    # Observed with torch 2.14: the CPU flash kernel SDPA dispatches to raises
    # NotImplementedError under forward AD. If a torch upgrade makes this pass,
    # jvp_safe_attention is no longer needed on the CPU (keep it for CUDA kernels).
    q, k, v = qkv(torch.float32)
    with pytest.raises(NotImplementedError, match="forward AD"):
        jvp(F.scaled_dot_product_attention, (q, k, v), (torch.ones_like(q), torch.ones_like(k), torch.ones_like(v)))


def test_jvp_safe_attention_matches_softmax_formula_and_central_differences():
    q, k, v = qkv()
    tangents = qkv()[::-1]
    with jvp_safe_attention():
        out, dout = jvp(attention, (q, k, v), tuple(tangents))
    reference = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
    torch.testing.assert_close(out, reference)
    h = 1e-6
    plus = attention(*(a + h * b for a, b in zip((q, k, v), tangents)))
    minus = attention(*(a - h * b for a, b in zip((q, k, v), tangents)))
    fd = (plus - minus) / (2 * h)
    assert (dout - fd).norm() / fd.norm() < 1e-6
    # outside the block the fast kernels are back
    torch.testing.assert_close(attention(q, k, v), reference)


# ---------------------------------------------------------------------------------
# Construction-time validation
# ---------------------------------------------------------------------------------


def test_bad_image_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"image_size=30 is not divisible by 2\*\*\(levels-1\)=4"):
        UNet(3, 30, model_channels=8, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"image_size=31 is not divisible"):
        SmallCNN(3, 31)
    with pytest.raises(ValueError, match=r"image_size=30 is not divisible by patch_size=4: use a patch size in \[1, 2\]"):
        DiT(4, 30, patch_size=4)
    with pytest.raises(ValueError, match=r"attention_resolutions=\[16\] must be among"):
        UNet(3, 8, model_channels=8, channel_mult=(1, 2), attention_resolutions=(16,))


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_dit_patch_sizes_unpatchify_to_the_state(patch_size):
    model = randomize(DiT(4, 16, patch_size=patch_size, hidden_size=16, depth=1, num_heads=2, frequency_dim=16))
    assert model.pos_embed.shape == (1, (16 // patch_size) ** 2, 16)
    z = make_unified_flow_matching_input(torch.randn(2, 4, 16, 16), torch.rand(2), torch.rand(2))
    assert model(z).shape == (2, 4, 16, 16)
    # each output patch depends on its own input patch through the token it came from
    tokens = model.x_embedder(torch.randn(1, 4, 16, 16)).flatten(2).transpose(1, 2)
    flat = torch.arange(tokens.shape[1] * patch_size * patch_size * 4, dtype=torch.float32)
    image = model.unpatchify(flat.reshape(1, tokens.shape[1], -1))
    first_patch = image[0, :, :patch_size, :patch_size]
    assert first_patch.max() < patch_size * patch_size * 4  # token 0 fills the top-left patch


def test_dit_attention_jvp_key_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"attention_jvp='fast': expected one of \['closed_form', 'flash'\]"):
        DiT(4, 8, hidden_size=16, depth=1, num_heads=2, attention_jvp="fast")
    if importlib.util.find_spec("jvp_flash_attention") is None:
        with pytest.raises(ValueError, match="needs the jvp-flash-attention package"):
            DiT(4, 8, hidden_size=16, depth=1, num_heads=2, attention_jvp="flash")
    else:
        model = DiT(4, 8, hidden_size=16, depth=1, num_heads=2, attention_jvp="flash")
        z = make_unified_flow_matching_input(torch.randn(2, 4, 8, 8), torch.rand(2), torch.rand(2))
        with pytest.raises(ValueError, match="runs on CUDA only"):
            model(z)
