"""Scheduler: which sequences run in the next engine step, iteration by iteration.

Slots are the rows of the KV cache: a sequence takes one when it is admitted and gives it back
when it leaves. Each step every decoding sequence advances one token, and prompts are prefilled
in chunks from a fixed per-step token budget (continuing prompts first, then newly admitted
ones, first come first served), so a long prompt never stalls the sequences already decoding.
"""
from __future__ import annotations

import heapq
from collections import deque

from llama.sequence import Sequence


class Scheduler:
    def __init__(self, max_slots: int, prefill_chunk: int):
        if max_slots < 1 or prefill_chunk < 1:
            raise ValueError(f"the engine needs at least one slot and a prefill chunk of at least one token, "
                             f"got max_slots={max_slots}, prefill_chunk={prefill_chunk}.")
        self.max_slots = max_slots
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order, each holding a slot
        self._free: list[int] = list(range(max_slots))  # a heap: the lowest free slot is taken first

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> int | None:
        """Take a sequence out (finished, cancelled, failed); return the slot it gave back."""
        if seq.slot is None:
            self.waiting.remove(seq)
            return None
        self.running.remove(seq)
        slot, seq.slot = seq.slot, None
        heapq.heappush(self._free, slot)
        return slot

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step's work: (sequence, number of its tokens to run), decodes first."""
        work = [(s, 1) for s in self.running if not s.prefilling]
        budget = self.prefill_chunk
        for s in self.running:
            if s.prefilling and budget > 0:
                n = min(s.prompt_len - s.computed, budget)
                work.append((s, n))
                budget -= n
        while self.waiting and self._free and budget > 0:
            s = self.waiting.popleft()
            s.slot = heapq.heappop(self._free)
            self.running.append(s)
            n = min(s.prompt_len, budget)
            work.append((s, n))
            budget -= n
        return work
