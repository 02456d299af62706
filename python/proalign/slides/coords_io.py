"""Patch-coordinate `.h5` files, TRIDENT and CLAM style, to and from `PatchGrid`.

TRIDENT (`<job>/<mag>x_<patch>px_<overlap>px_overlap/patches/<slide>_patches.h5`, features in
`.../features_<encoder>/<slide>.h5`): dataset `coords` (n, 2) int64, level-0 (x, y) top-left
corners, with attributes patch_size (target pixels, int), patch_size_level0 (float: its CLI's
magnification is a float), level0_magnification (int: a standard objective), target_magnification
(float), overlap (int), name, savetodir (str, the `<mag>x_..._overlap` folder); newer files add
level0_width and level0_height (int). TRIDENT stores None as the string 'None'. Its features file
holds `features` (n, d) with attributes encoder, name, savetodir and a copy of `coords` with the
coords file's attributes. `write_coords_h5` writes those dtypes (plus our own extra attributes,
which TRIDENT's readers ignore).
CLAM (`patches/<slide>.h5`, create_patches_fp.py): dataset `coords` (n, 2), level-0 (x, y), with
attributes patch_size (pixels at patch_level), patch_level, downsample ((dx, dy) of that level),
downsampled_level_dim and level_dim (both that level's (w, h)), name, save_path; some forks add
custom_downsample (the patch is resized by 1/custom_downsample before encoding).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from ..errors import ProAlignError
from ..features.io import plain_attr
from .grid import PatchGrid, best_level, resolve_resolution


class CoordsFileError(ProAlignError):
    """A coords file is missing, unreadable or lacks what a patch grid needs."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


LAYOUTS = ("flat", "trident")


def trident_job_name(magnification: float, patch_size: int, overlap: int = 0) -> str:
    """TRIDENT's folder for one patching setting, e.g. `20x_256px_0px_overlap` (an integral
    magnification without decimals, others in short form: `2.5x_...`)."""
    m = float(magnification)
    mag = str(round(m)) if abs(m - round(m)) < 1e-9 else f"{m:g}"
    return f"{mag}x_{int(patch_size)}px_{int(overlap)}px_overlap"


def trident_coords_path(job_dir: str | os.PathLike, name: str, job_name: str | None = None) -> Path:
    """Where TRIDENT puts a slide's coords: `<job_dir>/[<job_name>/]patches/<name>_patches.h5`
    (job_name: `trident_job_name(...)`; without it, the folder given is that one)."""
    d = Path(job_dir) / job_name if job_name else Path(job_dir)
    return d / "patches" / f"{name}_patches.h5"


def encoder_folder_name(encoder: str) -> str:
    """An encoder name made safe for a folder name (`open_clip:ViT-B-16` -> `open_clip_ViT-B-16`)."""
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(encoder)).strip("._")
    return safe or "encoder"


def trident_features_dir(job_dir: str | os.PathLike, job_name: str, encoder: str) -> Path:
    """Where TRIDENT puts a job's features: `<job_dir>/<job_name>/features_<encoder>/`."""
    return Path(job_dir) / job_name / f"features_{encoder_folder_name(encoder)}"


def trident_coords_attrs(grid: PatchGrid, *, name: str, savetodir: str) -> dict:
    """The `coords` attributes with the dtypes TRIDENT writes: patch_size, overlap, level0_width /
    level0_height int64; patch_size_level0 and target_magnification float64; level0_magnification
    int64 when integral; name and savetodir str; an unknown value the string 'None'. Our own extra
    attributes (level0_mpp, target_mpp, edge, min_tissue) follow."""
    attrs = grid.trident_attrs()
    attrs["patch_size"] = np.int64(attrs["patch_size"])
    attrs["overlap"] = np.int64(attrs["overlap"])
    attrs["patch_size_level0"] = np.float64(attrs["patch_size_level0"])
    if attrs["target_magnification"] != "None":
        attrs["target_magnification"] = np.float64(attrs["target_magnification"])
    for k in ("level0_width", "level0_height"):
        if k in attrs:
            attrs[k] = np.int64(attrs[k])
    attrs["name"], attrs["savetodir"] = str(name), str(savetodir)
    return attrs


