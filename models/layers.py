"""Layers whose forward-mode (JVP) rule costs about one more forward.

MeanFlow's step is forward + JVP + backward (``models/jvp.py``). With torch's built-in
forward-AD formulas the JVP costs far more than a forward (``scripts/benchmark.py
--profile`` shows it per layer):

- a weight closed over by ``torch.func.jvp`` carries no tangent, yet the formulas of
  ``addmm`` and ``convolution`` materialise a zero tangent for it and multiply by it
  (a Linear runs 4 matrix products, a conv 3 convolutions, where 2 suffice);
- GroupNorm / LayerNorm differentiate their composite decomposition: dozens of
  element-wise kernels and reductions;
- SiLU / GELU run their formula as several element-wise ops;
- fused attention kernels (SDPA's flash / memory-efficient) have no rule at all.

Each ``torch.autograd.Function`` below runs the primal through the same ATen kernel as
the built-in layer, the backward through the same ATen backward kernel, and the JVP
in closed form with one kernel per term that is not zero. They use the
``setup_context`` form with ``generate_vmap_rule`` so that ``torch.func.jvp``,
``torch.func.vmap`` and ``torch.func.grad`` compose with them, and
``set_materialize_grads(False)``, so a missing weight tangent arrives as None instead
of a tensor of zeros.

The modules (``Linear``, ``Conv2d``, ``GroupNorm``, ``LayerNorm``, ``SiLU``, ``GELU``)
subclass the ``torch.nn`` layers and keep their parameters, so state dicts are
unchanged. Under autocast they run the built-in ops (``use_rules``). Under
``torch.compile`` they fall back to the built-in ops as well: dynamo does not
trace an ``autograd.Function`` with a custom ``jvp`` (torch 2.14 graph break gb0144,
"Unsupported custom jvp"), and the compiler derives and fuses the forward-mode graph
itself (``tests/test_compile.py`` asserts one graph).

Tangent and autograd graph: a tangent computed with grad mode on is recorded in the
autograd graph (needed only to differentiate through the tangent), and a dual tensor
saved for the backward keeps its tangent alive. MeanFlow stops the tangent's gradient,
so ``models/jvp.py`` computes it inside ``tangents_without_graph()``; the rules then
run their tangent arithmetic under ``no_grad`` and save detached values (``primal``),
so the fused step holds about the memory of the primal's graph alone. Outside that
block the rules are fully differentiable (tangent included).

Not given a rule: the sinusoidal time embeddings (cos / sin of a (B, 256) tensor: the
built-in rule is a few element-wise ops on a tiny tensor), ReLU / Tanh (cheap built-in
rules), dropout (its rule multiplies the tangent by the same mask), RMSNorm (no model
uses it).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TANGENT_GRAPH = [True]  # False inside tangents_without_graph()


@contextmanager
def tangents_without_graph() -> Iterator[None]:
    """Within this block the rules below compute tangents outside the autograd graph
    (the caller promises not to differentiate the tangent)."""
    _TANGENT_GRAPH.append(False)
    try:
        yield
    finally:
        _TANGENT_GRAPH.pop()


def _tangent_grad() -> torch.autograd.grad_mode.set_grad_enabled:
    return torch.set_grad_enabled(torch.is_grad_enabled() and _TANGENT_GRAPH[-1])


def use_rules(x: Tensor) -> bool:
    """Whether a layer runs its custom rule: eagerly and without autocast.

    Under torch.compile the built-in ops (module docstring). Under autocast too: the
    casts autocast inserts belong to the autograd graph of the built-in ops, and the
    tangent pass of MeanFlow, the one place the rules pay off, runs with autocast off
    (a half-precision tangent overflows)."""
    if torch.compiler.is_compiling() or x.device.type == "meta":  # meta: shapes only (no autocast state to ask)
        return False
    return not torch.is_autocast_enabled(x.device.type)


def primal(t: Tensor | None) -> Tensor | None:
    """What a rule saves for the backward: inside ``tangents_without_graph()`` the
    value alone (detached), else the tensor itself.

    Autograd keeps the tangent of every saved dual tensor (``torch.autograd.forward_ad``)
    until the dual level closes, which in the fused MeanFlow step holds a second copy
    of the activations at the peak. The backward needs the values only; the tangent
    rules need the graph of the saved tensors only to differentiate the tangent, which
    ``tangents_without_graph()`` rules out."""
    return t if t is None or _TANGENT_GRAPH[-1] else t.detach()


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


# ---------------------------------------------------------------------------------
# Linear and convolution: the weight's tangent is usually absent
# ---------------------------------------------------------------------------------


class LinearFn(torch.autograd.Function):
    """``x Wᵀ + b``; tangent ``t_x Wᵀ`` (+ ``x t_Wᵀ + t_b`` only where those tangents exist)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.set_materialize_grads(False)
        ctx.has_bias = bias is not None
        x = primal(x)
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None, None
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = grad @ weight if need_x else None
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        gw = g2.T @ x2 if need_w else None
        gb = g2.sum(0) if need_b and ctx.has_bias else None
        return gx, gw, gb

    @staticmethod
    def jvp(ctx, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None) -> Tensor | None:
        x, weight = ctx.saved_tensors
        with _tangent_grad():
            out = None if tx is None else F.linear(tx, weight)
            out = _add(out, None if tw is None else F.linear(x, tw))
            return _add(out, tb)


