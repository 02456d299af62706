"""Reading TRIDENT / CLAM patch feature files, one slide at a time.

`.h5`: dataset `features` (N, d) (CLAM writes it as it extracts, so chunks may be one row; some
tools keep a leading batch axis, (1, N, d)) and usually `coords` (N, 2), with their attributes.
`.pt`: a tensor (N, d) (CLAM `pt_files`), or a dict holding one under "features".
Any float dtype is accepted; nothing is converted until the caller asks.
"""
from __future__ import annotations

import csv
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import FeatureFileError
from .h5_chunks import prefetch, read_row_chunked

FEATURE_SUFFIXES = (".h5", ".pt")
LMDB_MAX_KEY_BYTES = 511
# a TRIDENT job's folder for one patching setting, e.g. 20x_256px_0px_overlap (slides/coords_io.py)
TRIDENT_JOB = re.compile(r"^[0-9.]+x_[0-9]+px_[0-9]+px_overlap$")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureFileEntry:
    slide_id: str
    path: Path


@dataclass
class FeatureFile:
    slide_id: str
    path: Path
    features: np.ndarray  # (N, d), the file's own float dtype (bfloat16 .pt files come as float32)
    coords: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def source(self) -> dict:
        st = self.path.stat()
        return {"path": str(self.path.resolve()), "bytes": st.st_size, "mtime": int(st.st_mtime),
                "dtype": str(self.features.dtype), "encoder": self.attrs.get("encoder")}


def plain_attr(v):
    """h5 attribute value -> JSON-friendly Python value."""
    if isinstance(v, bytes):  # files written by h5py 2.x
        v = v.decode("utf-8", "replace")
    if isinstance(v, str) and v == "None":  # TRIDENT stores None as the string 'None'
        return None
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v



