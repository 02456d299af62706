"""Vision-only ViT encoders in timm's checkpoint layout (`timm:<arch>`, and the timm-layout presets
of presets.py: UNI, UNI2-h, Virchow2, H-optimus-0/1, Prov-GigaPath).

The `timm` package itself is not imported (PyPI's timm needs torchvision, which does not import
beside the CPU torch wheel these machines use); `layers.TimmViT` reads timm's state dicts. The
architecture table holds timm's own defaults for each name (facts from timm's model registry);
a `config.json` beside the weights (the timm / Hugging Face hub layout: `architecture`,
`model_args`, `pretrained_cfg`) and keyword overrides refine them, as `timm.create_model` would.
These encoders have no text tower: `joint_dim` is None and text allocation is done in a
vision-language model's space for the same patches (see the README).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import EncoderError
from .base import IMAGENET_MEAN, IMAGENET_STD, Encoder, build_on_meta, find_weights, load_checkpoint, read_state_dict
from .layers import TimmViT
from .presets import PRESETS as ALL_PRESETS
from .presets import EncoderPreset

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.safetensors")

# timm's defaults per architecture name (vision_transformer.py model registrations).
ARCHS: dict[str, dict[str, Any]] = {
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_giant_patch14_224": dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
    "vit_large_patch14_dinov2": dict(img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16,
                                     init_values=1e-5),
    "vit_giant_patch14_dinov2": dict(img_size=518, patch_size=14, embed_dim=1536, depth=40, num_heads=24,
                                     init_values=1e-5, mlp_ratio=2.66667 * 2, mlp="swiglu_packed", act="silu"),
    "vit_large_patch14_reg4_dinov2": dict(img_size=518, patch_size=14, embed_dim=1024, depth=24, num_heads=16,
                                          init_values=1e-5, reg_tokens=4, no_embed_class=True),
    "vit_giant_patch14_reg4_dinov2": dict(img_size=518, patch_size=14, embed_dim=1536, depth=40, num_heads=24,
                                          init_values=1e-5, mlp_ratio=2.66667 * 2, mlp="swiglu_packed", act="silu",
                                          reg_tokens=4, no_embed_class=True),
}

# timm keyword -> TimmViT keyword; None: accepted and ignored (no effect on inference features).
_KWARGS: dict[str, Optional[str]] = {
    "img_size": "img_size", "patch_size": "patch_size", "embed_dim": "embed_dim", "depth": "depth",
    "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias", "init_values": "init_values",
    "class_token": "class_token", "reg_tokens": "reg_tokens", "no_embed_class": "no_embed_class",
    "pre_norm": "pre_norm", "global_pool": "global_pool", "fc_norm": "fc_norm", "act_layer": "act",
    "act": "act", "mlp_layer": "mlp", "mlp": "mlp", "pos_interp": "pos_interp",
    "num_classes": None, "dynamic_img_size": None, "in_chans": None, "drop_rate": None, "pos_drop_rate": None,
    "proj_drop_rate": None, "attn_drop_rate": None, "drop_path_rate": None, "patch_drop_rate": None,
    "weight_init": None,
}
# Encoder-level overrides (not model kwargs).
_META_KEYS = ("mean", "std", "interpolation", "magnification", "patch_px", "resize_size")


# The named presets (uni_v1, uni_v2, virchow2, h_optimus_0/1, gigapath) are records of presets.py.
PRESETS: dict[str, EncoderPreset] = {k: p for k, p in ALL_PRESETS.items() if p.family == "timm"}


def _howto(arch: str) -> str:
    return (f"timm:{arch} weights: download the model's `model.safetensors` (or `pytorch_model.bin`) and its "
            f"`config.json` from its Hugging Face repo (e.g. `hf download <org>/<repo> model.safetensors config.json "
            f"--local-dir ~/models/<name>`) and pass the folder: create_encoder(\"timm:{arch}\", \"~/models/<name>\").")


def _translate(kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if k not in _KWARGS:
            raise EncoderError(f"{where}: option {k!r} is not supported by this ViT (supported: "
                               f"{sorted(k for k, t in _KWARGS.items() if t)})")
        target = _KWARGS[k]
        if target is None:
            if k == "in_chans" and v != 3:
                raise EncoderError(f"{where}: only 3-channel RGB models are supported")
            continue
        if target == "img_size" and isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise EncoderError(f"{where}: only square inputs are supported, img_size={v}")
            v = v[0]
        if target == "mlp":
            v = "swiglu_packed" if "swiglu" in str(v).lower() else ("mlp" if str(v).lower().endswith("mlp")
                                                                       else str(v))
        if target == "act":
            v = str(v).rsplit(".", 1)[-1].lower()
        out[target] = v
    return out


def read_config_json(weights: Path, weights_file: Path) -> Optional[dict[str, Any]]:
    """The Hugging Face style config.json in the weights folder (or beside the weights file), or None."""
    folder = weights if weights.is_dir() else weights_file.parent
    p = folder / "config.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise EncoderError(f"{p}: unreadable config.json ({e})") from e


def preset_vit_kwargs(preset: EncoderPreset) -> dict[str, Any]:
    """TimmViT keyword arguments of a timm-family preset: timm's defaults for its architecture
    name, then the preset's published create_model arguments, then its output rule."""
    kwargs: dict[str, Any] = dict(ARCHS.get(preset.arch, {}))
    kwargs.update(_translate({k: v for k, v in preset.arch_kwargs.items() if k != "global_pool"}, preset.name))
    kwargs["global_pool"] = {"cls": "token", "cls+mean": "cls+mean"}[preset.output]
    return kwargs


