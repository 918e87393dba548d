"""StepPlan: everything a rank needs to run one engine step, and its wire form.

The driver decides each step (which slots run, their input tokens and positions, which slots
were freed) and sends the plan to every other rank; all ranks then run the same forward. The
plan travels as one fixed-size int64 tensor, so a step costs one small broadcast, no pickling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# What a segment needs back from the forward (only the driver reads logits, but every rank
# computes the same rows: the output layer's all-gather is a collective).
LOGITS_NONE = 0  # a prefill chunk that is not the prompt's last: nothing to sample yet
LOGITS_LAST = 1  # sample the next token from the segment's last position
LOGITS_ALL = 2  # every position (prompt logprobs for echo) and sample from the last


def sampled_token(j: int) -> int:
    """A plan token that stands for row j of the tokens the previous step sampled. The driver
    plans step N+1 before step N's tokens are read back (llama/engine/core.py): a decode's input is
    then this reference, and every rank takes the token from its own copy of step N's sampled
    tokens on the device (ModelRunner.sampled). Real token ids are >= 0."""
    return -1 - j


_HEADER = 5  # kind, n_segments, n_tokens, n_freed, n_copies
_KIND_STEP, _KIND_STOP = 1, 2


@dataclass(frozen=True)
class Segment:
    slot: int  # the KV-cache slot (row) this sequence owns
    start: int  # position of the segment's first token; positions < start are already cached
    length: int  # tokens in this segment: 1 for a decode, up to the chunk budget for a prefill
    logits: int  # LOGITS_NONE | LOGITS_LAST | LOGITS_ALL


@dataclass(frozen=True)
class SlotCopy:
    """Before the forward: copy the keys/values of positions 0..length-1 from slot src to slot
    dst. A request whose prompt another running request has already prefilled starts from a
    copy (the n choices of one prompt prefill it once)."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class StepPlan:
    segments: tuple[Segment, ...]
    tokens: tuple[int, ...]  # the segments' input tokens, packed in segment order (< 0: sampled_token)
    freed: tuple[int, ...] = ()  # slots given back since the previous plan (finished, cancelled, failed)
    copies: tuple[SlotCopy, ...] = ()  # done before the forward
    stop: bool = False  # the driver is shutting down: leave the loop

    @property
    def idle(self) -> bool:
        return not self.segments and not self.copies

    @property
    def takes_sampled(self) -> bool:
        """Some input is a token the previous step sampled (see sampled_token)."""
        return any(t < 0 for t in self.tokens)

    @classmethod
    def prefill(cls, rows: list[list[int]]) -> "StepPlan":
        """Row i as a whole prompt in slot i from position 0, with logits at every position: one
        forward over a batch of sequences, outside the engine (training, scoring, tests)."""
        segments = tuple(Segment(i, 0, len(r), LOGITS_ALL) for i, r in enumerate(rows))
        return cls(segments, tuple(t for r in rows for t in r))

    @staticmethod
    def capacity(max_batch_size: int, prefill_chunk: int) -> int:
        """int64s in the wire tensor: header, 4 per segment (one per slot at most), the tokens
        (one per decoding slot plus the prefill budget), the freed slots, 3 per copy (one per
        slot at most)."""
        return _HEADER + 4 * max_batch_size + (max_batch_size + prefill_chunk) + max_batch_size + 3 * max_batch_size

    def to_tensor(self, capacity: int) -> torch.Tensor:
        kind = _KIND_STOP if self.stop else _KIND_STEP
        body = [kind, len(self.segments), len(self.tokens), len(self.freed), len(self.copies)]
        for s in self.segments:
            body += [s.slot, s.start, s.length, s.logits]
        body += list(self.tokens) + list(self.freed)
        for c in self.copies:
            body += [c.src, c.dst, c.length]
        if len(body) > capacity:
            raise AssertionError(f"step plan of {len(body)} ints exceeds its capacity {capacity}")
        out = torch.zeros(capacity, dtype=torch.int64)
        out[: len(body)] = torch.tensor(body, dtype=torch.int64)
        return out

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "StepPlan":
        kind, n_seg, n_tok, n_freed, n_copies = t[:_HEADER].tolist()
        if kind == _KIND_STOP:
            return cls((), (), stop=True)
        if kind != _KIND_STEP:
            raise RuntimeError(f"received a malformed step plan (kind {kind}): the driver and this rank disagree")
        end = _HEADER + 4 * n_seg + n_tok + n_freed + 3 * n_copies
        vals = t[_HEADER:end].tolist()
        segs = tuple(Segment(*vals[4 * i : 4 * i + 4]) for i in range(n_seg))
        at = 4 * n_seg
        toks = tuple(vals[at : at + n_tok])
        freed = tuple(vals[at + n_tok : at + n_tok + n_freed])
        at += n_tok + n_freed
        copies = tuple(SlotCopy(*vals[at + 3 * i : at + 3 * i + 3]) for i in range(n_copies))
        return cls(segs, toks, freed, copies=copies)
