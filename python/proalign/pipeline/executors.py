"""Where the per-slide worker runs: in the writer's process, or in a pool of local processes.

Every executor has `slots` (one slide in flight each), `submit(slot, entry)` and
`wait(timeout) -> [Event]`; the scheduler keeps the queue and hands the next slide to whichever
slot reports back first (pull-based: slides differ 10x in size, so nothing is assigned ahead).

Local processes come from a forkserver (a fresh interpreter, not a fork of the writer), so no
LMDB environment or writer lock is ever inherited by a worker. Workers and the forkserver ignore
SIGINT/SIGTERM (the writer decides what happens to the slide in flight; a SIGTERM to the whole
process group must not kill them) and workers exit when the writer's end of their pipe closes,
so a writer killed with SIGKILL leaves no workers behind.

A slide's timeout runs from when its worker reports it has started the slide (not from the
submit: a worker being (re)started loads its model first). A worker that cannot start raises
WorkerStartError from the next `wait()`, after the results already read have been delivered.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
from typing import Protocol

from ..errors import ProAlignError
from .worker import SlideRecord, describe


@dataclass
class Event:
    slot: int
    result: SlideRecord | None = None
    error: str | None = None
    died: bool = False  # the worker process/actor is gone (its slide counts as one failed try)
    requeued: bool = False  # the worker died before starting this slide: put it back, no try counted


class Executor(Protocol):
    """What the scheduler needs from an executor (InlineExecutor, ProcessExecutor, RayExecutor)."""
    name: str
    slots: int  # slides in flight at once (one per slot)

    def submit(self, slot: int, entry) -> None:
        """Start the slide `entry` on the free `slot`."""

    def wait(self, timeout: float) -> list[Event]:
        """Events (a result, a failure, a worker gone) that arrived within `timeout` seconds; raises
        WorkerStartError when a worker could not start, after delivering what was already read."""

    def close(self, drop: bool = False) -> None:
        """Stop the workers; `drop=True` abandons slides in flight instead of finishing them."""


class WorkerStartError(ProAlignError):
    """A worker could not start (its setup failed), so no slide could be embedded."""


class SlideDropped(BaseException):
    """Raised by the signal handler to abandon the slide being embedded in-process."""


def _signal_name(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class InlineExecutor:
    """The worker in the writer's own process: one slot, nothing to start."""
    name = "inline"

    def __init__(self, spec):
        self.worker = spec.build()
        self.slots = 1
        self.busy = False  # the signal handler may drop the slide only while this is True
        self._events: list[Event] = []

    def submit(self, slot: int, entry) -> None:
        self.busy = True
        try:
            self._events.append(Event(slot, result=self.worker(entry)))
        except Exception as e:  # a bad slide: the scheduler retries or quarantines it
            self._events.append(Event(slot, error=describe(e)))
        finally:
            self.busy = False

    def wait(self, timeout: float) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def close(self, drop: bool = False) -> None:
        pass


