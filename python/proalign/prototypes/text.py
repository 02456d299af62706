"""Text prototypes (METHOD.md Step 2): t_k = normalize(mean_m normalize(f_text(d_km))).

This is the prompt-ensembling recipe of CLIP/CONCH zero-shot classification: each type's M
descriptions are embedded by the vision-language model's own text tower, each embedding is
L2-normalised, the M are averaged and the mean is normalised again.

The encoder is duck-typed: `name: str`, `encode_text(list[str]) -> Tensor (n, D)`, optionally
`joint_dim: int` (checked against D) and `weights_id: str` (identifies its weights). Results are
cached on disk in `cache_dir` keyed by (encoder name, weights identity, description-set hash);
the weights identity is `weights_id` when the encoder has one, else a hash of its (or its
`backbone`'s) `state_dict()`, else there is no cache. A cache file is a prototype file (tensor `prototypes` (K, D) plus JSON
metadata under `proalign`), so it can be passed to `prototypes build --text-prototypes`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PrototypeError
from .descriptions import DescriptionSet, SetLike, load_descriptions

log = logging.getLogger(__name__)
RECIPE = "mean-of-normalized-v1"  # part of the cache key: change it when the math changes


def encoder_identity(encoder: Any) -> str | None:
    """What identifies the encoder's weights: its `weights_id`, a state-dict hash, or None."""
    wid = getattr(encoder, "weights_id", None)
    if isinstance(wid, str) and wid:
        return "weights_id:" + wid
    state_dict = getattr(encoder, "state_dict", None)
    if not callable(state_dict):  # proalign.encoders.Encoder wraps its nn.Module as `backbone`
        state_dict = getattr(getattr(encoder, "backbone", None), "state_dict", None)
    if callable(state_dict):  # reads every weight once: give big encoders a weights_id instead
        try:
            h = hashlib.sha256()
            for key, t in sorted(state_dict().items()):
                if not isinstance(t, torch.Tensor):
                    continue
                t = t.detach().to("cpu").contiguous()
                h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            return "state_dict:" + h.hexdigest()[:32]
        except (RuntimeError, TypeError, ValueError) as e:  # exotic tensors (sparse, quantised, meta)
            log.warning("cannot hash the weights of %r (%s); text prototypes are not cached",
                        getattr(encoder, "name", "?"), e)
    return None


