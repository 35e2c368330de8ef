"""DiT: Diffusion Transformer (Peebles & Xie 2023) as a mean-velocity field.

The state (B, C, H, W) is cut into p x p patches, linearly embedded and given fixed
2-D sin-cos position embeddings; a stack of adaLN-Zero transformer blocks
(Peebles & Xie 2023, Sec. 3.2) is conditioned on one vector c = emb(s) + emb'(t - s)
+ emb(class) (``models/embeddings.py``: the MeanFlow paper's (time, interval)
choice, with a learned null class at index ``num_classes`` for guidance); a final
adaLN layer and a linear map give p*p*C values per token, unpatchified back to
(B, C, H, W). No learned variance: the output has exactly the state's channels.

Beyond the paper's model:

- ``time_cond`` picks the times embedded (``models/embeddings.py``); ``num_conds``
  extra scalar conditions are embedded like times and added to c.
- ``cond_tokens``: every conditioning signal (each embedded time, the class, the
  augment label, each extra condition) becomes one in-context token prepended to the
  patch tokens instead of a term of c, as iMF's DiT conditions ("Improved Mean Flows",
  Geng et al. 2025); the blocks' shifts, scales and gates are then learned vectors
  (zero-initialised, so each block still starts as the identity), and the tokens are
  dropped before the final layer.
- ``aux_head``: iMF's auxiliary velocity head. The first ``shared_depth`` blocks are
  shared; u's path continues through the other ``depth - shared_depth`` blocks, v's
  through ``aux_depth`` blocks of its own, each with its own final layer. iMF's B/2:
  ``depth=12, aux_depth=8`` (``shared_depth`` 4 by default: equal head depths).

Sizes (depth / hidden / heads): S 12/384/6, B 12/768/12, L 24/1024/16, XL 28/1152/16.
With 4x32x32 latents and p=2 the class-conditional (1000 classes) models have
33.1M / 131.1M / 459.1M / 676.4M parameters, 0.3% / 0.8% / 0.2% / 0.2% above the
paper's 33M / 130M / 458M / 675M: the second time embedder adds 0.25M-1.6M and
the output has no learned-sigma channels (a few thousand fewer). Unconditional:
32.7M / 130.3M / 458.1M / 675.3M. ``tests/test_models.py`` checks them.
"""

import torch
from torch import Tensor, nn

