"""The two ranges an image lives in: float32 in [-1, 1] in the data sets and the models
(the range the noise ``x_0 ~ N(0, I)`` is matched against), uint8 in [0, 255] in files,
pictures and FID's feature networks. The maps between them, one way each.
"""

import torch
from torch import Tensor


def from_uint8(x: Tensor) -> Tensor:
    """[0, 255] (uint8, or float on that scale) -> float32 in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] -> uint8 in [0, 255]: clamped, then rounded to the nearest level (as a PNG
    save rounds), so ``to_uint8(from_uint8(u)) == u``."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
