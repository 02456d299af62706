"""One slide file -> one slide embedding: tissue -> grid -> tile engine -> decode -> encoder ->
streaming aggregation, never holding more than a few batches of patches or features.

Patch batches are produced on a background thread (the engine reads and decodes ahead), so
decoding the next batch overlaps encoding this one; features are folded into the aggregation
state batch by batch (StreamingAggregator) and optionally written to a TRIDENT-style features
.h5 (`features` + `coords`, rows in the grid's order): `layout="flat"` puts it at
`<features_dir>/<slide>.h5`, `layout="trident"` at TRIDENT's
`<features_dir>/<mag>x_<patch>px_<overlap>px_overlap/features_<encoder>/<slide>.h5`, with the
slide's coords file beside (`.../patches/<slide>_patches.h5`) when the grid was made here.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch

from ..aggregate.streaming import StreamingAggregator
from ..slides.patches import PatchStats, iter_patches
from ..errors import SlideError
from ..slides.coords_io import (LAYOUTS, read_coords_h5, trident_coords_attrs, trident_coords_path,
                                trident_features_dir, trident_job_name, write_coords_h5)
from ..slides.grid import PatchGrid
from ..slides.patching import slide_grid
from ..slides.slide import open_slide


@dataclass(frozen=True)
class SlideOptions:
    """How patches are cut; None means the encoder's preferred value."""

    magnification: float | None = None
    patch_size: int | None = None
    overlap: int = 0
    min_tissue: float = 0.1
    edge: str = "inside"
    decoder: str = "auto"  # auto | cpu | dali-cpu | dali-gpu
    shrink_on_load: bool = False  # half-size DCT decode of JPEG tiles when patches are downsampled
    batch_size: int | None = None  # encoder batch; None: from the GPU's free memory (CPU: 256)
    coords_dir: str | None = None  # read TRIDENT/CLAM coords instead of detecting tissue
    features_dir: str | None = None  # also write TRIDENT-style per-slide features .h5
    layout: str = "flat"  # features_dir as <dir>/<slide>.h5 (flat) or TRIDENT's job folders (trident)
    edge_fill: str = "white"  # pixels beyond the slide's edge: white, or black as TRIDENT reads them
    keep_penmarks: bool = False  # keep the patches under pen ink / blank or blurred tissue
    tissue_geojson: str | None = None  # contours (folder of <slide>.geojson) instead of tissue detection
    qc_dir: str | None = None  # write <slide>.png (thumbnail, contours, grid) and <slide>.geojson here

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.edge_fill not in ("white", "black"):
            raise ValueError(f"edge_fill must be 'white' or 'black', got {self.edge_fill!r}")

    def key(self, encoder_name: str) -> dict:
        """The part of a stored record's options that these settings determine."""
        key = {"encoder": encoder_name, "magnification": self.magnification, "patch_size": self.patch_size,
               "overlap": self.overlap, "min_tissue": self.min_tissue, "edge": self.edge,
               "coords": bool(self.coords_dir), "shrink_on_load": self.shrink_on_load}
        if self.edge_fill != "white":  # only when set, so the records of earlier stores still match
            key["edge_fill"] = self.edge_fill
        # Always stated (stores of earlier versions, which kept the ink, read as True: normalise_options).
        # Coords read from files are a given grid: nothing was excluded.
        key["keep_penmarks"] = self.keep_penmarks or bool(self.coords_dir)
        if self.tissue_geojson:
            key["tissue_geojson"] = True
        return key


@dataclass
class EmbeddedSlide:
    slide_id: str
    embedding: np.ndarray | None  # None when embed_slide ran with method=None (features only)
    n_patches: int
    grid: PatchGrid
    timing: dict[str, float] = field(default_factory=dict)
    stats: PatchStats | None = None
    features: np.ndarray | None = None  # (N, d) float32 in grid order, with keep_features