def write_coords_h5(path: str | os.PathLike, grid: PatchGrid, *, name: str | None = None,
                    savetodir: str | None = None) -> Path:
    """Write `grid` as a TRIDENT coords file (replacing `path` atomically); returns the path.
    savetodir: recorded as TRIDENT does (default: the grid's, else the folder holding `patches/`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    coords = np.ascontiguousarray(grid.coords, dtype=np.int64).reshape(-1, 2)
    job = path.parent.parent if path.parent.name == "patches" else path.parent
    attrs = trident_coords_attrs(
        grid, name=name if name is not None else (grid.name or path.stem.removesuffix("_patches")),
        savetodir=savetodir if savetodir is not None else (grid.savetodir or str(job)))
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            # resizable like TRIDENT's appendable datasets; chunks larger than its one row
            ds = f.create_dataset("coords", data=coords, maxshape=(None, 2),
                                  chunks=(max(1, min(len(coords), 8192)), 2))
            ds.attrs.update(attrs)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _number(attrs: dict, key: str, path: Path, required: bool = True) -> float | None:
    v = attrs.get(key)
    if isinstance(v, (list, tuple)) and len(v) >= 1:  # CLAM's (dx, dy): x is used, y checked by caller
        v = v[0]
    if v is None:
        if required:
            raise CoordsFileError(path, f"coords attribute {key!r} is missing (attributes found: {sorted(attrs)})")
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise CoordsFileError(path, f"coords attribute {key!r} is {v!r}, expected a number") from None


def _read_coords_array(ds: h5py.Dataset, path: Path) -> np.ndarray:
    a = ds[()]
    if a.ndim == 3 and a.shape[0] == 1:  # a leading batch axis, as some tools write
        a = a[0]
    if a.ndim != 2 or a.shape[1] != 2:
        raise CoordsFileError(path, f"dataset 'coords' has shape {a.shape}, expected (n, 2)")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise CoordsFileError(path, "dataset 'coords' holds non-integer values")
    elif not np.issubdtype(a.dtype, np.integer):
        raise CoordsFileError(path, f"dataset 'coords' has dtype {a.dtype}, expected integers")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise CoordsFileError(path, "dataset 'coords' holds negative positions")
    return a


def read_coords_h5(path: str | os.PathLike, *, level_downsamples: Sequence[float] | None = None,
                   slide_mpp: float | None = None, slide_magnification: float | None = None,
                   level_tolerance: float = 0.01) -> PatchGrid:
    """Read a TRIDENT or CLAM coords file into a `PatchGrid`.

    level_downsamples: the slide's pyramid; TRIDENT files then get the best read level (without
    it: level 0). CLAM files keep their patch_level. slide_mpp / slide_magnification fill in the
    resolution a CLAM file does not record (and the mpp a TRIDENT file may lack)."""
    path = Path(path)
    if not path.is_file():
        raise CoordsFileError(path, "file not found")
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f or not isinstance(f["coords"], h5py.Dataset):
                raise CoordsFileError(path, f"no 'coords' dataset (found: {sorted(f.keys())})")
            coords = _read_coords_array(f["coords"], path)
            attrs = {k: plain_attr(v) for k, v in f["coords"].attrs.items()}
    except CoordsFileError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise CoordsFileError(path, f"unreadable: {type(e).__name__}: {e}") from e

    if any(k in attrs for k in ("patch_size_level0", "level0_magnification", "target_magnification")):
        return _trident_grid(path, coords, attrs, level_downsamples, slide_mpp, level_tolerance)
    if "patch_level" in attrs:
        return _clam_grid(path, coords, attrs, level_downsamples, slide_mpp, slide_magnification)
    raise CoordsFileError(path, "coords attributes are neither TRIDENT style (patch_size_level0, "
                                "level0_magnification, target_magnification) nor CLAM style (patch_level); "
                                f"attributes found: {sorted(attrs)}")


def _positive_int(attrs: dict, key: str, path: Path) -> int:
    v = _number(attrs, key, path)
    if not (v >= 1 and v == round(v)):
        raise CoordsFileError(path, f"coords attribute {key!r} is {attrs.get(key)!r}, expected a positive integer")
    return int(v)


def _trident_grid(path: Path, coords: np.ndarray, attrs: dict, level_downsamples, slide_mpp, tol) -> PatchGrid:
    ps = _positive_int(attrs, "patch_size", path)
    mag0 = _number(attrs, "level0_magnification", path, required=False)
    magt = _number(attrs, "target_magnification", path, required=False)
    mpp0 = _number(attrs, "level0_mpp", path, required=False) or slide_mpp
    mppt = _number(attrs, "target_mpp", path, required=False)
    if attrs.get("patch_size_level0") is not None:
        ps0 = _positive_int(attrs, "patch_size_level0", path)
    elif mag0 and magt:
        ps0 = round(ps * mag0 / magt)  # what TRIDENT's own readers do
    else:
        raise CoordsFileError(path, "coords attributes give no level-0 patch size: 'patch_size_level0' is "
                                    "missing and so is 'level0_magnification' or 'target_magnification'")
    if mpp0 and mppt:
        ds = mppt / mpp0
    elif mag0 and magt:
        ds = mag0 / magt
    else:
        ds = ps0 / ps
    if mpp0 and not mppt:
        mppt = mpp0 * ds
    w, h = attrs.get("level0_width"), attrs.get("level0_height")
    size = (int(w), int(h)) if w is not None and h is not None else None
    if size is not None and len(coords) and (coords[:, 0].max() >= size[0] or coords[:, 1].max() >= size[1]):
        raise CoordsFileError(path, f"coords reach past the slide's level-0 size {size}")
    lds = list(level_downsamples) if level_downsamples is not None else [1.0]
    level = best_level(lds, ds, tol)
    return PatchGrid(coords=coords, patch_size=ps, patch_size_level0=ps0, level=level,
                     level_downsample=float(lds[level]), read_size=max(1, round(ps0 / lds[level])),
                     downsample=ds, overlap=int(_number(attrs, "overlap", path, required=False) or 0), level0_size=size,
                     level0_mpp=mpp0, target_mpp=mppt, level0_magnification=mag0, target_magnification=magt,
                     edge=str(attrs.get("edge") or "pad"),  # TRIDENT keeps edge patches
                     min_tissue=_number(attrs, "min_tissue", path, required=False),
                     name=str(attrs.get("name") or path.stem.removesuffix("_patches")),
                     savetodir=str(attrs.get("savetodir") or ""), extra_attrs=attrs)


def _clam_grid(path: Path, coords: np.ndarray, attrs: dict, level_downsamples, slide_mpp,
               slide_magnification) -> PatchGrid:
    ps = _positive_int(attrs, "patch_size", path)
    level = _number(attrs, "patch_level", path)
    if not (level >= 0 and level == round(level)):
        raise CoordsFileError(path, f"coords attribute 'patch_level' is {attrs['patch_level']!r}, expected an int >= 0")
    level = int(level)
    if attrs.get("downsample") is not None:
        lds = _number(attrs, "downsample", path)
    elif level_downsamples is not None:
        if level >= len(level_downsamples):
            raise CoordsFileError(path, f"patch_level {level} but the slide has {len(level_downsamples)} levels")
        lds = float(level_downsamples[level])
    else:
        raise CoordsFileError(path, "coords attribute 'downsample' is missing; pass the slide's level_downsamples")
    if not lds > 0:
        raise CoordsFileError(path, f"coords attribute 'downsample' is {attrs['downsample']!r}, expected > 0")
    custom = _number(attrs, "custom_downsample", path, required=False) or 1.0
    ps0 = max(1, round(ps * lds))
    target_ps = max(1, round(ps / custom))
    ds = lds * custom
    dim = attrs.get("level_dim", attrs.get("downsampled_level_dim"))
    d = attrs.get("downsample")
    dx, dy = (d[0], d[1]) if isinstance(d, (list, tuple)) and len(d) >= 2 else (lds, lds)
    # CLAM records only the patch level's size; level 0 is that times the level's downsample
    size = (round(dim[0] * dx), round(dim[1] * dy)) if isinstance(dim, (list, tuple)) and len(dim) >= 2 else None
    res = None
    if slide_mpp is not None or slide_magnification is not None:
        mpp0 = slide_mpp if slide_mpp is not None else 10.0 / slide_magnification
        res = resolve_resolution(target_mpp=mpp0 * ds, slide_mpp=slide_mpp, slide_magnification=slide_magnification)
    return PatchGrid(coords=coords, patch_size=target_ps, patch_size_level0=ps0, level=level,
                     level_downsample=lds, read_size=ps, downsample=ds, overlap=0, level0_size=size,
                     level0_mpp=res.level0_mpp if res else None, target_mpp=res.target_mpp if res else None,
                     level0_magnification=res.level0_magnification if res else None,
                     target_magnification=res.target_magnification if res else None, edge="pad",
                     name=str(attrs.get("name") or path.stem), savetodir=str(attrs.get("save_path") or ""),
                     extra_attrs=attrs)
