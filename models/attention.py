"""Multi-head attention kernel shared by the UNet and the DiT, its forward-mode rule,
and the JVP-safe mode.

Normally attention runs through ``torch.nn.functional.scaled_dot_product_attention``
(SDPA), which picks a fused kernel (flash / memory-efficient / cuDNN) when it can.
Those fused kernels have no forward-mode AD rule: with torch 2.14 on the CPU,
``torch.func.jvp`` through SDPA fails with ``NotImplementedError: Trying to use
forward AD with _scaled_dot_product_flash_attention_for_cpu ...`` (float32 and
float64 alike; ``tests/test_models.py`` checks it). The MeanFlow loss therefore wraps
its ``torch.func.jvp`` call in ``jvp_safe_attention()``, which restricts SDPA to the
MATH backend: a composite of matmul and softmax, whose forward-mode rules exist,
and whose output equals the fused kernels' up to rounding.

``attention`` itself (eager) goes through ``AttentionFn``: the primal through SDPA
(whichever kernel it picks), the backward and the tangent in closed form from the
recomputed probabilities, so it needs no forward-mode rule from SDPA at all. Under
``torch.compile`` it is plain SDPA (dynamo does not trace a custom ``jvp``; see
``models/layers.py``), and there ``jvp_safe_attention`` is what makes the JVP work.

``backend="flash"`` (CUDA only) uses the Triton kernel of the ``jvp-flash-attention``
package, which has its own forward-mode rule, for the primal and the tangent.
"""

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.layers import _tangent_grad, primal, use_rules

ATTENTION_JVP = ("closed_form", "flash")
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]


def _probabilities(q: Tensor, k: Tensor) -> tuple[Tensor, float]:
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1), scale  # (B, h, T, T)


class AttentionFn(torch.autograd.Function):
    """``O = softmax(S) v``, ``S = q kᵀ / sqrt(d)``.

    Tangent (differentiate the softmax row by row): with ``P = softmax(S)``,
    ``t_S = (t_q kᵀ + q t_kᵀ) / sqrt(d)``,
    ``t_O = P t_v + (P ∘ t_S) v - rowsum(P ∘ t_S) ∘ O``.
    Backward: ``dv = Pᵀ dO``, ``dS = P ∘ (dO vᵀ - rowsum(dO ∘ O))``,
    ``dq = dS k / sqrt(d)``, ``dk = dSᵀ q / sqrt(d)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # the fused kernels even inside jvp_safe_attention(): this rule needs no forward-mode
        # rule from SDPA (the MATH backend would cost two products and a softmax more)
        with sdpa_kernel(SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)
        saved = [primal(t) for t in (*inputs, output)]
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None, None
        q, k, v, out = ctx.saved_tensors
        p, scale = _probabilities(q, k)
        gv = p.transpose(-1, -2) @ grad
        gs = p * (grad @ v.transpose(-1, -2) - (grad * out).sum(-1, keepdim=True))
        return (gs @ k) * scale, (gs.transpose(-1, -2) @ q) * scale, gv

    @staticmethod
    def jvp(ctx, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None) -> Tensor | None:
        q, k, v, out = ctx.saved_tensors
        with _tangent_grad():
            p, scale = _probabilities(q, k)  # recomputed: SDPA's fused kernels do not return it
            result = None if tv is None else p @ tv
            # t_S / scale = t_q kᵀ + q t_kᵀ as one product over the concatenated head dim
            if tq is not None and tk is not None:
                ts = torch.cat([tq * scale, q * scale], -1) @ torch.cat([k, tk], -1).transpose(-1, -2)
            elif tq is not None:
                ts = (tq * scale) @ k.transpose(-1, -2)
            else:
                ts = None if tk is None else (q * scale) @ tk.transpose(-1, -2)
            if ts is not None:
                pts = p * ts  # (B, h, T, T)
                dout = pts @ v - pts.sum(-1, keepdim=True) * out
                result = dout if result is None else result + dout
            return result


def check_attention_jvp(backend: str) -> None:
    """One-line error at construction for an attention backend that cannot run here."""
    if backend not in ATTENTION_JVP:
        raise ValueError(f"attention_jvp={backend!r}: expected one of {list(ATTENTION_JVP)}")
    if backend == "flash" and importlib.util.find_spec("jvp_flash_attention") is None:
        raise ValueError("attention_jvp=flash needs the jvp-flash-attention package (CUDA only): "
                         "pip install jvp-flash-attention, or use attention_jvp=closed_form")


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "closed_form") -> Tensor:
    """softmax(q kᵀ / sqrt(d)) v over the token axis.

    Args:
        q, k, v: (B, heads, T, head_dim).
        backend: ``closed_form`` (``AttentionFn``) or ``flash`` (CUDA, jvp-flash-attention).

    Returns:
        (B, heads, T, head_dim).
    """
    if backend == "flash":
        if q.device.type != "cuda":
            raise ValueError(f"attention_jvp=flash runs on CUDA only, got a {q.device.type} tensor: use attention_jvp=closed_form")
        from jvp_flash_attention.jvp_attention import attention as flash_jvp_attention  # CUDA-only package

        return flash_jvp_attention(q, k, v)
    return AttentionFn.apply(q, k, v) if use_rules(q) else F.scaled_dot_product_attention(q, k, v)


@contextmanager
def jvp_safe_attention() -> Iterator[None]:
    """Within this block every ``attention`` call (indeed every SDPA call) uses the
    MATH backend, so ``torch.func.jvp`` can push tangents through it. Outside it
    the fused kernels come back. ``sdpa_kernel`` is understood by torch.compile, so
    the switch does not break a compiled graph."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield
