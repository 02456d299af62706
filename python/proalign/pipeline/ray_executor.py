"""The per-slide worker as Ray actors (`embed --backend ray`, or `--scheduler ray`).

Each actor holds one worker (`spec.build()`: prototypes, or an encoder, loaded once) and embeds the slides it is handed;
results stream back to the driver, the single writer, which stores each one as it arrives. The
scheduler keeps the queue: an actor gets its next slide when it returns one (two in flight per
actor, so the actor never waits for the round trip). A slide whose actor dies (node lost, OOM) or
raises is retried once on another try, then quarantined, exactly like the local backend; a dead
actor is replaced. An actor runs its slides one at a time in the order handed to it, so when it
dies only the first of its unfinished slides was being embedded: that one loses a try, the one
queued behind it is put back without losing one (`requeued`). A replacement actor must finish
its setup (`ready`) before it is handed a slide; when it cannot, the run stops with
WorkerStartError (raised by the next `wait()`, after the results already read are delivered).
Feature files must be readable at the same path on every node.

`ray.init` runs here unless Ray is already initialised: "auto" or "ray://..." joins a cluster;
`address=None` starts a local Ray head for this run (`LocalRayHead`) in its own session, so that
a SIGTERM to the run's process group (SLURM's, `kill -- -PGID`) reaches only the writer, which
finishes the slides in flight: the daemons `ray.init()` starts itself share the group, die of
that signal, and take the driver down with an abort.
"""
from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .executors import Event, WorkerStartError
from .worker import describe

HEAD_START_S = 120.0  # longest wait for the local head to accept the driver

DEPTH = 2  # slides in flight per actor


