"""EDM's non-leaking augmentation for image batches, with its augment label.

Karras et al. 2022 ("Elucidating the design space of diffusion-based generative
models", Sec. 5 and Appendix F.2; NVlabs/edm ``training/augment.py::AugmentPipe``)
augment each training image with probability ``p`` per operation and hand the network
a label describing what was done; the network is conditioned on the label (a linear
map, without bias, added to the time embedding), and sampling passes a zero label, so
the augmentations do not leak into the generated images.

The MeanFlow CIFAR-10 recipe (Gsunshine/py-meanflow, ``meanflow/training/train_loop.py``,
line 68) uses ``p=0.12, xflip=1e8, yflip=0, scale=1, rotate_frac=0, aniso=1,
translate_frac=1``, a 6-number label (``model_configs.py``: ``augment_dim = 6``):

    [xflip, scale, aniso * cos(r), aniso * sin(r), translate_x, translate_y]

``xflip=1e8`` saturates that operation's probability: every image is flipped with
probability 1/2 whatever ``p`` is, and the label says which were. The translation of
that recipe is EDM's *fractional* translation (``translate_frac``, Gaussian, std 1/8
of the image size), not its integer translation; ``translate_int`` is offered as EDM
offers it, off by default.

This is a reimplementation of the operations above (EDM also has y-flips, rotations
and colour operations, which no recipe here uses). It follows EDM's order of random
draws, probabilities, strengths, label layout and transform geometry; it differs in
the resampling filter: EDM upsamples 2x with a sym6 wavelet filter, samples bilinearly
and downsamples (nearly band-limited: sharper at half-pixel offsets, anti-aliased when
an image shrinks), here the image is sampled bilinearly at each output pixel (exact
for the identity and integer offsets; the scales stay near 1, 2^(0.2 N(0, 1)), so
shrinking aliases little). Only the images whose geometry changed are resampled.
"""

import math

import torch
from torch import Tensor


