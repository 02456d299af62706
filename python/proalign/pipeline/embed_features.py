"""`embed --features`: per-slide patch feature files -> slide embeddings in an LMDB store.

One slide at a time per worker (peak memory follows the largest slide), each stored atomically
by the single writer, so a run killed at any point resumes where it stopped: a slide whose record
exists with the same options, made from the same file (size, content fingerprint), is skipped. A
bad slide is retried once, then quarantined and reported; the run goes on. The per-slide worker is `worker.FeatureFileWorker`; the queue, shards,
workers, Ray, signals and the run report are in `scheduler.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..features.io import FeatureFileEntry
from .scheduler import RunReport, run_embedding
from .worker import EmbedOptions

__all__ = ["EmbedOptions", "RunReport", "embed_features"]


def embed_features(
    entries: Sequence[FeatureFileEntry],
    prototypes: str | Path,
    store_path: str | Path,
    options: EmbedOptions = EmbedOptions(),
    overwrite: bool = False,
    report_path: str | Path | None = None,
    progress: bool | None = None,
    **scheduling,
) -> RunReport:
    """Embed every slide of `entries` into the store at `store_path`; returns the run report
    (also written as JSON to `report_path`, default `<store>/reports/run-<time>.json`).

    `scheduling` (see `scheduler.run_embedding`): workers=1 (in-process; >1: local processes),
    scheduler="local"|"ray", shard="i/n", retries=1, threads, slide_timeout, ray_address,
    ray_cpus, ray_gpus, ray_init, handle_signals=False (True: SIGINT/SIGTERM stop cleanly, as the
    CLI does), on_change="redo"|"keep"|"fail" (a stored slide whose source file changed)."""
    scheduling.setdefault("handle_signals", False)
    return run_embedding(entries, prototypes, store_path, options, overwrite, report_path, progress, **scheduling)
