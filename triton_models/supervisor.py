"""Keeps the Triton process of `crema serve` serving, and says when it is not.

Every `interval` seconds, and at once when the server or one of its python processes exits (pidfds),
the supervisor checks, in this order:
  1. the tritonserver process: when it has exited (a crash, the OOM killer), start it again after
     1, 2, 4, ... 30 s (the delay doubles per failed start and resets after a minute of serving);
  2. each model's python processes: Triton 2.51's python backend does not replace a stub that died
     (the model stays READY and fails every request with "Stub process ... is not healthy"), so a
     READY model with fewer processes than its instances is reloaded (unload + load);
  3. the repository index: a model that is not READY (a failed load) is loaded again.
On each failure `on_failure(reason)` is called first, so the front answers the requests in flight at
once instead of leaving them to Triton's ~17 s stub time-out. `ready` is true only while the process
runs, every model is READY and nothing is being repaired. Every event is logged and kept in `events`.
"""
from __future__ import annotations

import os
import select
import threading
import time
from collections import Counter
from dataclasses import dataclass

from .layout import ENSEMBLE
from .server import ServerError, TritonServer, exit_reason, python_stubs, remove_regions

MAX_BACKOFF_S, STABLE_S = 30.0, 60.0


@dataclass
class Event:
    kind: str      # "restart" (tritonserver) | "reload" (a model whose python process died) | "load"
    what: str      # "tritonserver" or the model
    reason: str
    seconds: float  # how long the repair took
    at: float       # time.monotonic() when the repair finished


class Supervisor(threading.Thread):
    def __init__(self, server: TritonServer, stubs: dict[str, int], on_failure=lambda reason: None,
                 interval: float = 0.5, start_timeout: float = 300.0, log=print):
        """stubs: model -> python processes it runs (its instance count), for python-backend models."""
        super().__init__(daemon=True, name="crema-supervisor")
        self.server, self.on_failure, self.interval, self.log = server, on_failure, interval, log
        self.start_timeout = start_timeout
        self.events: list[Event] = []
        self.halt = threading.Event()
        self._ready = threading.Event()
        self.not_ready_reason = "starting"
        self._failed_starts = 0
        self._up_since = time.monotonic()
        self.expected = stubs
        self._pidfds: dict[int, int] = {}
        self._regions: dict[int, str] = {}  # pid -> shared-memory region of each python process seen
        self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def count(self, kind: str) -> int:
        return sum(e.kind == kind for e in self.events)

    def _stub_counts(self) -> Counter:
        stubs = python_stubs(self.server.process.pid)
        self._regions.update((pid, stub.region) for pid, stub in stubs.items())
        return Counter(stub.model for stub in stubs.values())

    def _remove_dead_regions(self, everything: bool = False) -> None:
        """A python process that died leaves its shared memory in /dev/shm; Triton does not remove it."""
        alive = set() if everything or self.server.process is None else set(python_stubs(self.server.process.pid))
        for pid in set(self._regions) - alive:
            remove_regions([self._regions.pop(pid)])

    def _unready(self, reason: str) -> None:
        self.not_ready_reason = reason
        self._ready.clear()
        self.on_failure(reason)

    def _record(self, kind: str, what: str, reason: str, start: float) -> None:
        self.events.append(Event(kind, what, reason, time.monotonic() - start, time.monotonic()))
        self.log(f"supervisor: {what}: {reason}; {kind} #{self.count(kind)} took {self.events[-1].seconds:.1f} s")

    def run(self) -> None:
        while not self.halt.is_set():
            self._wait_for_an_exit(self.interval)
            if self.halt.is_set():
                break
            try:
                self.check()
            except OSError as e:  # the server stopped answering between two checks: next round sees why
                self.log(f"supervisor: check failed: {e}")
                self.halt.wait(self.interval)

    def _wait_for_an_exit(self, timeout: float) -> None:
        """Sleep up to `timeout`, woken at once when the server or one of its python processes exits
        (a pidfd per process: no polling of /proc under load)."""
        wanted = {self.server.process.pid} if self.server.process is not None else set()
        wanted |= set(self._regions) if wanted else set()  # the python processes seen by the last check
        for pid in set(self._pidfds) - wanted:
            os.close(self._pidfds.pop(pid))
        for pid in wanted - set(self._pidfds):
            try:
                self._pidfds[pid] = os.pidfd_open(pid)
            except OSError:  # already gone: the check below sees it
                return
        poller = select.poll()
        for fd in self._pidfds.values():
            poller.register(fd, select.POLLIN)
        poller.poll(timeout * 1000)

    def check(self) -> None:
        process = self.server.process
        if process is None or process.poll() is not None:
            self.restart(exit_reason(None if process is None else process.returncode))
            return
        repaired = False
        now = self._stub_counts()
        dead = [m for m, n in self.expected.items() if now.get(m, 0) < n]
        for model in dead:  # the requests in flight hear of it first, then the repair
            self._unready(f"model {model}'s python process died")
        states = self.server.index()
        for model in dead:
            if states.get(model) == "READY" and not self.halt.is_set():  # else the loads below repair it
                start = time.monotonic()
                self.server.reload(model)
                self._record("reload", model, f"model {model}'s python process died", start)
                repaired = True
        for _ in range(len(states) + 1):  # loading an ensemble loads what it uses: models first, look again
            missing = sorted((m == ENSEMBLE, m, state) for m, state in self.server.index().items() if state != "READY")
            if not missing or self.halt.is_set():
                break
            _, model, state = missing[0]
            reason = f"model {model} was {state}"
            self._unready(reason)
            start = time.monotonic()
            self.server.load(model)
            self._record("load", model, reason, start)
            repaired = True
        if repaired or dead:
            self._remove_dead_regions()
        if not self.ready and not repaired and self.server.ready():
            self._ready.set()
        if time.monotonic() - self._up_since > STABLE_S:
            self._failed_starts = 0

    def restart(self, why: str) -> None:
        reason = f"tritonserver stopped ({why})"
        self._unready(reason)
        self.server.stop()  # reaps it and any python processes it left
        self._remove_dead_regions(everything=True)
        delay = min(MAX_BACKOFF_S, 2.0 ** self._failed_starts)
        self.log(f"supervisor: {reason}; starting it again in {delay:.0f} s")
        if self.halt.wait(delay):
            return
        start = time.monotonic()
        try:
            self.server.start(self.start_timeout)
        except ServerError as e:
            self._failed_starts += 1
            self.log(f"supervisor: restart failed: {e}")
            return
        self._up_since = time.monotonic()
        self._failed_starts += 1  # reset only after STABLE_S of serving
        self._record("restart", "tritonserver", reason, start)
        self._ready.set()

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join()
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()
