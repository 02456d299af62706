"""Main jobs: features -> embeddings -> store."""
from .embed_features import EmbedOptions, RunReport, embed_features
from .scheduler import EXIT_INTERRUPTED, parse_shard, run_archive, run_embedding, select_shard, shard_of
from .worker import SlideRecord, FeatureFileWorker, FeatureFileSpec

__all__ = ["EXIT_INTERRUPTED", "EmbedOptions", "RunReport", "SlideRecord", "FeatureFileWorker", "FeatureFileSpec",
           "embed_features", "parse_shard", "run_archive", "run_embedding", "select_shard", "shard_of"]
