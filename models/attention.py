"""Multi-head attention kernel shared by the UNet and the DiT, and its JVP-safe mode.

Normally attention runs through ``torch.nn.functional.scaled_dot_product_attention``
(SDPA), which picks a fused kernel (flash / memory-efficient / cuDNN) when it can.
Those fused kernels have no forward-mode AD rule: with torch 2.14 on the CPU,
``torch.func.jvp`` through SDPA fails with ``NotImplementedError: Trying to use
forward AD with _scaled_dot_product_flash_attention_for_cpu ...`` (float32 and
float64 alike; ``tests/test_models.py`` checks it). The MeanFlow loss therefore wraps
its ``torch.func.jvp`` call in ``jvp_safe_attention()``, which restricts SDPA to the
MATH backend: a composite of matmul and softmax, whose forward-mode rules exist,
and whose output equals the fused kernels' up to rounding.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(d)) v over the token axis.

    Args:
        q, k, v: (B, heads, T, head_dim).

    Returns:
        (B, heads, T, head_dim).
    """
    return F.scaled_dot_product_attention(q, k, v)


@contextmanager
def jvp_safe_attention() -> Iterator[None]:
    """Within this block every ``attention`` call (indeed every SDPA call) uses the
    MATH backend, so ``torch.func.jvp`` can push tangents through it. Outside it
    the fused kernels come back. ``sdpa_kernel`` is understood by torch.compile, so
    the switch does not break a compiled graph."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield
