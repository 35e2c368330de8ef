"""UNet mean-velocity field in the ADM / DDPM++ family.

Architecture as in Dhariwal & Nichol 2021 (ADM, App. A) and Song et al. 2021
(DDPM++, "Score-based generative modeling through SDEs", App. H), which is what the
MeanFlow paper uses on CIFAR-10 (Geng et al. 2025, Sec. 5.3: about 55M parameters):

- residual blocks GroupNorm-SiLU-conv, + embedding, GroupNorm-SiLU-dropout-conv, with
  the resolution change inside the residual block (BigGAN style), outputs scaled by
  1/sqrt(2) (DDPM++);
- self-attention in the middle, after every encoder block at the listed
  resolutions, and after the last decoder block of such a level (DDPM++);
- the encoder stores every block's output and the decoder concatenates them back;
- a zero-initialised output conv, so the initial velocity is 0.

Time: the times ``time_cond`` reads (by default the start time ``s`` and the interval
``t - s``) each go through a sinusoidal embedding and their own MLP; the results are
summed (``models/embeddings.py``) and the optional class embedding (learned null class
at index ``num_classes``), augment label and extra conditions are added. With
``aux_head`` a second output norm and conv on the same body give the auxiliary velocity.

With ``model_channels=128, channel_mult=(2, 2, 2), num_res_blocks=4,
attention_resolutions=(16,)`` at 32x32 the network has 55.8M parameters (EDM's DDPM++ at
CIFAR-10: 55.7M; here one more time MLP, no 1x1 convs on the resampling skips)
(``configs/model/unet.yaml``; ``tests/test_models.py`` checks the count).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import attention
from models.base_model import BaseModel
from models.embeddings import AugmentEmbedder, ClassEmbedder, ConditionEmbedder, TimeEmbedder, check_levels
from models.layers import Conv2d, GroupNorm, Linear, silu

SKIP_SCALE = 1 / math.sqrt(2)  # DDPM++ rescales every residual sum so its variance stays ~1


def group_norm(channels: int) -> GroupNorm:
    # 32 groups as in ADM/DDPM++, fewer for narrow (test-sized) layers
    return GroupNorm(min(32, channels // 4), channels, eps=1e-6)


class ResBlock(nn.Module):
    """Residual block with embedding injection and an optional 2x down/up resampling.

    (B, in_ch, H, W), (B, E) -> (B, out_ch, H', W'), H' = H/2, H or 2H.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, resample: str = "none") -> None:
        super().__init__()
        self.resample = resample
        self.norm1 = group_norm(in_ch)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            # 2x2 average pooling as a mean over the window axes: the same numbers as
            # F.avg_pool2d(x, 2), but nothing saved for the backward (avg_pool2d saves
            # its input, and in the fused MeanFlow pass that input's tangent with it)
            b, c, h, w = x.shape
            return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = silu(self.norm1(x))
        h = self.conv1(self._resample(h))  # (B, out_ch, H', W')
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        return (self.skip(self._resample(x)) + h) * SKIP_SCALE


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual: (B, C, H, W) -> same."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = Conv2d(channels, 3 * channels, 1)
        self.proj = Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        h = attention(q, k, v).transpose(-1, -2).reshape(b, c, hgt, wid)  # (B, C, H, W)
        return (x + self.proj(h)) * SKIP_SCALE


class UNet(BaseModel):
    """``u(x_s, s, t)`` for images (B, C, H, W).

    Args:
        in_channels: C, the state's channels (the unified input has C + 2).
        image_size: H = W; must be divisible by 2 ** (len(channel_mult) - 1).
        model_channels: base width; level i has width model_channels * channel_mult[i].
        channel_mult: one entry per resolution level.
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_resolutions: resolutions (e.g. 16 for 16x16) that get self-attention.
        dropout: dropout inside the residual blocks (0.2 on CIFAR-10 in MeanFlow/DDPM++).
        num_classes: 0 for unconditional; else a class embedding with a learned null
            class at index ``num_classes`` is added to the time embedding.
        augment_dim: size of the EDM augment label (0: none); its bias-free linear map
            is added to the time embedding beside the class (zero label at sampling).
        num_heads: attention heads (DDPM++ uses 1).
        num_conds, aux_head, time_cond: extra conditions, the auxiliary output layer,
            the times embedded (``models/base_model.py``).
        time_scale: the factor on times and conditions before their sinusoidal embedding
            (``models/embeddings.py``): 1 as the one-step references, 1000 as DDPM.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        model_channels: int = 128,
        channel_mult: list[int] | tuple[int, ...] = (2, 2, 2),
        num_res_blocks: int = 4,
        attention_resolutions: list[int] | tuple[int, ...] = (16,),
        dropout: float = 0.0,
        num_classes: int = 0,
        augment_dim: int = 0,
        num_heads: int = 1,
        num_conds: int = 0,
        aux_head: bool = False,
        time_cond: str = "s_h",
        time_scale: float = 1.0,
    ) -> None:
        super().__init__(num_classes, augment_dim, num_conds, aux_head, time_cond)
        channel_mult = tuple(channel_mult)
        attention_resolutions = tuple(attention_resolutions)
        check_levels("UNet", image_size, channel_mult)
        resolutions = [image_size // 2**i for i in range(len(channel_mult))]
        if not set(attention_resolutions) <= set(resolutions):
            raise ValueError(f"attention_resolutions={list(attention_resolutions)} must be among the UNet's resolutions {resolutions}")
        widths = [model_channels * m for m in channel_mult]
        if any(w % num_heads for w in widths):
            raise ValueError(f"num_heads={num_heads} must divide every level width {widths}")
        self.in_channels = in_channels
        self.image_size = image_size
        emb_dim = 4 * model_channels  # ADM/DDPM++ embedding width

        self.time_embed = TimeEmbedder(emb_dim, model_channels, time_cond, time_scale)
        self.class_embed = ClassEmbedder(num_classes, emb_dim) if num_classes > 0 else None
        self.augment_embed = AugmentEmbedder(augment_dim, emb_dim) if augment_dim > 0 else None
        self.cond_embed = ConditionEmbedder(num_conds, emb_dim, model_channels, time_scale) if num_conds > 0 else None

        # Encoder: every module's output is kept as a skip for the decoder.
        self.conv_in = Conv2d(in_channels, model_channels, 3, padding=1)
        self.enc = nn.ModuleList()
        skip_channels = [model_channels]
        ch = model_channels
        for level, (width, res) in enumerate(zip(widths, resolutions)):
            for _ in range(num_res_blocks):
                self.enc.append(self._stage(ch, width, emb_dim, dropout, res in attention_resolutions, num_heads))
                ch = width
                skip_channels.append(ch)
            if level < len(widths) - 1:
                self.enc.append(self._stage(ch, ch, emb_dim, dropout, False, num_heads, resample="down"))
                skip_channels.append(ch)

        self.mid = self._stage(ch, ch, emb_dim, dropout, True, num_heads)
        self.mid_out = ResBlock(ch, ch, emb_dim, dropout)

        # Decoder: num_res_blocks + 1 blocks per level, each eating one skip.
        self.dec = nn.ModuleList()
        self.dec_takes_skip: list[bool] = []
        for level in reversed(range(len(widths))):
            width, res = widths[level], resolutions[level]
            for idx in range(num_res_blocks + 1):
                # DDPM++ attends only after the level's last decoder block (ADM after every one)
                attn = idx == num_res_blocks and res in attention_resolutions
                self.dec.append(self._stage(ch + skip_channels.pop(), width, emb_dim, dropout, attn, num_heads))
                self.dec_takes_skip.append(True)
                ch = width
            if level > 0:
                self.dec.append(self._stage(ch, ch, emb_dim, dropout, False, num_heads, resample="up"))
                self.dec_takes_skip.append(False)

        self.norm_out = group_norm(ch)
        self.conv_out = Conv2d(ch, in_channels, 3, padding=1)
        self.aux_norm_out = group_norm(ch) if aux_head else None
        self.aux_conv_out = Conv2d(ch, in_channels, 3, padding=1) if aux_head else None
        self.initialize_weights()

    @staticmethod
    def _stage(in_ch: int, out_ch: int, emb_dim: int, dropout: float, attn: bool, num_heads: int, resample: str = "none") -> nn.ModuleList:
        blocks = [ResBlock(in_ch, out_ch, emb_dim, dropout, resample)]
        if attn:
            blocks.append(AttentionBlock(out_ch, num_heads))
        return nn.ModuleList(blocks)

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # Xavier-uniform (as in DDPM++'s default init): keeps activation variance
                # roughly constant through the conv stack at initialisation.
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ResBlock):
                # Zero last conv of each residual branch: blocks start as (scaled)
                # identities, as in ADM's zero_module(out_layers conv).
                nn.init.zeros_(module.conv2.weight)
            if isinstance(module, AttentionBlock):
                # Zero attention output projection: attention starts as the identity.
                nn.init.zeros_(module.proj.weight)
        if self.class_embed is not None:
            # Small normal class embeddings, as nn.Embedding's N(0, 1) would swamp the time signal.
            nn.init.normal_(self.class_embed.table.weight, std=0.02)
        # Zero output convs (u's and the auxiliary v's): the initial velocity is 0 everywhere.
        for conv in (self.conv_out, self.aux_conv_out):
            if conv is not None:
                nn.init.zeros_(conv.weight)

    def forward(self, z: Tensor, y: Tensor | None = None, aug: Tensor | None = None, cond: Tensor | None = None,
                head: str = "u") -> Tensor | tuple[Tensor, Tensor]:
        x, s, t, y, aug, cond = self.inputs(z, y, aug, cond, head)
        emb = self.time_embed(s, t)  # (B, E)
        if self.class_embed is not None:
            emb = emb + self.class_embed(y)
        if self.augment_embed is not None:
            emb = emb + self.augment_embed(aug)  # the augment label beside the class (EDM's map_augment)
        if self.cond_embed is not None:
            for c in self.cond_embed(cond):
                emb = emb + c
        emb = silu(emb)  # the blocks' embedding projections see SiLU(emb), as in ADM

        h = self.conv_in(x)  # (B, model_channels, H, W)
        skips = [h]
        for stage in self.enc:
            h = self._run(stage, h, emb)  # (B, width, H_level, W_level)
            skips.append(h)
        h = self.mid_out(self._run(self.mid, h, emb), emb)  # (B, width, H_min, W_min)
        for stage, takes_skip in zip(self.dec, self.dec_takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, ch + skip_ch, H_level, W_level)
            h = self._run(stage, h, emb)
        return self.outputs(head, h, self._u_out, self._v_out)  # (B, C, H, W), or two

    def _u_out(self, h: Tensor) -> Tensor:
        return self.conv_out(silu(self.norm_out(h)))

    def _v_out(self, h: Tensor) -> Tensor:
        return self.aux_conv_out(silu(self.aux_norm_out(h)))

    @staticmethod
    def _run(stage: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        h = stage[0](h, emb)
        for block in stage[1:]:
            h = block(h)
        return h
