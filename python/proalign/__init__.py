"""proalign-engine: ProAlign slide embeddings for whole-slide-image archives."""
from __future__ import annotations

__version__ = "0.1.0"

from .aggregate import aggregate, aggregate_batch  # noqa: E402
from .prototypes.io import load_prototypes  # noqa: E402


def open_slide(path, mpp: float | None = None):
    """Open a whole-slide image (TIFF fast path or OpenSlide); see proalign.slides.slide."""
    from .slides.slide import open_slide as _open

    return _open(path, mpp=mpp)


def read_patches(slide, coords, patch_size_level0: int, out_size: int):
    """uint8 (n, out_size, out_size, 3) patches at level-0 `coords`, through the tile engine."""
    from .decode.patches import read_patches as _read

    return _read(slide, coords, patch_size_level0, out_size)


def embed_slide(path, encoder, prototypes, **kwargs):
    """One slide file -> its embedding (tissue, grid, engine, encoder, streaming aggregation); see
    proalign.pipeline.embed_slides.embed_slide."""
    from .pipeline.embed_slides import embed_slide as _embed

    return _embed(path, encoder, prototypes, **kwargs)


def embed_archive(archive, encoder: str, weights, prototypes, store, **kwargs):
    """Every slide file under `archive` -> the LMDB `store`; returns the run report."""
    from .pipeline.slide_worker import embed_archive as _embed

    return _embed(archive, encoder, weights, prototypes, store, **kwargs)


def create_encoder(name: str, weights, **kwargs):
    """A patch encoder from local weights (conch_v1, open_clip:<arch>, timm:<name>)."""
    from .encoders import create_encoder as _create

    return _create(name, weights, **kwargs)


def open_store(path, write: bool = False):
    """Open an embedding store (read-only unless `write=True`); see proalign.store."""
    from .store import open_store as _open  # lmdb loads on first use: GPU hosts may lack it

    return _open(path, write=write)

__all__ = ["__version__", "aggregate", "aggregate_batch", "create_encoder", "embed_archive", "embed_slide",
           "load_prototypes", "open_slide", "open_store", "read_patches"]
