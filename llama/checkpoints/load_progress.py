"""LoadProgress: how far one rank is in reading its slices of the checkpoint: bytes done of the
total, the rate so far and the time left at that rate. Updated by the loader after each tensor
(llama.checkpoints.load.copy_into), read from other threads (a rank's log line, GET /cluster)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class LoadProgress:
    total_bytes: int  # this rank's slices, in the checkpoint's dtype
    done_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def add(self, nbytes: int) -> None:
        self.done_bytes += nbytes

    def finish(self) -> None:
        self.finished = time.monotonic()

    def as_dict(self) -> dict:
        """JSON-able: bytes read, of how many, rate (MB/s) and seconds left (None until known)."""
        elapsed = (self.finished or time.monotonic()) - self.started
        rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
        left = max(self.total_bytes - self.done_bytes, 0)
        eta = 0.0 if self.finished or not left else (left / rate if rate > 0 else None)
        return {
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "percent": round(100.0 * self.done_bytes / self.total_bytes, 1) if self.total_bytes else 100.0,
            "mb_per_s": round(rate / 1e6, 1),
            "seconds": round(elapsed, 2),
            "seconds_left": None if eta is None else round(eta, 1),
            "finished": self.finished is not None,
        }

    def describe(self) -> str:
        """'412.0 of 1024.0 MB (40.2%), 205.3 MB/s, 3.0 s left'"""
        d = self.as_dict()
        left = "?" if d["seconds_left"] is None else f"{d['seconds_left']:.1f}"
        return (f"{self.done_bytes / 1e6:.1f} of {self.total_bytes / 1e6:.1f} MB ({d['percent']}%), "
                f"{d['mb_per_s']} MB/s, {left} s left")
