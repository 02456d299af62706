"""The per-slide worker as Ray actors (`embed --backend ray`, or `--scheduler ray`).

Each actor holds one worker (`spec.build()`: prototypes, or an encoder, loaded once) and embeds the slides it is handed;
results stream back to the driver, the single writer, which stores each one as it arrives. The
scheduler keeps the queue: an actor gets its next slide when it returns one (two in flight per
actor, so the actor never waits for the round trip). A slide whose actor dies (node lost, OOM) or
raises is retried once on another try, then quarantined, exactly like the local backend; a dead
actor is replaced. Feature files must be readable at the same path on every node.

`ray.init` runs here unless Ray is already initialised: `address=None` starts a local Ray
(tests: fractional CPUs per actor), "auto" or "ray://..." joins a cluster.
"""
from __future__ import annotations

from .executors import Event
from .worker import describe

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
        if self.owns_ray:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **(init_kwargs or {}))
        self.cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(_Actor)
        self.spec, self.n, self.slots = spec, n, n * DEPTH
        self.actors = [self.cls.remote(spec) for _ in range(n)]
        self.refs: dict = {}  # object ref -> slot
        self.restarts = 0
        ray.get([a.ready.remote() for a in self.actors])  # setup errors surface here, once

    def submit(self, slot: int, entry) -> None:
        ref = self.actors[slot % self.n].run.remote(entry)
        self.refs[ref] = slot

    def _replace(self, a: int, dead_actor) -> None:
        if self.actors[a] is not dead_actor:
            return  # already replaced (its other slide reported first)
        self.restarts += 1
        if self.restarts > 4 * self.n + 100:
            raise RuntimeError(f"Ray actors keep dying ({self.restarts} restarts); giving up")
        try:
            self.ray.kill(dead_actor)
        except Exception:
            pass
        self.actors[a] = self.cls.remote(self.spec)

    def wait(self, timeout: float) -> list[Event]:
        if not self.refs:
            return []
        ray = self.ray
        ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready:
            more, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
            ready = list({r: None for r in [*ready, *more]})
        events = []
        for ref in ready:
            slot = self.refs.pop(ref)
            actor = self.actors[slot % self.n]
            try:
                status, value = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                events.append(Event(slot, error=f"Ray actor died while embedding this slide: {str(e).splitlines()[0]}",
                                    died=True))
                self._replace(slot % self.n, actor)
                continue
            except ray.exceptions.RayError as e:
                events.append(Event(slot, error=f"Ray task failed: {str(e).splitlines()[0]}"))
                continue
            events.append(Event(slot, result=value) if status == "ok" else Event(slot, error=value))
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
