"""proalign-engine: ProAlign slide embeddings for whole-slide-image archives."""
from __future__ import annotations

__version__ = "0.1.0"

from .aggregate import aggregate, aggregate_batch  # noqa: E402
from .prototypes.io import load_prototypes  # noqa: E402


def open_store(path, write: bool = False):
    """Open an embedding store (read-only unless `write=True`); see proalign.store."""
    from .store import open_store as _open  # lmdb loads on first use: GPU hosts may lack it

    return _open(path, write=write)

__all__ = ["__version__", "aggregate", "aggregate_batch", "load_prototypes", "open_store"]
