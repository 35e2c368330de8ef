"""SmallCNN: a small convolutional mean-velocity field for images (about 0.5M parameters).

A two-level U-shaped conv net: residual blocks at full resolution, one downsampling
to half resolution, and back up with a skip connection. The times (``time_cond``: ``s``
and ``t - s`` by default, see ``models/embeddings.py``), the optional class and extra
conditions are embedded into one vector that every residual block adds to its
features. With ``aux_head`` a second output norm and conv give the auxiliary velocity. Meant for quick experiments
on MNIST / CIFAR-10 and for tests; the UNet is the model for real runs.
"""

import torch
from torch import Tensor, nn

from models.base_model import BaseModel
from models.embeddings import ClassEmbedder, ConditionEmbedder, TimeEmbedder, check_levels
from models.layers import Conv2d, GroupNorm, Linear, silu


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the embedding, GroupNorm-SiLU-dropout-conv, plus skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, num_groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = GroupNorm(num_groups, in_ch)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = Linear(emb_dim, out_ch)
        self.norm2 = GroupNorm(num_groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(silu(self.norm1(x)))  # (B, out_ch, H, W)
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        return self.skip(x) + h


class SmallCNN(BaseModel):
    """``u(x_s, s, t)`` for images (B, C, H, W).

    Args:
        in_channels: C, the state's channels (the unified input has C + 2).
        image_size: H = W of the state; must be divisible by 2 ** (len(channel_mult) - 1).
        hidden_channels: width at full resolution.
        channel_mult: width multiplier per resolution level (one level per entry).
        blocks_per_level: residual blocks per level on the way down (and up).
        emb_dim: size of the time/class embedding vector.
        num_classes: 0 for unconditional; otherwise classes 0..num_classes-1 plus a
            learned null class at index ``num_classes``.
        dropout: dropout inside the residual blocks.
        num_groups: GroupNorm groups (must divide every level's width).
        num_conds, aux_head, time_cond: extra conditions, the auxiliary output layer,
            the times embedded (``models/base_model.py``).
        time_scale: the factor on times and conditions before their sinusoidal embedding
            (``models/embeddings.py``): 1 as the one-step references, 1000 as DDPM.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        hidden_channels: int = 40,
        channel_mult: list[int] | tuple[int, ...] = (1, 2),
        blocks_per_level: int = 1,
        emb_dim: int = 128,
        num_classes: int = 0,
        dropout: float = 0.0,
        num_groups: int = 8,
        num_conds: int = 0,
        aux_head: bool = False,
        time_cond: str = "s_h",
        time_scale: float = 1.0,
    ) -> None:
        super().__init__(num_classes, num_conds=num_conds, aux_head=aux_head, time_cond=time_cond)
        channel_mult = tuple(channel_mult)
        check_levels("SmallCNN", image_size, channel_mult)
        widths = [hidden_channels * m for m in channel_mult]
        if any(w % num_groups for w in widths):
            raise ValueError(f"num_groups={num_groups} must divide every level width {widths}")
        self.in_channels = in_channels
        self.image_size = image_size

        self.time_embed = TimeEmbedder(emb_dim, 64, time_cond, time_scale)
        self.class_embed = ClassEmbedder(num_classes, emb_dim) if num_classes > 0 else None
        self.cond_embed = ConditionEmbedder(num_conds, emb_dim, 64, time_scale) if num_conds > 0 else None
        self.conv_in = Conv2d(in_channels, widths[0], 3, padding=1)

        block = lambda i, o: ResBlock(i, o, emb_dim, num_groups, dropout)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = widths[0]
        for level, width in enumerate(widths):
            self.down.append(nn.ModuleList([block(ch if j == 0 else width, width) for j in range(blocks_per_level)]))
            ch = width
            if level < len(widths) - 1:
                self.downsample.append(Conv2d(ch, ch, 3, stride=2, padding=1))
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            # the first block of a level takes the skip from the same level of the down path
            self.up.append(nn.ModuleList([block((ch + width) if j == 0 else width, width) for j in range(blocks_per_level)]))
            ch = width
            if level > 0:
                self.upsample.append(Conv2d(ch, widths[level - 1], 3, padding=1))
                ch = widths[level - 1]
        self.norm_out = GroupNorm(num_groups, ch)
        self.conv_out = Conv2d(ch, in_channels, 3, padding=1)
        self.aux_norm_out = GroupNorm(num_groups, ch) if aux_head else None
        self.aux_conv_out = Conv2d(ch, in_channels, 3, padding=1) if aux_head else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Convs and linears keep PyTorch's default (Kaiming-uniform) init: it suits
        # SiLU nets this shallow, and there is no depth to correct for.
        for module in self.modules():
            if isinstance(module, ResBlock):
                # Zero the last conv of each residual branch: every block starts as the
                # identity, so the initial net is a shallow conv path and trains stably.
                nn.init.zeros_(module.conv2.weight)
                nn.init.zeros_(module.conv2.bias)
        # Zero output convs (u's and the auxiliary v's): the initial velocity is 0
        # everywhere, the usual starting point of diffusion/flow nets (loss starts at E|v|^2).
        for conv in (self.conv_out, self.aux_conv_out):
            if conv is not None:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    def forward(self, z: Tensor, y: Tensor | None = None, aug: Tensor | None = None, cond: Tensor | None = None,
                head: str = "u") -> Tensor | tuple[Tensor, Tensor]:
        x, s, t, y, aug, cond = self.inputs(z, y, aug, cond, head)
        emb = self.time_embed(s, t)  # (B, E)
        if self.class_embed is not None:
            emb = emb + self.class_embed(y)
        if self.cond_embed is not None:
            for c in self.cond_embed(cond):
                emb = emb + c
        h = self.conv_in(x)  # (B, w0, H, W)
        skips = []
        for level, blocks in enumerate(self.down):
            for blk in blocks:
                h = blk(h, emb)
            skips.append(h)  # (B, w_level, H / 2^level, W / 2^level)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, ch + w_level, H_level, W_level)
            for blk in blocks:
                h = blk(h, emb)
            if i < len(self.upsample):
                h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
                h = self.upsample[i](h)
        return self.outputs(head, h, self._u_out, self._v_out)  # (B, C, H, W), or two

    def _u_out(self, h: Tensor) -> Tensor:
        return self.conv_out(silu(self.norm_out(h)))

    def _v_out(self, h: Tensor) -> Tensor:
        return self.aux_conv_out(silu(self.aux_norm_out(h)))