def nonfinite_rows(feats: np.ndarray) -> np.ndarray:
    """(N,) bool: rows holding a NaN or an infinity. float16 is tested on its exponent bits (all
    ones = inf or NaN): numpy's isfinite converts each half to float, 2-3x slower."""
    if feats.dtype == np.float16:
        return ((feats.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
    return ~np.isfinite(feats).all(axis=1)

def _rows_shape(shape: tuple, name: str, path: Path, slide_id: str, width: int | None = None) -> tuple:
    """(N, w) of a dataset stored as (N, w) or (1, N, w); anything else is an error."""
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2 or (width is not None and shape[1] != width):
        want = f"(N, {width})" if width else "(N, d)"
        raise FeatureFileError(path, f"dataset {name!r} has shape {shape}, expected {want}", slide_id)
    return shape


def _squeeze_batch(a, name: str, path: Path, slide_id: str, width: int | None = None):
    _rows_shape(a.shape, name, path, slide_id, width)
    return a[0] if a.ndim == 3 else a


def _check_features(feats: np.ndarray, path: Path, slide_id: str) -> np.ndarray:
    if not np.issubdtype(feats.dtype, np.floating):
        raise FeatureFileError(path, f"features have dtype {feats.dtype}, expected a float dtype", slide_id)
    if feats.shape[0] == 0:
        raise FeatureFileError(path, "zero patches (features has 0 rows)", slide_id)
    if feats.shape[1] == 0:
        raise FeatureFileError(path, "features have 0 columns", slide_id)
    bad = nonfinite_rows(feats)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise FeatureFileError(
            path, f"{len(rows)} of {len(feats)} feature rows contain NaN or inf (first rows: {rows[:5].tolist()})",
            slide_id)
    return feats


def read_features(path: str | os.PathLike, slide_id: str | None = None, *, coords: bool = True) -> FeatureFile:
    """Read one slide's features (and coords/attributes when present); raise FeatureFileError
    naming the file and the problem otherwise. `coords=False` checks the coords' shape but does
    not read them (the embedding does not need them)."""
    path = Path(path)
    slide_id = slide_id or path.stem
    if not path.is_file():
        raise FeatureFileError(path, "file not found", slide_id)
    try:
        if path.suffix == ".h5":
            return _read_h5(path, slide_id, coords)
        if path.suffix == ".pt":
            return _read_pt(path, slide_id)
    except FeatureFileError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise FeatureFileError(path, f"unreadable: {type(e).__name__}: {e}", slide_id) from e
    raise FeatureFileError(path, f"unknown feature file type {path.suffix!r} (expected .h5 or .pt)", slide_id)


def _read_whole(ds: h5py.Dataset) -> np.ndarray:
    fast = read_row_chunked(ds)  # TRIDENT/CLAM one-row chunks in one read
    return ds[()] if fast is None else fast


def _read_h5(path: Path, slide_id: str, with_coords: bool) -> FeatureFile:
    prefetch(path)  # (nearly) the whole file is read: start it now, so HDF5's small reads wait less
    with h5py.File(path, "r") as f:
        if "features" not in f or not isinstance(f["features"], h5py.Dataset):
            raise FeatureFileError(path, f"no 'features' dataset (found: {sorted(f.keys())})", slide_id)
        ds = f["features"]
        feats = _squeeze_batch(_read_whole(ds), "features", path, slide_id)
        attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
        attrs.update({k: plain_attr(v) for k, v in ds.attrs.items()})
        coords = None
        if "coords" in f:
            cds = f["coords"]
            n_coords = _rows_shape(cds.shape, "coords", path, slide_id, width=2)[0]
            if n_coords != len(feats):
                raise FeatureFileError(path, f"{n_coords} coords but {len(feats)} feature rows", slide_id)
            if with_coords:
                coords = _squeeze_batch(_read_whole(cds), "coords", path, slide_id, width=2)
            attrs.update({f"coords.{k}": plain_attr(v) for k, v in cds.attrs.items()})
    return FeatureFile(slide_id, path, _check_features(feats, path, slide_id), coords, attrs)


# TRIDENT's `.pt` option saves a numpy array: allow exactly what rebuilds a float array, so the
# weights-only unpickler still refuses anything that could run code.
_NUMPY_ARRAY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype,
                        *(type(np.dtype(t)) for t in (np.float16, np.float32, np.float64))]


def _load_pt(path: Path):
    with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        obj = obj.get("features")
    if isinstance(obj, np.ndarray):
        return obj
    if not isinstance(obj, torch.Tensor):
        raise ValueError("expected a tensor or array (N, d), or a dict with a 'features' tensor")
    if obj.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        obj = obj.float()
    return obj.numpy()


def _read_pt(path: Path, slide_id: str) -> FeatureFile:
    feats = _squeeze_batch(_load_pt(path), "features", path, slide_id)
    return FeatureFile(slide_id, path, _check_features(feats, path, slide_id))


def read_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """Selected rows (sorted, unique) of a feature file, for sampling a prototype pool without
    reading whole slides where the format allows it."""
    if path.suffix == ".h5":
        with h5py.File(path, "r") as f:
            ds = f["features"]
            return ds[0, rows] if ds.ndim == 3 else ds[rows]
    return _squeeze_batch(_load_pt(path), "features", path, path.stem)[rows]


def check_slide_id(slide_id: str, where: str) -> None:
    if not slide_id:
        raise FeatureFileError(where, "empty slide id")
    n = len(slide_id.encode("utf-8"))
    if n > LMDB_MAX_KEY_BYTES:
        raise FeatureFileError(where, f"slide id is {n} bytes, longer than LMDB's key limit of "
                                      f"{LMDB_MAX_KEY_BYTES} bytes", slide_id[:40] + "...")


def _trident_features(root: Path, files: list[Path]) -> list[Path]:
    """`files` (every feature file under `root`), or, when all of them lie in TRIDENT job folders
    (`root/<mag>x_<patch>px_<overlap>px_overlap/...`, as `--layout trident` writes), those of its one
    `features_<encoder>/` folder: the coords files beside it are no features. A job folder with
    several features folders, or none, is a ValueError naming them."""
    def job_parts(p: Path) -> tuple[str, ...]:
        rel = p.relative_to(root).parts
        return rel if len(rel) > 2 and TRIDENT_JOB.match(rel[0]) else ()

    if not files or any(not job_parts(p) for p in files):
        return files
    folders = sorted({root / rel[0] / rel[1] for rel in map(job_parts, files) if rel[1].startswith("features_")})
    if len(folders) == 1:
        log.info("%s is a TRIDENT job folder: reading the feature files in %s", root, folders[0])
        return [p for p in files if folders[0] in p.parents]
    if folders:
        names = ", ".join(str(f.relative_to(root)) for f in folders)
        raise ValueError(f"{root} is a TRIDENT job folder with {len(folders)} features folders ({names}): pass the "
                         f"one to read, e.g. --features {folders[0]}")
    raise ValueError(f"{root} is a TRIDENT job folder without a features_<encoder>/ folder (its .h5 files are "
                     f"coords, e.g. {files[0].relative_to(root)}): extract features first (embed --archive ... "
                     "--save-features DIR) or pass a folder of feature files")


def list_feature_files(features: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None) -> list[FeatureFileEntry]:
    """Slides of a cohort, sorted by id: every .h5/.pt file under a folder (id = file name
    without extension; a TRIDENT job folder: its one features_<encoder>/ folder), or the rows of a manifest CSV with columns `slide_id` and `path`
    (relative paths are taken from the manifest's folder)."""
    if (features is None) == (manifest is None):
        raise ValueError("give exactly one of a features folder or a manifest")
    if features is not None:
        root = Path(features)
        if not root.is_dir():
            raise FileNotFoundError(f"features folder not found: {root}")
        files = sorted(p for p in root.rglob("*") if p.suffix in FEATURE_SUFFIXES)
        entries = [FeatureFileEntry(p.stem, p) for p in _trident_features(root, files)]
    else:
        mpath = Path(manifest)
        with open(mpath, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"slide_id", "path"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"manifest {mpath} lacks column(s) {sorted(missing)} (has {reader.fieldnames})")
            entries = [FeatureFileEntry(r["slide_id"].strip(), (mpath.parent / r["path"].strip())) for r in reader]
    seen: dict[str, Path] = {}
    for e in entries:
        if e.slide_id in seen:
            raise ValueError(f"slide id {e.slide_id!r} appears twice: {seen[e.slide_id]} and {e.path}")
        seen[e.slide_id] = e.path
    return sorted(entries, key=lambda e: e.slide_id)
