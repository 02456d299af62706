"""One slide to a patch grid: open, tissue mask from a thumbnail, grid at the target resolution.
Shared by `proalign-engine patch` and the slides-to-embeddings pipeline."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SlideError
from .grid import GridError, MissingResolutionError, PatchGrid, grid_for_slide
from .contours import TissueGeoJSONError
from .slide import Slide, open_slide


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


@dataclass
class SlideTissue:
    """What the grid is cut from: tissue, exclusions and holes on one pixel grid (the
    thumbnail's), its scale (level-0 pixels per mask pixel) and where it came from."""

    mask: np.ndarray
    excluded: np.ndarray | None
    holes: np.ndarray | None
    scale: tuple[float, float]
    source: str  # "auto" or the GeoJSON file
    thumbnail: np.ndarray | None = None


def slide_tissue(slide: Slide, *, thumbnail_size: int = 2048, keep_penmarks: bool = False,
                 tissue_geojson: str | Path | None = None, slide_id: str | None = None,
                 thumbnail: bool = False) -> SlideTissue:
    """The tissue of a slide: detected on its thumbnail (slides/tissue.py; pen ink and
    blank/blurred tissue as exclusions unless `keep_penmarks`), or read from a GeoJSON file
    (`tissue_geojson`: the file, or a folder holding <slide>.geojson) at the thumbnail's pixel
    grid. `thumbnail=True` keeps the thumbnail (for the QC picture)."""
    from .contours import geojson_path, read_tissue_geojson, thumbnail_shape
    from .tissue import tissue_masks

    sid = slide_id or _slide_id(slide)
    w0, h0 = (int(v) for v in slide.levels[0])
    thumb = None
    if tissue_geojson is not None:
        gj = Path(tissue_geojson)
        if gj.is_dir():
            gj = geojson_path(gj, sid)
        if not gj.is_file():
            raise SlideError(slide.path, f"no tissue GeoJSON {gj} (--tissue-geojson: a folder of <slide>.geojson "
                                         "files, as --qc writes them)")
        if thumbnail:
            thumb = np.asarray(slide.get_thumbnail(thumbnail_size))
        h, w = thumb.shape[:2] if thumb is not None else thumbnail_shape((w0, h0), thumbnail_size)
        scale = (w0 / w, h0 / h)
        mask, excluded, holes = read_tissue_geojson(gj, (h, w), scale)
        return SlideTissue(mask, None if keep_penmarks else excluded, holes, scale, str(gj), thumb)
    thumb = np.asarray(slide.get_thumbnail(thumbnail_size))
    if thumb.ndim != 3 or thumb.shape[0] == 0 or thumb.shape[1] == 0:
        raise ValueError(f"slide thumbnail has shape {thumb.shape}, expected (h, w, 3)")
    scale = (w0 / thumb.shape[1], h0 / thumb.shape[0])
    if keep_penmarks:  # the grid as before pen-mark exclusion: no exclusions, no blur rule
        mask, excluded = tissue_masks(thumb, use_gpu=None, artifact_rejection=False)
        excluded = None
    else:
        mask, excluded = tissue_masks(thumb, use_gpu=None)
    return SlideTissue(mask, excluded, None, scale, "auto", thumb if thumbnail else None)


def _slide_id(slide) -> str:
    return getattr(slide, "name", None) or Path(str(slide.path)).stem


def slide_grid(slide: Slide, *, patch_size: int = 256, target_magnification: float | None = None,
               target_mpp: float | None = None, overlap: int = 0, min_tissue: float = 0.1,
               edge: str = "inside", thumbnail_size: int = 2048, keep_penmarks: bool = False,
               max_excluded: float = 0.05, tissue_geojson: str | Path | None = None,
               qc_dir: str | Path | None = None, slide_id: str | None = None) -> PatchGrid:
    """Tissue mask + patch grid of an open slide. A slide with no mpp/magnification (and none given
    with open_slide(path, mpp=...)) raises SlideError saying how to supply one.

    Patches with more than `max_excluded` of their area in pen ink or blank/blurred tissue are
    left out (`keep_penmarks=True`: not). `tissue_geojson`: contours to use instead of the
    detector (a file, or a folder of <slide>.geojson). `qc_dir`: write <slide>.png (thumbnail,
    contours, exclusions, grid) and <slide>.geojson there (slides/qc.py)."""
    if target_magnification is None and target_mpp is None:
        target_magnification = 20.0
    sid = slide_id or _slide_id(slide)
    try:
        t = slide_tissue(slide, thumbnail_size=thumbnail_size, keep_penmarks=keep_penmarks,
                         tissue_geojson=tissue_geojson, slide_id=sid, thumbnail=qc_dir is not None)
    except TissueGeoJSONError as e:
        raise SlideError(slide.path, str(e)) from None
    try:
        grid = grid_for_slide(slide, t.mask, t.scale, patch_size=patch_size,
                              target_magnification=target_magnification, target_mpp=target_mpp, overlap=overlap,
                              min_tissue=min_tissue, edge=edge, exclude=t.excluded, max_excluded=max_excluded,
                              holes=t.holes)
    except MissingResolutionError as e:
        from .mpp import MPP_FIX, mpp_like_properties

        note = getattr(slide.info, "resolution_note", "")
        maybe = mpp_like_properties(slide)
        hint = f" Properties that may hold it: {', '.join(maybe)}." if maybe else ""
        raise SlideError(slide.path, f"{e}{f' ({note})' if note else ''}.{hint} {MPP_FIX}") from None
    except GridError as e:
        raise SlideError(slide.path, str(e)) from None
    if qc_dir is not None:
        from .qc import write_qc

        write_qc(qc_dir, sid, t.thumbnail, t.scale, t.mask, t.excluded, grid)
    return grid


def patch_slide(path: str | Path, *, mpp: float | None = None, mpp_keys: tuple[str, ...] = (),
                **grid_options) -> tuple[Slide, PatchGrid]:
    """Open a slide (with an optional user mpp, and custom property names that may hold its mpp:
    slides/mpp.py) and make its grid."""
    slide = open_slide(path, mpp=mpp, mpp_keys=tuple(mpp_keys))
    return slide, slide_grid(slide, **grid_options)