def build_vit(name: str, arch: str, weights: Optional[str | os.PathLike], *, device: Any = "cpu",
              dtype: Any = None, compile: bool | str = False, preset: Optional[EncoderPreset] = None,
              **overrides: Any) -> Encoder:
    meta = {k: overrides.pop(k) for k in _META_KEYS if k in overrides}
    howto = preset.howto() if preset else _howto(arch)
    files = tuple(dict.fromkeys(preset.weight_files + WEIGHT_FILES)) if preset else WEIGHT_FILES
    path = find_weights(weights, files, what=name, howto=howto)
    pretrained: dict[str, Any] = {}
    kwargs: dict[str, Any] = dict(ARCHS.get(arch, {}))
    if preset:
        kwargs = preset_vit_kwargs(preset)
    else:
        cfg = read_config_json(Path(weights).expanduser(), path)
        if cfg is not None:
            cfg_arch = cfg.get("architecture")
            if cfg_arch and cfg_arch.split(".")[0] != arch:
                raise EncoderError(f"{name}: config.json beside the weights is for {cfg_arch!r}, not {arch!r}")
            kwargs.update(_translate(dict(cfg.get("model_args") or {}), f"{name} config.json"))
            if cfg.get("global_pool"):
                kwargs["global_pool"] = cfg["global_pool"]
            pretrained = dict(cfg.get("pretrained_cfg") or {})
    kwargs.update(_translate(overrides, name))
    need = ("patch_size", "embed_dim", "depth", "num_heads")
    if any(k not in kwargs for k in need):
        raise EncoderError(f"{name}: unknown timm architecture {arch!r} and no {list(need)} given "
                           f"(known: {sorted(ARCHS)})")
    if "input_size" in pretrained:
        kwargs.setdefault("img_size", int(pretrained["input_size"][-1]))
    kwargs.setdefault("img_size", 224)
    try:
        model = build_on_meta(lambda: TimmViT(**kwargs))
    except (TypeError, ValueError) as e:
        raise EncoderError(f"{name}: {e}") from e
    sd = read_state_dict(path)
    pos = sd.get("pos_embed")
    if pos is not None and tuple(pos.shape) != tuple(model.pos_embed.shape):
        raise EncoderError(f"{name}: {path} has {tuple(pos.shape)} position embeddings, the model "
                           f"{tuple(model.pos_embed.shape)} (img_size={kwargs['img_size']}, patch_size="
                           f"{kwargs['patch_size']}): set img_size to the size the checkpoint was trained at")
    load_checkpoint(model, sd, what=name, path=path, ignore_prefixes=("head.",))
    mean = meta.get("mean", pretrained.get("mean", preset.mean if preset else IMAGENET_MEAN))
    std = meta.get("std", pretrained.get("std", preset.std if preset else IMAGENET_STD))
    interpolation = meta.get("interpolation", pretrained.get("interpolation",
                                                             preset.interpolation if preset else "bicubic"))
    if interpolation not in ("bicubic", "bilinear"):
        interpolation = "bicubic"
    s = int(kwargs["img_size"])
    resize = meta.get("resize_size", preset_resize(preset, s) if preset else s)
    return Encoder(model, name=name, input_size=s, mean=mean, std=std, feature_dim=model.num_features,
                   joint_dim=None, magnification=meta.get("magnification", preset.magnification if preset else 20),
                   patch_size=meta.get("patch_px", preset.patch_px if preset else s),
                   logit_scale=None, interpolation=interpolation, device=device, dtype=dtype, compile=compile,
                   weights=path, impl="native", resize_size=resize)


def preset_resize(preset: EncoderPreset, input_size: int) -> int:
    """The preset's resize-before-crop, scaled when the input size is overridden (small test models)."""
    if input_size == preset.img_size:
        return preset.resize
    return max(input_size, int(round(preset.resize * input_size / preset.img_size)))


def preset_encoder(model: Any, preset: EncoderPreset, meta: dict, input_size: int, *, name: str,
                   path: Any, device: Any, dtype: Any, compile: bool | str) -> Encoder:
    """A vision-only Encoder around `model` with the preset's preprocessing and grid, each value
    overridable by the weights folder's metadata (`meta`)."""
    return Encoder(model, name=name, input_size=input_size, mean=meta.get("mean", preset.mean),
                   std=meta.get("std", preset.std), feature_dim=model.num_features, joint_dim=None,
                   magnification=meta.get("magnification", preset.magnification),
                   patch_size=meta.get("patch_px", preset.patch_px), logit_scale=None,
                   interpolation=meta.get("interpolation", preset.interpolation), device=device, dtype=dtype,
                   compile=compile, weights=path, impl="native",
                   resize_size=meta.get("resize_size", preset_resize(preset, input_size)))


__all__ = ["ARCHS", "PRESETS", "build_vit", "preset_encoder", "preset_resize", "preset_vit_kwargs"]
