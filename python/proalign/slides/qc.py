"""Quality-control outputs per slide: a thumbnail PNG with the tissue contours, the excluded
regions (pen ink, blank/blurred tissue) and the patch grid drawn on it; the contours as
QuPath GeoJSON (slides/contours.py); a sample of patch images.

Files, in the QC folder: <slide>.png, <slide>.geojson (reuse it, edited or not, with
--tissue-geojson on that folder), and with a patch sample <slide>_patches/<i>_x<x>_y<y>.png.
Picture colours: tissue outlines green, excluded regions magenta (tinted, outlined), patch
squares yellow; holes of the tissue are outlined like the tissue they cut.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .contours import mask_polygons, write_tissue_geojson

TISSUE_RGB = (0, 190, 0)
EXCLUDED_RGB = (220, 0, 220)
GRID_RGB = (255, 200, 0)


def qc_picture(thumb: np.ndarray, scale_xy: tuple[float, float], tissue: np.ndarray, excluded: np.ndarray | None,
               coords: np.ndarray, patch_size_level0: int) -> np.ndarray:
    """RGB (h, w, 3) uint8: the thumbnail with contours, exclusions and the patch grid."""
    from PIL import Image, ImageDraw

    img = np.asarray(thumb, np.uint8)[..., :3].copy()
    if excluded is not None and excluded.shape == img.shape[:2] and excluded.any():
        tint = np.asarray(EXCLUDED_RGB, np.float32)
        img[excluded] = (0.55 * img[excluded] + 0.45 * tint).astype(np.uint8)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    sx, sy = (float(v) for v in scale_xy)
    width = max(1, round(max(img.shape[:2]) / 800))
    for x, y in np.asarray(coords).reshape(-1, 2):
        draw.rectangle([x / sx, y / sy, (x + patch_size_level0) / sx - 1, (y + patch_size_level0) / sy - 1],
                       outline=GRID_RGB, width=1)
    for mask, colour in ((excluded, EXCLUDED_RGB), (tissue, TISSUE_RGB)):
        if mask is None:
            continue
        for rings in mask_polygons(mask, (1.0, 1.0)):  # thumbnail pixel units
            for r in rings:
                draw.line([(float(a), float(b)) for a, b in r], fill=colour, width=width)
    return np.asarray(pil)


def write_qc(qc_dir: str | Path, slide_id: str, thumb: np.ndarray, scale_xy: tuple[float, float],
             tissue: np.ndarray, excluded: np.ndarray | None, grid: Any) -> dict[str, Path]:
    """<qc_dir>/<slide>.png (picture) and <qc_dir>/<slide>.geojson (contours)."""
    from PIL import Image

    d = Path(qc_dir)
    d.mkdir(parents=True, exist_ok=True)
    png = d / f"{slide_id}.png"
    pic = qc_picture(thumb, scale_xy, tissue, excluded, grid.coords, grid.patch_size_level0)
    tmp = png.with_name(png.name + ".tmp")
    Image.fromarray(pic).save(tmp, format="PNG")
    tmp.replace(png)
    gj = write_tissue_geojson(d / f"{slide_id}.geojson", tissue, scale_xy, excluded, slide_id=slide_id)
    return {"picture": png, "geojson": gj}


def dump_patches(slide: Any, grid: Any, n: int, out_dir: str | Path, *, seed: int = 0,
                 fill: int = 255) -> list[Path]:
    """A sample of `n` patches of the grid (all when it has fewer; seeded, in grid order) as PNG
    images at the grid's patch size: <out_dir>/<i>_x<x>_y<y>.png, i the patch's row in the coords."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = len(grid)
    if n <= 0 or m == 0:
        return []
    pick = np.arange(m) if n >= m else np.sort(np.random.default_rng(seed).choice(m, size=n, replace=False))
    paths = []
    for i in pick:
        x, y = (int(v) for v in grid.coords[i])
        img = slide.read_region((x, y), grid.level, (grid.read_size, grid.read_size), fill=fill)
        pil = Image.fromarray(np.asarray(img, np.uint8)[..., :3])
        if grid.read_size != grid.patch_size:
            pil = pil.resize((grid.patch_size, grid.patch_size), Image.BICUBIC)
        p = out_dir / f"{int(i):06d}_x{x}_y{y}.png"
        pil.save(p, format="PNG")
        paths.append(p)
    return paths
