"""Archive-scale runs: shards, a pull-based queue, one writer, retries, quarantine, clean stops.

    slides (manifest or folder) --shard i/n--> this node's slides --skip stored--> queue
    queue --(largest first, next slide to whichever worker is free)--> workers (spec.build())
    workers --EmbeddedSlide--> the writer (this process, the only one that opens the store)

- Shards: a slide belongs to shard `blake2b(slide id) mod n`: stable across machines and runs,
  so the n shards are disjoint and together complete whatever order the manifest lists.
- Faults: a slide whose worker raised or died is put back at the end of the queue once (`retries`),
  then quarantined: the run report lists its path, tries and every reason. Rerunning retries the
  quarantined slides and skips every stored one whose source file is unchanged (source_check.py;
  `on_change` says what to do with the others). A slide handed to a worker that died before
  starting it goes back to the head of the queue without losing a try (report: `requeued`). A
  record naming another slide than the one handed out is a failed try, never stored.
- Store failures: after MAX_STORE_FAILURES slides in a row could not be stored (a full disk), the
  run stops (report: `aborted`, exit code 3), keeping every record stored; rerun to finish.
- Signals: the first SIGINT/SIGTERM stops handing out slides and finishes the ones in flight
  (stored); a second drops them (their workers are killed; nothing half-written: a record is one
  LMDB transaction). The report is written and the exit code is 3 (`EXIT_INTERRUPTED`).
- Executors: in-process (`workers=1`), local processes (`workers>1`) or Ray actors; see
  executors.py and ray_executor.py.
"""
from __future__ import annotations

from typing import Iterator

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import ProAlignError, SourceChangedError, StoreError, StoreOptionsError, StoreWriteError
from ..features.io import FeatureFileEntry, check_slide_id
from ..report_file import write_report
from .executors import Executor, InlineExecutor, ProcessExecutor, SlideDropped
from .source_check import ON_CHANGE, check_source
from .worker import EmbedOptions, FeatureFileSpec, WorkerSpec, describe

log = logging.getLogger("proalign.embed")

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 3
MAX_STORE_FAILURES = 3  # slides in a row that could not be stored before the run stops (a full disk)