def _worker_main(conn, spec, env: dict | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update(env or {})  # e.g. CUDA_VISIBLE_DEVICES: before anything initialises CUDA
    try:
        worker = spec.build()
    except Exception as e:
        conn.send(("init_error", describe(e)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            entry = conn.recv()
        except (EOFError, OSError):
            return  # the writer is gone
        if entry is None:
            return
        try:
            conn.send(("started", None))  # the writer's slide timeout runs from here
        except OSError:
            return
        try:
            msg = ("ok", worker(entry))
        except Exception as e:
            msg = ("error", describe(e))
        try:
            conn.send(msg)
        except OSError:
            return


class ProcessExecutor:
    """`n` local worker processes, one slide each at a time, each with its own pipe."""
    name = "processes"

    def __init__(self, spec, n: int, slide_timeout: float | None = None, slot_env: list[dict] | None = None):
        self.spec, self.slots, self.slide_timeout = spec, n, slide_timeout
        self.slot_env = slot_env or [{} for _ in range(n)]  # environment of each slot's worker
        self.ctx = mp.get_context("forkserver")
        # workers fork from an interpreter that imported us; forkserver_signals makes the forkserver
        # itself ignore SIGTERM (imported there only)
        self.ctx.set_forkserver_preload([__name__, f"{__package__}.forkserver_signals"])
        self.procs: list = [None] * n
        self.conns: list = [None] * n
        self.held = [False] * n  # the slot's worker was handed a slide
        self.started_at: list[float | None] = [None] * n  # when the worker said it started that slide
        self.ready = [False] * n  # the worker said it is set up
        self.restarts = 0
        self.start_error: WorkerStartError | None = None  # raised by the next wait()
        self.pids: list[int] = []
        for i in range(n):
            self._start(i)

    def _start(self, i: int) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        p = self.ctx.Process(target=_worker_main, args=(child, self.spec, self.slot_env[i]),
                             name=f"proalign-worker-{i}", daemon=True)
        p.start()
        child.close()
        self.procs[i], self.conns[i] = p, parent
        self.held[i], self.started_at[i], self.ready[i] = False, None, False
        self.pids.append(p.pid)

    def _restart(self, i: int) -> None:
        self._kill(i)
        self.restarts += 1
        if self.restarts > 4 * self.slots + 100:
            raise WorkerStartError(f"worker processes keep dying ({self.restarts} restarts); giving up")
        self._start(i)

    def _kill(self, i: int) -> None:
        p, c = self.procs[i], self.conns[i]
        if p is not None and p.is_alive():
            p.kill()
        if p is not None:
            p.join(5)
        if c is not None:
            c.close()

    def _fail(self, error: WorkerStartError) -> None:
        self.start_error = self.start_error or error

    def submit(self, slot: int, entry) -> None:
        self.held[slot] = True
        try:
            self.conns[slot].send(entry)
        except OSError:
            pass  # a dead worker: its sentinel reports it in wait()

    def wait(self, timeout: float) -> list[Event]:
        if self.start_error is not None:  # found by the previous call, after delivering its results
            raise self.start_error
        by_obj = {}
        for i in range(self.slots):
            by_obj[self.conns[i]] = ("conn", i)
            by_obj[self.procs[i].sentinel] = ("dead", i)
        ready = mp_wait(list(by_obj), timeout)
        events: list[Event] = []
        dead: set[int] = set()
        for obj in ready:
            kind, i = by_obj[obj]
            if kind == "dead":
                dead.add(i)
                continue
            while True:  # drain what this worker sent (a result may precede its death)
                try:
                    msg = self.conns[i].recv()
                except (EOFError, OSError):
                    dead.add(i)
                    break
                if msg[0] == "init_error":
                    self._fail(WorkerStartError(f"a worker could not start: {msg[1]}"))
                elif msg[0] == "ready":
                    self.ready[i] = True
                elif msg[0] == "started":
                    self.started_at[i] = time.monotonic()
                elif msg[0] in ("ok", "error"):
                    events.append(Event(i, result=msg[1]) if msg[0] == "ok" else Event(i, error=msg[1]))
                    self.held[i], self.started_at[i] = False, None
                if not self.conns[i].poll():
                    break
        for i in sorted(dead):
            self.procs[i].join(1)
            code = self.procs[i].exitcode
            if self.started_at[i] is not None:  # it was embedding a slide: that slide's try failed
                events.append(Event(i, error=f"worker process died ({_signal_name(code)}) while embedding this slide",
                                    died=True))
            elif self.held[i]:  # handed a slide it had not started: no try lost
                events.append(Event(i, requeued=True))
            if not self.ready[i] and code is not None and code >= 0:  # its setup failed (killed: restart it)
                self._fail(WorkerStartError(
                    f"a worker process exited ({_signal_name(code)}) before it was set up; its error is above "
                    f"(the main module must be importable: run the proalign-engine command, python -m, or a "
                    f"script file)"))
                self.held[i] = False
                continue
            self._restart_or_fail(i)
        if self.slide_timeout:
            now = time.monotonic()
            for i, t in enumerate(self.started_at):
                if t is not None and now - t > self.slide_timeout:
                    events.append(Event(i, error=f"timed out after {self.slide_timeout:g} s (worker killed)",
                                        died=True))
                    self._restart_or_fail(i)
        return events

    def _restart_or_fail(self, i: int) -> None:
        try:
            self._restart(i)
        except WorkerStartError as e:
            self._fail(e)
            self.held[i], self.started_at[i] = False, None

    def close(self, drop: bool = False) -> None:
        for i in range(self.slots):
            if drop:
                self._kill(i)
                continue
            try:
                self.conns[i].send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        for i in range(self.slots):
            p = self.procs[i]
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
            self.conns[i].close()