from models.attention import attention, check_attention_jvp
from models.base_model import BaseModel
from models.embeddings import AugmentEmbedder, ClassEmbedder, ConditionEmbedder, TimeEmbedder
from models.layers import GELU, Conv2d, LayerNorm, Linear, SiLU, gated_residual, modulate


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (Vaswani et al. 2017 per axis, as in MAE/DiT).

    Half of the channels encode the row, half the column, each with ``dim / 4``
    frequencies. Returns (grid * grid, dim), tokens in row-major order.
    """
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # (grid, grid) each

    def embed(p: Tensor) -> Tensor:
        args = p.reshape(-1)[:, None] * omega[None]  # (T, dim/4)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (T, dim/2)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()  # (T, dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention: (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, num_heads: int, attention_jvp: str = "closed_form") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_jvp = attention_jvp
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, D/heads)
        h = attention(q, k, v, self.attention_jvp).transpose(1, 2).reshape(b, n, d)  # (B, T, D)
        return self.proj(h)


def modulation(x: Tensor, c: Tensor | None, adaptive: nn.Module | None, learned: Tensor | None) -> Tensor:
    """The shifts, scales and gates of a block, (B, k D): adaLN's map of the conditioning
    vector ``c``, or (in-context conditioning, ``c`` None) learned vectors shared by all samples."""
    if c is not None:
        return adaptive(c)
    return learned.to(x.dtype).expand(x.shape[0], -1)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, Fig. 3);
    ``adaptive=False``: learned modulation vectors instead (in-context conditioning)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attention_jvp: str = "closed_form",
                 adaptive: bool = True) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, attention_jvp)
        self.norm2 = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(Linear(dim, hidden), GELU(approximate="tanh"), Linear(hidden, dim))
        # shift, scale, gate for the attention and for the MLP branch
        self.adaLN_modulation = nn.Sequential(SiLU(), Linear(dim, 6 * dim)) if adaptive else None
        self.modulation = None if adaptive else nn.Parameter(torch.zeros(6 * dim))

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        mods = modulation(x, c, self.adaLN_modulation, self.modulation)  # (B, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods.chunk(6, dim=1)  # each (B, D)
        x = gated_residual(x, gate_a, self.attn(modulate(self.norm1(x), shift_a, scale_a)))  # (B, T, D)
        x = gated_residual(x, gate_m, self.mlp(modulate(self.norm2(x), shift_m, scale_m)))
        return x


class FinalLayer(nn.Module):
    """adaLN (or learned vectors) then a linear map to p*p*C values per token: (B, T, D) -> (B, T, p*p*C)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, adaptive: bool = True) -> None:
        super().__init__()
        self.norm = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(SiLU(), Linear(dim, 2 * dim)) if adaptive else None
        self.modulation = None if adaptive else nn.Parameter(torch.zeros(2 * dim))

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        shift, scale = modulation(x, c, self.adaLN_modulation, self.modulation).chunk(2, dim=1)  # each (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(BaseModel):
    """``u(x_s, s, t)`` for images or latents (B, C, H, W).

    Args:
        in_channels: C, the state's channels (the unified input has C + 2).
        image_size: H = W; must be divisible by ``patch_size``.
        patch_size: p, side of a square patch (2, 4 or 8 in the paper).
        hidden_size: token width D.
        depth: transformer blocks on u's path (with ``aux_head``: the shared ones included).
        num_heads: attention heads (must divide D).
        mlp_ratio: MLP width / D.
        num_classes: 0 for unconditional; else a class embedding with a learned null
            class at index ``num_classes``.
        augment_dim: size of the EDM augment label (0: none); its bias-free linear map
            is added to the conditioning vector beside the class (zero label at sampling).
        frequency_dim: size of the sinusoidal time embeddings before their MLPs.
        attention_jvp: ``closed_form`` (SDPA primal, closed-form tangent, any device) or
            ``flash`` (the jvp-flash-attention Triton kernel; CUDA only, checked here
            and at the first forward with one-line errors).
        num_conds, aux_head, time_cond: extra conditions, the auxiliary velocity head,
            the times embedded (``models/base_model.py``).
        time_scale: the factor on times and conditions before their sinusoidal embedding
            (``models/embeddings.py``): 1 as the one-step references, 1000 as DDPM.
        cond_tokens: the conditioning as in-context tokens instead of adaLN (module docstring).
        aux_depth: blocks of the auxiliary head's own (0: a second final layer on the
            shared blocks' output); only with ``aux_head``.
        shared_depth: blocks shared by u and v (None: ``depth - aux_depth``, heads of
            equal depth as in iMF); only with ``aux_head``.
    """

    INFERENCE_CONFIG = {"aux_head": False, "aux_depth": 0, "shared_depth": None}

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        augment_dim: int = 0,
        frequency_dim: int = 256,
        attention_jvp: str = "closed_form",
        num_conds: int = 0,
        aux_head: bool = False,
        time_cond: str = "s_h",
        cond_tokens: bool = False,
        aux_depth: int = 0,
        shared_depth: int | None = None,
        time_scale: float = 1.0,
    ) -> None:
        super().__init__(num_classes, augment_dim, num_conds, aux_head, time_cond)
        check_attention_jvp(attention_jvp)
        if not aux_head and (aux_depth != 0 or shared_depth is not None):
            raise ValueError(f"DiT aux_depth={aux_depth}, shared_depth={shared_depth} shape the auxiliary head: "
                             "set aux_head=true, or aux_depth=0 and shared_depth=null")
        if aux_depth < 0:
            raise ValueError(f"DiT aux_depth={aux_depth}: expected the auxiliary head's own blocks, >= 0")
        shared = depth - aux_depth if shared_depth is None else shared_depth
        if aux_head and not 0 <= shared <= depth:
            raise ValueError(f"DiT shared_depth={shared} (depth={depth}, aux_depth={aux_depth}): "
                             f"expected 0 <= shared_depth <= depth")
        if image_size % patch_size != 0:
            fits = [p for p in (1, 2, 4, 8, 16) if image_size % p == 0]
            raise ValueError(f"DiT image_size={image_size} is not divisible by patch_size={patch_size}: use a patch size in {fits}")
        if hidden_size % num_heads != 0:
            raise ValueError(f"DiT hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if hidden_size % 4 != 0:
            raise ValueError(f"DiT hidden_size={hidden_size} must be a multiple of 4 for the 2-D sin-cos position embedding")
        self.in_channels = in_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.cond_tokens = cond_tokens
        self.shared_depth = shared if aux_head else depth

        self.x_embedder = Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # fixed, not learned; recomputed at construction, so not stored in checkpoints
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.time_embed = TimeEmbedder(hidden_size, frequency_dim, time_cond, time_scale)
        self.class_embed = ClassEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.augment_embed = AugmentEmbedder(augment_dim, hidden_size) if augment_dim > 0 else None
        self.cond_embed = ConditionEmbedder(num_conds, hidden_size, frequency_dim, time_scale) if num_conds > 0 else None
        block = lambda: DiTBlock(hidden_size, num_heads, mlp_ratio, attention_jvp, adaptive=not cond_tokens)
        self.blocks = nn.ModuleList([block() for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, adaptive=not cond_tokens)
        self.aux_blocks = nn.ModuleList([block() for _ in range(aux_depth)]) if aux_head else None
        self.aux_final_layer = FinalLayer(hidden_size, patch_size, in_channels, adaptive=not cond_tokens) if aux_head else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # Xavier-uniform for every linear layer, as in ViT/DiT.
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Patch embedding initialised like a linear layer on the flattened patch.
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        # Time MLPs and class table with N(0, 0.02), the DiT choice: small conditioning
        # vectors at first, so the zeroed adaLN layers below dominate.
        # The extra conditions' MLPs alike; as tokens the LayerNorm of the next block
        # rescales each token, so their size does not matter there.
        embedders = self.time_embed.embedders() + (list(self.cond_embed.embedders) if self.cond_embed is not None else [])
        for embedder in embedders:
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.table.weight, std=0.02)
        # adaLN-Zero: zero modulation, so every gate is 0 and each block starts as the
        # identity (Peebles & Xie 2023, Sec. 3.2). Learned modulation vectors start at 0.
        blocks = list(self.blocks) + (list(self.aux_blocks) if self.aux_blocks is not None else [])
        finals = [self.final_layer] + ([self.aux_final_layer] if self.aux_final_layer is not None else [])
        for layer in blocks + finals:
            if layer.adaLN_modulation is not None:
                nn.init.zeros_(layer.adaLN_modulation[-1].weight)
                nn.init.zeros_(layer.adaLN_modulation[-1].bias)
        # Zero final layers: the initial velocity is 0 everywhere.
        for final in finals:
            nn.init.zeros_(final.linear.weight)
            nn.init.zeros_(final.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        b, p, g, c = x.shape[0], self.patch_size, self.grid, self.in_channels
        x = x.reshape(b, g, g, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward(self, z: Tensor, y: Tensor | None = None, aug: Tensor | None = None, cond: Tensor | None = None,
                head: str = "u") -> Tensor | tuple[Tensor, Tensor]:
        x, s, t, y, aug, cond = self.inputs(z, y, aug, cond, head)
        h = self.x_embedder(x).flatten(2).transpose(1, 2)  # (B, T, D), T = (H/p)(W/p)
        h = h + self.pos_embed.to(h.dtype)  # (B, T, D)
        signals = self.time_embed.embeddings(s, t)  # each (B, D)
        if self.class_embed is not None:
            signals.append(self.class_embed(y))
        if self.augment_embed is not None:
            signals.append(self.augment_embed(aug))  # the augment label beside the class in the conditioning
        if self.cond_embed is not None:
            signals += self.cond_embed(cond)
        if self.cond_tokens:
            c = None
            h = torch.cat([torch.stack(signals, dim=1), h], dim=1)  # (B, K + T, D): K in-context tokens first
        else:
            c, *rest = signals
            for signal in rest:
                c = c + signal  # (B, D)
        for block in self.blocks[: self.shared_depth]:
            h = block(h, c)  # (B, K + T, D)
        u_out = lambda h: self._head(h, c, self.blocks[self.shared_depth:], self.final_layer)
        v_out = lambda h: self._head(h, c, self.aux_blocks, self.aux_final_layer)
        return self.outputs(head, h, u_out, v_out)  # (B, C, H, W), or two

    def _head(self, h: Tensor, c: Tensor | None, blocks: nn.ModuleList, final_layer: FinalLayer) -> Tensor:
        """One head's own blocks and final layer, the in-context tokens dropped: (B, K + T, D) -> (B, C, H, W)."""
        for block in blocks:
            h = block(h, c)
        if self.cond_tokens:
            h = h[:, -self.grid * self.grid :]  # (B, T, D): the patch tokens
        return self.unpatchify(final_layer(h, c))  # (B, T, p*p*C) -> (B, C, H, W)
