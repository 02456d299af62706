"""proalign-engine: ProAlign slide embeddings for whole-slide-image archives."""
from __future__ import annotations

__version__ = "0.1.0"

from .aggregate import aggregate, aggregate_batch  # noqa: E402
from .prototypes.io import load_prototypes  # noqa: E402
from .store import open_store  # noqa: E402

__all__ = ["__version__", "aggregate", "aggregate_batch", "load_prototypes", "open_store"]