def _prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run a generator on a background thread, at most `depth` items ahead; its errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def find_coords(coords_dir: str | Path, slide_id: str) -> Path:
    """A slide's coords file in a TRIDENT job folder (patches/<id>_patches.h5, or
    <mag>x_<patch>px_<overlap>px_overlap/patches/<id>_patches.h5 when exactly one such folder has
    it) or a CLAM one (patches/<id>.h5, or <id>.h5 directly)."""
    d = Path(coords_dir)
    for p in (trident_coords_path(d, slide_id), d / "patches" / f"{slide_id}.h5", d / f"{slide_id}_patches.h5",
              d / f"{slide_id}.h5"):
        if p.is_file():
            return p
    nested = sorted(p for p in d.glob(f"*x_*px_*px_overlap/patches/{slide_id}_patches.h5") if p.is_file())
    if len(nested) == 1:
        return nested[0]
    if nested:
        raise SlideError(d, f"coords for slide {slide_id!r} in several TRIDENT job folders "
                            f"({', '.join(p.parent.parent.name for p in nested)}): give one of them as --coords")
    raise SlideError(d, f"no coords file for slide {slide_id!r} (looked for patches/{slide_id}_patches.h5 and "
                        f"{slide_id}.h5)")


def embed_slide(path: str | Path, encoder: Any, prototypes, *, method: str | None = "proalign",
                aggregate_kwargs: dict | None = None, options: SlideOptions = SlideOptions(),
                slide_id: str | None = None, mpp: float | None = None, device: str | torch.device = "cpu",
                text_prototypes=None, mpp_keys: tuple[str, ...] = (), keep_features: bool = False) -> EmbeddedSlide:
    """Embed one slide file. `encoder` follows proalign.encoders (preprocess, encode_image,
    project, input_size, magnification, patch_size). `text_prototypes` switches proalign to
    space=joint (keys = projected patches). `mpp_keys`: custom property names holding the mpp
    of a slide whose standard metadata has none (--custom-mpp-keys). `keep_features` returns the
    patch features too (N x d in memory); method=None only encodes (no embedding: heatmaps)."""
    path = Path(path)
    slide_id = slide_id or path.stem
    timing = {"grid_s": 0.0, "patches_s": 0.0, "encode_s": 0.0, "aggregate_s": 0.0}
    t0 = time.perf_counter()
    slide = open_slide(path, mpp=mpp, mpp_keys=tuple(mpp_keys))
    try:
        patch_size = options.patch_size or encoder.patch_size
        if options.coords_dir:
            # the slide's resolution completes a CLAM file's grid (which records none): TRIDENT's folder name needs it
            grid = read_coords_h5(find_coords(options.coords_dir, slide_id), level_downsamples=slide.downsamples,
                                  slide_mpp=slide.mpp, slide_magnification=slide.objective_power)
        else:
            grid = slide_grid(slide, patch_size=patch_size,
                              target_magnification=options.magnification or encoder.magnification,
                              overlap=options.overlap, min_tissue=options.min_tissue, edge=options.edge,
                              keep_penmarks=options.keep_penmarks, tissue_geojson=options.tissue_geojson,
                              qc_dir=options.qc_dir, slide_id=slide_id)
        if len(grid) == 0:
            raise SlideError(path, "no tissue patches (empty grid): check --min-tissue or the slide")
        timing["grid_s"] = time.perf_counter() - t0
        kw = dict(aggregate_kwargs or {})
        agg = StreamingAggregator(prototypes, method, queries=text_prototypes, **kw) if method else None
        kept = None
        writer = (_FeatureWriter.for_options(options, slide_id, grid, getattr(encoder, "name", None))
                  if options.features_dir else None)
        stats = PatchStats()
        # on a GPU, as large as its free memory allows (the encoder's estimate); on the CPU, 256
        batch_size = options.batch_size or (min(1024, encoder.batch_size_for(source_size=grid.patch_size))
                                            if str(device).startswith("cuda") else 256)
        t_wait = time.perf_counter()
        # Patches come at the grid's size (e.g. 512 px at 20x); the encoder's own preprocess resizes
        # them to its input (CONCH: bicubic to 448) on the device, as its training pipeline did.
        for idx, patches in _prefetch(iter_patches(slide, grid.coords, grid.patch_size_level0, grid.patch_size,
                                                   batch_size=batch_size, decoder=options.decoder,
                                                   shrink_on_load=options.shrink_on_load,
                                                   edge_fill=options.edge_fill, stats=stats)):
            t1 = time.perf_counter()
            timing["patches_s"] += t1 - t_wait
            with torch.inference_mode():
                x = encoder.encode_image(encoder.preprocess(patches.to(device, non_blocking=True)))
                keys = encoder.project(x) if text_prototypes is not None else None
            t2 = time.perf_counter()
            if agg is not None:
                agg.update(x.float(), keys=None if keys is None else keys.float())
            if writer or keep_features:
                rows = x.float().cpu().numpy()
                if writer:
                    writer.write(rows, idx)
                if keep_features:
                    kept = np.empty((len(grid), rows.shape[1]), np.float32) if kept is None else kept
                    kept[np.asarray(idx)] = rows
            t_wait = time.perf_counter()
            timing["encode_s"] += t2 - t1
            timing["aggregate_s"] += t_wait - t2
        if writer:
            writer.close()
        emb = agg.result().numpy() if agg is not None else None
    finally:
        slide.close()
    timing["total_s"] = time.perf_counter() - t0
    return EmbeddedSlide(slide_id, emb, len(grid), grid, timing, stats, kept)


