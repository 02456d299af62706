"""One slide to a patch grid: open, tissue mask from a thumbnail, grid at the target resolution.
Shared by `proalign-engine patch` and the slides-to-embeddings pipeline."""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import SlideError
from .grid import GridError, MissingResolutionError, PatchGrid, grid_for_slide
from .slide import Slide, open_slide
from .tissue import mask_from_slide


SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm"}


def list_slide_files(archive: str | Path) -> list[Path]:
    """Slide files under `archive` (recursively), sorted; a slide's id is its file name without the
    extension. A DICOM-WSI series is a folder of .dcm files: its first file stands for the series."""
    root = Path(archive)
    out, dicom_dirs = [], set()
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in SLIDE_SUFFIXES:
            continue
        if p.suffix.lower() == ".dcm":
            if p.parent in dicom_dirs:
                continue
            dicom_dirs.add(p.parent)
        out.append(p)
    return out


def read_mpp_csv(path: str | Path) -> dict[str, float]:
    """Per-slide mpp from a CSV with a slide column (`wsi`, as TRIDENT names it, `slide_id` or `slide`:
    file name with or without extension) and an `mpp` column."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise SlideError(path, f"cannot read the mpp CSV: {e.strerror or e}") from e
    cols = rows[0].keys() if rows else []
    key = next((c for c in ("wsi", "slide_id", "slide") if c in cols), None)
    if key is None or "mpp" not in cols:
        raise SlideError(path, f"mpp CSV needs a 'wsi' (or 'slide_id') column and an 'mpp' column, has {list(cols)}")
    out = {}
    for i, r in enumerate(rows, start=2):
        try:
            out[Path(r[key]).name] = out[Path(r[key]).stem] = float(r["mpp"])
        except (TypeError, ValueError):
            raise SlideError(path, f"line {i}: mpp {r.get('mpp')!r} is not a number") from None
    return out


def slide_grid(slide: Slide, *, patch_size: int = 256, target_magnification: float | None = None,
               target_mpp: float | None = None, overlap: int = 0, min_tissue: float = 0.1,
               edge: str = "inside", thumbnail_size: int = 2048) -> PatchGrid:
    """Tissue mask + patch grid of an open slide. A slide with no mpp/magnification (and none given
    with open_slide(path, mpp=...)) raises SlideError saying how to supply one."""
    if target_magnification is None and target_mpp is None:
        target_magnification = 20.0
    mask, scale = mask_from_slide(slide, max_size=thumbnail_size)
    try:
        return grid_for_slide(slide, mask, scale, patch_size=patch_size, target_magnification=target_magnification,
                              target_mpp=target_mpp, overlap=overlap, min_tissue=min_tissue, edge=edge)
    except MissingResolutionError as e:
        from .mpp import MPP_FIX, mpp_like_properties

        note = getattr(slide.info, "resolution_note", "")
        maybe = mpp_like_properties(slide)
        hint = f" Properties that may hold it: {', '.join(maybe)}." if maybe else ""
        raise SlideError(slide.path, f"{e}{f' ({note})' if note else ''}.{hint} {MPP_FIX}") from None
    except GridError as e:
        raise SlideError(slide.path, str(e)) from None


def patch_slide(path: str | Path, *, mpp: float | None = None, mpp_keys: tuple[str, ...] = (),
                **grid_options) -> tuple[Slide, PatchGrid]:
    """Open a slide (with an optional user mpp, and custom property names that may hold its mpp:
    slides/mpp.py) and make its grid."""
    slide = open_slide(path, mpp=mpp, mpp_keys=tuple(mpp_keys))
    return slide, slide_grid(slide, **grid_options)
