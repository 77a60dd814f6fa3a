"""Logging shared by the jobs: one format, INFO by default, quiet third parties; rate lines."""

from __future__ import annotations

import logging
import math
import os
import time


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once (``ALIGNER_LOG_LEVEL`` overrides the level)."""
    level = level or os.environ.get("ALIGNER_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("urllib3", "filelock", "fsspec", "PIL", "matplotlib", "httpx", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def throughput(done: float, seconds: float) -> float:
    """``done / seconds``; 0 when no time passed."""
    return done / seconds if seconds > 0 and math.isfinite(seconds) else 0.0


class RateLog:
    """Rate-limited INFO lines while a driver consumes a stream of results.

    ``update(n, **detail)`` adds ``n`` done items; at most every ``every_s`` seconds (and when
    the total is reached) it logs ``<what> done/total (rate/s, ETA)`` plus the ``detail``
    values. The first update also logs the start-up time (actors loading models, workers
    importing torch), which :attr:`first_at` keeps for throughput reports.
    """

    def __init__(self, what: str, total: int | None = None, every_s: float = 10.0,
                 unit: str = "rows", logger: logging.Logger | None = None) -> None:
        self.what, self.total, self.every_s, self.unit = what, total, every_s, unit
        self.log = logger or logging.getLogger("aligner.progress")
        self.start = time.time()
        self.last = self.start
        self.first_at: float | None = None
        self.done = 0

    @property
    def startup_s(self) -> float:
        """Seconds from the start to the first result (all of it, if none came)."""
        return (self.first_at or time.time()) - self.start

    def update(self, n: int, **detail: object) -> None:
        now = time.time()
        if self.first_at is None and n:
            self.first_at = now
            self.log.info("%s: first results after %.1f s (start-up)", self.what,
                          now - self.start)
        self.done += n
        finished = self.total is not None and self.done >= self.total
        if now - self.last < self.every_s and not finished:
            return
        self.last = now
        rate = throughput(self.done, now - self.start)
        total = f"/{self.total}" if self.total is not None else ""
        eta = ""
        if self.total is not None and rate > 0 and not finished:
            eta = f", ETA {(self.total - self.done) / rate:.0f} s"
        extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in detail.items())
        self.log.info("%s: %d%s %s (%.1f %s/s%s)%s", self.what, self.done, total, self.unit,
                      rate, self.unit, eta, extra)
