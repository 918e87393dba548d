"""Scheduler: which sequences run in the next engine step, iteration by iteration.

Slots are the rows of the KV cache: a sequence takes one when it is admitted and gives it back
when it leaves. Each step every decoding sequence advances one token, and prompts are prefilled
in chunks from a fixed per-step token budget (continuing prompts first, then newly admitted
ones, first come first served), so a long prompt never stalls the sequences already decoding.
A prompt that a running sequence has already prefilled (the other choices of an n > 1
request, a repeated prompt) is not prefilled again: its slot starts as a copy of that one's.
"""
from __future__ import annotations

import heapq
import time
from collections import deque

from llama.engine.sequence import Sequence
from llama.engine.step_plan import SlotCopy


class Scheduler:
    def __init__(self, max_batch_size: int, prefill_chunk: int, max_seq_len: int):
        # EngineConfig has checked them (>= 1)
        self.max_batch_size = max_batch_size  # slots
        self.prefill_chunk = prefill_chunk
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order, each holding a slot
        self._free: list[int] = list(range(max_batch_size))  # a heap: the lowest free slot is taken first

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

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[SlotCopy]]:
        """The next step's work: (sequence, number of its tokens to run), decodes first; and the
        slot copies to make before it."""
        # A sequence whose token in flight is its last (by count) is read back, not run again.
        work = [(s, 1) for s in self.running if not s.prefilling and s.can_grow(self.max_seq_len)]
        budget = self.prefill_chunk
        for s in self.running:
            if s.prefilling and budget > 0:
                n = min(s.prompt_len - s.computed, budget)
                work.append((s, n))
                budget -= n
        copies: list[SlotCopy] = []
        deferred: list[Sequence] = []
        while self.waiting and self._free and budget > 0:
            s = self.waiting.popleft()
            donor, sibling = self._same_prompt(s)
            if donor is None and sibling is not None:
                deferred.append(s)  # its twin is still prefilling: wait, then copy, not redo
                continue
            s.slot = heapq.heappop(self._free)
            s.queue_s = time.monotonic() - s.arrived
            self.running.append(s)
            if donor is not None:
                # Positions 0..plen-2 come from the donor; the last prompt token runs here, so
                # its logits give this sequence's first token.
                copies.append(SlotCopy(donor.slot, s.slot, s.prompt_len - 1))
                s.computed = s.prompt_len - 1
                n = 1
            else:
                n = min(s.prompt_len, budget)
            work.append((s, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))  # keep their place in the queue
        return work, copies

    def _same_prompt(self, seq: Sequence) -> tuple[Sequence | None, Sequence | None]:
        """A running sequence with seq's prompt whose slot already holds all but its last token
        (a donor), else one still prefilling it (a sibling). Sequences that need their prompt's
        logprobs (echo) run their own prefill."""
        if not seq.can_share_prompt:
            return None, None
        sibling = None
        for r in self.running:
            if r.prompt_key == seq.prompt_key and r.tokens[: r.prompt_len] == seq.tokens:
                if r.computed >= seq.prompt_len - 1:
                    return r, None
                sibling = r
        return None, sibling
