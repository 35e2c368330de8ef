"""Extra conditions, the auxiliary velocity head and the time conditioning of every
model (models/base_model.py, models/embeddings.py): defaults keep the old models,
each option reads what it says, heads share one body pass, forward mode holds
through every head (float64 central differences), and the auxiliary head drops out
for inference."""

import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from config_checks import check_arguments
from models.base_model import BaseModel
from models.dit.dit import DiT
from models.embeddings import TIME_CONDS, TimeEmbedder
from models.flow_matching.cnn import SmallCNN
from models.flow_matching.mlp import MLP
from models.jvp import JVP_MODES, primal_and_tangent
from models.unet.unet import UNet
from models.unified_input import make_unified_flow_matching_input
from runs.build import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
KINDS = ["mlp", "cnn", "unet", "dit"]
NEW_ARGS = {"num_conds": 0, "aux_head": False, "time_cond": "s_h"}
DIT_ARGS = {"cond_tokens": False, "aux_depth": 0, "shared_depth": None}


def tiny_cfg(kind: str, **kwargs) -> dict:
    """A tiny model's config node (``_target_`` and arguments)."""
    cfgs = {
        "mlp": {"_target_": "models.flow_matching.mlp.MLP", "data_dim": 3, "hidden": 16, "depth": 2, "time_embed_dim": 8},
        "cnn": {"_target_": "models.flow_matching.cnn.SmallCNN", "in_channels": 3, "image_size": 8, "hidden_channels": 8,
                "emb_dim": 16, "num_groups": 4},
        "unet": {"_target_": "models.unet.unet.UNet", "in_channels": 3, "image_size": 8, "model_channels": 8,
                 "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 2},
        "dit": {"_target_": "models.dit.dit.DiT", "in_channels": 3, "image_size": 8, "hidden_size": 16, "depth": 3,
                "num_heads": 2, "frequency_dim": 16},
    }
    return {**cfgs[kind], **kwargs}


def tiny(kind: str, seed: int = 0, **kwargs) -> BaseModel:
    torch.manual_seed(seed)
    return build_model(tiny_cfg(kind, **kwargs))


def randomize(model: BaseModel) -> BaseModel:
    """Perturb every weight: zero-initialised output layers and gates would hide what is tested."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def unified(kind: str, n: int = 3, s: torch.Tensor | None = None, t: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3) if kind == "mlp" else (n, 3, 8, 8), generator=gen, dtype=dtype)
    s = torch.rand(n, generator=gen, dtype=dtype) * 0.5 if s is None else s
    t = s + 0.4 if t is None else t
    return make_unified_flow_matching_input(x, s, t)


def conds(n: int, k: int = 3, dtype: torch.dtype = torch.float32, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------
# Defaults: the models of before
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_explicit_defaults_build_the_same_model_as_no_new_arguments(kind):
    new = NEW_ARGS | (DIT_ARGS if kind == "dit" else {})
    plain, explicit = tiny(kind), tiny(kind, **new)
    assert plain.state_dict().keys() == explicit.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(value, explicit.state_dict()[name]), name
    # checkpoints keep their names: no new module in a default model, the two time MLPs as before
    keys = list(plain.state_dict())
    assert not [k for k in keys if k.startswith(("aux_", "cond_embed")) or "t_embedder" in k or ".modulation" in k]
    if kind != "mlp":
        assert any(k.startswith("time_embed.s_embedder.") for k in keys)
        assert any(k.startswith("time_embed.interval_embedder.") for k in keys)
    z = unified(kind)
    randomize(plain), randomize(explicit)
    assert torch.equal(plain(z), explicit(z, head="u"))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_carry_the_new_keys_at_the_constructor_defaults(path):
    data_shape = [2] if path.stem == "mlp" else [4, 32, 32]
    cfg = OmegaConf.create({"dataloaders": {"data_shape": data_shape, "num_classes": 0}, "model": OmegaConf.load(path)})
    node = OmegaConf.to_container(cfg, resolve=True)["model"]
    cls = {"DiT": DiT, "UNet": UNet, "SmallCNN": SmallCNN, "MLP": MLP}[node["_target_"].rsplit(".", 1)[1]]
    defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
    for key, value in (NEW_ARGS | (DIT_ARGS if cls is DiT else {})).items():
        assert node[key] == value == defaults[key], key
    check_arguments(cls, {k: v for k, v in node.items() if k not in ("name", "_target_")}, "model")


# ---------------------------------------------------------------------------------
# time_cond
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("time_cond", list(TIME_CONDS))
def test_time_embedder_sums_one_embedder_per_time_read(time_cond):
    torch.manual_seed(0)
    embed = TimeEmbedder(8, 16, time_cond).double()
    s, t = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    present = set(dict(embed.named_children()))
    expected = {"s": "s_embedder", "t": "t_embedder", "h": "interval_embedder"}
    assert present == {expected[name] for name in TIME_CONDS[time_cond]}
    reference = {"s": lambda: embed.s_embedder(s), "t": lambda: embed.t_embedder(t), "h": lambda: embed.interval_embedder(t - s)}
    torch.testing.assert_close(embed(s, t), sum(reference[name]() for name in TIME_CONDS[time_cond]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("time_cond", list(TIME_CONDS))
def test_only_h_is_blind_to_shifting_both_times(kind, time_cond):
    model = randomize(tiny(kind, time_cond=time_cond)).double().eval()
    s = torch.tensor([0.1, 0.3], dtype=torch.float64)
    base = model(unified(kind, 2, s, s + 0.4, torch.float64))
    shifted = model(unified(kind, 2, s + 0.2, s + 0.6, torch.float64))
    longer = model(unified(kind, 2, s, s + 0.5, torch.float64))
    assert (longer - base).abs().max() > 1e-6  # every choice reads the interval
    if time_cond == "h":
        torch.testing.assert_close(shifted, base)
    else:
        assert (shifted - base).abs().max() > 1e-6


# ---------------------------------------------------------------------------------
# Extra conditions
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS + ["dit_tokens"])
def test_conditions_change_the_output_and_carry_gradient(kind):
    extra = {"cond_tokens": True} if kind == "dit_tokens" else {}
    kind = kind.removesuffix("_tokens")
    model = randomize(tiny(kind, num_conds=3, num_classes=4, **extra))
    z, y = unified(kind), torch.tensor([0, 3, 4])
    cond = conds(3).requires_grad_()
    out = model(z, y, cond=cond)
    other = conds(3, seed=5)
    for i in range(3):  # each condition on its own
        moved = cond.detach().clone()
        moved[:, i] = other[:, i]
        assert (model(z, y, cond=moved) - out).abs().max() > 1e-5, i
    out.square().sum().backward()
    assert cond.grad.abs().min() > 0
    if kind != "mlp":  # the MLP feeds them to its first layer, the others through their own embedders
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.cond_embed.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_condition_and_head_errors_are_one_line(kind):
    one_line = r"[^\n]*$"
    z = unified(kind, 2)
    with pytest.raises(ValueError, match=r"^this model takes 3 extra conditions \(num_conds=3\) but got cond=None" + one_line):
        tiny(kind, num_conds=3)(z)
    with pytest.raises(ValueError, match=r"^this model takes no extra conditions \(num_conds=0\) but got 3" + one_line):
        tiny(kind)(z, cond=conds(2))
    with pytest.raises(ValueError, match=r"^conditions of shape \(2, 2\): expected \(2, 3\)" + one_line):
        tiny(kind, num_conds=3)(z, cond=conds(2, 2))
    with pytest.raises(ValueError, match=r"^head='v' needs the auxiliary head" + one_line):
        tiny(kind)(z, head="v")
    with pytest.raises(ValueError, match=r"^head='w': expected one of \['u', 'v', 'both'\]" + one_line):
        tiny(kind, aux_head=True)(z, head="w")
    with pytest.raises(ValueError, match=r"^time_cond='r_t': expected one of \['s_h', 's_t'" + one_line):
        tiny(kind, time_cond="r_t")
    with pytest.raises(ValueError, match=r"^num_conds=-1" + one_line):
        tiny(kind, num_conds=-1)


def test_dit_head_depth_errors_are_one_line():
    with pytest.raises(ValueError, match=r"^DiT aux_depth=2, shared_depth=None shape the auxiliary head: set aux_head=true[^\n]*$"):
        tiny("dit", aux_depth=2)
    with pytest.raises(ValueError, match=r"^DiT shared_depth=4 \(depth=3, aux_depth=0\): expected 0 <= shared_depth <= depth$"):
        tiny("dit", aux_head=True, shared_depth=4)
    with pytest.raises(ValueError, match=r"^DiT shared_depth=-1 \(depth=3, aux_depth=4\)"):
        tiny("dit", aux_head=True, aux_depth=4)


# ---------------------------------------------------------------------------------
# The auxiliary head
# ---------------------------------------------------------------------------------

AUX = {  # kind -> (constructor arguments, the modules of the shared body, run once per pass)
    "mlp": ({}, ["body", "rest"]),
    "cnn": ({}, ["conv_in", "norm_out"]),
    "unet": ({}, ["conv_in", "mid_out", "norm_out"]),
    "dit": ({"aux_depth": 2, "shared_depth": 1}, ["x_embedder", "blocks.0"]),
    "dit_tokens": ({"aux_depth": 1, "cond_tokens": True, "time_cond": "h"}, ["x_embedder", "blocks.0", "blocks.1"]),
}


def aux_model(name: str, **kwargs) -> BaseModel:
    extra, _ = AUX[name]
    return tiny(name.removesuffix("_tokens"), aux_head=True, num_conds=2, num_classes=4, **extra, **kwargs)


def calls(model: BaseModel, names: list[str]) -> tuple[dict[str, int], list]:
    counts = dict.fromkeys(names, 0)
    modules = dict(model.named_modules())

    def hook(name):
        return lambda *_: counts.__setitem__(name, counts[name] + 1)

    return counts, [modules[name].register_forward_hook(hook(name)) for name in names]


@pytest.mark.parametrize("name", list(AUX))
def test_both_heads_come_from_one_pass_of_the_shared_body(name):
    model = randomize(aux_model(name)).eval()
    kind = name.removesuffix("_tokens")
    z, y, cond = unified(kind), torch.tensor([0, 3, 4]), conds(3, 2)
    shared = AUX[name][1]
    if kind == "dit":  # the heads' own blocks: u's after the shared ones, then v's
        own_u = [f"blocks.{i}" for i in range(model.shared_depth, len(model.blocks))]
        own_v = [f"aux_blocks.{i}" for i in range(len(model.aux_blocks))]
    else:
        own_u, own_v = [], []
    counts, handles = calls(model, shared + own_u + own_v)
    u_both, v_both = model(z, y, cond=cond, head="both")
    assert all(n == 1 for n in counts.values()), counts
    counts.update(dict.fromkeys(counts, 0))
    u, v = model(z, y, cond=cond, head="u"), model(z, y, cond=cond, head="v")
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(u_both, u)
    torch.testing.assert_close(v_both, v)
    assert (u - v).abs().max() > 1e-4  # two different outputs
    assert u.shape == v.shape == z[:, :-2].shape
    if kind == "dit":  # u's own blocks ran for u alone, v's for v alone
        assert all(counts[b] == 1 for b in own_u + own_v), counts


@pytest.mark.parametrize("mode", JVP_MODES)
@pytest.mark.parametrize("name", list(AUX))
def test_jvp_through_both_heads_matches_central_differences_in_float64(name, mode):
    """The MeanFlow tangent (v on the state, 1 on s, 0 on t) through u and v together."""
    model = randomize(aux_model(name)).double().eval()
    kind = name.removesuffix("_tokens")
    z = unified(kind, 2, torch.tensor([0.2, 0.5], dtype=torch.float64), torch.tensor([0.7, 0.9], dtype=torch.float64),
                torch.float64)
    tangent = make_unified_flow_matching_input(torch.randn_like(z[:, :-2]), torch.ones(2), torch.zeros(2)).double()
    y, cond = torch.tensor([1, 4]), conds(2, 2, torch.float64)

    def f(z_):
        return model(z_, y, cond=cond, head="both")

    (u, v), (du, dv) = primal_and_tangent(f, z, tangent, mode)
    torch.testing.assert_close(u, f(z)[0])
    torch.testing.assert_close(v, f(z)[1])
    h = 1e-7  # the 1000x time scaling makes high derivatives in s large: keep the truncation error small
    with torch.no_grad():
        plus, minus = f(z + h * tangent), f(z - h * tangent)
    for d, p, m in ((du, plus[0], minus[0]), (dv, plus[1], minus[1])):
        fd = (p - m) / (2 * h)
        assert fd.norm() > 1e-6 and (d - fd).norm() / fd.norm() < 1e-6
    (u.square().sum() + v.square().sum()).backward()  # the primals keep their graph
    assert all(p.grad is not None for p in model.parameters())


def test_jvp_of_an_output_that_ignores_z_is_zero():
    model = randomize(tiny("mlp")).double()
    z = unified("mlp", 2, dtype=torch.float64)
    const = torch.ones(2, 3, dtype=torch.float64)
    (u, c), (du, dc) = primal_and_tangent(lambda z_: (model(z_), const), z, torch.ones_like(z), "fused")
    assert torch.equal(dc, torch.zeros_like(const)) and torch.equal(c, const) and du.abs().max() > 0


@pytest.mark.parametrize("name", list(AUX))
def test_inference_weights_load_strictly_without_the_aux_head_and_give_the_same_u(name):
    kind = name.removesuffix("_tokens")
    cfg = tiny_cfg(kind, aux_head=True, num_conds=2, num_classes=4, **AUX[name][0])
    model = randomize(build_model(cfg)).eval()
    weights = model.inference_state_dict()
    assert weights and not [k for k in weights if k.startswith("aux_")]
    assert len(weights) < len(model.state_dict())
    plain = build_model(model.inference_config(cfg)).eval()
    assert not plain.aux_head
    plain.load_state_dict(weights, strict=True)
    z, y, cond = unified(kind), torch.tensor([0, 3, 4]), conds(3, 2)
    assert torch.equal(plain(z, y, cond=cond), model(z, y, cond=cond, head="u"))


# ---------------------------------------------------------------------------------
# DiT: in-context tokens
# ---------------------------------------------------------------------------------


def test_dit_cond_tokens_replace_adaln_with_learned_vectors():
    adaln = tiny("dit", num_conds=3, num_classes=4)
    tokens = tiny("dit", num_conds=3, num_classes=4, cond_tokens=True)
    assert not [k for k in tokens.state_dict() if "adaLN" in k]
    assert tokens.blocks[0].modulation.shape == (6 * 16,) and tokens.final_layer.modulation.shape == (2 * 16,)
    assert sum(p.numel() for p in tokens.parameters()) < sum(p.numel() for p in adaln.parameters())
    # zero-initialised gates and output: the velocity starts at 0, as with adaLN-Zero
    z = unified("dit")
    assert torch.equal(tokens(z, cond=conds(3)), torch.zeros_like(z[:, :-2]))
    # tokens in, tokens out: the final layer sees the patch tokens only
    seen = []
    tokens.final_layer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    randomize(tokens)(z, cond=conds(3))
    assert seen == [torch.Size([3, 16, 16])]  # (B, (8/2)^2 patches, D)


@pytest.mark.parametrize("mode", JVP_MODES)
def test_dit_cond_tokens_jvp_matches_central_differences_in_float64(mode):
    model = randomize(tiny("dit", num_conds=3, num_classes=4, augment_dim=2, cond_tokens=True, time_cond="s_t_h"))
    model = model.double().eval()
    z = unified("dit", 2, torch.tensor([0.2, 0.5], dtype=torch.float64), torch.tensor([0.7, 0.9], dtype=torch.float64),
                torch.float64)
    tangent = make_unified_flow_matching_input(torch.randn_like(z[:, :-2]), torch.ones(2), torch.zeros(2)).double()
    y, cond, aug = torch.tensor([1, 4]), conds(2, 3, torch.float64), torch.rand(2, 2, dtype=torch.float64)

    def f(z_):
        return model(z_, y, aug, cond)

    u, du = primal_and_tangent(f, z, tangent, mode)
    torch.testing.assert_close(u, f(z))
    h = 1e-7
    with torch.no_grad():
        fd = (f(z + h * tangent) - f(z - h * tangent)) / (2 * h)
    assert fd.norm() > 1e-6 and (du - fd).norm() / fd.norm() < 1e-6
