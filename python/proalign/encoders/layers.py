"""Transformer building blocks whose parameter *names and shapes* follow the released checkpoints
of timm ViTs, open_clip CLIP models and CONCH (a CoCa variant), so those weights load here with a
strict key check. The modules are written for this package (inference only, no dropout, no
training init); attention goes through `F.scaled_dot_product_attention`, which picks the flash /
memory-efficient kernels on a GPU and never stores the (L x L) matrix there.

Naming facts used (from the public code of those projects):
- timm ViT block: `norm1`, `attn.qkv`, `attn.proj`, `ls1.gamma`, `norm2`, `mlp.fc1`, `mlp.fc2`,
  `ls2.gamma`; LayerNorm eps 1e-6; qkv packed [q; k; v] along the output dim.
- open_clip residual block: `ln_1`, `attn.in_proj_weight/in_proj_bias`, `attn.out_proj`, `ls_1.gamma`,
  `ln_2`, `mlp.c_fc`, `mlp.c_proj`, `ls_2.gamma` (torch `nn.MultiheadAttention` names); eps 1e-5.
- attentional pooler: `query`, `attn.*` (torch MHA names: packed `in_proj_weight` when the key dim
  equals the query dim, else `q_proj_weight`/`k_proj_weight`/`v_proj_weight`), `ln_q`, `ln_k`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI-trained CLIP towers (open_clip `quick_gelu`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    key = name.lower().rsplit(".", 1)[-1]
    if key == "gelu":
        return nn.GELU()
    if key in ("quickgelu", "quick_gelu"):
        return QuickGELU()
    if key in ("silu", "swish"):
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r} (gelu, quick_gelu, silu)")


class LayerScale(nn.Module):
    """Per-channel scale; parameter `gamma` (the name timm and open_clip both use)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    n, l, d = t.shape
    return t.view(n, l, heads, d // heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    n, h, l, hd = t.shape
    return t.transpose(1, 2).reshape(n, l, h * hd)


def _mask_for(q: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # SDPA wants an additive mask in the query's dtype (bf16 under autocast).
    return None if mask is None or mask.dtype == torch.bool else mask.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# timm ViT
# ---------------------------------------------------------------------------------------------
class TimmAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, l, d = x.shape
        q, k, v = self.qkv(x).view(n, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))


class TimmMlp(nn.Module):
    """`fc1` -> act -> `fc2`; `packed_glu=True` is timm's SwiGLUPacked: fc1 gives [a; b], act(a) * b."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", packed_glu: bool = False):
        super().__init__()
        self.packed_glu = packed_glu
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden // 2 if packed_glu else hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.packed_glu:
            a, b = x.chunk(2, dim=-1)
            x = self.act(a) * b
        else:
            x = self.act(x)
        return self.fc2(x)


class TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int, *, qkv_bias: bool = True,
                 layer_scale: bool = False, act: str = "gelu", packed_glu: bool = False, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = TimmAttention(dim, heads, qkv_bias)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = TimmMlp(dim, mlp_hidden, act, packed_glu)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """`proj`: a stride-p convolution; output (n, gh, gw, D) so the grid size is known."""

    def __init__(self, patch_size: int, dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


POS_INTERP = ("timm", "hf", "dino", "bilinear")


def resample_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       n_prefix: int, mode: str = "timm") -> torch.Tensor:
    """Absolute position table (1, n_prefix + gh*gw, D) resized to another grid in float32; prefix
    rows are kept as they are. The official codes differ, and so do their numbers:
    - "timm": bicubic to the new size with antialiasing (timm's `dynamic_img_size` rule);
    - "hf": bicubic to the new size without antialiasing (transformers' Dinov2 `interpolate_pos_encoding`);
    - "dino": bicubic by the scale factor (new + 0.1) / old, without antialiasing (the DINO / iBOT
      rule, used by CONCH v1.5's trunk): the kernel samples at that scale, not at new / old;
    - "bilinear": bilinear to the new size without antialiasing (timm's `resample_abs_pos_embed` as
      CONCH v1.5's loader calls it on checkpoints)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    if mode not in POS_INTERP:
        raise ValueError(f"position interpolation {mode!r} is not supported {POS_INTERP}")
    prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
    d = grid.shape[-1]
    g = grid.float().reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    if mode == "dino":
        scale = ((new_grid[0] + 0.1) / old_grid[0], (new_grid[1] + 0.1) / old_grid[1])
        g = F.interpolate(g, scale_factor=scale, mode="bicubic", align_corners=False)
        if tuple(g.shape[-2:]) != tuple(new_grid):
            raise ValueError(f"dino position interpolation gave {tuple(g.shape[-2:])}, not {tuple(new_grid)}")
    else:
        g = F.interpolate(g, size=tuple(new_grid), mode="bilinear" if mode == "bilinear" else "bicubic",
                          antialias=(mode == "timm"), align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos.dtype)
    return torch.cat([prefix, g], dim=1)


class TimmViT(nn.Module):
    """timm `VisionTransformer` as used by pathology encoders: class token, optional register
    tokens, learned absolute positions (with or without rows for the prefix tokens), optional
    LayerScale and SwiGLU-packed MLP, final `norm` (or `fc_norm` after average pooling).
    `forward_tokens` returns all tokens after the final norm (timm `forward_features`).

    `global_pool`: the image feature `forward_features` returns: "token" (the class token), "avg"
    (mean of the patch tokens, then `fc_norm`) or "cls+mean" (Virchow's: the class token and the
    mean of the patch tokens, register tokens left out, concatenated: 2 x embed_dim).
    `pos_interp`: how the position table follows another input size (`resample_pos_embed`)."""

    POOLS = ("token", "avg", "cls+mean")

    def __init__(self, *, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, init_values: Optional[float] = None,
                 class_token: bool = True, reg_tokens: int = 0, no_embed_class: bool = False,
                 pre_norm: bool = False, global_pool: str = "token", fc_norm: Optional[bool] = None,
                 act: str = "gelu", mlp: str = "mlp", eps: float = 1e-6, pos_interp: str = "timm"):
        super().__init__()
        if global_pool not in self.POOLS:
            raise ValueError(f"global_pool {global_pool!r} is not supported {self.POOLS}")
        if global_pool in ("token", "cls+mean") and not class_token:
            raise ValueError(f"global_pool={global_pool!r} needs the class token")
        if mlp not in ("mlp", "swiglu_packed"):
            raise ValueError(f"mlp {mlp!r} is not supported (mlp, swiglu_packed)")
        if pos_interp not in POS_INTERP:
            raise ValueError(f"pos_interp {pos_interp!r} is not supported {POS_INTERP}")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.num_heads, self.mlp_ratio, self.depth = num_heads, mlp_ratio, depth
        self.global_pool, self.no_embed_class, self.pos_interp = global_pool, no_embed_class, pos_interp
        self.num_features = 2 * embed_dim if global_pool == "cls+mean" else embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.grid = (img_size // patch_size, img_size // patch_size)
        use_fc_norm = (global_pool == "avg") if fc_norm is None else fc_norm

        self.patch_embed = PatchEmbed(patch_size, embed_dim, bias=not pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        n_pos = self.grid[0] * self.grid[1] + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim, eps=eps) if pre_norm else nn.Identity()
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.Sequential(*[
            TimmBlock(embed_dim, num_heads, hidden, qkv_bias=qkv_bias, layer_scale=init_values is not None,
                      act=act, packed_glu=(mlp == "swiglu_packed"), eps=eps) for _ in range(depth)])
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=eps)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=eps) if use_fc_norm else nn.Identity()

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1] + self.num_prefix_tokens

    def activation_shape(self) -> tuple[int, int, int, float]:
        return self.seq_len, self.embed_dim, self.num_heads, self.mlp_ratio

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        n, gh, gw, d = x.shape
        pos = resample_pos_embed(self.pos_embed, self.grid, (gh, gw),
                                 0 if self.no_embed_class else self.num_prefix_tokens, self.pos_interp)
        x = x.reshape(n, gh * gw, d)
        prefix = [t.expand(n, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = x + pos  # positions only for patch tokens (DeiT-3 / DINOv2-reg layout)
            x = torch.cat(prefix + [x], dim=1) if prefix else x
        else:
            x = torch.cat(prefix + [x], dim=1) if prefix else x
            x = x + pos
        x = self.blocks(self.norm_pre(x))
        return self.norm(x)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(pixels)
        if self.global_pool == "cls+mean":
            return torch.cat([x[:, 0], x[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        return self.fc_norm(x)


# ---------------------------------------------------------------------------------------------
# open_clip / CONCH text and vision towers
# ---------------------------------------------------------------------------------------------
class PackedAttention(nn.Module):
    """Self-attention with torch `nn.MultiheadAttention`'s parameter names (packed in-projection)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = (_heads(t, self.heads) for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, -1))
        return self.out_proj(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=_mask_for(q, mask))))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu",
                 ls_init_value: Optional[float] = None, eps: float = 1e-5):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = PackedAttention(dim, heads)
        self.ls_1 = LayerScale(dim) if ls_init_value is not None else nn.Identity()
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(dim, hidden)), ("gelu", make_act(act)),
                                              ("c_proj", nn.Linear(hidden, dim))]))
        self.ls_2 = LayerScale(dim) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """`resblocks.<i>`; batch-first (n, L, D) throughout."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu",
                 ls_init_value: Optional[float] = None):
        super().__init__()
        self.width, self.layers, self.heads, self.mlp_ratio = width, layers, heads, mlp_ratio
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, act, ls_init_value)
                                        for _ in range(layers)])

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """Additive (L, L) mask: 0 on and below the diagonal, -inf above (text towers)."""
    return torch.full((length, length), float("-inf"), device=device).triu_(1)


class CrossAttention(nn.Module):
    """Queries of width `dim` attending to keys/values of width `kdim`, torch MHA names: separate
    `q/k/v_proj_weight` when kdim != dim (torch's rule), else a packed `in_proj_weight`."""

    def __init__(self, dim: int, kdim: int, heads: int):
        super().__init__()
        self.heads, self.dim, self.packed = heads, dim, kdim == dim
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(dim, dim))
            self.k_proj_weight = nn.Parameter(torch.empty(dim, kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(dim, kdim))
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        if self.packed:
            wq, wk, wv = self.in_proj_weight.chunk(3, 0)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq, bk, bv = self.in_proj_bias.chunk(3, 0)
        qh = _heads(F.linear(q, wq, bq), self.heads)
        kh = _heads(F.linear(kv, wk, bk), self.heads)
        vh = _heads(F.linear(kv, wv, bv), self.heads)
        return self.out_proj(_merge(F.scaled_dot_product_attention(qh, kh, vh)))


class AttentionalPooler(nn.Module):
    """Learned queries attending over all image tokens (CoCa / CONCH): ln_k on the tokens, ln_q on
    the queries, one multi-head cross-attention. Output (n, n_queries, d_model)."""

    def __init__(self, d_model: int, context_dim: int, heads: int, n_queries: int, eps: float = 1e-5):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model) / math.sqrt(d_model))
        self.attn = CrossAttention(d_model, context_dim, heads)
        self.ln_q = nn.LayerNorm(d_model, eps=eps)
        self.ln_k = nn.LayerNorm(context_dim, eps=eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(tokens)
        q = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(q, kv)


__all__ = ["AttentionalPooler", "CrossAttention", "LayerScale", "POS_INTERP", "PackedAttention", "PatchEmbed",
           "QuickGELU", "ResidualAttentionBlock", "TimmBlock", "TimmMlp", "TimmViT", "Transformer", "causal_mask", "make_act",
           "resample_pos_embed"]
