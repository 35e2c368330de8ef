"""The one forward-mode pass of the mean-flow losses: the model's output and its
directional derivative along a tangent on the unified input.

    u, du = primal_and_tangent(u_fn, z, tangent_z, mode)
    (u, v), (du, dv) = primal_and_tangent(lambda z: model(z, head="both"), z, tangent_z, mode)

A function of several outputs (a model's ``head="both"``) gives tuples of primals and
tangents; eagerly every tangent is computed, read or not (iMF reads du, not dv).

``mode``:

- ``fused``: one forward-mode pass; the primal output keeps its autograd graph and
  is back-propagated, the tangent is returned detached (the losses stop its gradient).
  It is computed inside ``tangents_without_graph()``, so the model's layers
  (``models/layers.py``) keep the tangent arithmetic out of the autograd graph.
- ``separate``: a no-grad forward-mode pass for the tangent, then a plain forward for
  the primal; the RNG is rewound between the two so dropout draws one mask for both.
  Under ``torch.compile`` it runs as ``fused`` (one graph; see the code).

The pass itself: eagerly, dual tensors of ``torch.autograd.forward_ad`` (one level);
under ``torch.compile``, ``torch.func.jvp``, which dynamo captures in the step's
graph. The two compute the same numbers; the dual tensors skip functorch's
per-operator wrapping of the custom rules of ``models/layers.py``, which cost more
than the rules save (``scripts/benchmark.py`` measures the step either way: swap the
eager branch of ``_jvp`` for ``torch.func.jvp``).
Parameters are plain tensors in both, so they carry no tangent.

Both run under ``jvp_safe_attention()`` (fused SDPA kernels have no forward-mode
rule; the project's own attention does not need it, other code may). Callers turn
autocast off around it: the tangent of a half-precision forward overflows.
"""

from collections.abc import Callable
from typing import TypeAlias

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from models.attention import jvp_safe_attention
from models.layers import tangents_without_graph
from runs.machine import rewound_rng

JVP_MODES = ("fused", "separate")

Outputs: TypeAlias = Tensor | tuple[Tensor, ...]


def primal_and_tangent(fn: Callable[[Tensor], Outputs], z: Tensor, tangent: Tensor, mode: str) -> tuple[Outputs, Outputs]:
    """``(fn(z), d/dε fn(z + ε tangent) at ε = 0)``; the first with gradient, the second
    detached; tuples of the same length where ``fn`` returns a tuple.

    Args:
        fn: the model on the unified input, ``(B, ...) -> (B, ...)`` or a tuple of such.
        z: the unified input (B, D + 2) or (B, C + 2, H, W).
        tangent: same shape as ``z``.
        mode: ``fused`` or ``separate`` (module docstring).
    """
    with jvp_safe_attention():
        # compiled, both modes are the one fused pass: dynamo cannot trace the RNG
        # rewind of ``separate`` (a graph break that would leave the model eager), and
        # the compiler's partitioner keeps for the backward only what it needs
        if mode == "fused" or torch.compiler.is_compiling():
            with tangents_without_graph():
                u, du = _jvp(fn, z, tangent)
            return u, (tuple(d.detach() for d in du) if isinstance(du, tuple) else du.detach())
        with rewound_rng(z.device), torch.no_grad():
            _, du = _jvp(fn, z, tangent)
        return fn(z), du  # the same dropout mask as the JVP: the RNG was rewound


def _jvp(fn: Callable[[Tensor], Outputs], z: Tensor, tangent: Tensor) -> tuple[Outputs, Outputs]:
    """``(fn(z), J_fn(z) tangent)`` (module docstring: dual tensors eagerly,
    ``torch.func.jvp`` under torch.compile)."""
    if torch.compiler.is_compiling():
        return torch.func.jvp(fn, (z,), (tangent,))
    with fwAD.dual_level():
        out = fn(fwAD.make_dual(z, tangent))
        pairs = [fwAD.unpack_dual(o) for o in (out if isinstance(out, tuple) else (out,))]
    # an output that does not depend on z has no tangent here; torch.func.jvp gives zeros
    us = tuple(p.primal for p in pairs)
    dus = tuple(torch.zeros_like(p.primal) if p.tangent is None else p.tangent for p in pairs)
    return (us, dus) if isinstance(out, tuple) else (us[0], dus[0])
