"""Scheduler: which sequences run in the next engine step, iteration by iteration, and where
their keys and values go.

Memory decides, not slots: each running sequence holds a row of the block table and as many
KV blocks (llama/engine/block_pool.py) as its computed tokens fill, taking one more only when
it needs it. Each step every running sequence, in admission order, either decodes one token or
prefills a chunk of its prompt from a fixed per-step token budget, so a long prompt never
stalls the sequences already decoding; then waiting sequences are admitted, first come first
served, while rows, blocks and budget last.

A new prompt starts from the longest run of its full blocks already in the pool (keyed by
chained hashes: llama/engine/block_hash.py), from finished requests (prefix caching) or from
running ones (the other choices of an n > 1 request, a repeated prompt), and prefills only
the rest. One whose next block a running sequence is prefilling right now waits for it rather
than computing it twice.

When a running sequence needs a block and none is left, the newest running sequence is
preempted: it gives its blocks back (its full ones stay cached) and returns to the front of the
queue, to be recomputed, mostly from the prefix cache, when there is room again; its client
sees nothing but time. A sequence is admitted only if it could run to its end alone (checked
at submission), so the oldest one always makes progress.

In a pipeline of P stages the driver keeps P steps in flight (llama/engine/core.py): a sequence
awaiting its token from one of them is skipped (a prompt's next chunk needs none, so it can
run), and each step takes at most 1/P of the sequences (rounded up), so the next steps find
sequences of their own.

Block tables reach the other ranks as changes (the plan's TableRun), at most `table_budget`
ids per step; a sequence whose table is not all sent (a long cached prefix) waits a step.
"""
from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from llama.engine.block_pool import BlockPool
from llama.engine.sequence import Sequence
from llama.engine.step_plan import TableRun, table_budget


@dataclass
class Scheduled:
    work: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens it runs)
    table: list[TableRun] = field(default_factory=list)  # block-table changes, before the forward
    freed: list[int] = field(default_factory=list)  # rows given back since the last plan


