"""A metadata probe that crashes its process on one slide (as a segfault in a native reader would);
used by test_archive_slides.py to check that only that slide is marked. FaultySpec: a per-slide
worker with faults, for test_archive.py (importable by worker processes and Ray actors: run them
with this folder on PYTHONPATH)."""
import dataclasses
import os
import signal
import time


def probe(job):
    if "crash" in job[1]:
        os._exit(139)
    return {"slide_id": job[0], "path": job[1], "status": "ok", "error": ""}


@dataclasses.dataclass(frozen=True)
class FaultySpec:
    """`base` (a FeatureFileSpec) with faults: `load_s` of setup (a model being loaded); slides in `crash`
    kill their worker process with SIGKILL once started (creating the file `broken` first, if
    given); setup fails while `broken` exists; slides in `mislabel` return a record naming another
    slide."""
    base: object
    load_s: float = 0.0
    crash: tuple = ()
    broken: str | None = None
    mislabel: tuple = ()
    threads: int | None = None
    shard: str | None = None

    def record_key(self) -> dict:
        return self.base.record_key()

    def describe(self) -> dict:
        return self.base.describe()

    def build(self):
        if self.broken and os.path.exists(self.broken):
            raise RuntimeError(f"model weights unreadable: {self.broken} (test)")
        time.sleep(self.load_s)
        worker = dataclasses.replace(self.base, threads=self.threads, shard=self.shard).build()
        return _FaultyWorker(self, worker)


class _FaultyWorker:
    def __init__(self, spec, worker):
        self.spec, self.worker = spec, worker

    def __call__(self, entry):
        if entry.slide_id in self.spec.crash:
            if self.spec.broken:
                open(self.spec.broken, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        rec = self.worker(entry)
        if entry.slide_id in self.spec.mislabel:
            rec.slide_id += "-other"
        return rec
