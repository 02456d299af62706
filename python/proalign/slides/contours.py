"""Tissue contours as GeoJSON in QuPath's convention, and back to masks.

Written (`masks_to_geojson`): a FeatureCollection; one Feature per connected piece of the mask,
geometry a Polygon (exterior ring, then one interior ring per hole) in level-0 pixel
coordinates, origin at the top-left corner of the full-resolution image (QuPath's pixel units).
Properties as QuPath writes annotations: `objectType: "annotation"` and
`classification: {"name": "Tissue", "color": [r, g, b]}`. The regions excluded from the grid
(pen ink, blank/blurred tissue) are written too, classified "Artifact", so a pathologist sees
them in QuPath. Rings are closed (first point = last), exterior counter-clockwise, holes
clockwise (in x-right, y-up terms, as RFC 7946 asks; QuPath reads either).

The outline of a pixel mask is traced with marching squares (contourpy, which matplotlib
brings) at the 0.5 level of the 0/1 image: it passes between the centres of tissue and
background pixels, so filling the polygons back at pixel centres gives the same mask again.

Read (`read_tissue_geojson`): a FeatureCollection, a list of Features (QuPath's older export),
a single Feature or a bare geometry; Polygon, MultiPolygon and GeometryCollection geometries
(points and lines, having no area, are skipped). Features classified "Artifact" (or "Ignore*",
QuPath's convention for regions to leave out) are exclusions, every other polygon is tissue.
Interior rings are holes: not tissue, and no patch may be centred in one. Anything malformed
raises TissueGeoJSONError naming the file and the feature.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ProAlignError

TISSUE_CLASS = "Tissue"
ARTIFACT_CLASS = "Artifact"
TISSUE_COLOR = [0, 170, 0]
ARTIFACT_COLOR = [200, 0, 200]


class TissueGeoJSONError(ProAlignError, ValueError):
    """A tissue GeoJSON file that cannot be read as polygons."""


# --------------------------------------------------------------------------------------------
# mask -> polygons -> GeoJSON
# --------------------------------------------------------------------------------------------


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """A closed ring (first point repeated last) without points on a straight run."""
    pts = ring[:-1]
    if len(pts) < 4:
        return ring
    prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
    keep = np.abs(cross) > 1e-9
    if keep.sum() < 3:
        return ring
    pts = pts[keep]
    return np.vstack([pts, pts[:1]])


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def mask_polygons(mask: np.ndarray, scale_xy: tuple[float, float]) -> list[list[np.ndarray]]:
    """Polygons of a boolean mask whose pixel (i, j) covers level-0 [j*sx, (j+1)*sx) x
    [i*sy, (i+1)*sy): a list of polygons, each a list of closed rings (n, 2) in level-0 (x, y),
    exterior first, then the holes."""
    import contourpy

    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if not m.any():
        return []
    sx, sy = (float(v) for v in scale_xy)
    z = np.zeros((m.shape[0] + 2, m.shape[1] + 2), np.float64)
    z[1:-1, 1:-1] = m
    gen = contourpy.contour_generator(z=z, fill_type=contourpy.FillType.OuterOffset, corner_mask=False)
    points, offsets = gen.filled(0.5, 1.5)
    out = []
    for pts, offs in zip(points, offsets):
        rings = []
        for k in range(len(offs) - 1):
            r = np.asarray(pts[offs[k]:offs[k + 1]], np.float64)
            if not np.array_equal(r[0], r[-1]):
                r = np.vstack([r, r[:1]])
            r = _drop_collinear(r)
            # padded centre index -> level-0: pixel j's centre (j + 0.5) * sx sits at index j + 1
            r = np.column_stack([(r[:, 0] - 0.5) * sx, (r[:, 1] - 0.5) * sy])
            # exterior counter-clockwise, holes clockwise, with y pointing up (RFC 7946)
            ccw_up = _signed_area(r) < 0  # y points down in image coordinates
            if ccw_up != (k == 0):
                r = r[::-1]
            rings.append(r)
        if rings:
            out.append(rings)
    return out


def _feature(rings: list[np.ndarray], name: str, color: list[int]) -> dict[str, Any]:
    coords = [[[round(float(x), 2), round(float(y), 2)] for x, y in r] for r in rings]
    return {"type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": color},
                           "isLocked": False}}


def masks_to_geojson(mask: np.ndarray, scale_xy: tuple[float, float], excluded: np.ndarray | None = None,
                     *, slide_id: str = "") -> dict[str, Any]:
    """A QuPath-style FeatureCollection: a "Tissue" annotation per piece of `mask`, an
    "Artifact" annotation per piece of `excluded` (regions the grid keeps out of)."""
    feats = [_feature(p, TISSUE_CLASS, TISSUE_COLOR) for p in mask_polygons(mask, scale_xy)]
    if excluded is not None:
        feats += [_feature(p, ARTIFACT_CLASS, ARTIFACT_COLOR) for p in mask_polygons(excluded, scale_xy)]
    out: dict[str, Any] = {"type": "FeatureCollection", "features": feats}
    if slide_id:
        out["properties"] = {"slide": slide_id, "units": "level-0 pixels"}
    return out


def write_tissue_geojson(path: str | Path, mask: np.ndarray, scale_xy: tuple[float, float],
                         excluded: np.ndarray | None = None, *, slide_id: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(masks_to_geojson(mask, scale_xy, excluded, slide_id=slide_id)))
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# GeoJSON -> masks
# --------------------------------------------------------------------------------------------


def _parity_fill(rings: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of rings (one ring: its inside) given in mask-pixel centre units (pixel (i, j) at u=j, v=i),
    sampled at pixel centres."""
    h, w = shape
    out = np.zeros((h, w), dtype=bool)
    edges = []
    for r in rings:
        if len(r) >= 2:
            edges.append(np.column_stack([r[:-1], r[1:]]))
    if not edges:
        return out
    e = np.vstack(edges)
    u1, v1, u2, v2 = e[:, 0], e[:, 1], e[:, 2], e[:, 3]
    vlo, vhi = np.minimum(v1, v2), np.maximum(v1, v2)
    lo = np.clip(np.ceil(vlo), 0, h).astype(np.int64)  # rows i with vlo <= i < vhi
    hi = np.clip(np.ceil(vhi), 0, h).astype(np.int64)
    cnt = np.maximum(hi - lo, 0)
    if cnt.sum() == 0:
        return out
    idx = np.repeat(np.arange(len(e)), cnt)
    rows = lo[idx] + (np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    t = (rows - v1[idx]) / (v2[idx] - v1[idx])
    u = u1[idx] + t * (u2[idx] - u1[idx])
    cols = np.clip(np.ceil(u), 0, w).astype(np.int64)
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    tog = np.zeros((r1 - r0, w + 1), np.int64)
    np.add.at(tog, (rows - r0, cols), 1)
    out[r0:r1] = (np.cumsum(tog[:, :w], axis=1) % 2).astype(bool)
    return out


def _err(path: Path, where: str, what: str) -> TissueGeoJSONError:
    return TissueGeoJSONError(f"{path}: {where}: {what} (expected a GeoJSON FeatureCollection of Polygon/"
                              "MultiPolygon features in level-0 pixel coordinates, as QuPath exports)")


def _ring(path: Path, where: str, ring: Any) -> np.ndarray:
    try:
        a = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError):
        raise _err(path, where, "a ring is not a list of [x, y] numbers") from None
    if a.ndim != 2 or a.shape[1] < 2 or a.shape[0] < 3:
        raise _err(path, where, f"a ring needs at least 3 [x, y] points, got shape {a.shape}")
    a = a[:, :2]
    if not np.all(np.isfinite(a)):
        raise _err(path, where, "a ring has a non-finite coordinate")
    if not np.array_equal(a[0], a[-1]):
        a = np.vstack([a, a[:1]])
    return a