class Scheduler:
    def __init__(self, max_batch_size: int, prefill_chunk: int, max_seq_len: int, pool: BlockPool, depth: int = 1):
        """depth: the steps in flight a pipeline keeps (its stages); each step takes its share of the sequences."""
        # EngineConfig has checked them (>= 1)
        self.max_batch_size = max_batch_size  # table rows
        self.prefill_chunk = prefill_chunk
        self.max_seq_len = max_seq_len
        self.pool = pool
        self.depth = depth
        self.block_size = pool.block_size
        self.table_budget = table_budget(max_batch_size, prefill_chunk, pool.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order, each holding a row
        self._rows: list[int] = list(range(max_batch_size))  # a heap: the lowest free row is taken first
        self._freed: list[int] = []
        self._pending: dict[bytes, Sequence] = {}  # keys of blocks a running sequence is prefilling now
        self.preemptions = 0
        self.hit_tokens = 0  # prompt tokens admissions found cached
        self.query_tokens = 0  # prompt tokens admissions looked up

    @property
    def free_slots(self) -> int:
        return len(self._rows)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, cancelled, failed); its row and blocks go back."""
        if seq.slot is None:
            self.waiting.remove(seq)
            return
        self.running.remove(seq)
        self._give_back(seq)

    def take_freed(self) -> list[int]:
        freed, self._freed = self._freed, []
        return freed

    def schedule(self) -> Scheduled:
        """The next step's work, the table changes it needs and the rows freed before it."""
        out = Scheduled()
        budget, ids = self.prefill_chunk, self.table_budget
        for s in self.running:
            self._register(s)
        share = -(-(len(self.running) + len(self.waiting)) // self.depth)  # sequences this step may run
        i = 0
        while i < len(self.running):
            s = self.running[i]
            if s.awaiting or len(out.work) >= share:
                n = 0  # its token is still on its way (a pipeline), or the step has its share
            elif s.prefilling:
                n = min(s.target - s.computed, budget)
            else:  # a sequence whose token in flight is its last (by count) is read back, not run again
                n = 1 if s.can_grow(self.max_seq_len) else 0
            need = self.blocks_for(s.computed + n) - len(s.blocks) if n else 0
            while need > self.pool.available:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is s:
                    break
            if s.slot is None:  # preempted itself: nothing older is left to give way
                break
            if need:
                s.blocks += self.pool.take([], need)
            ids = self._sync(s, ids, out)
            if n and s.synced == len(s.blocks):
                out.work.append((s, n))
                budget -= n if s.prefilling else 0
            i += 1
        deferred: list[Sequence] = []
        while self.waiting and self._rows and budget > 0 and len(out.work) < share:
            s = self.waiting[0]
            if s.in_flight or s.awaiting:
                break  # preempted with a token on its way back: admitted once it has arrived
            admitted = self._admit(s, budget)
            if admitted is None:
                break  # no room: it keeps its place at the front
            self.waiting.popleft()
            if admitted is False:
                deferred.append(s)  # its next block is being prefilled by a running sequence
                continue
            ids = self._sync(s, ids, out)
            n = admitted
            if s.synced == len(s.blocks):
                out.work.append((s, n))
                budget -= n
        self.waiting.extendleft(reversed(deferred))  # keep their place in the queue
        out.freed = self.take_freed()
        return out

    def _admit(self, s: Sequence, budget: int) -> int | bool | None:
        """Give s a row and its first blocks: the cached run of its prompt, and fresh ones for
        its first chunk. Returns the tokens of that chunk; False to wait for a running twin;
        None when the pool has no room for it now."""
        target = len(s.tokens)  # its prompt, or after a preemption everything it has
        keys = s.keys_to(target - 1, self.block_size)  # at least one token runs: its logits are needed
        hit = [] if s.wants_prompt_logits else self.pool.lookup(keys)
        if not s.wants_prompt_logits and len(hit) < len(keys):
            twin = self._pending.get(keys[len(hit)])
            if twin is not None and twin.slot is not None and twin.prefilling and twin is not s:
                return False
        start = len(hit) * self.block_size
        n = min(target - start, budget)
        new = self.blocks_for(start + n) - len(hit)
        if self.pool.cost(hit, new) > self.pool.available:
            return None
        s.blocks = self.pool.take(hit, new)
        s.synced = 0
        s.computed = start
        s.registered = len(hit)
        s.target = target
        s.slot = heapq.heappop(self._rows)
        self.running.append(s)
        if s.cached_tokens is None:  # its first admission: what the client is told was cached
            s.cached_tokens = start
            s.queue_s = time.monotonic() - s.arrived
            self.hit_tokens += start
            self.query_tokens += s.prompt_len
        for key in keys[len(hit) :]:
            self._pending.setdefault(key, s)  # twins wait for these rather than compute them too
        return n

    def _sync(self, s: Sequence, ids: int, out: Scheduled) -> int:
        """Send what fits of s's table entries the ranks lack; returns the ids left this step."""
        k = min(len(s.blocks) - s.synced, ids)
        if k > 0:
            out.table.append(TableRun(s.slot, s.synced, tuple(s.blocks[s.synced : s.synced + k])))
            s.synced += k
        return ids - k

    def _register(self, s: Sequence) -> None:
        """Offer s's full blocks whose tokens are known and computed to the prefix cache."""
        keys = s.keys_to(s.computed, self.block_size)
        for i in range(s.registered, len(keys)):
            self.pool.register(s.blocks[i], keys[i])
            if self._pending.get(keys[i]) is s:
                del self._pending[keys[i]]
        s.registered = max(s.registered, len(keys))

    def _give_back(self, s: Sequence) -> None:
        self._register(s)
        for key in s.keys[s.registered :]:
            if self._pending.get(key) is s:
                del self._pending[key]
        self.pool.release(s.blocks)
        s.blocks, s.synced, s.registered = [], 0, 0
        heapq.heappush(self._rows, s.slot)
        self._freed.append(s.slot)
        s.slot = None

    def _preempt(self, s: Sequence) -> None:
        """s gives its row and blocks back and waits at the front, to be recomputed."""
        self.running.remove(s)
        self._give_back(s)
        s.computed = 0
        s.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(s)
