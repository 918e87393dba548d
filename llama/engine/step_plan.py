"""StepPlan: everything a rank needs to run one engine step, and its wire form.

The driver decides each step (which table rows run, their input tokens and positions, which
rows were freed, the blocks each row gained) and sends the plan to every other rank; all ranks
then apply the same block-table changes and run the same forward. The plan travels as one
fixed-size int64 tensor, so a step costs one small broadcast, no pickling. It carries block
tables as changes, never whole: at most `table_budget` block ids per plan (the scheduler keeps
to it), so its size does not grow with the context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# What a segment needs back from the forward (only the driver reads logits, but every rank
# computes the same rows: the output layer's all-gather is a collective).
LOGITS_NONE = 0  # a prefill chunk that is not the prompt's last: nothing to sample yet
LOGITS_LAST = 1  # sample the next token from the segment's last position
LOGITS_ALL = 2  # every position (prompt logprobs for echo) and sample from the last
# As LOGITS_LAST, but the driver only takes the row's greedy token (no logprobs, no penalty, bias
# or mask): in a pipeline the last stage sends that token back instead of the row.
LOGITS_TOKEN = 3


def logit_rows(s: "Segment") -> int:
    """The logits rows a segment's forward computes."""
    return {LOGITS_NONE: 0, LOGITS_LAST: 1, LOGITS_TOKEN: 1, LOGITS_ALL: s.length}[s.logits]


def sampled_token(j: int) -> int:
    """A plan token that stands for row j of the tokens the previous step sampled. The driver
    plans step N+1 before step N's tokens are read back (llama/engine/core.py): a decode's input is
    then this reference, and every rank takes the token from its own copy of step N's sampled
    tokens on the device (ModelRunner.sampled). Real token ids are >= 0."""
    return -1 - j


def table_budget(max_batch_size: int, prefill_chunk: int, block_size: int) -> int:
    """Block ids one plan may carry: a new block per decoding row, those of a prefill budget
    spread over every row, and 256 more (a cached prefix of 4,096 tokens at block size 16)."""
    return 2 * max_batch_size + -(-prefill_chunk // block_size) + 256


_HEADER = 6  # kind, n_segments, n_tokens, n_freed, n_runs, n_run_blocks
_KIND_STEP, _KIND_STOP = 1, 2


@dataclass(frozen=True)
class Segment:
    slot: int  # the block-table row this sequence owns
    start: int  # position of the segment's first token; positions < start are already cached
    length: int  # tokens in this segment: 1 for a decode, up to the chunk budget for a prefill
    logits: int  # LOGITS_NONE | LOGITS_LAST | LOGITS_TOKEN | LOGITS_ALL


@dataclass(frozen=True)
class TableRun:
    """Before the forward: entries index..index+len(blocks)-1 of row slot's block table become
    `blocks` (new blocks for the positions it runs next, or cached ones its prompt begins with)."""

    slot: int
    index: int
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    segments: tuple[Segment, ...]
    tokens: tuple[int, ...]  # the segments' input tokens, packed in segment order (< 0: sampled_token)
    freed: tuple[int, ...] = ()  # rows given back since the previous plan (finished, cancelled, preempted)
    table: tuple[TableRun, ...] = ()  # applied after `freed`, before the forward
    stop: bool = False  # the driver is shutting down: leave the loop

    @property
    def idle(self) -> bool:
        return not self.segments

    def token_rows(self) -> list[int]:
        """The logits rows (in segment order) whose greedy token is all the driver takes."""
        out, row = [], 0
        for s in self.segments:
            if s.logits == LOGITS_TOKEN:
                out.append(row)
            row += logit_rows(s)
        return out

    @property
    def takes_sampled(self) -> bool:
        """Some input is a token the previous step sampled (see sampled_token)."""
        return any(t < 0 for t in self.tokens)

    @classmethod
    def prefill(cls, rows: list[list[int]], block_size: int) -> "StepPlan":
        """Row i as a whole prompt in table row i from position 0, in blocks of its own taken in
        order from block 1, with logits at every position: one forward over a batch of
        sequences, outside the engine (training, scoring, tests)."""
        segments = tuple(Segment(i, 0, len(r), LOGITS_ALL) for i, r in enumerate(rows))
        runs, first = [], 1
        for i, r in enumerate(rows):
            n = -(-len(r) // block_size)
            runs.append(TableRun(i, 0, tuple(range(first, first + n))))
            first += n
        return cls(segments, tuple(t for r in rows for t in r), table=tuple(runs))

    @staticmethod
    def capacity(max_batch_size: int, prefill_chunk: int, block_size: int) -> int:
        """int64s in the wire tensor: header, 4 per segment (one per row at most), the tokens
        (one per decoding row plus the prefill budget), the freed rows, 3 per table run (one per
        row at most) and the runs' block ids (table_budget at most): whatever the context."""
        return (_HEADER + 4 * max_batch_size + (max_batch_size + prefill_chunk) + max_batch_size
                + 3 * max_batch_size + table_budget(max_batch_size, prefill_chunk, block_size))

    def to_tensor(self, capacity: int) -> torch.Tensor:
        kind = _KIND_STOP if self.stop else _KIND_STEP
        ids = [b for r in self.table for b in r.blocks]
        body = [kind, len(self.segments), len(self.tokens), len(self.freed), len(self.table), len(ids)]
        for s in self.segments:
            body += [s.slot, s.start, s.length, s.logits]
        body += list(self.tokens) + list(self.freed)
        for r in self.table:
            body += [r.slot, r.index, len(r.blocks)]
        body += ids
        if len(body) > capacity:
            raise AssertionError(f"step plan of {len(body)} ints exceeds its capacity {capacity}")
        out = torch.zeros(capacity, dtype=torch.int64)
        out[: len(body)] = torch.tensor(body, dtype=torch.int64)
        return out

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "StepPlan":
        kind, n_seg, n_tok, n_freed, n_runs, n_ids = t[:_HEADER].tolist()
        if kind == _KIND_STOP:
            return cls((), (), stop=True)
        if kind != _KIND_STEP:
            raise RuntimeError(f"received a malformed step plan (kind {kind}): the driver and this rank disagree")
        end = _HEADER + 4 * n_seg + n_tok + n_freed + 3 * n_runs + n_ids
        vals = t[_HEADER:end].tolist()
        segs = tuple(Segment(*vals[4 * i : 4 * i + 4]) for i in range(n_seg))
        at = 4 * n_seg
        toks = tuple(vals[at : at + n_tok])
        freed = tuple(vals[at + n_tok : at + n_tok + n_freed])
        at += n_tok + n_freed
        heads = [vals[at + 3 * i : at + 3 * i + 3] for i in range(n_runs)]
        at += 3 * n_runs
        runs = []
        for slot, index, n in heads:
            runs.append(TableRun(slot, index, tuple(vals[at : at + n])))
            at += n
        return cls(segs, toks, freed, table=tuple(runs))