class _FeatureWriter:
    """A TRIDENT-style features .h5 filled as batches arrive, each row at its patch's index in the
    grid (so `features` rows follow `coords` as in TRIDENT's files), moved into place when complete.
    `features` carries TRIDENT's attributes encoder, name, savetodir; `coords` is a copy of the
    grid with the coords file's attributes (those of the file read with coords_dir, as stored)."""

    def __init__(self, path: Path, slide_id: str, grid: PatchGrid, *, encoder: str | None,
                 coords_attrs: dict, coords_file: Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.grid, self.slide_id, self.encoder, self.n = grid, slide_id, encoder, 0
        self.coords_attrs, self.coords_file = coords_attrs, coords_file
        self.f = h5py.File(self.tmp, "w")

    @classmethod
    def for_options(cls, options: SlideOptions, slide_id: str, grid: PatchGrid,
                    encoder: str | None) -> "_FeatureWriter":
        coords_file = find_coords(options.coords_dir, slide_id) if options.coords_dir else None
        if options.layout == "flat":
            path = Path(options.features_dir) / f"{slide_id}.h5"
            savetodir = grid.savetodir or str(Path(options.features_dir))
        else:
            mag = grid.target_magnification
            if mag is None and grid.target_mpp:
                mag = 10.0 / grid.target_mpp
            if mag is None:
                raise SlideError(slide_id, "the grid has no target magnification for TRIDENT's folder name "
                                           "(<mag>x_<patch>px_<overlap>px_overlap): give the slide's mpp "
                                           "(--slide-mpp, --mpp-csv) or use --layout flat")
            job = Path(options.features_dir) / trident_job_name(mag, grid.patch_size, grid.overlap)
            path = trident_features_dir(options.features_dir, job.name, encoder or "encoder") / f"{slide_id}.h5"
            savetodir = str(job)
            if coords_file is None:  # the grid made here: its coords file too, as TRIDENT's patching step
                write_coords_h5(trident_coords_path(job, slide_id), grid, name=slide_id, savetodir=savetodir)
        attrs = trident_coords_attrs(grid, name=slide_id, savetodir=savetodir)
        return cls(path, slide_id, grid, encoder=encoder, coords_attrs=attrs, coords_file=coords_file)

    def write(self, feats: np.ndarray, idx: np.ndarray) -> None:
        """Rows `feats` of the patches at grid indices `idx`."""
        n = len(self.grid)
        if "features" not in self.f:
            d = feats.shape[1]
            ds = self.f.create_dataset("features", shape=(n, d), maxshape=(None, d), dtype=np.float32,
                                       chunks=(min(1024, max(1, n)), d))
            ds.attrs.update({"encoder": self.encoder if self.encoder is not None else "None",
                             "name": self.slide_id, "savetodir": str(self.path.parent)})
            c = self.f.create_dataset("coords", data=np.ascontiguousarray(self.grid.coords, dtype=np.int64),
                                      maxshape=(None, 2), chunks=(max(1, min(n, 8192)), 2))
            if self.coords_file is not None:  # the coords file's own attributes, values and dtypes
                with h5py.File(self.coords_file, "r") as src:
                    c.attrs.update(dict(src["coords"].attrs))
            else:
                c.attrs.update(self.coords_attrs)
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            self.f["features"][idx[0]:idx[0] + len(idx)] = feats
        elif len(idx):
            order = np.argsort(idx, kind="stable")
            self.f["features"][idx[order]] = feats[order]
        self.n += len(idx)

    def close(self) -> None:
        self.f.close()
        if self.n != len(self.grid):
            self.tmp.unlink(missing_ok=True)
            raise SlideError(self.path, f"features for {self.n} of {len(self.grid)} patches written")
        self.tmp.replace(self.path)


__all__ = ["SlideOptions", "EmbeddedSlide", "embed_slide", "find_coords"]