class ConvFn(torch.autograd.Function):
    """2-D convolution; tangent ``conv(t_x, W)`` (+ ``conv(x, t_W) + t_b`` only where present)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple, padding: tuple, dilation: tuple,
                groups: int) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, ctx.stride, ctx.padding, ctx.dilation, ctx.groups = inputs
        ctx.set_materialize_grads(False)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        x = primal(x)
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return (None,) * 7
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, ctx.bias_sizes, list(ctx.stride), list(ctx.padding), list(ctx.dilation), False, [0, 0],
            ctx.groups, [need_x, need_w, need_b and ctx.bias_sizes is not None],
        )  # fmt: skip
        return gx, gw, gb, None, None, None, None

    @staticmethod
    def jvp(ctx, tx, tw, tb, *_) -> Tensor | None:
        x, weight = ctx.saved_tensors
        conv = lambda a, w: F.conv2d(a, w, None, ctx.stride, ctx.padding, ctx.dilation, ctx.groups)
        with _tangent_grad():
            out = None if tx is None else conv(tx, weight)
            out = _add(out, None if tw is None else conv(x, tw))
            return _add(out, None if tb is None else tb[:, None, None])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) with ``LinearFn``'s JVP."""

    def forward(self, x: Tensor) -> Tensor:
        return LinearFn.apply(x, self.weight, self.bias) if use_rules(x) else super().forward(x)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (zero padding only) with ``ConvFn``'s JVP."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(f"Conv2d padding={self.padding!r}, padding_mode={self.padding_mode!r}: expected integer zero padding")

    def forward(self, x: Tensor) -> Tensor:
        if not use_rules(x):
            return super().forward(x)
        return ConvFn.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


# ---------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------


# The Jacobian of the normalisation itself, ``x̂ = (x - mean) · rstd`` over a group of
# n values, is ``rstd · (I - 11ᵀ/n - x̂x̂ᵀ/n)``: symmetric. So its JVP equals its VJP, and
# the tangent of ``γ x̂ + β`` is ``γ · VJP(t_x)``, one call of the backward kernel with no
# affine weight (a fused, vectorised pass) instead of a dozen element-wise ops.


