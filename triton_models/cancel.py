"""The cancellation board: how `crema serve`'s front tells the llm model that a request it forwarded is gone.

Triton 2.51 drops the ensemble steps of a cancelled request that have not started, but never tells a
python model that is already executing (`request.is_cancelled()` stays false; tests/test_deadlines.py).
So the front gives every inference an id (request parameter `crema_request_id`, layout.ID_PARAMETER,
which Triton carries through the ensemble) and, when its client cancels or goes away, writes an empty file of that name into
a directory private to this server (mode 0700, on /dev/shm where there is one; its path reaches the
model processes as CREMA_CANCEL_DIR). The llm model's decode loop looks for it before every step (one
stat) and stops. Files older than KEEP_S are swept when a new one is written.
"""
from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from pathlib import Path

ENV = "CREMA_CANCEL_DIR"
KEEP_S = 3600.0  # longer than any request may take (crema serve --request-timeout, 300 s by default)
_ID = re.compile(r"^[0-9a-f]{32}$")


def new_id() -> str:
    return secrets.token_hex(16)


def make_board_dir() -> Path:
    """A fresh private directory for one server's board."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="crema-cancel-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK)
                                 else None))


class CancelBoard:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    @classmethod
    def from_env(cls) -> "CancelBoard | None":
        directory = os.environ.get(ENV)
        return cls(directory) if directory else None

    def mark(self, request_id: str) -> None:
        """Record that request_id was cancelled (and sweep old marks)."""
        if _ID.match(request_id):
            (self.dir / request_id).touch()
        self._sweep()

    def marked(self, request_id: str | None) -> bool:
        return bool(request_id) and bool(_ID.match(request_id)) and (self.dir / request_id).exists()

    def _sweep(self) -> None:
        old = time.time() - KEEP_S
        for p in self.dir.iterdir():
            try:
                if p.stat().st_mtime < old:
                    p.unlink()
            except FileNotFoundError:
                pass
