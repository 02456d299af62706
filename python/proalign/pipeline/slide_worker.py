"""The per-slide worker of the slides path: a slide file in -> one store record out, through
`embed_slide` (tissue, grid, engine, decode, encoder, streaming aggregation). `SlideFileSpec`
follows the worker contract of worker.py (picklable; build(), record_key(), describe()), so the
same schedulers (inline, process pool, Ray, shards) run it; the encoder is loaded once per worker."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .._version import __version__
from .embed_slides import SlideOptions, embed_slide
from .worker import EmbedOptions, set_threads


@dataclass(frozen=True)
class SlideEncoding:
    """How slide files become features: the encoder (from local weights) and the patch settings."""

    encoder: str
    weights: str
    encoder_kwargs: dict = field(default_factory=dict)
    device: str | None = None  # None: cuda when present
    options: SlideOptions = SlideOptions()
    mpp: dict = field(default_factory=dict)  # slide file name or stem -> level-0 mpp; "*": the default (mpp_for)
    text_prototypes: np.ndarray | None = None  # (K, D): proalign in the joint space
    mpp_keys: tuple = ()  # custom property names holding the mpp (--custom-mpp-keys)

    def key(self) -> dict:
        """What, besides the aggregation options, a stored record must match to count as done."""
        return {**self.options.key(self.encoder), "weights": str(Path(self.weights).resolve()),
                "space": "joint" if self.text_prototypes is not None else "visual"}


@dataclass(frozen=True)
class SlideFileSpec:
    """Everything a slides-path worker needs, by value."""

    prototypes: np.ndarray  # (K, d) float32
    prototypes_path: str  # provenance only
    slides: SlideEncoding
    options: EmbedOptions = EmbedOptions()
    threads: int | None = None
    shard: str | None = None

    def build(self) -> "SlideFileWorker":
        return SlideFileWorker(self)

    def record_key(self) -> dict:
        from ..prototypes.io import prototype_hash

        return {**self.options.key(prototype_hash(self.prototypes)), **self.slides.key()}

    def describe(self) -> dict:
        return {"prototypes": self.prototypes_path,
                "options": {**asdict(self.options), "slides": asdict(self.slides.options),
                            "encoder": self.slides.encoder, "weights": self.slides.weights}}


class SlideFileWorker:
    """Callable: FeatureFileEntry (slide id, slide file) -> pipeline.worker.SlideRecord."""

    def __init__(self, spec: SlideFileSpec):
        import torch

        from ..encoders import create_encoder
        from ..prototypes.io import prototype_hash

        self.spec, self.slides = spec, spec.slides
        set_threads(spec.threads)
        self.device = self.slides.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.encoder = create_encoder(self.slides.encoder, self.slides.weights, device=self.device,
                                      **self.slides.encoder_kwargs)
        self.c = np.ascontiguousarray(spec.prototypes, dtype=np.float32)
        self.phash = prototype_hash(self.c)
        self.key = spec.record_key()
        self.host = socket.gethostname()

    def __call__(self, entry):
        from ..fingerprint import bytes_fingerprint
        from ..slides.manifest import mpp_for
        from .worker import SlideRecord

        opts = self.spec.options
        path = Path(entry.path)  # where to read: the slide, or its local cached copy
        source = Path(getattr(entry, "source", None) or path)  # the slide itself (provenance)
        mpp = getattr(entry, "mpp", None)  # recorded in a manifest
        if mpp is None:
            mpp = mpp_for(self.slides.mpp, source)
        # the source's identity before reading: a slide rescanned meanwhile is seen as changed next time
        try:
            st, fingerprint = source.stat(), bytes_fingerprint(path)  # a cached copy holds the same bytes
        except OSError:
            st = fingerprint = None  # embed_slide names the problem
        res = embed_slide(path, self.encoder, self.c, method=opts.method, aggregate_kwargs=opts.aggregate_kwargs(),
                          options=self.slides.options, slide_id=entry.slide_id, mpp=mpp,
                          device=self.device, text_prototypes=self.slides.text_prototypes,
                          **({"mpp_keys": tuple(self.slides.mpp_keys)} if self.slides.mpp_keys else {}))
        if st is None:
            st, fingerprint = source.stat(), bytes_fingerprint(path)
        emb = np.ascontiguousarray(res.embedding.astype(opts.dtype))
        t = res.timing
        meta = {
            "method": opts.method, "options": self.key,
            "taus": list(opts.taus) if opts.method == "proalign" else None,
            "prototypes": {"hash": self.phash, "path": str(Path(self.spec.prototypes_path).resolve()),
                           "k": int(self.c.shape[0])},
            "slide": {"path": str(source.resolve()), "bytes": st.st_size, "mtime": int(st.st_mtime),
                      "fingerprint": fingerprint, "level": res.grid.level,
                      "patch_size_level0": res.grid.patch_size_level0, "mpp": res.grid.level0_mpp,
                      **({"read_from": "cache"} if source != path else {})},
            "encoder": self.encoder.info() if hasattr(self.encoder, "info") else self.slides.encoder,
            "slide_options": asdict(self.slides.options), "timing": t,
            "engine_version": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "worker": {"host": self.host, "pid": os.getpid(), "device": str(self.device)},
        }
        if self.spec.shard:
            meta["shard"] = self.spec.shard
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # --gpus: this worker's GPU
            meta["worker"]["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
        return SlideRecord(entry.slide_id, emb, res.n_patches, meta, read_s=t["grid_s"] + t["patches_s"],
                           aggregate_s=t["encode_s"] + t["aggregate_s"], nbytes=st.st_size)


def embed_archive(archive: str | Path | Sequence, encoder: str, weights: str | Path, prototypes: str | Path,
                  store: str | Path, *,
                  options: EmbedOptions = EmbedOptions(), slide_options: SlideOptions = SlideOptions(),
                  encoder_kwargs: dict | None = None, device: str | None = None, mpp: dict | None = None,
                  text_prototypes: np.ndarray | None = None, overwrite: bool = False,
                  mpp_keys: Sequence[str] = (), **scheduling):
    """Every slide file under `archive` -> one record each in `store` (resumable, sharded, retried:
    see scheduler.run_archive for `scheduling`, cache_dir and duplicates included). `archive` may
    also be a list of entries, e.g. `read_slide_manifest(...).entries` (their recorded size and mpp
    are used). Of several files with one slide id only the first in sorted path order is embedded
    (`manifest.duplicate_ids`, as the manifest does); the others are listed in the report's
    `duplicates`. `mpp_keys`: custom property names holding the mpp of slides whose standard
    metadata has none (--custom-mpp-keys; slides/mpp.py). Returns the run report."""
    from ..features.io import FeatureFileEntry
    from ..prototypes.io import read_prototype_file
    from ..slides.manifest import duplicate_ids
    from ..slides.patching import list_slide_files
    from .scheduler import run_archive

    if isinstance(archive, (str, Path)):
        paths = list_slide_files(archive)
        if not paths:
            raise ValueError(f"no slide files found under {archive}")
        entries = [FeatureFileEntry(p.stem, p) for p in paths]
    else:
        entries = list(archive)
        if not entries:
            raise ValueError("no slides to embed (an empty manifest?)")
    # one file per slide id: records, the store and the cache are keyed by it
    dup = duplicate_ids([(e.slide_id, e.path) for e in entries])
    duplicates = {sid: list(paths) for sid, paths in (scheduling.pop("duplicates", None) or {}).items()}
    for n in sorted(dup):
        duplicates.setdefault(entries[n].slide_id, []).append(str(entries[n].path))
    entries = [e for n, e in enumerate(entries) if n not in dup]
    c, _ = read_prototype_file(prototypes)
    slides = SlideEncoding(encoder, str(weights), dict(encoder_kwargs or {}), device, slide_options, dict(mpp or {}),
                       text_prototypes, tuple(mpp_keys or ()))
    spec = SlideFileSpec(c, str(prototypes), slides, options, scheduling.pop("threads", None))
    return run_archive(entries, spec, store, overwrite=overwrite, duplicates=duplicates, **scheduling)