class GroupNormFn(torch.autograd.Function):
    """``nn.functional.group_norm`` through ``native_group_norm``; closed-form tangent."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        n, c = x.shape[:2]
        return torch.ops.aten.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, ctx.groups, _ = inputs
        _, mean, rstd = output
        ctx.set_materialize_grads(False)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, rstd)
        x = primal(x)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.save_for_forward(x, weight, mean, rstd)

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_) -> tuple[Tensor | None, ...]:
        if grad is None:
            return (None,) * 5
        x, weight, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            grad.contiguous(), x, mean, rstd, weight, n, c, x[0, 0].numel(), ctx.groups,
            [need_x, need_w and ctx.has_weight, need_b and ctx.has_bias],
        )  # fmt: skip
        return gx, gw, gb, None, None

    @staticmethod
    def jvp(ctx, tx, tw, tb, *_) -> tuple[Tensor | None, None, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        affine = (1, c) + (1,) * (x.dim() - 2)
        with _tangent_grad():
            out = None
            if tx is not None:  # γ · J t_x, J symmetric (see above)
                out = torch.ops.aten.native_group_norm_backward(
                    tx.contiguous(), x, mean, rstd, None, n, c, x[0, 0].numel(), ctx.groups, [True, False, False]
                )[0]
                if weight is not None:
                    out = out * weight.reshape(affine)
            if tw is not None:
                xhat = ((x.reshape(n, ctx.groups, -1) - mean[..., None]) * rstd[..., None]).reshape(x.shape)
                out = _add(out, xhat * tw.reshape(affine))
            out = _add(out, None if tb is None else tb.reshape(affine).expand(x.shape))
        return out, None, None


class LayerNormFn(torch.autograd.Function):
    """``nn.functional.layer_norm`` through ``native_layer_norm``; closed-form tangent."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.aten.native_layer_norm(x, list(shape), weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.shape, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.set_materialize_grads(False)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, rstd)
        x = primal(x)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.save_for_forward(x, weight, mean, rstd)

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_) -> tuple[Tensor | None, ...]:
        if grad is None:
            return (None,) * 5
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, _, need_w, need_b, _ = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            grad, x, list(ctx.shape), mean, rstd, weight, bias, [need_x, need_w and ctx.has_weight, need_b and ctx.has_bias]
        )
        return gx, None, gw, gb, None

    @staticmethod
    def jvp(ctx, tx, _shape, tw, tb, _eps) -> tuple[Tensor | None, None, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        with _tangent_grad():
            out = None
            if tx is not None:  # γ · J t_x, J symmetric (see above)
                out = torch.ops.aten.native_layer_norm_backward(
                    tx.contiguous(), x, list(ctx.shape), mean, rstd, None, None, [True, False, False]
                )[0]
                if weight is not None:
                    out = out * weight
            out = _add(out, None if tw is None else (x - mean) * rstd * tw)
            out = _add(out, None if tb is None else tb.expand(x.shape))
        return out, None, None


def group_norm_composite(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """GroupNorm from reductions and element-wise ops, for torch.compile: with torch 2.14
    dynamo fails on ``F.group_norm`` under ``torch.func.jvp`` (an internal assert on
    ``_fw_primal`` while running it on fake tensors), and Inductor fuses this anyway."""
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, -1)
    var, mean = torch.var_mean(xg, dim=-1, correction=0, keepdim=True)
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    affine = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(affine)
    return y if bias is None else y + bias.reshape(affine)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters) with ``GroupNormFn``'s JVP."""

    def forward(self, x: Tensor) -> Tensor:
        if not use_rules(x):
            return group_norm_composite(x, self.num_groups, self.weight, self.bias, self.eps)
        return GroupNormFn.apply(x, self.weight, self.bias, self.num_groups, self.eps)[0]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters) with ``LayerNormFn``'s JVP."""

    def forward(self, x: Tensor) -> Tensor:
        if not use_rules(x):
            return super().forward(x)
        return LayerNormFn.apply(x, tuple(self.normalized_shape), self.weight, self.bias, self.eps)[0]


# ---------------------------------------------------------------------------------
# adaLN (DiT): per-sample scale, shift and gate of a token sequence
# ---------------------------------------------------------------------------------


