"""CONCH v1.5 (MahmoodLab/conchv1_5, TITAN's patch encoder): the vision tower only.

Layout of the released `pytorch_model_vision.bin` (facts from TRIDENT's model_zoo/conchv1_5,
the code MahmoodLab loads it with):
- `trunk.*`: an iBOT-style ViT-L/16 with timm's key names (`cls_token`, `pos_embed`,
  `patch_embed.proj`, `blocks.<i>.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2,
  ls2.gamma}`, `norm`), qkv bias, LayerScale, LayerNorm eps 1e-6, GELU; built for 224 px, so its
  position table is 14 x 14 (+1 class row); a checkpoint table of another size is first resized
  to it (bilinear, no antialiasing), and at the 448 px input the table is interpolated by the
  DINO rule (bicubic at the scale factor (28 + 0.1) / 14, `layers.resample_pos_embed` "dino");
- `attn_pool_contrast.*`: one learned query (`query`, 768-d) with `ln_q` / `ln_k` LayerNorms
  (eps 1e-5), `to_q` (768 -> 768), `to_kv` (1024 -> 2 x 768) and `to_out` (768 -> 768), all
  without bias, 8 heads, softmax attention over every trunk token after the trunk's final norm;
- `ln_contrast`: a LayerNorm (eps 1e-5) on the pooled query: the 768-d patch feature.
There is no text tower in this release.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EncoderError
from .base import Encoder, build_on_meta, find_weights, load_checkpoint, read_state_dict
from .layers import TimmViT, _heads, _merge, resample_pos_embed
from .presets import EncoderPreset
from .vit import preset_encoder


class QueryPooler(nn.Module):
    """Learned queries attending to the tokens, projections without bias (`to_q`, `to_kv`,
    `to_out`), LayerNorms on queries and tokens; output (n, n_queries, dim)."""

    def __init__(self, dim: int, context_dim: int, heads: int, n_queries: int = 1, eps: float = 1e-5):
        super().__init__()
        if dim % heads:
            raise ValueError(f"pooler width {dim} is not a multiple of its {heads} heads")
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(n_queries, dim))
        self.ln_k = nn.LayerNorm(context_dim, eps=eps)
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).unsqueeze(0).expand(n, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(_heads(q, self.heads), _heads(k.contiguous(), self.heads),
                                             _heads(v.contiguous(), self.heads))
        return self.to_out(_merge(out))


class ConchV15Vision(nn.Module):
    def __init__(self, *, img_size: int = 224, patch_size: int = 16, embed_dim: int = 1024, depth: int = 24,
                 num_heads: int = 16, mlp_ratio: float = 4.0, init_values: Optional[float] = 1.0,
                 pool_dim: int = 768, pool_heads: int = 8):
        super().__init__()
        self.trunk = TimmViT(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, init_values=init_values, pos_interp="dino")
        self.attn_pool_contrast = QueryPooler(pool_dim, embed_dim, pool_heads, 1)
        self.ln_contrast = nn.LayerNorm(pool_dim)
        self.num_features = pool_dim
        self.input_size = 448  # the size it runs at (the builder sets it): tokens for activation_shape

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_tokens(pixels))[:, 0])

    def activation_shape(self) -> tuple[int, int, int, float]:
        t = self.trunk
        return (self.input_size // t.patch_size) ** 2 + t.num_prefix_tokens, t.embed_dim, t.num_heads, t.mlp_ratio


_ARCH_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "init_values", "pool_dim",
              "pool_heads")


def build_conch_v15(preset: EncoderPreset, weights: Optional[str | os.PathLike], *, device: Any = "cpu",
                    dtype: Any = None, compile: bool | str = False, **overrides: Any) -> Encoder:
    """CONCH v1.5's vision tower from `pytorch_model_vision.bin`. Overrides: the architecture
    (img_size: the trunk's position-table size; patch_size, embed_dim, depth, num_heads, mlp_ratio,
    pool_dim, pool_heads), `input_size` (pixels the model sees, 448), and mean / std /
    interpolation / magnification / patch_px / resize_size."""
    name = preset.name
    meta = {k: overrides.pop(k) for k in ("mean", "std", "interpolation", "magnification", "patch_px", "resize_size",
                                          "input_size") if k in overrides}
    unknown = set(overrides) - set(_ARCH_KEYS)
    if unknown:
        raise EncoderError(f"{name}: option(s) {sorted(unknown)} not supported (architecture: {list(_ARCH_KEYS)})")
    path = find_weights(weights, preset.weight_files + ("pytorch_model.bin",), what=name, howto=preset.howto())
    kw = {**dict(preset.arch_kwargs), **overrides}
    try:
        model = build_on_meta(lambda: ConchV15Vision(**kw))
    except (TypeError, ValueError) as e:
        raise EncoderError(f"{name}: {e}") from e
    sd = read_state_dict(path)
    if sd and all(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items()}
    pos = sd.get("trunk.pos_embed")
    want = model.trunk.pos_embed.shape
    if pos is not None and pos.ndim == 3 and tuple(pos.shape) != tuple(want) and pos.shape[-1] == want[-1]:
        # the official loader resizes a checkpoint table of another grid to the trunk's (bilinear)
        g = int(round((pos.shape[1] - 1) ** 0.5))
        if g * g != pos.shape[1] - 1:
            raise EncoderError(f"{name}: {path}: trunk.pos_embed {tuple(pos.shape)} is not a square grid + 1")
        sd["trunk.pos_embed"] = resample_pos_embed(pos, (g, g), model.trunk.grid, 1, "bilinear")
    load_checkpoint(model, sd, what=name, path=path)
    s = int(meta.get("input_size", preset.img_size))
    if s % model.trunk.patch_size:
        raise EncoderError(f"{name}: input_size {s} is not a multiple of the patch size {model.trunk.patch_size}")
    model.input_size = s
    return preset_encoder(model, preset, meta, s, name=name, path=path, device=device, dtype=dtype, compile=compile)


__all__ = ["ConchV15Vision", "QueryPooler", "build_conch_v15"]
