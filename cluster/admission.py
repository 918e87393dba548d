"""Admission: the replica's bound on the requests it holds (max_batch_size running plus
max_waiting queued in the engine), taken for all the choices of one HTTP request at once.

Beyond the bound a request is refused at once (OverloadedError, a 429) instead of waiting for
its deadline. Choices are admitted all or none: admitting them one by one let a request with
n > 1 start some choices, then be refused, then cancel those it had started (counted as aborts,
work the driver had already begun).
"""
from __future__ import annotations

from cluster.errors import OverloadedError


class Places:
    """How many of the replica's places are held. One per replica; no locking: the replica's
    event loop is its only user."""

    def __init__(self, running: int, waiting: int) -> None:
        self.running, self.waiting = running, waiting
        self.limit = running + waiting
        self.held = 0

    def admit(self, n: int) -> Admission:
        """n places, or none: raises OverloadedError when they do not all fit now, and ValueError
        (the caller's mistake) when they never could."""
        if n > self.limit:
            raise ValueError(f"this request asks for {n} choices, but this server holds at most {self.limit} requests "
                             f"at once (max_batch_size {self.running} running + max_waiting {self.waiting} waiting): "
                             f"lower n, or split the prompts across requests.")
        if self.held + n > self.limit:
            raise OverloadedError(f"this replica holds {self.held} requests, its limit (max_batch_size {self.running} "
                                  f"running + max_waiting {self.waiting} waiting), so {n} more do not fit; retry "
                                  f"shortly.")
        self.held += n
        return Admission(self, n)


class Admission:
    """Places held for one HTTP request's choices, from before their streams start until the
    request ends, however it ends: `release` gives them back, once."""

    def __init__(self, places: Places, n: int) -> None:
        self._places, self.n = places, n

    def release(self) -> None:
        if self.n:
            self._places.held -= self.n
            self.n = 0