def _polygons(path: Path, where: str, geom: Any) -> list[list[np.ndarray]]:
    if not isinstance(geom, dict) or "type" not in geom:
        raise _err(path, where, "geometry missing or not an object with a 'type'")
    t = geom["type"]
    if t in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return []  # no area
    if t == "GeometryCollection":
        if not isinstance(geom.get("geometries"), list):
            raise _err(path, where, "GeometryCollection without a 'geometries' list")
        return [p for g in geom["geometries"] for p in _polygons(path, where, g)]
    coords = geom.get("coordinates")
    if t == "Polygon":
        if not isinstance(coords, list) or not coords:
            raise _err(path, where, "Polygon without coordinates")
        return [[_ring(path, where, r) for r in coords]]
    if t == "MultiPolygon":
        if not isinstance(coords, list):
            raise _err(path, where, "MultiPolygon without coordinates")
        out = []
        for poly in coords:
            if not isinstance(poly, list) or not poly:
                raise _err(path, where, "an empty polygon in a MultiPolygon")
            out.append([_ring(path, where, r) for r in poly])
        return out
    raise _err(path, where, f"unsupported geometry type {t!r}")


def _class_name(feature: dict) -> str:
    props = feature.get("properties") or {}
    c = props.get("classification") if isinstance(props, dict) else None
    if isinstance(c, dict):
        return str(c.get("name") or "")
    return str(c or "")