def cache_key(encoder_name: str, identity: str, set_hash: str) -> str:
    blob = json.dumps([RECIPE, encoder_name, identity, set_hash]).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def cache_path(cache_dir: str | os.PathLike, encoder_name: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", encoder_name).strip("-")[:60] or "encoder"
    return Path(cache_dir).expanduser() / f"text-{safe}-{key}.safetensors"


def ensemble(embeddings: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """(K*M, D) sentence embeddings, type-major -> (K, D) normalised type prototypes (float64 math)."""
    e = embeddings.detach().to("cpu", torch.float64)
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = e.reshape(k, m, -1).mean(dim=1)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _encode(encoder: Any, sentences: list[str], batch_size: int) -> torch.Tensor:
    parts = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            chunk = sentences[i:i + batch_size]
            out = encoder.encode_text(chunk)
            out = torch.as_tensor(out)
            if out.ndim != 2 or out.shape[0] != len(chunk):
                raise PrototypeError(f"encoder {getattr(encoder, 'name', '?')!r}: encode_text gave shape "
                                     f"{tuple(out.shape)} for {len(chunk)} texts, expected ({len(chunk)}, D)")
            parts.append(out.detach().to("cpu", torch.float64))
    return torch.cat(parts)


def _read_cache(path: Path, key: str, k: int) -> torch.Tensor | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("proalign", "{}"))
            t = f.get_tensor("prototypes")
    except Exception as e:  # a damaged cache entry is recomputed, never trusted
        log.warning("text-prototype cache %s unreadable (%s: %s); recomputing", path, type(e).__name__, e)
        return None
    if meta.get("cache_key") != key or t.ndim != 2 or t.shape[0] != k or not torch.isfinite(t).all():
        log.warning("text-prototype cache %s does not match this encoder/set; recomputing", path)
        return None
    return t.to(torch.float32)


def _write_cache(path: Path, t: torch.Tensor, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({"prototypes": t.contiguous()}, str(tmp), metadata={"proalign": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)


def text_prototypes(encoder: Any, dset: SetLike, cache_dir: str | os.PathLike | None = None,
                    batch_size: int = 64) -> torch.Tensor:
    """(K, D) float32 CPU tensor of unit-norm text prototypes t_k of a description set.

    `dset` is a DescriptionSet, a shipped set's name, a JSON path or a dict. With `cache_dir`,
    the result is read from / written to a safetensors file keyed by (encoder, weights, set hash)."""
    ds: DescriptionSet = load_descriptions(dset)
    name = str(getattr(encoder, "name", type(encoder).__name__))
    set_hash = ds.hash
    path = key = identity = None
    if cache_dir is not None:
        identity = encoder_identity(encoder)
        if identity is None:
            log.warning("encoder %r has no weights_id nor state_dict; text prototypes are not cached", name)
        else:
            key = cache_key(name, identity, set_hash)
            path = cache_path(cache_dir, name, key)
            if path.is_file():
                cached = _read_cache(path, key, ds.k)
                if cached is not None:
                    log.debug("text prototypes from cache %s", path)
                    return cached
    emb = _encode(encoder, ds.sentences, batch_size)
    joint_dim = getattr(encoder, "joint_dim", None)
    if isinstance(joint_dim, int) and emb.shape[1] != joint_dim:
        raise PrototypeError(f"encoder {name!r}: encode_text gave dim {emb.shape[1]}, joint_dim says {joint_dim}")
    if not torch.isfinite(emb).all():
        raise PrototypeError(f"encoder {name!r}: text embeddings contain NaN or inf")
    t = ensemble(emb, ds.k, ds.m).to(torch.float32)
    if path is not None:
        meta = {"kind": "text_prototypes", "recipe": RECIPE, "cache_key": key, "encoder": name,
                "weights": identity, "description_set": ds.name, "description_set_hash": set_hash,
                "k": ds.k, "m": ds.m, "dim": int(t.shape[1]), "type_names": ds.type_names}
        try:
            _write_cache(path, t, meta)
        except OSError as e:  # a read-only cache must not stop the run
            log.warning("could not write text-prototype cache %s: %s", path, e)
    return t


__all__ = ["cache_key", "cache_path", "encoder_identity", "ensemble", "text_prototypes"]


@dataclass
class Teacher:
    """The text side of Steps 2-3: text prototypes (K, D), the vision->joint projection W (d, D),
    the allocation temperature and what is known of the description set (name, hash, type names)."""
    text: np.ndarray
    projection: np.ndarray
    tau_a: float
    meta: dict


def teacher(encoder: Any | None = None, descriptions: SetLike | None = None,
            text_file: str | os.PathLike | None = None, projection_file: str | os.PathLike | None = None,
            tau_a: float | None = None, default_tau_a: float = 0.01) -> Teacher:
    """The one recipe for the teacher, used by `prototypes build --init text`, `prototypes train`
    and the demo: text prototypes from `text_file` or from `descriptions` through the encoder's
    text tower; W from `projection_file` or the encoder's projection; tau_a given, else the
    encoder's 1/logit_scale, else `default_tau_a`. Raises ValueError naming what is missing."""
    from .io import read_matrix, read_prototype_file

    if text_file is not None:
        text, tmeta = read_prototype_file(text_file)
        meta = {"descriptions": tmeta.get("description_set", tmeta.get("descriptions")),
                "descriptions_hash": tmeta.get("description_set_hash", tmeta.get("descriptions_hash")),
                "type_names": tmeta.get("type_names")}
    elif descriptions is not None and encoder is not None:
        dset = load_descriptions(descriptions)
        text = text_prototypes(encoder, dset).numpy()
        meta = {"descriptions": dset.name, "descriptions_hash": dset.hash, "type_names": list(dset.type_names)}
    else:
        raise ValueError("the text prototypes need --text-prototypes, or --descriptions with a vision-language "
                         "--encoder/--weights")
    if projection_file is not None:
        projection = read_matrix(projection_file)
    elif encoder is not None and getattr(encoder, "joint_dim", None) is not None:
        projection = encoder.projection_matrix().numpy()
    else:
        raise ValueError("the teacher needs --projection W, or a vision-language --encoder (with a text tower)")
    if tau_a is None:
        scale = getattr(encoder, "logit_scale", None) if encoder is not None else None
        tau_a = 1.0 / scale if scale else default_tau_a
    return Teacher(text, projection, float(tau_a), {k: v for k, v in meta.items() if v})