def mirror(index: Tensor, size: int) -> Tensor:
    """Fold integer indices into ``[0, size)`` by reflection about the first and last
    pixels (no edge repeat: -1 -> 1), as ``torch.nn.functional.pad(mode="reflect")``."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= size, period - index, index)


def _rotation(theta: Tensor) -> Tensor:
    """(N, 3, 3) rotations by ``theta`` (x right, y down)."""
    c, s = theta.cos(), theta.sin()
    zero, one = torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([c, -s, zero, s, c, zero, zero, zero, one], dim=-1).reshape(-1, 3, 3)


def _scaling(sx: Tensor, sy: Tensor) -> Tensor:
    zero, one = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, zero, zero, zero, sy, zero, zero, zero, one], dim=-1).reshape(-1, 3, 3)


def _translation(tx: Tensor, ty: Tensor) -> Tensor:
    zero, one = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([one, zero, tx, zero, one, ty, zero, zero, one], dim=-1).reshape(-1, 3, 3)


def _bilinear_mirrored(images: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
    """Sample ``images`` (M, C, H, W) at pixel coordinates ``qx, qy`` (M, h, w) with
    bilinear interpolation on the mirror-extended image; returns (M, C, h, w)."""
    m, c, height, width = images.shape
    flat = images.reshape(m, c, height * width)
    x0, y0 = qx.floor(), qy.floor()
    fx, fy = (qx - x0).unsqueeze(1), (qy - y0).unsqueeze(1)  # (M, 1, h, w)
    x0, y0 = x0.long(), y0.long()

    def tap(dy: int, dx: int) -> Tensor:
        index = mirror(y0 + dy, height) * width + mirror(x0 + dx, width)  # (M, h, w)
        gathered = flat.gather(2, index.reshape(m, 1, -1).expand(m, c, -1))
        return gathered.reshape(m, c, *qx.shape[1:])

    top = tap(0, 0) * (1 - fx) + tap(0, 1) * fx
    bottom = tap(1, 0) * (1 - fx) + tap(1, 1) * fx
    return top * (1 - fy) + bottom * fy


def resample(images: Tensor, g_inv: Tensor) -> Tensor:
    """Warp ``images`` (M, C, H, W) by the inverse maps ``g_inv`` (M, 3, 3), which take an
    output pixel position to the input position it reads, both in pixel units centred
    on the image (x right, y down); bilinear on the mirror-extended image."""
    _, _, height, width = images.shape
    cx, cy = (width - 1) / 2, (height - 1) / 2
    py, px = torch.meshgrid(
        torch.arange(height, device=images.device, dtype=images.dtype) - cy,
        torch.arange(width, device=images.device, dtype=images.dtype) - cx,
        indexing="ij",
    )  # (H, W)
    g = g_inv.to(images.dtype)[:, :, :, None, None]  # (M, 3, 3, 1, 1)
    qx = g[:, 0, 0] * px + g[:, 0, 1] * py + g[:, 0, 2] + cx  # (M, H, W)
    qy = g[:, 1, 0] * px + g[:, 1, 1] * py + g[:, 1, 2] + cy
    return _bilinear_mirrored(images, qx, qy)


class AugmentPipe:
    """EDM's augment pipe for a batch of images (B, C, H, W) in [-1, 1].

    Each argument but ``p`` and the strengths is a probability multiplier, as in EDM:
    an operation is applied to an image with probability ``multiplier * p``.

    Args:
        p: overall augmentation probability (0.12 in the EDM and MeanFlow CIFAR-10 recipes).
        xflip: horizontal flip (applied as a fair coin on the eligible images).
        translate_int: integer translation, uniform within ``translate_int_max`` of the size.
        scale: isotropic scaling by ``2 ** (scale_std * N(0, 1))``.
        aniso: anisotropic scaling by ``2 ** (aniso_std * N(0, 1))`` along an axis rotated by
            a uniform angle with probability ``aniso_rotate_prob``, else along x.
        translate_frac: fractional translation by ``translate_frac_std * size * N(0, 1)``.

    ``__call__`` returns ``(images, label)``; ``label`` is (B, ``label_dim``) float32, zero
    for an image that nothing was applied to.
    """

    def __init__(
        self,
        p: float = 0.12,
        xflip: float = 0.0,
        translate_int: float = 0.0,
        scale: float = 0.0,
        aniso: float = 0.0,
        translate_frac: float = 0.0,
        translate_int_max: float = 0.125,
        scale_std: float = 0.2,
        aniso_std: float = 0.2,
        aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augment probability p must be in [0, 1], got {p}")
        multipliers = {"xflip": xflip, "translate_int": translate_int, "scale": scale, "aniso": aniso}
        for name, value in {**multipliers, "translate_frac": translate_frac}.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"augment multiplier {name} must be a number >= 0, got {value}")
        self.p = p
        self.xflip, self.translate_int, self.scale, self.aniso = xflip, translate_int, scale, aniso
        self.translate_frac = translate_frac
        self.translate_int_max = translate_int_max
        self.scale_std, self.aniso_std = scale_std, aniso_std
        self.aniso_rotate_prob = aniso_rotate_prob
        self.translate_frac_std = translate_frac_std

    @classmethod
    def meanflow_cifar10(cls, p: float = 0.12) -> "AugmentPipe":
        """The MeanFlow CIFAR-10 pipe (py-meanflow ``train_loop.py`` line 68): x-flip,
        isotropic and anisotropic scaling, fractional translation; label_dim 6."""
        return cls(p=p, xflip=1e8, scale=1, aniso=1, translate_frac=1)

    @property
    def label_dim(self) -> int:
        """Numbers in the augment label: 1 per flip / scale, 2 per translation / aniso."""
        return (
            (self.xflip > 0)
            + 2 * (self.translate_int > 0)
            + (self.scale > 0)
            + 2 * (self.aniso > 0)
            + 2 * (self.translate_frac > 0)
        )

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        n, _, height, width = images.shape
        device = images.device

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, device=device, generator=generator)

        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, device=device, generator=generator)

        labels: list[Tensor] = []

        # Pixel blitting (exact): flips and integer translations.
        if self.xflip > 0:
            w = torch.randint(2, (n, 1, 1, 1), device=device, generator=generator)
            w = torch.where(rand(n, 1, 1, 1) < self.xflip * self.p, w, torch.zeros_like(w))
            images = torch.where(w == 1, images.flip(3), images)
            labels.append(w)

        if self.translate_int > 0:
            w = rand(2, n, 1, 1, 1) * 2 - 1
            w = torch.where(rand(1, n, 1, 1, 1) < self.translate_int * self.p, w, torch.zeros_like(w))
            tx = (w[0] * (width * self.translate_int_max)).round().long()
            ty = (w[1] * (height * self.translate_int_max)).round().long()
            # EDM's convention: output (y, x) reads input (y + ty, x - tx), mirrored at the
            # borders, so content moves right by tx and up by ty.
            y = torch.arange(height, device=device).reshape(1, 1, height, 1)
            x = torch.arange(width, device=device).reshape(1, 1, 1, width)
            index = mirror(y + ty, height) * width + mirror(x - tx, width)  # (N, 1, H, W)
            flat = images.reshape(n, images.shape[1], height * width)
            images = flat.gather(2, index.reshape(n, 1, -1).expand_as(flat)).reshape(images.shape)
            labels += [tx / (width * self.translate_int_max), ty / (height * self.translate_int_max)]

        # Geometric transformations, composed as one inverse map per image (output -> input).
        g_inv = torch.eye(3, device=device).expand(n, 3, 3)
        moved = torch.zeros(n, dtype=torch.bool, device=device)  # images whose geometry changes

        if self.scale > 0:
            w = randn(n)
            w = torch.where(rand(n) < self.scale * self.p, w, torch.zeros_like(w))
            s = torch.exp2(w * self.scale_std)
            g_inv = g_inv @ _scaling(1 / s, 1 / s)
            moved |= w != 0
            labels.append(w)

        if self.aniso > 0:
            w = randn(n)
            r = (rand(n) * 2 - 1) * math.pi
            w = torch.where(rand(n) < self.aniso * self.p, w, torch.zeros_like(w))
            r = torch.where(rand(n) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = torch.exp2(w * self.aniso_std)
            # stretch by s along the axis at angle r and by 1/s across it: inverse R(-r) S(1/s, s) R(r);
            # the frame is left out where w = 0, so that R(-r) R(r) rounding leaves those images exact
            frame = torch.where(w != 0, r, torch.zeros_like(r))
            g_inv = g_inv @ _rotation(-frame) @ _scaling(1 / s, s) @ _rotation(frame)
            moved |= w != 0
            labels += [w * r.cos(), w * r.sin()]

        if self.translate_frac > 0:
            w = randn(2, n)
            w = torch.where(rand(1, n) < self.translate_frac * self.p, w, torch.zeros_like(w))
            g_inv = g_inv @ _translation(
                -w[0] * width * self.translate_frac_std, -w[1] * height * self.translate_frac_std
            )
            moved |= (w != 0).any(dim=0)
            labels += [w[0], w[1]]

        if moved.any():
            images = images.clone()
            images[moved] = resample(images[moved], g_inv[moved])

        if not labels:
            return images, torch.zeros(n, 0, device=device)
        return images, torch.cat([label.float().reshape(n, -1) for label in labels], dim=1)
