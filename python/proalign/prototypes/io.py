"""Prototype files: safetensors (tensor `prototypes` (K, d) + string metadata) or npz
(`prototypes` + a JSON `meta` string). `.npy` and `.pt` holding a (K, d) array are read too."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import PrototypeError


def prototype_hash(prototypes: np.ndarray) -> str:
    """Content hash of a prototype set: sha256 of its shape and float32 bytes (16 hex digits)."""
    c = np.ascontiguousarray(prototypes, dtype=np.float32)
    return hashlib.sha256(f"{c.shape}".encode() + c.tobytes()).hexdigest()[:16]


def save_prototypes(path: str | os.PathLike, prototypes: np.ndarray, meta: dict) -> str:
    """Write a prototype file (.safetensors or .npz) with its metadata; returns its hash."""
    from safetensors.numpy import save_file

    path = Path(path)
    c = np.ascontiguousarray(prototypes, dtype=np.float32)
    meta = {**meta, "hash": prototype_hash(c), "k": c.shape[0], "dim": c.shape[1]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        save_file({"prototypes": c}, str(tmp), metadata={"proalign": json.dumps(meta, sort_keys=True)})
    elif path.suffix == ".npz":
        with open(tmp, "wb") as fh:
            np.savez(fh, prototypes=c, meta=np.array(json.dumps(meta, sort_keys=True)))
    else:
        raise PrototypeError(f"{path}: prototype files must end in .safetensors or .npz")
    os.replace(tmp, path)
    return meta["hash"]


def read_prototype_file(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """(prototypes (K, d) float32, metadata dict) of a prototype file."""
    path = Path(path)
    if not path.is_file():
        raise PrototypeError(f"prototype file not found: {path}")
    meta: dict = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                if "prototypes" not in f.keys():
                    raise PrototypeError(f"{path}: no 'prototypes' tensor (found {list(f.keys())})")
                c = f.get_tensor("prototypes")
                meta = json.loads((f.metadata() or {}).get("proalign", "{}"))
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                c = z["prototypes"]
                meta = json.loads(str(z["meta"])) if "meta" in z else {}
        elif path.suffix == ".npy":
            c = np.load(path, allow_pickle=False)
        elif path.suffix == ".pt":
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            c = (obj["prototypes"] if isinstance(obj, dict) else obj).float().numpy()
        else:
            raise PrototypeError(f"{path}: unknown prototype file type (use .safetensors, .npz, .npy or .pt)")
    except PrototypeError:
        raise
    except Exception as e:  # any parse failure of a user file becomes one clear message
        raise PrototypeError(f"{path}: unreadable prototype file ({type(e).__name__}: {e})") from e
    c = np.asarray(c)
    if c.ndim == 3 and c.shape[0] == 1:  # PANTHER keeps a leading batch axis
        c = c[0]
    if c.ndim != 2 or c.shape[0] == 0:
        raise PrototypeError(f"{path}: prototypes must be (K, d), got shape {c.shape}")
    c = c.astype(np.float32)
    if not np.isfinite(c).all():
        raise PrototypeError(f"{path}: prototypes contain NaN or inf")
    return c, meta


def load_prototypes(path: str | os.PathLike) -> np.ndarray:
    """(K, d) float32 prototypes of a prototype file."""
    return read_prototype_file(path)[0]


def read_matrix(path: str | os.PathLike) -> np.ndarray:
    """A single 2-D float matrix (e.g. a projection W (d, D)) from .npy, .pt or a one-tensor
    .safetensors/.npz file."""
    path = Path(path)
    if not path.is_file():
        raise PrototypeError(f"matrix file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                tensors = dict(z)
        elif path.suffix == ".npy":
            tensors = {"matrix": np.load(path, allow_pickle=False)}
        elif path.suffix == ".pt":
            import torch

            tensors = {"matrix": torch.load(path, map_location="cpu", weights_only=True).float().numpy()}
        else:
            raise PrototypeError(f"{path}: unknown matrix file type (use .npy, .npz, .pt or .safetensors)")
    except PrototypeError:
        raise
    except Exception as e:  # any parse failure of a user file becomes one clear message
        raise PrototypeError(f"{path}: unreadable matrix file ({type(e).__name__}: {e})") from e
    if len(tensors) != 1:
        raise PrototypeError(f"{path}: expected one matrix, found {sorted(tensors)}")
    m = np.asarray(next(iter(tensors.values())), dtype=np.float32)
    if m.ndim != 2:
        raise PrototypeError(f"{path}: expected a 2-D matrix, got shape {m.shape}")
    return m
