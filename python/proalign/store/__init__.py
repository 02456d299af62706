"""LMDB store of slide embeddings: one record per slide, keyed by slide id."""
from .lmdb_store import EmbeddingStore, Record, open_store

__all__ = ["EmbeddingStore", "Record", "open_store"]
