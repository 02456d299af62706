"""The per-slide worker: one slide in -> one store record out.

`FeatureFileSpec(...).build()` gives a `FeatureFileWorker`; `worker(entry)` reads one slide's patch features,
embeds them and returns a `SlideRecord` (embedding, N, provenance) that the single writer stores
as it is. The worker never touches the store and holds no open files between slides; the spec
is plain data (it is pickled to processes and Ray actors), so any scheduler can run it:
in-process, a local process pool, Ray actors (scheduler.run_archive).

The contract a scheduler relies on, for any kind of worker, is the `WorkerSpec` protocol below:
`FeatureFileSpec` (here: feature files) and `slide_worker.SlideFileSpec` (slide files: its worker
loads the encoder once and calls embed_slides.embed_slide per entry) implement it.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from .._version import __version__
from ..defaults import DEFAULT_PROALIGN, default_prior, default_taus
from ..errors import FeatureFileError, ProAlignError


@dataclass(frozen=True)
class EmbedOptions:
    method: str = "proalign"
    taus: tuple[float, ...] = default_taus()
    over: str = DEFAULT_PROALIGN["over"]
    moments: int = DEFAULT_PROALIGN["moments"]  # 2: also each prototype's weighted variance
    # over=prototypes: pseudo-patches per prototype, one number or one per tau (None: the default's)
    prior: float | Sequence[float] | None = None
    dtype: str = "float16"  # how embeddings are stored
    backend: str | None = None  # None: fastest live backend
    encoder_id: str | None = None  # default: the feature file's `encoder` attribute
    panther_eps: float = 1.0  # METHOD.md defaults; PANTHER's released config.json runs 0.1
    panther_prior: float = 1.0  # PANTHER prior_strength (name kept: records store it); PANTHER runs 0.001

    def __post_init__(self):
        if self.prior is None:
            object.__setattr__(self, "prior", default_prior(self.over, self.taus))
        if self.method == "proalign":  # a clear error now, not one per slide
            from ..ops.proalign_attention.reference import check_options, compact_prior

            check_options(self.over, self.moments, self.prior)
            # as records store it (one number, or a list per row): the resume check compares like with like
            object.__setattr__(self, "prior", compact_prior(self.prior, len(self.taus)))

    def key(self, prototypes_hash: str) -> dict:
        """What a stored record must match to count as done (the backend does not change it)."""
        k = {"method": self.method, "dtype": self.dtype, "prototypes": prototypes_hash}
        if self.method == "proalign":
            k.update(taus=list(self.taus), over=self.over, moments=self.moments, prior=self.prior)
        if self.method == "panther":
            k.update(eps=self.panther_eps, prior_strength=self.panther_prior)
        return k

    def aggregate_kwargs(self) -> dict:
        if self.method == "proalign":
            return {"tau": list(self.taus) if len(self.taus) > 1 else self.taus[0], "over": self.over,
                    "moments": self.moments, "prior": self.prior}
        if self.method == "panther":
            return {"eps": self.panther_eps, "prior_strength": self.panther_prior}
        return {}


@dataclass(frozen=True)
class FeatureFileSpec:
    """Everything a worker needs, by value (it travels to processes and Ray actors)."""
    prototypes: np.ndarray  # (K, d) float32
    prototypes_path: str  # provenance only: workers never open it
    options: EmbedOptions = EmbedOptions()
    threads: int | None = None  # numba/torch threads in this worker; None: keep the defaults
    shard: str | None = None  # "i/n", provenance only

    def build(self) -> "FeatureFileWorker":
        return FeatureFileWorker(self)

    def record_key(self) -> dict:
        from ..prototypes.io import prototype_hash

        return self.options.key(prototype_hash(self.prototypes))

    def describe(self) -> dict:
        from dataclasses import asdict

        from ..aggregate import resolve_backend

        o = self.options
        backend = resolve_backend(o.method, o.backend, options=o.aggregate_kwargs()).name
        return {"prototypes": self.prototypes_path, "options": {**asdict(o), "backend": backend}}


@dataclass
class SlideRecord:
    """One store record, ready to write, plus what the run report sums up."""
    slide_id: str
    embedding: np.ndarray
    n_patches: int
    meta: dict
    read_s: float = 0.0
    aggregate_s: float = 0.0
    nbytes: int = 0  # size of the feature file


@runtime_checkable
class WorkerSpec(Protocol):
    """What the scheduler (run_archive) needs of a worker spec. The spec is plain data: it is
    pickled to worker processes and Ray actors."""
    threads: int | None  # numba/torch threads per worker; the scheduler sets it (dataclasses.replace)
    shard: str | None  # "i/n", provenance only; set by the scheduler

    def build(self) -> Callable[..., SlideRecord]:
        """The worker, `worker(entry) -> SlideRecord`, raising (naming the slide) for a bad slide;
        called once per process or actor."""

    def record_key(self) -> dict:
        """The `options` a stored record must carry to count as done."""

    def describe(self) -> dict:
        """{"prototypes": ..., "options": ...} for the run report."""


def describe(e: BaseException) -> str:
    """One line for the report: our errors already name the slide, file and problem."""
    if isinstance(e, ProAlignError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def set_threads(threads: int | None) -> int:
    """Set the threads numba, torch and the CPU tile decoders use in this process (None: keep the
    defaults); returns the count in effect. Records do not depend on it (the numba kernels cut a
    slide into work items by its length alone)."""
    import torch

    from ..slides.patches import set_decode_threads

    try:
        import numba
    except ImportError:
        numba = None
    if threads:
        set_decode_threads(threads)
        torch.set_num_threads(threads)
        if numba is not None:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return numba.get_num_threads() if numba is not None else torch.get_num_threads()


class FeatureFileWorker:
    """Callable: `FeatureFileEntry` -> `SlideRecord`; raises (naming the slide) when the slide is bad."""

    def __init__(self, spec: FeatureFileSpec):
        from ..aggregate import resolve_backend
        from ..prototypes.io import prototype_hash

        self.spec = spec
        self.c = np.ascontiguousarray(spec.prototypes, dtype=np.float32)
        self.phash = prototype_hash(self.c)
        self.key = spec.options.key(self.phash)
        self.threads = set_threads(spec.threads)
        self.backend = resolve_backend(spec.options.method, spec.options.backend,
                                       options=spec.options.aggregate_kwargs()).name
        self.host = socket.gethostname()

    def __call__(self, entry) -> SlideRecord:
        from ..aggregate import aggregate
        from ..features.io import check_slide_id, read_features
        from ..fingerprint import bytes_fingerprint, features_fingerprint

        opts = self.spec.options
        check_slide_id(entry.slide_id, str(entry.path))
        t0 = time.perf_counter()
        try:
            # .pt: hashed before reading, so a file replaced meanwhile is seen as changed next time
            p = Path(entry.path)
            fingerprint = bytes_fingerprint(p) if p.suffix != ".h5" and p.is_file() else None
            ff = read_features(entry.path, entry.slide_id, coords=False)
        except ProAlignError:
            raise
        except Exception as e:  # a reader that let something else through: still this slide's problem
            raise FeatureFileError(entry.path, f"unreadable: unexpected {type(e).__name__}: {e}", entry.slide_id) from e
        t1 = time.perf_counter()
        if ff.features.shape[1] != self.c.shape[1]:
            raise FeatureFileError(entry.path, f"feature dim {ff.features.shape[1]} does not match the prototypes' "
                                               f"dim {self.c.shape[1]}", entry.slide_id)
        emb = aggregate(ff.features, self.c, method=opts.method, backend=opts.backend, **opts.aggregate_kwargs())
        emb = np.ascontiguousarray(emb.astype(opts.dtype))
        t2 = time.perf_counter()
        # .h5: the rows just embedded are hashed (what a resume compares with the file)
        source = {**ff.source, "fingerprint": fingerprint or features_fingerprint(ff.features)}
        if getattr(entry, "source", None) is not None:  # read from a local cached copy: name the original
            st = Path(entry.source).stat()
            source.update(path=str(Path(entry.source).resolve()), bytes=st.st_size, mtime=int(st.st_mtime),
                          read_from="cache")
        meta = {
            "method": opts.method,
            "options": self.key,
            "taus": list(opts.taus) if opts.method == "proalign" else None,
            "prototypes": {"hash": self.phash, "path": str(Path(self.spec.prototypes_path).resolve()),
                           "k": int(self.c.shape[0])},
            "feature_source": source,
            "encoder": opts.encoder_id or ff.attrs.get("encoder"),
            "backend": self.backend,
            "engine_version": __version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "worker": {"host": self.host, "pid": os.getpid(), "threads": self.threads},
        }
        if self.spec.shard:
            meta["shard"] = self.spec.shard
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            meta["worker"]["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
        return SlideRecord(entry.slide_id, emb, len(ff.features), meta, t1 - t0, t2 - t1, int(source["bytes"]))
