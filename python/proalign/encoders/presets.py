"""Encoder presets as data: one record per published pathology encoder, the way timm keeps one
pretrained config per model.

Each `EncoderPreset` says which architecture the released weights need (the official
constructor and its keyword arguments as the model card or the lab's own loader publishes them),
how patches are prepared (input size, the resize before the centre crop, interpolation, mean /
std), the patch grid the model is used with (pixels at a magnification, TRIDENT's settings),
which output is the patch feature, and where a user downloads the weights by hand (nothing is
ever downloaded here). `registry.py` registers a builder for every preset; the README's table of
presets is `markdown_table()`; tests/test_official_parity.py checks each preset against its
official code at the real size.

Facts and where they come from (the `source` of each record):
- UNI, UNI2-h: the MahmoodLab model cards' `timm.create_model` arguments; TRIDENT's loaders
  (Resize(224) + ImageNet mean/std on 256 px patches at 20x).
- CONCH v1: the conch package (`conch_ViT-B-16`), 512 px patches at 20x (TRIDENT).
- CONCH v1.5: TRIDENT's `model_zoo/conchv1_5` (the TITAN patch encoder): an iBOT-style ViT-L/16
  trunk (timm key names, LayerScale, position table for 224 px, interpolated to the input by the
  DINO rule), an attentional pooler with one query (768-d, 8 heads, `to_q` / `to_kv` / `to_out`
  without bias) and a LayerNorm: 768-d features; Resize(448, bilinear) + CenterCrop(448) +
  ImageNet mean/std; weights `pytorch_model_vision.bin` from MahmoodLab/conchv1_5.
- Virchow2: paige-ai/Virchow2's config (timm `vit_huge_patch14_224`, mlp_ratio 5.3375, 4 register
  tokens, LayerScale) with the model card's SwiGLUPacked / SiLU; the feature is the class token
  concatenated with the mean of the patch tokens (register tokens left out): 2560-d.
- H-optimus-0 / H-optimus-1: bioptimus' configs (timm `vit_giant_patch14_reg4_dinov2`, 224 px,
  class token) with the model cards' init_values=1e-5, dynamic_img_size=False and H-optimus-0's
  mean / std, which TRIDENT's H-optimus-1 encoder uses too; 224 px patches at 0.5 um/px.
- Phikon-v2: owkin/phikon-v2, transformers' `Dinov2Model` (ViT-L/16, 224 px, LayerScale, GELU
  MLP), feature `last_hidden_state[:, 0]`; ImageNet mean/std.
- Prov-GigaPath tile encoder: its hub config (timm `vit_giant_patch14_dinov2` with patch_size 16,
  img_size 224, mlp_ratio 5.33334, SwiGLU from the architecture) and its pipeline's transform
  Resize(256, bicubic) + CenterCrop(224) + ImageNet mean/std on 256 px tiles at 0.5 um/px.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))

FAMILIES = ("timm", "hf_dinov2", "conch_v1", "conch_v15")
OUTPUTS = {
    "cls": "class token",
    "cls+mean": "class token + mean of patch tokens",
    "attn_pool": "attentional pooler",
}


@dataclass(frozen=True)
class EncoderPreset:
    """One published encoder: architecture, preprocessing, patch grid, output, weights.

    `family`: which builder reads the checkpoint: "timm" (timm's ViT key layout), "hf_dinov2"
    (transformers' Dinov2Model layout), "conch_v1", "conch_v15". `arch` / `arch_kwargs`: the
    official constructor and its arguments as published (timm vocabulary for "timm": layer
    classes by name, e.g. mlp_layer="SwiGLUPacked"; the transformers config for "hf_dinov2").
    `img_size`: pixels the model sees; `resize`: the shortest side a patch is resized to before the
    centre crop to `img_size`; `patch_px` pixels at `magnification`x: the patch grid the model
    is used with. `output`: a key of OUTPUTS. `files`: the weight file names (the first is what
    the builder looks for first; config files listed are read when present). `repo`: the Hugging
    Face repository the files are downloaded from by hand."""

    name: str
    model: str
    family: str
    arch: str
    arch_kwargs: Mapping[str, Any]
    img_size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    magnification: float
    patch_px: int
    output: str
    feature_dim: int
    joint_dim: Optional[int]
    files: tuple[str, ...]
    repo: str
    gated: bool
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch_kwargs", MappingProxyType(dict(self.arch_kwargs)))
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family {self.family!r} is not one of {FAMILIES}")
        if self.output not in OUTPUTS:
            raise ValueError(f"{self.name}: output {self.output!r} is not one of {list(OUTPUTS)}")
        if self.resize < self.img_size:
            raise ValueError(f"{self.name}: resize {self.resize} < img_size {self.img_size}")

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}"

    @property
    def weight_files(self) -> tuple[str, ...]:
        return tuple(f for f in self.files if not f.endswith(".json"))

    def howto(self) -> str:
        """What to download, from where, and where to put it (for the missing-weights error)."""
        first, alts = self.weight_files[0], self.weight_files[1:]
        configs = [f for f in self.files if f.endswith(".json")]
        what = f"`{first}`" + (f" (or {', '.join(f'`{f}`' for f in alts)})" if alts else "") + \
            "".join(f" and `{f}`" for f in configs)
        access = (f"{self.model} weights are gated: request access at {self.url} and accept its terms "
                  "(then `hf auth login`)" if self.gated else f"{self.model} weights are at {self.url}")
        return (f"{access}. Download {what}, e.g.\n"
                f"    hf download {self.repo} {' '.join([first] + configs)} --local-dir ~/models/{self.name}\n"
                f"and pass the folder or the file: create_encoder(\"{self.name}\", \"~/models/{self.name}\").")


def _p(**kw: Any) -> EncoderPreset:
    return EncoderPreset(**kw)


PRESETS: dict[str, EncoderPreset] = {p.name: p for p in [
    _p(name="conch_v1", model="CONCH v1", family="conch_v1", arch="conch_ViT-B-16",
       arch_kwargs=dict(image_size=448, patch_size=16, width=768, layers=12, embed_dim=512),
       img_size=448, resize=448, interpolation="bicubic", mean=OPENAI[0], std=OPENAI[1],
       magnification=20, patch_px=512, output="attn_pool", feature_dim=512, joint_dim=512,
       files=("pytorch_model.bin",), repo="MahmoodLab/CONCH", gated=True,
       source="conch package (open_clip_custom); TRIDENT Conchv1InferenceEncoder"),
    _p(name="conch_v15", model="CONCH v1.5", family="conch_v15", arch="iBOT ViT-L/16 trunk + attentional pooler",
       arch_kwargs=dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4,
                        init_values=1.0, pool_dim=768, pool_heads=8),
       img_size=448, resize=448, interpolation="bilinear", mean=IMAGENET[0], std=IMAGENET[1],
       magnification=20, patch_px=512, output="attn_pool", feature_dim=768, joint_dim=None,
       files=("pytorch_model_vision.bin",), repo="MahmoodLab/conchv1_5", gated=True,
       source="TRIDENT model_zoo/conchv1_5 (TITAN's patch encoder)"),
    _p(name="uni_v1", model="UNI", family="timm", arch="vit_large_patch16_224",
       arch_kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
       img_size=224, resize=224, interpolation="bilinear", mean=IMAGENET[0], std=IMAGENET[1],
       magnification=20, patch_px=256, output="cls", feature_dim=1024, joint_dim=None,
       files=("pytorch_model.bin",), repo="MahmoodLab/UNI", gated=True,
       source="model card; TRIDENT UNIInferenceEncoder"),
    _p(name="uni_v2", model="UNI2-h", family="timm", arch="vit_giant_patch14_224",
       arch_kwargs=dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                        mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer="SwiGLUPacked",
                        act_layer="SiLU", reg_tokens=8, dynamic_img_size=True),
       img_size=224, resize=224, interpolation="bilinear", mean=IMAGENET[0], std=IMAGENET[1],
       magnification=20, patch_px=256, output="cls", feature_dim=1536, joint_dim=None,
       files=("pytorch_model.bin",), repo="MahmoodLab/UNI2-h", gated=True,
       source="model card; TRIDENT UNIv2InferenceEncoder"),
    _p(name="virchow2", model="Virchow2", family="timm", arch="vit_huge_patch14_224",
       arch_kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, reg_tokens=4,
                        global_pool="", dynamic_img_size=True, mlp_layer="SwiGLUPacked", act_layer="SiLU"),
       img_size=224, resize=224, interpolation="bicubic", mean=IMAGENET[0], std=IMAGENET[1],
       magnification=20, patch_px=224, output="cls+mean", feature_dim=2560, joint_dim=None,
       files=("model.safetensors", "pytorch_model.bin"), repo="paige-ai/Virchow2", gated=True,
       source="hub config + model card; TRIDENT Virchow2InferenceEncoder"),
    _p(name="h_optimus_0", model="H-optimus-0", family="timm", arch="vit_giant_patch14_reg4_dinov2",
       arch_kwargs=dict(img_size=224, num_classes=0, global_pool="token", init_values=1e-5, dynamic_img_size=False),
       img_size=224, resize=224, interpolation="bilinear", mean=HOPTIMUS[0], std=HOPTIMUS[1],
       magnification=20, patch_px=224, output="cls", feature_dim=1536, joint_dim=None,
       files=("model.safetensors", "pytorch_model.bin"), repo="bioptimus/H-optimus-0", gated=True,
       source="hub config + model card; TRIDENT HOptimus0InferenceEncoder"),
    _p(name="h_optimus_1", model="H-optimus-1", family="timm", arch="vit_giant_patch14_reg4_dinov2",
       arch_kwargs=dict(img_size=224, num_classes=0, global_pool="token", init_values=1e-5, dynamic_img_size=False),
       img_size=224, resize=224, interpolation="bilinear", mean=HOPTIMUS[0], std=HOPTIMUS[1],
       magnification=20, patch_px=224, output="cls", feature_dim=1536, joint_dim=None,
       files=("model.safetensors", "pytorch_model.bin"), repo="bioptimus/H-optimus-1", gated=True,
       # mean/std: H-optimus-0's, as TRIDENT's H-optimus-1 encoder normalises (docs/ENCODERS.md)
       source="TRIDENT HOptimus1InferenceEncoder (mahmoodlab/TRIDENT 40ace3e, same at a91fa84): timm "
              "vit_giant_patch14_reg4_dinov2, init_values 1e-5, 224 px, Resize(224) + H-optimus-0's mean/std "
              "(0.707223, 0.578729, 0.703617) / (0.211883, 0.230117, 0.177517); the gated hub card not read here"),
    _p(name="phikon_v2", model="Phikon-v2", family="hf_dinov2", arch="transformers Dinov2Model",
       arch_kwargs=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16,
                        image_size=224, mlp_ratio=4, layer_norm_eps=1e-6, layerscale_value=1.0, hidden_act="gelu",
                        qkv_bias=True, use_swiglu_ffn=False),
       img_size=224, resize=224, interpolation="bilinear", mean=IMAGENET[0], std=IMAGENET[1],
       magnification=20, patch_px=224, output="cls", feature_dim=1024, joint_dim=None,
       files=("model.safetensors", "config.json"), repo="owkin/phikon-v2", gated=False,
       source="model card (AutoModel, last_hidden_state[:, 0]); TRIDENT Phikonv2InferenceEncoder"),
    _p(name="gigapath", model="Prov-GigaPath (tile)", family="timm", arch="vit_giant_patch14_dinov2",
       arch_kwargs=dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                        init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
       img_size=224, resize=256, interpolation="bicubic", mean=IMAGENET[0], std=IMAGENET[1],
       magnification=20, patch_px=256, output="cls", feature_dim=1536, joint_dim=None,
       files=("pytorch_model.bin",), repo="prov-gigapath/prov-gigapath", gated=True,
       source="hub config; gigapath/pipeline.py transform; TRIDENT GigaPathInferenceEncoder"),
]}


def get_preset(name: str) -> EncoderPreset:
    if name not in PRESETS:
        raise KeyError(f"no encoder preset {name!r} (presets: {', '.join(PRESETS)})")
    return PRESETS[name]


def _arch_cell(p: EncoderPreset) -> str:
    if p.family == "timm":
        return f"timm `{p.arch}`"
    if p.family == "hf_dinov2":
        k = p.arch_kwargs
        return f"transformers `Dinov2Model` (ViT-L/{k['patch_size']})" if k["hidden_size"] == 1024 else \
            "transformers `Dinov2Model`"
    if p.family == "conch_v1":
        return "CoCa ViT-B/16 (conch)"
    return "ViT-L/16 + attentional pooler"


def _num(x: float) -> str:
    return f"{x:g}"


def markdown_table() -> str:
    """The README's table of presets (tests/test_presets.py checks the README holds exactly this)."""
    head = ("| name | model | architecture | d (x) | D (z, text) | input: resize → crop | mean / std | "
            "patches | feature | weights (download by hand) |")
    rows = [head, "|---|---|---|---:|---:|---|---|---|---|---|"]
    for p in PRESETS.values():
        norm = "ImageNet" if (p.mean, p.std) == IMAGENET else "OpenAI CLIP" if (p.mean, p.std) == OPENAI else \
            f"({', '.join(map(_num, p.mean))}) / ({', '.join(map(_num, p.std))})"
        resize = (f"{p.resize} → {p.img_size}" if p.resize != p.img_size else f"{p.img_size}") + f", {p.interpolation}"
        files = ", ".join(f"`{f}`" for f in p.files)
        rows.append(f"| `{p.name}` | {p.model} | {_arch_cell(p)} | {p.feature_dim} | "
                    f"{p.joint_dim if p.joint_dim else '–'} | {resize} | {norm} | "
                    f"{p.patch_px} px at {_num(p.magnification)}x | {OUTPUTS[p.output]} | "
                    f"[{p.repo}]({p.url}){' (gated)' if p.gated else ''}: {files} |")
    return "\n".join(rows)


__all__ = ["EncoderPreset", "FAMILIES", "OUTPUTS", "PRESETS", "get_preset", "markdown_table"]


if __name__ == "__main__":
    print(markdown_table())