# -- shards --------------------------------------------------------------------------------------
def _log_reason(reason: str) -> str:
    """A failure reason as logged per slide: without the missing-mpp fix, which the command says
    once for the run (slides/mpp.py; the report keeps the whole reason)."""
    from ..slides.mpp import without_fix

    return without_fix(reason)


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" (0 <= i < n) -> (i, n)."""
    try:
        i, n = (int(p) for p in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n with 0 <= i < n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n (shards are numbered from 0, as SLURM array tasks)")
    return i, n


def shard_of(slide_id: str, n: int) -> int:
    """The shard of a slide: a stable hash of its id (never Python's salted hash())."""
    h = hashlib.blake2b(slide_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") % n


def select_shard(entries: Sequence[FeatureFileEntry], index: int, count: int) -> list[FeatureFileEntry]:
    return [e for e in entries if shard_of(e.slide_id, count) == index]


# -- GPUs ----------------------------------------------------------------------------------------
def parse_gpus(text: str, available: int) -> list[int]:
    """"0,1,3" -> [0, 1, 3]: distinct GPU numbers below `available` (torch's device count)."""
    try:
        ids = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--gpus wants comma-separated GPU numbers, got {text!r}") from None
    if available < 1:
        raise ValueError(f"--gpus {text}: this machine has no CUDA GPU (torch sees none); leave out --gpus "
                         "to run on the CPU")
    bad = [i for i in ids if not 0 <= i < available]
    if not ids or bad or len(set(ids)) != len(ids):
        why = (f"no such GPU {bad[0]}" if bad else "no GPU listed" if not ids else "a GPU is listed twice")
        raise ValueError(f"--gpus {text}: this machine has {available} CUDA GPU(s) (0..{available - 1}); {why}")
    return ids


def gpu_env(gpus: Sequence[int | str], visible: str | None = None) -> list[dict[str, str]]:
    """The environment of each GPU's worker: CUDA_VISIBLE_DEVICES = that GPU. When this process
    already sees a subset (CUDA_VISIBLE_DEVICES="4,6"), GPU i means the i-th of it, as in torch."""
    shown = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    out = []
    for g in gpus:
        g = str(g).strip()
        out.append({"CUDA_VISIBLE_DEVICES": shown[int(g)] if g.isdigit() and int(g) < len(shown) else g})
    return out


# -- report --------------------------------------------------------------------------------------
def _stage_times() -> dict[str, float]:
    return {"scan_s": 0.0, "read_s": 0.0, "aggregate_s": 0.0, "write_s": 0.0}


@dataclass
class RunReport:
    store: str
    prototypes: str
    options: dict
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # quarantined: id -> last reason
    quarantine: dict[str, dict] = field(default_factory=dict)  # id -> {path, tries, reasons}
    retried: dict[str, list[str]] = field(default_factory=dict)  # stored after a failed try: id -> reasons
    requeued: list[str] = field(default_factory=list)  # put back untried: their worker died before starting them
    timing: dict[str, float] = field(default_factory=_stage_times)
    patches: int = 0
    shard: str | None = None
    scheduler: str = "inline"
    workers: int = 1
    interrupted: str | None = None  # the signal that stopped the run
    aborted: str | None = None  # why the run stopped itself (the store could not be written)
    pending: list[str] = field(default_factory=list)  # not done because the run was stopped
    in_flight_at_stop: list[str] = field(default_factory=list)  # being embedded at the first signal
    stored_after_stop: list[str] = field(default_factory=list)  # stored after the first signal
    cache: dict = field(default_factory=dict)  # the local slide cache (cache_dir): counts, fallbacks
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # slide id -> other files, not embedded
    on_change: str = "redo"  # what was done with stored slides whose source file changed
    changed_sources: dict[str, str] = field(default_factory=dict)  # id -> "path: what changed"
    unfingerprinted: list[str] = field(default_factory=list)  # stored by an older version: size/mtime compared
    report_path: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted and not self.aborted

    @property
    def exit_code(self) -> int:
        if self.interrupted or self.aborted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.failed else EXIT_OK

    def summary(self) -> str:
        t = self.timing.get("total_s", 0.0)
        s = (f"{len(self.done)} embedded, {len(self.skipped)} already stored, {len(self.failed)} failed "
             f"in {t:.1f} s ({self.patches} patches)")
        if self.changed_sources:
            s += (f"; {len(self.changed_sources)} source file(s) changed since stored: "
                  + ("embedded again" if self.on_change == "redo" else "records kept (--on-change keep)"))
        if self.retried:
            s += f"; {len(self.retried)} stored on a retry"
        if self.duplicates:
            s += (f"; {sum(map(len, self.duplicates.values()))} file(s) not embedded: their slide id is taken "
                  "(see the report's duplicates)")
        if self.cache.get("fallback"):
            s += f"; {len(self.cache['fallback'])} read from the original path (no cache copy: see the report)"
        if self.interrupted:
            s += f"; stopped by {self.interrupted}, {len(self.pending)} not done (rerun the same command to finish)"
        if self.aborted:
            s += f"; stopped: {self.aborted}; {len(self.pending)} not done"
        return s

    def write(self, path: Path) -> None:
        """Write the report (report_file.write_report: the temp folder when the store's disk is full)."""
        self.report_path = str(write_report(path, {**asdict(self), "ok": self.ok, "exit_code": self.exit_code}))


# -- progress ------------------------------------------------------------------------------------
def _drain(events, inflight: dict, sig) -> Iterator:
    """Each event of a batch, its slide counted in flight (for a stop's snapshot) until stored."""
    for ev in events:
        sid = inflight[ev.slot].entry.slide_id
        yield ev
        sig.storing.discard(sid)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """A tqdm bar on a terminal (plain log lines otherwise) with slides/h, patches/s and an ETA
    by remaining feature bytes (slides differ 10x in size, so a per-slide ETA would mislead)."""

    def __init__(self, total: int, total_bytes: int, enabled: bool | None):
        self.total, self.total_bytes = total, total_bytes
        self.count = self.patches = self.bytes = 0
        self.t0 = time.perf_counter()
        self.last_log = self.t0
        tty = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="slide", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        self.every = max(1, total // 100)

    def rates(self) -> tuple[float, float, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        slides_h = self.count / dt * 3600
        patches_s = self.patches / dt
        if self.total_bytes and self.bytes:
            eta = (self.total_bytes - self.bytes) / (self.bytes / dt)
        else:
            eta = (self.total - self.count) / (self.count / dt) if self.count else float("inf")
        return slides_h, patches_s, max(eta, 0.0)

    def line(self) -> str:
        slides_h, patches_s, eta = self.rates()
        return f"{slides_h:,.0f} slides/h, {patches_s:,.0f} patches/s, ETA {_hms(eta)}"

    def step(self, slide_id: str, status: str, patches: int, nbytes: int) -> None:
        self.count += 1
        self.patches += patches
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.line()} | {slide_id}: {status}", refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if (status not in ("done", "skipped") or self.count % self.every == 0 or self.count == self.total
                or now - self.last_log > 30):
            self.last_log = now
            log.info("[%d/%d] %s %s (%s)", self.count, self.total, slide_id, status, self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- signals -------------------------------------------------------------------------------------
class _Signals:
    """First SIGINT/SIGTERM: stop handing out slides. Second: drop the slides in flight (raising
    SlideDropped in-process while the inline worker computes; never during a store write)."""

    def __init__(self, enabled: bool):
        self.count, self.name = 0, None
        self.executor = None
        self.inflight: dict = {}  # the scheduler's slot -> task, to note what was in flight
        self.storing: set[str] = set()  # results received, not yet stored: in flight too
        self.in_flight_at_stop: list[str] = []
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._old: dict = {}

    def _handle(self, signum, frame):
        self.count += 1
        self.name = self.name or signal.Signals(signum).name
        if self.count == 1:
            self.in_flight_at_stop = sorted({t.entry.slide_id for t in list(self.inflight.values())} | self.storing)
            log.warning("%s: finishing the slides in flight, then stopping (again to drop them)", self.name)
        elif self.count == 2:
            log.warning("%s again: dropping the slides in flight", signal.Signals(signum).name)
            if isinstance(self.executor, InlineExecutor) and self.executor.busy:
                raise SlideDropped()

    def __enter__(self):
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# -- the run -------------------------------------------------------------------------------------
@dataclass
class _Task:
    entry: FeatureFileEntry
    size: int
    tries: int = 0
    reasons: list[str] = field(default_factory=list)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _entry_size(entry) -> int:
    """The slide's bytes: as recorded in a manifest entry (no stat on network storage), else stat."""
    size = getattr(entry, "size_bytes", None)
    return int(size) if size is not None else _size(Path(entry.path))


def _stored_metas(store, key: dict, overwrite: bool, run_ids: set[str]) -> dict[str, dict | None]:
    """Each stored slide's provenance, its `options` completed for legacy records (None for a
    damaged record, which is redone). A store holds one option set: records of other options are
    refused (StoreOptionsError) unless `overwrite` redoes them; other-option records outside this
    run are reported."""
    from ..store import normalise_options, option_diff

    out: dict[str, dict | None] = {}
    other: dict[str, list] = {}
    for sid in store:
        try:
            meta = store.record(sid).meta
        except StoreError as err:  # a damaged record counts as missing: redo it
            log.warning("%s: stored record is damaged (%s); a run that includes it embeds it again", sid, err)
            out[sid] = None
            continue
        out[sid] = meta = {**meta, "options": normalise_options(meta.get("options"), meta.get("slide_options"))}
        if meta["options"] != key and (not overwrite or sid not in run_ids):
            other.setdefault(json.dumps(meta["options"], sort_keys=True), []).append(sid)
    if other:
        opts, ids = next(iter(other.items()))
        diff = option_diff(json.loads(opts), key)
        what = (f"{sum(map(len, other.values()))} records of {store.path} were made with other options "
                f"[stored vs this run: {diff}], e.g. {ids[0]!r}: {opts}; this run makes "
                f"{json.dumps(key, sort_keys=True)}{_option_hint(diff)}")
        if not overwrite:
            raise StoreOptionsError(f"{what}. One store holds one option set: write to another --out, repeat the "
                                    "store's options, or --overwrite to redo this run's slides")
        log.warning("%s; those not in this run stay as they are", what)
    return out


def _option_hint(diff: str) -> str:
    """How to match a store whose records differ in pen-mark exclusion (records made before it
    existed count as keep_penmarks=True)."""
    if "keep_penmarks: True vs False" in diff:
        return " (the store's slides were cut with pen marks kept: add --keep-penmarks to add to it)"
    if "keep_penmarks: False vs True" in diff:
        return " (the store's slides were cut with pen marks excluded, the default: drop --keep-penmarks)"
    return ""


def _note_changed_sources(report: RunReport, store_path) -> None:
    """Log (or, with on_change="fail", refuse) the stored slides whose source file changed."""
    if report.unfingerprinted:
        log.warning("%d stored record(s) carry no content fingerprint (an older version wrote them): their "
                    "sources were compared by size and mtime only", len(report.unfingerprinted))
    changed = report.changed_sources
    if not changed:
        return
    lines = [f"{sid} ({what})" for sid, what in list(changed.items())[:20]]
    more = f" (and {len(changed) - 20} more)" if len(changed) > 20 else ""
    if report.on_change == "fail":
        raise SourceChangedError(
            f"{len(changed)} slide(s) stored in {store_path} were made from files that have changed since: "
            + "; ".join(lines) + more + ". Nothing was written. Rerun with --on-change redo to embed them again, "
            "or --on-change keep to keep their records")
    what = "embedding again" if report.on_change == "redo" else "keeping the stored records (--on-change keep)"
    log.warning("source file changed since stored, %s: %s%s", what, "; ".join(lines), more)


def _make_executor(kind: str, spec, workers: int, ray_options: dict, slide_timeout: float | None,
                   gpus: Sequence | None = None) -> Executor:
    if kind == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(spec, workers, **ray_options)
    if kind == "inline":
        return InlineExecutor(spec)
    env = gpu_env(gpus, os.environ.get("CUDA_VISIBLE_DEVICES")) if gpus else None
    return ProcessExecutor(spec, workers, slide_timeout=slide_timeout, slot_env=env)


def run_embedding(
    entries: Sequence[FeatureFileEntry],
    prototypes: str | Path,
    store_path: str | Path,
    options: EmbedOptions = EmbedOptions(),
    overwrite: bool = False,
    report_path: str | Path | None = None,
    progress: bool | None = None,
    **scheduling,
) -> RunReport:
    """The features path: embed `entries` (feature files) with `prototypes` into the store; see
    `run_archive` for `scheduling` (workers, scheduler, shard, retries, threads, ...)."""
    from ..aggregate import resolve_backend
    from ..prototypes.io import read_prototype_file

    c, _ = read_prototype_file(prototypes)
    resolve_backend(options.method, options.backend, options=options.aggregate_kwargs())  # a clear error now
    spec = FeatureFileSpec(c, str(prototypes), options, scheduling.pop("threads", None))
    return run_archive(entries, spec, store_path, overwrite=overwrite, report_path=report_path, progress=progress,
                       **scheduling)


def run_archive(
    entries: Sequence[FeatureFileEntry],
    spec: WorkerSpec,
    store_path: str | Path,
    *,
    overwrite: bool = False,
    report_path: str | Path | None = None,
    progress: bool | None = None,
    workers: int = 1,
    scheduler: str = "local",
    shard: str | tuple[int, int] | None = None,
    retries: int = 1,
    slide_timeout: float | None = None,
    gpus: Sequence[int | str] | None = None,
    ray_address: str | None = None,
    ray_cpus: float = 1.0,
    ray_gpus: float = 0.0,
    ray_init: dict | None = None,
    handle_signals: bool = True,
    cache_dir: str | Path | None = None,
    cache_ahead: int = 2,
    keep_cache: bool = False,
    cache_min_free: int = 256 << 20,
    duplicates: dict[str, list[str]] | None = None,
    on_change: str = "redo",
) -> RunReport:
    """Run any per-slide worker (`spec`: the worker.WorkerSpec protocol) over `entries` (this
    shard's share of them) into the store; see the module docstring. Returns the run report, also
    written as JSON (default `<store>/reports/run-<time>.json`).

    workers: 1 runs in this process, more start local worker processes (scheduler="local") or
    Ray actors (scheduler="ray"; ray_address, ray_cpus, ray_gpus, ray_init for `ray.init`).
    gpus=[0, 1, ...]: one local worker process per GPU, with CUDA_VISIBLE_DEVICES set to it.
    retries: further tries of a failed slide before quarantine. slide_timeout: seconds after which
    a local worker stuck on one slide is killed. handle_signals: SIGINT/SIGTERM stop cleanly.
    cache_dir: copy each slide to this local folder before it is handed out, `cache_ahead` slides
    ahead (queue order), deleting each copy once stored unless keep_cache; a failed copy falls back
    to the original path (report: `cache.fallback`). See slide_cache.py.
    duplicates: slide id -> files left out because another file has that id (slide_worker's
    listing, a slide manifest); recorded in the report (this shard's ids) and logged, and they do
    not change the exit code.
    on_change: a stored slide counts as done only while its source file is unchanged (size and
    content fingerprint, see source_check.py); a changed one is embedded again ("redo"), kept as
    stored ("keep"), or stops the run before anything is written ("fail": SourceChangedError).
    Either way the report lists it (`changed_sources`)."""
    from ..store import open_store

    t_start = time.perf_counter()
    _check_scheduling(scheduler, on_change, cache_dir)
    shard_text = None
    if shard is not None:
        i, n = parse_shard(shard) if isinstance(shard, str) else shard
        shard_text = f"{i}/{n}"
        entries = select_shard(entries, i, n)
        duplicates = {sid: p for sid, p in (duplicates or {}).items() if shard_of(sid, n) == i}
    spec, workers, kind = _plan_workers(spec, workers, scheduler, gpus, ray_cpus, shard_text)
    about = spec.describe()
    report = RunReport(str(store_path), str(about.get("prototypes")), about.get("options", {}),
                       shard=shard_text, scheduler=kind, workers=workers, on_change=on_change)
    if report_path is None:
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}"
        report_path = Path(store_path) / "reports" / f"run-{stamp}.json"
    report.report_path = str(report_path)
    _note_duplicates(report, entries, duplicates)

    with open_store(store_path, write=True) as store, _Signals(handle_signals) as sig:
        t0 = time.perf_counter()
        queue = _queue_slides(report, store, store_path, entries, spec.record_key(), overwrite, on_change)
        report.timing["scan_s"] = time.perf_counter() - t0
        log.info("%d slides to embed, %d already stored%s", len(queue), len(report.skipped),
                 f" (shard {shard_text})" if shard_text else "")
        run = _Run(report, store, store_path, sig, queue, retries)
        try:
            if queue and cache_dir is not None:  # copying starts while the workers start
                from .slide_cache import SlideCache

                run.cache = SlideCache(cache_dir, cache_ahead, keep_cache, cache_min_free)
                run.cache.plan([t.entry for t in itertools.islice(queue, run.cache.ahead)])
            if queue:
                run.executor = sig.executor = _make_executor(kind, spec, workers, {
                    "address": ray_address, "num_cpus": ray_cpus, "num_gpus": ray_gpus, "init_kwargs": ray_init},
                    slide_timeout, gpus)
            report.timing["start_workers_s"] = time.perf_counter() - t0 - report.timing["scan_s"]
            run.loop(Progress(len(queue), sum(t.size for t in queue), progress), inline=kind == "inline")
        except KeyboardInterrupt:  # signals not handled here (API default): drop what is in flight
            sig.name, sig.count = sig.name or "SIGINT", 2
            raise
        finally:
            run.close()
            _finish_report(report, sig, run, time.perf_counter() - t_start, workers)
            report.write(Path(report_path))
    return report


def _check_scheduling(scheduler: str, on_change: str, cache_dir) -> None:
    if scheduler not in ("local", "ray"):
        raise ValueError(f"unknown scheduler {scheduler!r}; choose local or ray")
    if on_change not in ON_CHANGE:
        raise ValueError(f"unknown on_change {on_change!r}; choose {', '.join(ON_CHANGE)}")
    if cache_dir is not None and scheduler == "ray":
        raise ValueError("a local slide cache (--cache-dir) is for the local scheduler: Ray actors may run on "
                         "other nodes")


def _plan_workers(spec, workers: int, scheduler: str, gpus, ray_cpus: float, shard_text: str | None):
    """(the spec every worker builds, the worker count, the executor kind: inline, processes, ray)."""
    if gpus and scheduler == "local":  # one worker process per GPU, each seeing only its own
        workers = len(gpus)
    workers = max(1, int(workers))
    threads = spec.threads
    if threads is None and (scheduler == "ray" or workers > 1):
        # one fixed count per worker, so every worker splits slides the same way
        threads = max(1, int(ray_cpus)) if scheduler == "ray" else max(1, (os.cpu_count() or 1) // workers)
    spec = dataclasses.replace(spec, threads=threads, shard=shard_text)
    kind = "ray" if scheduler == "ray" else ("processes" if workers > 1 or gpus else "inline")
    return spec, workers, kind


def _note_duplicates(report: RunReport, entries: Sequence[FeatureFileEntry], duplicates: dict | None) -> None:
    report.duplicates = {sid: list(paths) for sid, paths in (duplicates or {}).items()}
    kept = {e.slide_id: e.path for e in entries}
    for sid, paths in report.duplicates.items():
        log.warning("not embedded: %s (slide id %r is taken by %s; rename to embed)", ", ".join(paths), sid,
                    kept.get(sid, "another file"))


def _queue_slides(report: RunReport, store, store_path, entries: Sequence[FeatureFileEntry], key: dict,
                  overwrite: bool, on_change: str) -> deque[_Task]:
    """The slides still to do, largest first (with a pull-based queue the big slides do not end up
    last on one worker); bad slide ids are quarantined, stored ones skipped or redone (on_change)."""
    stored = _stored_metas(store, key, overwrite, {e.slide_id for e in entries})
    queue = []
    for e in entries:
        try:
            check_slide_id(e.slide_id, str(e.path))
        except ProAlignError as err:
            report.failed[e.slide_id] = str(err)
            report.quarantine[e.slide_id] = {"path": str(e.path), "tries": 0, "reasons": [str(err)]}
            continue
        meta = stored.get(e.slide_id)
        if not overwrite and meta is not None and meta["options"] == key:
            # stored with these options: done while its source file is the one it was made from
            check = check_source(meta, e.path)
            if check.legacy:
                report.unfingerprinted.append(e.slide_id)
            if not check.changed or on_change == "keep":
                report.skipped.append(e.slide_id)
            if check.changed:
                report.changed_sources[e.slide_id] = f"{check.path}: {check.detail}"
            if not check.changed or on_change != "redo":
                continue
        queue.append(_Task(e, _entry_size(e)))
    _note_changed_sources(report, store_path)
    return deque(sorted(queue, key=lambda t: -t.size))


class _Run:
    """One run's moving parts: the queue, the slides in flight per worker slot, the executor, the
    optional local slide cache; `loop` hands out slides and stores what comes back."""

    def __init__(self, report: RunReport, store, store_path, sig: _Signals, queue: deque[_Task], retries: int):
        self.report, self.store, self.store_path = report, store, store_path
        self.sig, self.queue, self.retries = sig, queue, retries
        self.executor: Executor | None = None
        self.cache = None
        self.inflight: dict[int, _Task] = {}
        sig.inflight = self.inflight
        self.store_failures = 0  # slides in a row that could not be stored
        self.bar: Progress | None = None

    def loop(self, bar: Progress, inline: bool) -> None:
        self.bar = bar  # rates from the first slide out
        idle = list(range(self.executor.slots))[::-1] if self.executor else []
        while self.queue or self.inflight:
            if self.sig.count >= 2 or self.report.aborted:
                break
            copying = self._hand_out(idle, inline)
            if self.sig.count and not self.inflight:
                break
            events = list(self.executor.wait(0.05 if copying else 0.2))
            self.sig.storing = {self.inflight[ev.slot].entry.slide_id for ev in events}
            for ev in _drain(events, self.inflight, self.sig):
                task = self.inflight.pop(ev.slot)
                idle.append(ev.slot)
                self._settle(task, ev)
                if self.report.aborted:
                    break  # the rest of this batch stays in flight: pending

    def _hand_out(self, idle: list[int], inline: bool) -> bool:
        """Give queued slides to idle slots; True when the next slide's local copy is not ready."""
        while idle and self.queue and self.sig.count == 0:
            task = self.queue[0]
            entry = task.entry
            if self.cache is not None:  # the local copy, or the original if it failed
                entry = self.cache.take(task.entry, timeout=0.05)
                if entry is None:  # not copied yet: store results and check timeouts meanwhile
                    return True
            self.queue.popleft()
            slot = idle.pop()
            if self.cache is not None:
                self.cache.plan([t.entry for t in itertools.islice(self.queue, self.cache.ahead)])
            task.tries += 1
            self.inflight[slot] = task
            try:
                self.executor.submit(slot, entry)
            except SlideDropped:
                break
            if inline:
                break  # done already: store it before taking the next
        return False

    def _settle(self, task: _Task, ev) -> None:
        """One worker event: put back untried, stored, retried or quarantined."""
        sid = task.entry.slide_id
        if ev.requeued:  # never started: back to the head of the queue, no try counted
            task.tries -= 1
            self.queue.appendleft(task)
            if sid not in self.report.requeued:
                self.report.requeued.append(sid)
            log.info("%s: put back untried (its worker died before starting it)", sid)
            return
        if ev.result is not None and ev.result.slide_id != sid:
            ev = type(ev)(ev.slot, error=f"the worker returned a record for slide "
                                         f"{ev.result.slide_id!r} instead of {sid!r}; not stored")
        if ev.result is not None:
            error = self._store(task, ev.result)
            if error is None:
                return
            ev = type(ev)(ev.slot, error=error)
        if self.cache is not None:  # a failed try: a retry copies it again
            self.cache.release(task.entry)
        self._fail(task, ev.error)

    def _store(self, task: _Task, r) -> str | None:
        """Write a result; None when stored, else the reason (a full disk stops the run after
        MAX_STORE_FAILURES in a row)."""
        sid, report = task.entry.slide_id, self.report
        try:
            tw = time.perf_counter()
            self.store.put(sid, r.embedding, r.n_patches, r.meta)
            report.timing["write_s"] += time.perf_counter() - tw
        except StoreWriteError as err:
            self.store_failures += 1
            if self.store_failures >= MAX_STORE_FAILURES:
                report.aborted = (f"{self.store_failures} slides in a row could not be stored in "
                                  f"{self.store_path} (the disk may be full): {err}; rerun the same "
                                  f"command to finish")
                log.error("stopping: %s", report.aborted)
            return describe(err)
        self.store_failures = 0
        report.done.append(sid)
        report.patches += r.n_patches
        report.timing["read_s"] += r.read_s
        report.timing["aggregate_s"] += r.aggregate_s
        if task.reasons:
            report.retried[sid] = list(task.reasons)
        if self.sig.count:
            report.stored_after_stop.append(sid)
        if self.cache is not None:  # stored: its local copy goes
            self.cache.release(task.entry)
        self.bar.step(sid, "done", r.n_patches, task.size)
        return None

    def _fail(self, task: _Task, error: str) -> None:
        sid = task.entry.slide_id
        task.reasons.append(error)
        if task.tries <= self.retries:
            log.warning("%s failed (try %d), will retry: %s", sid, task.tries, _log_reason(error))
            self.queue.append(task)
            return
        self.report.failed[sid] = error
        self.report.quarantine[sid] = {"path": str(task.entry.path), "tries": task.tries,
                                       "reasons": list(task.reasons)}
        log.error("%s failed: %s", sid, _log_reason(error))
        self.bar.step(sid, "FAILED", 0, task.size)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.executor is not None:
            self.executor.close(drop=self.sig.count >= 2 or bool(self.inflight))
        if self.cache is not None:
            self.cache.close()
            self.report.cache = self.cache.summary()


def _finish_report(report: RunReport, sig: _Signals, run: _Run, total: float, workers: int) -> None:
    """What is left pending, why the run stopped, and its rates."""
    report.pending = sorted([t.entry.slide_id for t in run.queue] + [t.entry.slide_id for t in run.inflight.values()])
    report.interrupted = sig.name if report.pending else None  # a signal after the last slide: done
    report.in_flight_at_stop = sig.in_flight_at_stop
    busy = report.timing["read_s"] + report.timing["aggregate_s"]
    report.timing.update({
        "total_s": total,
        "slides_per_s": len(report.done) / total if total > 0 else 0.0,
        "slides_per_h": 3600 * len(report.done) / total if total > 0 else 0.0,
        "patches_per_s": report.patches / total if total > 0 else 0.0,
        "worker_busy_fraction": busy / (total * workers) if total > 0 else 0.0,
    })
    if run.executor is not None and getattr(run.executor, "restarts", 0):
        report.timing["worker_restarts"] = run.executor.restarts