class _Actor:
    def __init__(self, spec):
        self.worker = spec.build()

    def ready(self) -> bool:
        return True

    def run(self, entry):
        try:
            return ("ok", self.worker(entry))
        except Exception as e:
            return ("error", describe(e))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _setup_error(e: BaseException) -> str:
    """The actor's own setup error from a RayActorError (the last line naming an exception)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    return named[-1] if named else _first_line(e)


def _die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs this child when the process that started it ends, however
    it ends (Ray's own daemons die with the `ray start` that started them the same way)."""
    if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayHead:
    """`ray start --head --block` in its own session, bound to this process (it dies with it)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths are limited
        self.log = Path(self.temp) / "head.log"
        ray_exe = Path(sys.executable).parent / "ray"
        cmd = ([str(ray_exe)] if ray_exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]) + [
            "start", "--head", "--block", f"--port={self.port}", "--include-dashboard=false",
            f"--temp-dir={self.temp}", "--disable-usage-stats"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        self.address = f"127.0.0.1:{self.port}"

    def connect(self, ray, **init) -> None:
        """ray.init against the head once it listens (it takes a few seconds to start)."""
        deadline = time.time() + HEAD_START_S
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the local Ray head exited (code {self.proc.returncode}):\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"the local Ray head did not start within {HEAD_START_S:.0f} s "
                                       f"(its log: {self.log})") from None
                time.sleep(0.2)
        ray.init(address=self.address, **init)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops its daemons on SIGTERM
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


class RayExecutor:
    name = "ray"

    def __init__(self, spec, n: int, address: str | None = None, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, init_kwargs: dict | None = None):
        try:
            import ray
        except ImportError as e:
            raise RuntimeError("--backend ray needs Ray: pip install 'proalign-engine[ray]' "
                               f"(ray[data]) ({e})") from e
        self.ray = ray
        self.owns_ray = not ray.is_initialized()
        self.head: LocalRayHead | None = None
        on_sigterm = signal.getsignal(signal.SIGTERM)
        if self.owns_ray and address is None and not init_kwargs:
            self.head = LocalRayHead()
            try:
                self.head.connect(ray, log_to_driver=False)
            except BaseException:
                self.head.close()
                raise
        elif self.owns_ray:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **(init_kwargs or {}))
        if self.owns_ray and on_sigterm is not None and threading.current_thread() is threading.main_thread():
            # ray.init installs its own SIGTERM handler (exit at once); the writer's (finish the
            # slides in flight, exit 3) must stay
            signal.signal(signal.SIGTERM, on_sigterm)
        self.cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(_Actor)
        self.spec, self.n, self.slots = spec, n, n * DEPTH
        self.refs: dict = {}  # object ref -> slot
        self.queued: list[list] = [[] for _ in range(n)]  # each actor's unfinished refs, in the order handed out
        self.restarts = 0
        self.start_error: WorkerStartError | None = None  # raised by the next wait() or submit()
        self.actors = [self.cls.remote(spec) for _ in range(n)]
        try:
            self._check_ready(self.actors)  # setup errors surface here, once
        except WorkerStartError:
            self.close(drop=True)
            raise

    def _check_ready(self, actors) -> None:
        try:
            self.ray.get([a.ready.remote() for a in actors])
        except self.ray.exceptions.RayError as e:
            raise WorkerStartError(f"a Ray actor could not start: {_setup_error(e)}") from e

    def submit(self, slot: int, entry) -> None:
        if self.start_error is not None:
            raise self.start_error
        a = slot % self.n
        ref = self.actors[a].run.remote(entry)
        self.refs[ref] = slot
        self.queued[a].append(ref)

    def _replace(self, a: int) -> None:
        """A fresh actor for a dead one, handed slides only once its setup has finished."""
        try:
            self.ray.kill(self.actors[a])
        except Exception:
            pass
        self.restarts += 1
        if self.restarts > 4 * self.n + 100:
            self.start_error = WorkerStartError(f"Ray actors keep dying ({self.restarts} restarts); giving up")
            return
        self.actors[a] = self.cls.remote(self.spec)
        try:
            self._check_ready([self.actors[a]])
        except WorkerStartError as e:
            self.start_error = e

    def _event(self, slot: int, ref) -> Event:
        """The event of a finished ref whose actor is alive (raises RayActorError when it died)."""
        try:
            status, value = self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            raise
        except self.ray.exceptions.RayError as e:
            return Event(slot, error=f"Ray task failed: {_first_line(e)}")
        return Event(slot, result=value) if status == "ok" else Event(slot, error=value)

    def _actor_died(self, a: int, error: BaseException) -> list[Event]:
        """Actor `a` is gone: the first of its unfinished slides was being embedded (one failed
        try); the ones queued behind it never started (put back, no try counted)."""
        events, charged = [], False
        for ref in self.queued[a]:
            slot = self.refs.pop(ref)
            done, _ = self.ray.wait([ref], timeout=0)
            if done:  # it may have finished before the actor died
                try:
                    events.append(self._event(slot, ref))
                    continue
                except self.ray.exceptions.RayActorError:
                    pass
            if not charged:
                events.append(Event(slot, error=f"Ray actor died while embedding this slide: {_first_line(error)}",
                                    died=True))
                charged = True
            else:
                events.append(Event(slot, requeued=True))
        self.queued[a] = []
        self._replace(a)
        return events

    def wait(self, timeout: float) -> list[Event]:
        if self.start_error is not None:  # found by the previous call, after delivering its results
            raise self.start_error
        if not self.refs:
            return []
        ray = self.ray
        ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready:
            more, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
            ready = list({r: None for r in [*ready, *more]})
        events = []
        for ref in ready:
            if ref not in self.refs:
                continue  # reported with its actor's death
            slot = self.refs[ref]
            a = slot % self.n
            try:
                ev = self._event(slot, ref)
            except ray.exceptions.RayActorError as e:
                events.extend(self._actor_died(a, e))
                continue
            del self.refs[ref]
            self.queued[a].remove(ref)
            events.append(ev)
        return events

    def close(self, drop: bool = False) -> None:
        ray = self.ray
        if not drop and self.refs:
            ray.wait(list(self.refs), num_returns=len(self.refs), timeout=30)
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        if self.owns_ray:
            ray.shutdown()
        if self.head is not None:
            self.head.close()
            self.head = None
