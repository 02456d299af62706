"""CLIP ViT encoders in open_clip's checkpoint layout (`open_clip:<arch>`): QuiltNet, and any
CLIP fine-tuned / trained with open_clip (`open_clip_pytorch_model.bin`, `open_clip_model.safetensors`).

The `open_clip` package is not imported (PyPI's open_clip needs torchvision, which does not
import beside the CPU torch wheel these machines use); this module reads its state dicts. Key
names and the forward pass follow open_clip's `CLIP` (facts from its public code):
- `visual.conv1` (no bias), `visual.class_embedding`, `visual.positional_embedding`, `visual.ln_pre`,
  `visual.transformer.resblocks.<i>.*`, `visual.ln_post`, `visual.proj` (width x embed_dim);
- text at the top level: `token_embedding`, `positional_embedding`, `transformer.resblocks.<i>.*`,
  `ln_final`, `text_projection` (width x embed_dim), `logit_scale` (checkpoints of open_clip's
  CustomTextCLIP keep the same text keys under `text.`; both are read);
- vision heads = width / head_width (64), text heads from the config; LayerNorm eps 1e-5;
  GELU, or QuickGELU for `-quickgelu` models (OpenAI-initialised ones such as QuiltNet-B-32).
Pre-projection feature x = ln_post(class token) (width-d); z = normalize(x @ visual.proj).
An `open_clip_config.json` beside the weights (open_clip's hub layout: `model_cfg`,
`preprocess_cfg`) overrides the built-in architecture and the mean/std.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import EncoderError
from .base import OPENAI_MEAN, OPENAI_STD, Encoder, build_on_meta, find_weights, load_checkpoint, read_state_dict
from .layers import Transformer, causal_mask

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json",)
_META_KEYS = ("mean", "std", "interpolation", "magnification", "patch_px")


@dataclass
class VisionCfg:
    image_size: int = 224
    layers: int = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 16
    ls_init_value: Optional[float] = None
    no_ln_pre: bool = False
    pool_type: str = "tok"
    final_ln_after_pool: bool = False


@dataclass
class TextCfg:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = None
    pool_type: str = "argmax"
    no_causal_mask: bool = False
    final_ln_after_pool: bool = False
    proj_bias: bool = False
    pad_id: int = 0
    eos_id: int = 2


@dataclass
class ClipConfig:
    embed_dim: int = 512
    quick_gelu: bool = False
    vision_cfg: VisionCfg = field(default_factory=VisionCfg)
    text_cfg: TextCfg = field(default_factory=TextCfg)


def _v(image_size: int, layers: int, width: int, patch_size: int, head_width: int = 64) -> dict[str, Any]:
    return dict(image_size=image_size, layers=layers, width=width, patch_size=patch_size, head_width=head_width)


def _t(width: int, heads: int, layers: int) -> dict[str, Any]:
    return dict(context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers)


# open_clip's model_configs for the CLIP ViTs pathology models build on.
ARCHS: dict[str, dict[str, Any]] = {
    "ViT-B-32": dict(embed_dim=512, vision_cfg=_v(224, 12, 768, 32), text_cfg=_t(512, 8, 12)),
    "ViT-B-16": dict(embed_dim=512, vision_cfg=_v(224, 12, 768, 16), text_cfg=_t(512, 8, 12)),
    "ViT-L-14": dict(embed_dim=768, vision_cfg=_v(224, 24, 1024, 14), text_cfg=_t(768, 12, 12)),
    "ViT-L-14-336": dict(embed_dim=768, vision_cfg=_v(336, 24, 1024, 14), text_cfg=_t(768, 12, 12)),
    "ViT-H-14": dict(embed_dim=1024, vision_cfg=_v(224, 32, 1280, 14, 80), text_cfg=_t(1024, 16, 24)),
}
for _name in list(ARCHS):
    ARCHS[_name + "-quickgelu"] = dict(ARCHS[_name], quick_gelu=True)


# Config keys accepted but without effect on inference (when falsy, for the second set).
_IGNORED_TOP = {"custom_text", "init_logit_scale", "cast_dtype"}
_IGNORED_IF_FALSY = {"output_tokens", "patch_dropout", "embed_cls", "hf_tokenizer_name", "tokenizer_kwargs",
                     "tokenizer_mode", "act_kwargs", "norm_kwargs", "attentional_pool", "timm_model_name",
                     "hf_model_name", "init_logit_bias"}


def _cfg_from_dict(d: dict[str, Any], where: str) -> ClipConfig:
    """open_clip model_cfg dict -> ClipConfig; anything this implementation does not do is refused."""
    d = {k: v for k, v in d.items() if k not in _IGNORED_TOP}
    vd, td = dict(d.pop("vision_cfg", {}) or {}), dict(d.pop("text_cfg", {}) or {})
    bad = []
    for sub, cls, label in ((d, None, ""), (vd, VisionCfg, "vision_cfg."), (td, TextCfg, "text_cfg.")):
        names = {f.name for f in fields(cls or ClipConfig)} - {"vision_cfg", "text_cfg"}
        for k in list(sub):
            if k in names:
                continue
            if k in _IGNORED_IF_FALSY and not sub[k]:
                sub.pop(k)
            else:
                bad.append(label + k)
    if bad:
        raise EncoderError(f"{where}: options {sorted(bad)} are not supported (CLIP ViTs with open_clip's own "
                           "text transformer only)")
    if isinstance(vd.get("layers"), (list, tuple)):
        raise EncoderError(f"{where}: ResNet CLIP image towers are not supported")
    cfg = ClipConfig(**d, vision_cfg=VisionCfg(**vd), text_cfg=TextCfg(**td))
    if cfg.vision_cfg.pool_type not in ("tok", "avg"):
        raise EncoderError(f"{where}: vision pool_type {cfg.vision_cfg.pool_type!r} is not supported (tok, avg)")
    if cfg.text_cfg.pool_type not in ("argmax", "last", "first", "eos"):
        raise EncoderError(f"{where}: text pool_type {cfg.text_cfg.pool_type!r} is not supported")
    return cfg


class ClipVisual(nn.Module):
    def __init__(self, cfg: VisionCfg, embed_dim: int, act: str):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.heads = w // cfg.head_width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(self.grid * self.grid + 1, w) * w ** -0.5)
        self.ln_pre = nn.Identity() if cfg.no_ln_pre else nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, self.heads, cfg.mlp_ratio, act, cfg.ls_init_value)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.randn(w, embed_dim) * w ** -0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels)
        n, w, gh, gw = x.shape
        if (gh, gw) != (self.grid, self.grid):
            raise EncoderError(f"CLIP image tower takes {self.cfg.image_size} px inputs, got "
                               f"{tuple(pixels.shape[-2:])}: pass patches through preprocess()")
        x = x.reshape(n, w, gh * gw).transpose(1, 2)
        x = torch.cat([self.class_embedding.view(1, 1, -1).expand(n, 1, -1).to(x.dtype), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        x = self.transformer(x)
        if self.cfg.final_ln_after_pool:
            pooled = x[:, 0] if self.cfg.pool_type == "tok" else x[:, 1:].mean(dim=1)
            return self.ln_post(pooled)
        x = self.ln_post(x)
        return x[:, 0] if self.cfg.pool_type == "tok" else x[:, 1:].mean(dim=1)


class OpenClipViT(nn.Module):
    """open_clip `CLIP` with a ViT image tower (our definition, open_clip's key names)."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        act = "quick_gelu" if cfg.quick_gelu else "gelu"
        tc = cfg.text_cfg
        self.cfg = cfg
        self.visual = ClipVisual(cfg.vision_cfg, cfg.embed_dim, act)
        self.token_embedding = nn.Embedding(tc.vocab_size, tc.width)
        self.positional_embedding = nn.Parameter(torch.randn(tc.context_length, tc.width) * 0.01)
        self.transformer = Transformer(tc.width, tc.layers, tc.heads, tc.mlp_ratio, act, tc.ls_init_value)
        self.ln_final = nn.LayerNorm(tc.width)
        if tc.proj_bias:
            self.text_projection: nn.Module | nn.Parameter = nn.Linear(tc.width, cfg.embed_dim)
        else:
            self.text_projection = nn.Parameter(torch.randn(tc.width, cfg.embed_dim) * tc.width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def projection_weight(self) -> torch.Tensor:
        return self.visual.proj

    def encode_text_ids(self, ids: torch.Tensor) -> torch.Tensor:
        tc = self.cfg.text_cfg
        n, l = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding[:l]
        mask = None if tc.no_causal_mask else causal_mask(l, ids.device)
        x = self.transformer(x, mask)
        if not tc.final_ln_after_pool:
            x = self.ln_final(x)
        if tc.pool_type == "argmax":  # the end token has the largest id
            pooled = x[torch.arange(n, device=ids.device), ids.argmax(dim=-1)]
        elif tc.pool_type == "eos":
            pooled = x[torch.arange(n, device=ids.device), (ids == tc.eos_id).int().argmax(dim=-1)]
        else:
            pooled = x[:, 0] if tc.pool_type == "first" else x[:, -1]
        if tc.final_ln_after_pool:
            pooled = self.ln_final(pooled)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    def activation_shape(self) -> tuple[int, int, int, float]:
        v = self.visual
        return v.grid * v.grid + 1, v.cfg.width, v.heads, v.cfg.mlp_ratio


def _canonical_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # CustomTextCLIP keeps the text tower under `text.`; CLIP at the top level. Read both.
    if any(k.startswith("text.") for k in sd) and "token_embedding.weight" not in sd:
        return {(k[len("text."):] if k.startswith("text.") else k): v for k, v in sd.items()}
    return sd


def _make_tokenizer(path: Path, cfg: ClipConfig, name: str):
    from .tokenization import FileTokenizer

    tc = cfg.text_cfg
    tok = FileTokenizer(path, context_length=tc.context_length, pad_id=tc.pad_id, what=name)
    sot, eot = tok.token_id("<|startoftext|>"), tok.token_id("<|endoftext|>")
    if sot is None or eot is None:
        raise EncoderError(f"{name}: {path} is not a CLIP tokenizer (no <|startoftext|> / <|endoftext|>)")
    if tok.vocab_size > tc.vocab_size:
        raise EncoderError(f"{name}: tokenizer {path} has {tok.vocab_size} tokens, the model {tc.vocab_size}")
    if tc.pool_type == "argmax" and eot != tok.vocab_size - 1:
        raise EncoderError(f"{name}: argmax pooling needs <|endoftext|> to be the largest token id "
                           f"({eot} vs {tok.vocab_size - 1})")
    return tok


def _howto(arch: str) -> str:
    return (f"open_clip:{arch} weights: download the model's `open_clip_pytorch_model.bin` (or "
            f"`open_clip_model.safetensors`), with its `open_clip_config.json` and `tokenizer.json`, from its Hugging "
            f"Face repo, e.g. for QuiltNet\n    hf download wisdomik/QuiltNet-B-32 open_clip_pytorch_model.bin "
            f"open_clip_config.json tokenizer.json --local-dir ~/models/quiltnet-b-32\nand pass the folder: "
            f"create_encoder(\"open_clip:ViT-B-32-quickgelu\", \"~/models/quiltnet-b-32\"). Any CLIP model's "
            f"tokenizer.json (e.g. openai/clip-vit-base-patch32) serves models with the standard 49,408-token "
            f"vocabulary.")


def build_open_clip(name: str, arch: str, weights: Optional[str | os.PathLike], *, device: Any = "cpu",
                    dtype: Any = None, compile: bool | str = False, tokenizer: Optional[str] = None,
                    **overrides: Any) -> Encoder:
    meta = {k: overrides.pop(k) for k in _META_KEYS if k in overrides}
    path = find_weights(weights, WEIGHT_FILES, what=name, howto=_howto(arch))
    wdir = Path(weights).expanduser()
    folder = wdir if wdir.is_dir() else path.parent
    pre: dict[str, Any] = {}
    cfg_path = folder / "open_clip_config.json"
    if cfg_path.is_file():
        try:
            hub = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise EncoderError(f"{cfg_path}: unreadable ({e})") from e
        base = hub.get("model_cfg") or ARCHS.get(arch)
        pre = dict(hub.get("preprocess_cfg") or {})
        where = str(cfg_path)
    else:
        base, where = ARCHS.get(arch), name
    if base is None:
        raise EncoderError(f"{name}: unknown open_clip architecture {arch!r} and no open_clip_config.json beside "
                           f"the weights (known: {sorted(ARCHS)})")
    d = json.loads(json.dumps(base))  # deep copy
    for k, v in overrides.items():  # overrides: top-level keys, or vision_cfg / text_cfg dicts merged
        if k in ("vision_cfg", "text_cfg") and isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    cfg = _cfg_from_dict(d, where)
    model = build_on_meta(lambda: OpenClipViT(cfg))
    sd = _canonical_keys(read_state_dict(path))
    load_checkpoint(model, sd, what=name, path=path, ignore_keys=("attn_mask", "visual.attn_mask"))
    tok_path = Path(tokenizer).expanduser() if tokenizer else next(
        (folder / f for f in TOKENIZER_FILES if (folder / f).is_file()), None)
    if tokenizer and not tok_path.is_file():
        raise EncoderError(f"{name}: tokenizer file {tok_path} does not exist")
    interp = meta.get("interpolation", pre.get("interpolation", "bicubic"))
    return Encoder(model, name=name, input_size=cfg.vision_cfg.image_size,
                   mean=meta.get("mean", pre.get("mean", OPENAI_MEAN)), std=meta.get("std", pre.get("std", OPENAI_STD)),
                   feature_dim=cfg.vision_cfg.width, joint_dim=cfg.embed_dim,
                   magnification=meta.get("magnification", 20),
                   patch_size=meta.get("patch_px", cfg.vision_cfg.image_size),
                   logit_scale=float(model.logit_scale.detach().exp()),
                   interpolation=interp if interp in ("bicubic", "bilinear") else "bicubic",
                   tokenizer=None if tok_path is None else (lambda: _make_tokenizer(tok_path, cfg, name)),
                   text_help=f"no tokenizer.json beside the weights ({folder}).\n{_howto(arch)}",
                   device=device, dtype=dtype, compile=compile, weights=path, impl="native")


__all__ = ["ARCHS", "ClipConfig", "OpenClipViT", "build_open_clip"]
