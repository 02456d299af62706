"""LMDB store of slide embeddings: one record per slide, keyed by slide id."""
from .lmdb_store import EmbeddingStore, Record, normalise_options, open_store, option_diff
from .merge import MergeReport, StoreMergeError, merge_stores

__all__ = ["EmbeddingStore", "MergeReport", "Record", "StoreMergeError", "merge_stores", "normalise_options", "open_store",
           "option_diff"]
