"""The encoder registry: one factory, `create_encoder(name, weights)`, in the timm/open_clip style.

Names: exact ones (the presets of presets.py: `conch_v1`, `conch_v15`, `uni_v1`, `uni_v2`,
`virchow2`, `h_optimus_0`, `h_optimus_1`, `phikon_v2`, `gigapath`; and whatever
`register_encoder` adds) and two families, `open_clip:<arch>` and `timm:<arch>`. Weights always
come from a local path the user gives (a file, or a Hugging Face style folder); nothing is
downloaded.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
from typing import Any, Callable, Optional

from ..errors import EncoderError
from .base import CheckpointMismatchError, Encoder, read_encoder_config
from .clip import ARCHS as CLIP_ARCHS
from .clip import build_open_clip
from .conch import build_conch_v1
from .conch_v15 import build_conch_v15
from .dinov2 import build_hf_dinov2
from .presets import PRESETS, EncoderPreset
from .vit import ARCHS as VIT_ARCHS
from .vit import build_vit

Builder = Callable[..., Encoder]
_EXACT: dict[str, tuple[Builder, str]] = {}
_FAMILIES: dict[str, tuple[Callable[..., Encoder], str, Callable[[], list[str]]]] = {
    "open_clip": (build_open_clip, "CLIP ViT in open_clip's checkpoint layout (QuiltNet, open_clip models)",
                  lambda: sorted(CLIP_ARCHS)),
    "timm": (build_vit, "vision-only ViT in timm's checkpoint layout (no text tower)", lambda: sorted(VIT_ARCHS)),
}


def register_encoder(name: str, builder: Builder, description: str = "", *, overwrite: bool = False) -> None:
    """Add an encoder: `builder(weights, *, device, dtype, compile, **kwargs) -> Encoder`."""
    if ":" in name:
        raise EncoderError(f"encoder name {name!r}: ':' is reserved for the open_clip:/timm: families")
    if name in _EXACT and not overwrite:
        raise EncoderError(f"encoder {name!r} is already registered")
    _EXACT[name] = (builder, description)


def _preset_builder(key: str) -> Builder:
    preset = PRESETS[key]
    if preset.family == "timm":
        def build(weights: Any, **kwargs: Any) -> Encoder:
            return build_vit(key, preset.arch, weights, preset=preset, **kwargs)
    elif preset.family == "hf_dinov2":
        def build(weights: Any, **kwargs: Any) -> Encoder:
            return build_hf_dinov2(preset, weights, **kwargs)
    elif preset.family == "conch_v15":
        def build(weights: Any, **kwargs: Any) -> Encoder:
            return build_conch_v15(preset, weights, **kwargs)
    else:
        raise KeyError(f"no builder for preset family {preset.family!r}")
    return build


def _description(p: EncoderPreset) -> str:
    parts = [f"{p.model} ({p.repo}): {p.arch}", f"{p.img_size} px", f"{p.feature_dim}-d features"]
    parts.append("text tower" if p.joint_dim else "vision only")
    return ", ".join(parts) + f"; {p.patch_px} px at {p.magnification:g}x"


# One registered name per preset (presets.py: the data; README: its table).
for _name, _p in PRESETS.items():
    register_encoder(_name, build_conch_v1 if _p.family == "conch_v1" else _preset_builder(_name), _description(_p))


def list_encoders(pattern: Optional[str] = None, *, descriptions: bool = False) -> list[str] | dict[str, str]:
    """Known encoder names (exact names, then `open_clip:<arch>` and `timm:<arch>` for the built-in
    architectures; other timm/open_clip names work with a config beside the weights), filtered by
    an fnmatch `pattern`. With `descriptions=True`, a dict name -> one-line description."""
    out: dict[str, str] = {n: d for n, (_, d) in _EXACT.items()}
    for fam, (_, desc, archs) in _FAMILIES.items():
        out.update({f"{fam}:{a}": desc for a in archs()})
    if pattern:
        out = {k: v for k, v in out.items() if fnmatch.fnmatch(k, pattern)}
    return out if descriptions else list(out)


def create_encoder(name: str, weights: Optional[str | os.PathLike], *, device: Any = "cpu", dtype: Any = None,
                   compile: bool | str = False, cuda_graphs: bool = False, **kwargs: Any) -> Encoder:
    """Build encoder `name` from local `weights` (a checkpoint file or a folder holding it).

    `device`: where it runs; `dtype`: compute dtype (default bf16 on a GPU, fp32 on the CPU);
    `compile`: torch.compile the image forward (True, or a backend name); `cuda_graphs`: replay
    the image forward as a CUDA graph (GPU only; Encoder.use_cuda_graphs). Other keyword arguments
    go to the encoder's builder: architecture overrides (timm / open_clip style), `tokenizer=PATH`,
    `mean`/`std`/`interpolation`/`magnification`/`patch_px` for the timm and open_clip families,
    `impl="native"|"conch"|"auto"` for conch_v1. A missing path raises EncoderError saying what to
    download (official repository and file name) and where to put it. A weights folder holding
    ENCODER_CONFIG_FILE (`proalign_encoder.json`, written by `write_encoder_config`, e.g. by the
    demo's random-weight models) supplies keyword arguments recorded with the weights; the ones
    given here win; a checkpoint that does not match them raises an EncoderError naming the file."""
    if not isinstance(name, str) or not name:
        raise EncoderError(f"encoder name must be a non-empty string, got {name!r}")
    common = dict(device=device, dtype=dtype, compile=compile)
    family, sep, arch = name.partition(":")
    if not (name in _EXACT or (sep and family in _FAMILIES and arch)):
        close = difflib.get_close_matches(name, list_encoders(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise EncoderError(f"unknown encoder {name!r}.{hint} Known: {', '.join(_EXACT)}, open_clip:<arch>, "
                           "timm:<arch> (list_encoders() lists them).")
    # settings recorded beside the weights (ENCODER_CONFIG_FILE); explicit keyword arguments win
    cfg_path, recorded = read_encoder_config(weights, name)
    given = dict(kwargs)
    kwargs = {**recorded, **kwargs}
    try:
        if name in _EXACT:
            enc = _EXACT[name][0](weights, **common, **kwargs)
        else:
            enc = _FAMILIES[family][0](name, arch, weights, **common, **kwargs)
    except EncoderError as e:
        if cfg_path is None or not recorded:
            raise
        used = ", ".join(f"{k}={v!r}" for k, v in recorded.items() if k not in given)
        over = ", ".join(f"{k}={v!r}" for k, v in given.items() if k in recorded)
        also = f"; given explicitly instead of the file's: {over}" if over else ""
        if isinstance(e, CheckpointMismatchError):
            raise CheckpointMismatchError(
                f"{e}\nThe architecture was built from {cfg_path} ({used}{also}), and the checkpoint's keys or "
                f"shapes disagree with it: fix or delete {cfg_path}, or override a value with --encoder-arg "
                "KEY=VALUE (create_encoder keyword arguments win over the file).") from e
        raise EncoderError(f"{e}\n(settings read from {cfg_path}: {used}{also})") from e
    if cuda_graphs:
        enc.use_cuda_graphs()
    return enc


__all__ = ["create_encoder", "list_encoders", "register_encoder"]
