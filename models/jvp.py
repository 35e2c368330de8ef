"""The one forward-mode pass of the mean-flow losses: the model's output and its
directional derivative along a tangent on the unified input.

    u, du = primal_and_tangent(u_fn, z, tangent_z, mode)

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

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from models.attention import jvp_safe_attention
from models.layers import tangents_without_graph
from runs.machine import rewound_rng

JVP_MODES = ("fused", "separate")


def primal_and_tangent(fn: Callable[[Tensor], Tensor], z: Tensor, tangent: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """``(fn(z), d/dε fn(z + ε tangent) at ε = 0)``; the first with gradient, the second detached.

    Args:
        fn: the model on the unified input, ``(B, ...) -> (B, ...)``.
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
            return u, du.detach()
        with rewound_rng(z.device), torch.no_grad():
            _, du = _jvp(fn, z, tangent)
        return fn(z), du  # the same dropout mask as the JVP: the RNG was rewound


def _jvp(fn: Callable[[Tensor], Tensor], z: Tensor, tangent: Tensor) -> tuple[Tensor, Tensor]:
    """``(fn(z), J_fn(z) tangent)`` (module docstring: dual tensors eagerly,
    ``torch.func.jvp`` under torch.compile)."""
    if torch.compiler.is_compiling():
        return torch.func.jvp(fn, (z,), (tangent,))
    with fwAD.dual_level():
        u, du = fwAD.unpack_dual(fn(fwAD.make_dual(z, tangent)))
    if du is None:  # an output that does not depend on z has no tangent here; torch.func.jvp gives zeros
        du = torch.zeros_like(u)
    return u, du
