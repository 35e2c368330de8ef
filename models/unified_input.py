"""The unified input every model reads, and the straight path whose states it holds
(docs/design.md, "Time convention" and "Unified input").

    x_t = (1 - t) x_0 + t x_1        noise x_0 at t = 0, data x_1 at t = 1
    z   = [x_s, s, t]                (B, D + 2), or (B, C + 2, H, W) with two constant time channels

Packing (``make_unified_flow_matching_input``) and unpacking (``split_unified_input``)
live here together, so the data, the losses, the samplers and the networks agree on
one layout.
"""

import torch
from torch import Tensor


def broadcast_time(t: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample times (B,) so they broadcast against ``x`` (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def straight_path(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 - t) x_0 + t x_1`` for per-sample times ``t`` (B,); its velocity is ``x_1 - x_0``."""
    tb = broadcast_time(t.to(x1.dtype), x1)
    return (1 - tb) * x0 + tb * x1


def make_unified_flow_matching_input(x: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """Pack the state and both times into one tensor.

    Args:
        x: state, shape (B, D) for dense data or (B, C, H, W) for images.
        s: start time, shape (B,) (or anything broadcastable to it).
        t: end time, shape (B,).

    Returns:
        (B, D + 2) as ``[x, s, t]`` for dense data, or (B, C + 2, H, W) with two
        constant channels ``s`` and ``t`` appended for images.
    """
    batch = x.shape[0]
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device).reshape(-1).expand(batch)
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(batch)
    if x.dim() == 2:
        return torch.cat([x, s[:, None], t[:, None]], dim=1)
    if x.dim() == 4:
        _, _, h, w = x.shape
        times = torch.stack([s, t], dim=1)[:, :, None, None].expand(batch, 2, h, w)
        return torch.cat([x, times], dim=1)
    raise ValueError(f"state must be (B, D) or (B, C, H, W), got shape {tuple(x.shape)}")


def split_unified_input(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``make_unified_flow_matching_input``: ``(x, s, t)``, the state (B, D)
    or (B, C, H, W) and the two times, each (B,)."""
    if z.dim() == 2:
        return z[:, :-2], z[:, -2], z[:, -1]
    return z[:, :-2], z[:, -2, 0, 0], z[:, -1, 0, 0]
