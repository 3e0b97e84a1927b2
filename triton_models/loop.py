"""An asyncio server run on its own event-loop thread, started and stopped from other threads (the front
of `crema serve`, `crema gateway`). Subclasses give `_start()` / `_stop()` coroutines."""
from __future__ import annotations

import asyncio
import threading


class LoopThread:
    start_timeout: float | None = None  # seconds _start() may take; None: as long as it takes

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def start(self):
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(self.start_timeout)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