class ModulateFn(torch.autograd.Function):
    """``x (1 + scale) + shift`` for x (B, T, D), shift and scale (B, D); tangent
    ``t_x (1 + scale) + x t_scale + t_shift`` in two fused multiply-adds."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return torch.addcmul(shift[:, None], x, 1 + scale[:, None])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, _, scale = inputs
        ctx.set_materialize_grads(False)
        x, scale = primal(x), primal(scale)
        ctx.save_for_backward(x, scale)
        ctx.save_for_forward(x, scale)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None, None
        x, scale = ctx.saved_tensors
        need_x, need_shift, need_scale = ctx.needs_input_grad
        return (grad * (1 + scale[:, None]) if need_x else None, grad.sum(1) if need_shift else None,
                (grad * x).sum(1) if need_scale else None)

    @staticmethod
    def jvp(ctx, tx, tshift, tscale) -> Tensor | None:
        x, scale = ctx.saved_tensors
        with _tangent_grad():
            out = None if tshift is None else tshift[:, None].expand_as(x)
            if tscale is not None:
                out = x * tscale[:, None] if out is None else torch.addcmul(out, x, tscale[:, None])
            if tx is not None:
                out = tx * (1 + scale[:, None]) if out is None else torch.addcmul(out, tx, 1 + scale[:, None])
            return out


class GatedResidualFn(torch.autograd.Function):
    """``x + gate y`` for x, y (B, T, D) and gate (B, D); tangent
    ``t_x + gate t_y + t_gate y`` in two fused multiply-adds."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
        return torch.addcmul(x, gate[:, None], y)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, gate, y = inputs
        ctx.set_materialize_grads(False)
        gate, y = primal(gate), primal(y)
        ctx.save_for_backward(gate, y)
        ctx.save_for_forward(gate, y)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None, None
        gate, y = ctx.saved_tensors
        need_x, need_gate, need_y = ctx.needs_input_grad
        return (grad if need_x else None, (grad * y).sum(1) if need_gate else None,
                grad * gate[:, None] if need_y else None)

    @staticmethod
    def jvp(ctx, tx, tgate, ty) -> Tensor | None:
        gate, y = ctx.saved_tensors
        with _tangent_grad():
            out = tx
            if ty is not None:
                out = ty * gate[:, None] if out is None else torch.addcmul(out, gate[:, None], ty)
            if tgate is not None:
                out = tgate[:, None] * y if out is None else torch.addcmul(out, tgate[:, None], y)
            return out


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: (B, T, D) scaled and shifted per sample by (B, D) vectors."""
    return ModulateFn.apply(x, shift, scale) if use_rules(x) else x * (1 + scale[:, None]) + shift[:, None]


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """adaLN-Zero's gated branch: ``x + gate y``, (B, T, D) and (B, D)."""
    return GatedResidualFn.apply(x, gate, y) if use_rules(x) else x + gate[:, None] * y


# ---------------------------------------------------------------------------------
# Activations: the Jacobian is diagonal, so the tangent is the backward kernel applied
# to the input tangent (one fused element-wise kernel)
# ---------------------------------------------------------------------------------


class SiLUFn(torch.autograd.Function):
    """``x σ(x)``; tangent ``σ(x) (1 + x (1 - σ(x))) t_x`` via ``silu_backward``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return F.silu(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)
        x = primal(inputs[0])
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> Tensor | None:
        return None if grad is None else torch.ops.aten.silu_backward(grad, ctx.saved_tensors[0])

    @staticmethod
    def jvp(ctx, tx: Tensor | None) -> Tensor | None:
        with _tangent_grad():
            return None if tx is None else torch.ops.aten.silu_backward(tx, ctx.saved_tensors[0])


class GELUFn(torch.autograd.Function):
    """GELU (exact or tanh approximation); tangent via ``gelu_backward``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, approximate: str) -> Tensor:
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)
        ctx.approximate = inputs[1]
        x = primal(inputs[0])
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[Tensor | None, None]:
        if grad is None:
            return None, None
        return torch.ops.aten.gelu_backward(grad, ctx.saved_tensors[0], approximate=ctx.approximate), None

    @staticmethod
    def jvp(ctx, tx: Tensor | None, _) -> Tensor | None:
        with _tangent_grad():
            return None if tx is None else torch.ops.aten.gelu_backward(tx, ctx.saved_tensors[0], approximate=ctx.approximate)


def silu(x: Tensor) -> Tensor:
    return SiLUFn.apply(x) if use_rules(x) else F.silu(x)


class SiLU(nn.SiLU):
    def forward(self, x: Tensor) -> Tensor:
        return silu(x)


class GELU(nn.GELU):
    def forward(self, x: Tensor) -> Tensor:
        return GELUFn.apply(x, self.approximate) if use_rules(x) else super().forward(x)
