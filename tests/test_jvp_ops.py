"""The forward-mode rules of models/layers.py and models/attention.py, each against the
built-in op it replaces: values, tangents (torch's own forward AD and float64 central
differences), the gradient of the primal, the weight tangent where one is given, vmap,
and the tangent kept out of the autograd graph inside ``tangents_without_graph``."""

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jvp, vmap

from models.attention import AttentionFn, attention
from models.layers import GELU, Conv2d, GroupNorm, LayerNorm, Linear, SiLU, tangents_without_graph

D = torch.float64


def gen_like(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial affine parameters (GroupNorm's default weight 1, bias 0 would hide terms)."""
    module = module.double()
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.add_(0.3 * gen_like(p.shape, 100 + i))
    return module


# (name, custom module, the same computation with built-in ops only, input shape)
def cases() -> list[tuple[str, torch.nn.Module, Callable[[torch.nn.Module, Tensor], Tensor], tuple[int, ...]]]:
    return [
        ("linear", perturbed(Linear(6, 5)), lambda m, x: F.linear(x, m.weight, m.bias), (3, 4, 6)),
        ("conv3x3", perturbed(Conv2d(4, 6, 3, padding=1)), lambda m, x: F.conv2d(x, m.weight, m.bias, padding=1), (2, 4, 5, 5)),
        ("conv_stride2", perturbed(Conv2d(4, 6, 2, stride=2)), lambda m, x: F.conv2d(x, m.weight, m.bias, stride=2), (2, 4, 6, 6)),
        ("groupnorm", perturbed(GroupNorm(2, 6, eps=1e-6)), lambda m, x: F.group_norm(x, 2, m.weight, m.bias, 1e-6), (3, 6, 4, 4)),
        ("layernorm", perturbed(LayerNorm(8)), lambda m, x: F.layer_norm(x, (8,), m.weight, m.bias, 1e-5), (2, 3, 8)),
        ("layernorm_plain", LayerNorm(8, elementwise_affine=False, eps=1e-6),
         lambda m, x: F.layer_norm(x, (8,), None, None, 1e-6), (2, 3, 8)),
        ("silu", SiLU(), lambda m, x: F.silu(x), (3, 7)),
        ("gelu_tanh", GELU(approximate="tanh"), lambda m, x: F.gelu(x, approximate="tanh"), (3, 7)),
        ("gelu", GELU(), lambda m, x: F.gelu(x), (3, 7)),
    ]


CASES = {name: (module, ref, shape) for name, module, ref, shape in cases()}


@pytest.mark.parametrize("name", list(CASES))
def test_value_tangent_and_gradient_match_the_builtin_op(name):
    module, ref, shape = CASES[name]
    x, tx = gen_like(shape, 0), gen_like(shape, 1)
    out, dout = jvp(module, (x,), (tx,))
    ref_out, ref_dout = jvp(lambda a: ref(module, a), (x,), (tx,))  # torch's own forward AD
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dout, ref_dout)
    h = 1e-6
    with torch.no_grad():
        fd = (module(x + h * tx) - module(x - h * tx)) / (2 * h)
    torch.testing.assert_close(dout, fd, rtol=1e-6, atol=1e-8)
    # the gradient of the primal (the custom backward) against autograd on the built-in op
    g = gen_like(out.shape, 2)
    xr = x.clone().requires_grad_()
    params = list(module.parameters())
    grads = torch.autograd.grad(module(xr), [xr, *params], g)
    ref_grads = torch.autograd.grad(ref(module, xr), [xr, *params], g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", [n for n in CASES if list(CASES[n][0].parameters())])
def test_weight_tangents_follow_the_builtin_rule(name):
    """Tangents on the weights too (not MeanFlow's case, which treats them as constants)."""
    module, ref, shape = CASES[name]
    params = {n: p.detach() for n, p in module.named_parameters()}
    x, tx = gen_like(shape, 3), gen_like(shape, 4)
    tparams = {n: gen_like(p.shape, 10 + i) for i, (n, p) in enumerate(params.items())}

    def custom(a, ps):
        return torch.func.functional_call(module, ps, (a,))

    def builtin(a, ps):
        return ref(SimpleNamespace(**ps), a)

    _, dout = jvp(custom, (x, params), (tx, tparams))
    _, ref_dout = jvp(builtin, (x, params), (tx, tparams))
    torch.testing.assert_close(dout, ref_dout)


@pytest.mark.parametrize("name", ["linear", "conv3x3", "groupnorm", "layernorm", "silu"])
def test_vmap_over_the_custom_rules(name):
    module, ref, shape = CASES[name]
    xs = gen_like((3, *shape), 5)
    torch.testing.assert_close(vmap(module)(xs), torch.stack([ref(module, x) for x in xs]))
    txs = gen_like((3, *shape), 6)
    _, douts = vmap(lambda a, ta: jvp(module, (a,), (ta,)))(xs, txs)
    _, ref_douts = jvp(lambda a: ref(module, a), (xs[1],), (txs[1],))
    torch.testing.assert_close(douts[1], ref_douts)


def test_no_zero_tangent_is_materialised_for_weights():
    """A weight closed over by torch.func.jvp arrives at the rule as None: one product for
    the primal and one for the tangent (the built-in rule runs four)."""
    from torch.profiler import profile

    lin = Linear(16, 16).double()
    x = gen_like((4, 16), 7)
    with torch.no_grad(), profile() as prof:
        jvp(lin, (x,), (x,))
    products = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
    assert products == 2
    assert not any(e.key in ("aten::zeros", "aten::_efficientzerotensor") for e in prof.key_averages())


def test_tangents_without_graph_keeps_the_primal_graph_only():
    lin, act, norm = Linear(6, 6).double(), SiLU(), GroupNorm(2, 6).double()
    x, tx = gen_like((2, 6, 3, 3), 8), gen_like((2, 6, 3, 3), 9)

    def f(a):
        return act(norm(lin(a.transpose(1, -1)).transpose(1, -1)))

    out, dout = jvp(f, (x,), (tx,))
    assert out.requires_grad and dout.requires_grad  # by default the tangent is differentiable
    with tangents_without_graph():
        out2, dout2 = jvp(f, (x,), (tx,))
    assert out2.requires_grad and not dout2.requires_grad
    torch.testing.assert_close(dout2, dout.detach())


# ---------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------


def qkv(seed: int) -> list[Tensor]:
    return [gen_like((2, 3, 5, 4), seed + i) for i in range(3)]


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def test_attention_rule_matches_softmax_formula_forward_ad_and_differences():
    q, k, v = qkv(0)
    tangents = qkv(10)
    out, dout = jvp(attention, (q, k, v), tuple(tangents))
    ref_out, ref_dout = jvp(math_attention, (q, k, v), tuple(tangents))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dout, ref_dout)
    h = 1e-6
    plus = attention(*(a + h * b for a, b in zip((q, k, v), tangents)))
    minus = attention(*(a - h * b for a, b in zip((q, k, v), tangents)))
    torch.testing.assert_close(dout, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-8)
    # one tangent at a time: the None branches of the rule
    for i in range(3):
        only = [torch.zeros_like(t) if j != i else t for j, t in enumerate(tangents)]
        _, d_one = jvp(lambda a, i=i: attention(*[a if j == i else x for j, x in enumerate((q, k, v))]), ((q, k, v)[i],), (tangents[i],))
        torch.testing.assert_close(d_one, jvp(math_attention, (q, k, v), tuple(only))[1])


def test_attention_gradient_matches_autograd_on_the_formula():
    q, k, v = [a.requires_grad_() for a in qkv(20)]
    g = gen_like((2, 3, 5, 4), 30)
    grads = torch.autograd.grad(AttentionFn.apply(q, k, v), (q, k, v), g)
    ref = torch.autograd.grad(math_attention(q, k, v), (q, k, v), g)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_flash_attention_backend_is_cuda_only():
    from models.attention import check_attention_jvp

    with pytest.raises(ValueError, match="attention_jvp='fast': expected one of"):
        check_attention_jvp("fast")
    q, k, v = qkv(0)
    with pytest.raises(ValueError, match="runs on CUDA only"):
        attention(q.float(), k.float(), v.float(), backend="flash")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="jvp-flash-attention is a CUDA kernel")