def is_exclusion_class(name: str) -> bool:
    return name.lower() in ("artifact", "artefact", "pen", "excluded") or name.lower().startswith("ignore")


def read_tissue_geojson(path: str | Path, shape: tuple[int, int], scale_xy: tuple[float, float]
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tissue, excluded, holes) boolean masks of `shape` (h, w), pixel (i, j) covering level-0
    [j*sx, (j+1)*sx) x [i*sy, (i+1)*sy), from a GeoJSON file (see the module notes)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise TissueGeoJSONError(f"{path}: cannot read the tissue GeoJSON: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TissueGeoJSONError(f"{path}: not valid JSON: {e}") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features")
        if not isinstance(feats, list):
            raise _err(path, "FeatureCollection", "no 'features' list")
    elif isinstance(data, list):
        feats = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    elif isinstance(data, dict) and ("coordinates" in data or data.get("type") == "GeometryCollection"):
        feats = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise _err(path, "top level", f"not a FeatureCollection (type {data.get('type') if isinstance(data, dict) else type(data).__name__!r})")
    h, w = (int(v) for v in shape)
    sx, sy = (float(v) for v in scale_xy)
    tissue = np.zeros((h, w), bool)
    excluded = np.zeros((h, w), bool)
    hole_fill = np.zeros((h, w), bool)
    for n, f in enumerate(feats):
        where = f"feature {n}"
        if not isinstance(f, dict) or f.get("type") != "Feature":
            raise _err(path, where, "not a GeoJSON Feature")
        target = excluded if is_exclusion_class(_class_name(f)) else tissue
        for rings in _polygons(path, where, f.get("geometry")):
            px = [np.column_stack([r[:, 0] / sx - 0.5, r[:, 1] / sy - 0.5]) for r in rings]
            inside = _parity_fill(px[:1], (h, w))
            for r in px[1:]:  # the exterior less every hole (a hole drawn past the exterior cuts only it)
                cut = _parity_fill([r], (h, w))
                inside &= ~cut
                if target is tissue:
                    hole_fill |= cut
            target |= inside
    return tissue, excluded, hole_fill & ~tissue


def geojson_path(directory: str | Path, slide_id: str) -> Path:
    """<directory>/<slide>.geojson (what --qc writes)."""
    return Path(directory) / f"{slide_id}.geojson"


def thumbnail_shape(level0_size: tuple[int, int], max_size: int) -> tuple[int, int]:
    """(h, w) of `Slide.get_thumbnail(max_size)` without reading it."""
    w0, h0 = (int(v) for v in level0_size)
    scale = max(max(w0, h0) / max_size, 1.0)
    return max(1, round(h0 / scale)), max(1, round(w0 / scale))


__all__ = ["TissueGeoJSONError", "mask_polygons", "masks_to_geojson", "write_tissue_geojson",
           "read_tissue_geojson", "geojson_path", "thumbnail_shape", "is_exclusion_class"]
