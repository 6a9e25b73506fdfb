"""One exclusive ``flock`` per cache key, shared by the coarse cache and the image cache.

The first process to ask holds the lock and builds the entry; the others wait, then read it. The
kernel drops a lock when its holder dies (even by SIGKILL), so a crashed builder never blocks anyone.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["held"]


@contextmanager
def held(path: Path, log: logging.Logger, waiting: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, with its folder); if another process holds it, log
    ``waiting`` and how long the wait took."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s; waiting", waiting)
            t0 = time.perf_counter()
            fcntl.flock(lock, fcntl.LOCK_EX)
            log.info("%s: waited %.0f s", waiting, time.perf_counter() - t0)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
