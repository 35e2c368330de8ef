"""The one forward-mode pass of the mean-flow losses: the model's output and its
directional derivative along a tangent on the unified input.

    u, du = primal_and_tangent(u_fn, z, tangent_z, mode)

``mode``:

- ``fused``: one ``torch.func.jvp``; the primal output keeps its autograd graph and
  is back-propagated, the tangent is returned detached (the losses stop its gradient).
  It is computed inside ``tangents_without_graph()``, so the model's layers
  (``models/layers.py``) keep the tangent arithmetic out of the autograd graph and the
  step holds about the memory of the primal's graph alone.
- ``separate``: a no-grad ``torch.func.jvp`` for the tangent, then a plain forward for
  the primal; the RNG is rewound between the two so dropout draws one mask for both.

Both run under ``jvp_safe_attention()`` (fused SDPA kernels have no forward-mode
rule). Callers turn autocast off around it: the tangent of a half-precision forward
overflows.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from models.attention import jvp_safe_attention
from models.layers import tangents_without_graph

JVP_MODES = ("fused", "separate")


@contextmanager
def rewound_rng(device: torch.device) -> Iterator[None]:
    """Run the block, then put the RNG back where it was, so whatever runs next draws
    the same numbers (one dropout mask for two passes; probes that must not shift
    the stream that exact resume depends on)."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


def primal_and_tangent(fn: Callable[[Tensor], Tensor], z: Tensor, tangent: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """``(fn(z), d/dε fn(z + ε tangent) at ε = 0)``; the first with gradient, the second detached.

    Args:
        fn: the model on the unified input, ``(B, ...) -> (B, ...)``.
        z: the unified input (B, D + 2) or (B, C + 2, H, W).
        tangent: same shape as ``z``.
        mode: ``fused`` or ``separate`` (module docstring).
    """
    with jvp_safe_attention():
        if mode == "fused":
            with tangents_without_graph():
                u, du = torch.func.jvp(fn, (z,), (tangent,))
            return u, du.detach()
        with rewound_rng(z.device), torch.no_grad():
            _, du = torch.func.jvp(fn, (z,), (tangent,))
        return fn(z), du  # the same dropout mask as the JVP: the RNG was rewound
