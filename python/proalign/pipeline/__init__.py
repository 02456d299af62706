"""Main jobs: features -> embeddings -> store."""
from .embed_features import EmbedOptions, RunReport, embed_features

__all__ = ["EmbedOptions", "RunReport", "embed_features"]