def test_flash_attention_jvp_matches_the_closed_form_on_cuda():
    pytest.importorskip("jvp_flash_attention")
    q, k, v = [a.float().cuda() for a in qkv(0)]
    tangents = [a.float().cuda() for a in qkv(10)]
    out, dout = jvp(lambda *a: attention(*a, backend="flash"), (q, k, v), tuple(tangents))
    ref_out, ref_dout = jvp(attention, (q, k, v), tuple(tangents))
    torch.testing.assert_close(out, ref_out, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(dout, ref_dout, rtol=2e-3, atol=2e-3)


def test_compiled_path_group_norm_equals_the_builtin():
    from models.layers import group_norm_composite

    norm = perturbed(GroupNorm(3, 6))
    x, tx = gen_like((2, 6, 4, 4), 40), gen_like((2, 6, 4, 4), 41)
    composite = lambda a: group_norm_composite(a, 3, norm.weight, norm.bias, norm.eps)
    builtin = lambda a: F.group_norm(a, 3, norm.weight, norm.bias, norm.eps)
    for a, b in zip(jvp(composite, (x,), (tx,)), jvp(builtin, (x,), (tx,)), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["cnn", "unet", "dit"])
def test_fused_pass_saves_no_tangent_for_the_backward(kind):
    """Inside primal_and_tangent's fused pass every tensor saved for the backward is a
    plain value: a saved dual tensor would keep its tangent (a second copy of the
    activations) alive until the pass ends."""
    import torch.autograd.forward_ad as fwAD

    from models.jvp import primal_and_tangent
    from tests.test_models import randomize, tiny

    model = randomize(tiny(kind)).train()
    z, tz = gen_like((2, 5, 8, 8), 50).float(), gen_like((2, 5, 8, 8), 51).float()
    with_tangent = []

    def pack(t: Tensor) -> Tensor:
        if fwAD.unpack_dual(t).tangent is not None:
            with_tangent.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        u, du = primal_and_tangent(model, z, tz, "fused")
    assert with_tangent == []
    u.square().sum().backward()  # the saved values still serve the backward
    _, ref = jvp(model, (z,), (tz,))  # torch.func.jvp: the functorch path through the same rules
    torch.testing.assert_close(du, ref, rtol=1e-4, atol=1e-4 * float(ref.detach().abs().max()))  # float32, outputs ~10


@pytest.mark.parametrize("kind", ["cnn", "unet", "dit"])
def test_models_train_under_bf16_autocast(kind):
    """Under autocast the layers run torch's own ops (the rules are for the fp32 tangent
    pass): a bf16 forward and backward work and match the fp32 ones roughly."""
    from tests.test_models import randomize, tiny

    model = randomize(tiny(kind)).train()
    z = gen_like((2, 5, 8, 8), 60).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(z)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(out.float(), model(z).detach(), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("which", ["modulate", "gated_residual"])
@pytest.mark.parametrize("tangents_on", [(0, 1, 2), (0,), (1,), (2,)])
def test_adaln_rules_match_the_builtin_products(which, tangents_on):
    from models.layers import gated_residual, modulate

    if which == "modulate":
        custom, shapes = modulate, [(2, 5, 4), (2, 4), (2, 4)]
        builtin = lambda x, shift, scale: x * (1 + scale[:, None]) + shift[:, None]
    else:
        custom, shapes = gated_residual, [(2, 5, 4), (2, 4), (2, 5, 4)]
        builtin = lambda x, gate, y: x + gate[:, None] * y
    inputs = [gen_like(s, 70 + i) for i, s in enumerate(shapes)]
    tangents = [gen_like(s, 80 + i) if i in tangents_on else torch.zeros(s, dtype=D) for i, s in enumerate(shapes)]

    def only(f):  # the function of the inputs that carry a tangent, the others closed over
        def g(*args):
            full = list(inputs)
            for i, a in zip(tangents_on, args, strict=True):
                full[i] = a
            return f(*full)
        return g

    picked = tuple(inputs[i] for i in tangents_on)
    picked_t = tuple(tangents[i] for i in tangents_on)
    out, dout = jvp(only(custom), picked, picked_t)
    ref_out, ref_dout = jvp(only(builtin), picked, picked_t)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dout, ref_dout)
    h = 1e-6
    fd = (custom(*(a + h * t for a, t in zip(inputs, tangents))) - custom(*(a - h * t for a, t in zip(inputs, tangents)))) / (2 * h)
    torch.testing.assert_close(dout, fd, rtol=1e-6, atol=1e-8)
    leaves = [a.clone().requires_grad_() for a in inputs]
    g = gen_like(out.shape, 90)
    for a, b in zip(torch.autograd.grad(custom(*leaves), leaves, g), torch.autograd.grad(builtin(*leaves), leaves, g), strict=True):
        torch.testing.assert_close(a, b)
