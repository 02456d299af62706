"""ViTs released in transformers' `Dinov2Model` layout (Phikon-v2), read into `layers.TimmViT`.

transformers' Dinov2 is the timm ViT block under other names: `embeddings.{cls_token,
position_embeddings, patch_embeddings.projection}`, per layer `norm1`, `attention.attention.
{query,key,value}`, `attention.output.dense`, `layer_scale1.lambda1`, `norm2`, `mlp.fc1/fc2`,
`layer_scale2.lambda1`, and a final `layernorm`; `last_hidden_state[:, 0]` is the class token
after it (facts from transformers' modeling_dinov2.py). The key mapping below renames them and
packs q, k, v into timm's `attn.qkv`; the unused `embeddings.mask_token` is dropped. Other input
sizes resample the position table as transformers does (bicubic, no antialiasing). The
`config.json` beside the weights (transformers' Dinov2Config) sets the architecture when present.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

import torch

from ..errors import EncoderError
from .base import Encoder, build_on_meta, find_weights, load_checkpoint, read_state_dict
from .layers import TimmViT
from .presets import EncoderPreset
from .vit import preset_encoder, read_config_json

_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_RENAME = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_IGNORED = ("embeddings.mask_token",)
# Dinov2Config keys -> meaning; the ones that change the computation are checked.
_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size", "mlp_ratio",
                "layer_norm_eps", "qkv_bias", "hidden_act", "use_swiglu_ffn")


def hf_dinov2_to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers Dinov2Model state dict (optionally under `dinov2.`) in timm's ViT key names.
    Keys it does not know are kept as they are, so a strict load names them."""
    if sd and all(k.startswith("dinov2.") for k in sd):
        sd = {k[len("dinov2."):]: v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in _IGNORED:
            continue
        if k in _TOP:
            out[_TOP[k]] = v
            continue
        m = _LAYER.match(k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if rest in _RENAME:
                out[f"blocks.{i}.{_RENAME[rest]}"] = v
                continue
            qm = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
            if qm:
                qkv.setdefault(i, {})[f"{qm.group(1)}.{qm.group(2)}"] = v
                continue
        out[k] = v
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            got = [parts.get(f"{n}.{kind}") for n in ("query", "key", "value")]
            if all(t is not None for t in got):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(got, dim=0)
            else:  # incomplete: keep the original names so the strict load reports them
                for n, t in zip(("query", "key", "value"), got):
                    if t is not None:
                        out[f"encoder.layer.{i}.attention.attention.{n}.{kind}"] = t
    return out


def build_hf_dinov2(preset: EncoderPreset, weights: Optional[str | os.PathLike], *, device: Any = "cpu",
                    dtype: Any = None, compile: bool | str = False, **overrides: Any) -> Encoder:
    """A `hf_dinov2` preset from local weights (a folder with model.safetensors and config.json,
    or the file). Overrides: Dinov2Config keys (hidden_size, num_hidden_layers, ...), and the
    encoder-level mean / std / interpolation / magnification / patch_px / resize_size."""
    name = preset.name
    meta = {k: overrides.pop(k) for k in ("mean", "std", "interpolation", "magnification", "patch_px", "resize_size")
            if k in overrides}
    path = find_weights(weights, preset.weight_files + ("pytorch_model.bin",), what=name, howto=preset.howto())
    cfg = dict(preset.arch_kwargs)
    file_cfg = read_config_json(path.parent, path)
    if file_cfg is not None:
        if file_cfg.get("model_type") not in (None, "dinov2"):
            raise EncoderError(f"{name}: config.json beside the weights is for model_type "
                               f"{file_cfg.get('model_type')!r}, not dinov2")
        cfg.update({k: file_cfg[k] for k in _CONFIG_KEYS if k in file_cfg})
    unknown = set(overrides) - set(_CONFIG_KEYS)
    if unknown:
        raise EncoderError(f"{name}: option(s) {sorted(unknown)} not supported (Dinov2Config keys: {list(_CONFIG_KEYS)})")
    cfg.update(overrides)
    if cfg.get("use_swiglu_ffn"):
        raise EncoderError(f"{name}: Dinov2 with use_swiglu_ffn=True is not supported")
    if not cfg.get("qkv_bias", True):
        raise EncoderError(f"{name}: Dinov2 with qkv_bias=False is not supported")
    if str(cfg.get("hidden_act", "gelu")).lower() != "gelu":
        raise EncoderError(f"{name}: Dinov2 hidden_act {cfg.get('hidden_act')!r} is not supported (gelu)")
    sd = hf_dinov2_to_timm(read_state_dict(path))
    # The position table's grid is the checkpoint's (image_size // patch_size in transformers).
    p = int(cfg["patch_size"])
    pos = sd.get("pos_embed")
    grid_img = int(cfg["image_size"]) // p * p
    if pos is not None:
        n = pos.shape[1] - 1
        g = int(round(n ** 0.5))
        if g * g == n:
            grid_img = g * p
    kw = dict(img_size=grid_img, patch_size=p, embed_dim=int(cfg["hidden_size"]), depth=int(cfg["num_hidden_layers"]),
              num_heads=int(cfg["num_attention_heads"]), mlp_ratio=float(cfg["mlp_ratio"]), init_values=1.0,
              eps=float(cfg["layer_norm_eps"]), pos_interp="hf")
    try:
        model = build_on_meta(lambda: TimmViT(**kw))
    except (TypeError, ValueError) as e:
        raise EncoderError(f"{name}: {e}") from e
    load_checkpoint(model, sd, what=name, path=path)
    s = int(cfg["image_size"])
    return preset_encoder(model, preset, meta, s, name=name, path=path, device=device, dtype=dtype, compile=compile)


__all__ = ["build_hf_dinov2", "hf_dinov2_to_timm"]
