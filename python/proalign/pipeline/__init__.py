"""Main jobs: features -> embeddings -> store."""
from .embed_features import EmbedOptions, RunReport, embed_features
from .scheduler import EXIT_INTERRUPTED, parse_shard, run_archive, run_embedding, select_shard, shard_of
from .worker import SlideRecord, SlideWorker, WorkerSpec

__all__ = ["EXIT_INTERRUPTED", "EmbedOptions", "RunReport", "SlideRecord", "SlideWorker", "WorkerSpec",
           "embed_features", "parse_shard", "run_archive", "run_embedding", "select_shard", "shard_of"]
