"""Sequence: one request's state inside the engine, from submission until its last delta.

It holds the prompt and generated tokens, its table row and KV blocks (and how many of its
tokens they hold), the chained keys of its full blocks, its own RNG, its incremental
detokeniser, and the callback that carries its deltas out.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from llama.engine.block_hash import ROOT, block_hashes
from llama.engine.grammar import GrammarMatcher
from llama.engine.request import EndToken, FinishReason, GenerationRequest, StreamDelta, TopLogprobs
from llama.tokenizers.detokenizer import TextStream

log = logging.getLogger(__name__)

# Receives a sequence's deltas, or the exception that ended it. Called on the engine's thread.
Sink = Callable[[StreamDelta | BaseException], None]


class Sequence:
    def __init__(
        self,
        request_id: str,
        request: GenerationRequest,
        sink: Sink,
        text: TextStream,
        generator: torch.Generator | None,
    ):
        self.request_id = request_id
        self.params = request.params
        self.sink = sink
        self.text = text
        self.generator = generator
        self.grammar: GrammarMatcher | None = None  # where it is in its request's grammar (structured outputs)
        self.tokens: list[int] = list(request.prompt_tokens)  # prompt, then generated
        self.prompt_len = len(self.tokens)
        # Leading tokens whose keys/values are in its blocks (or will be, once the steps queued have run).
        self.computed = 0
        # Run tokens up to here before sampling: the prompt, or after a preemption all its tokens.
        self.target = self.prompt_len
        self.in_flight = 0  # tokens sampled on the device and not yet read back (llama/engine/core.py's overlap)
        self.last_row = 0  # the newest of them: its row among the tokens its step sampled
        self.awaiting = 0  # steps in a pipeline that will give it a token, not yet drawn (core.py)
        self.finished = False  # its last delta is out; a row still in flight for it is dropped
        self.slot: int | None = None  # its block-table row while it runs
        self.blocks: list[int] = []  # its KV blocks, position p in blocks[p // block_size]
        self.synced = 0  # of which the ranks' tables have been sent (the plans carry changes)
        self.keys: list[bytes] = []  # chained keys of its full blocks, as far as computed (block_hash.py)
        self.registered = 0  # leading blocks offered to the prefix cache
        self.cached_tokens: int | None = None  # prompt tokens its first admission found cached
        self.preemptions = 0
        self.arrived = time.monotonic()
        self.deadline = None if request.timeout_s is None else self.arrived + request.timeout_s
        self.queue_s: float | None = None  # how long it waited to start running (set when it does)
        self.abort_requested = False
        self.started_streaming = False
        want = self.params.logprobs is not None and self.params.echo
        # Nothing predicts the first prompt token: 0.0 and no alternatives, as the reference does.
        self.prompt_logprobs: list[float] | None = [0.0] if want else None
        self.prompt_top: list[TopLogprobs] | None = [[]] if want else None

    @property
    def prefilling(self) -> bool:
        return self.computed < self.target

    @property
    def wants_prompt_logits(self) -> bool:
        """Its prompt's logprobs (echo) are not all known: its prompt runs with every position's
        logits, none of it taken from the prefix cache."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.prompt_len

    def keys_to(self, n_tokens: int, block_size: int) -> list[bytes]:
        """The keys of its full blocks within its first n_tokens tokens (extended as needed)."""
        full = min(n_tokens, len(self.tokens)) // block_size
        if full > len(self.keys):
            self.keys += block_hashes(self.tokens[: full * block_size], block_size, len(self.keys),
                                      self.keys[-1] if self.keys else ROOT)
        return self.keys[:full]

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def can_grow(self, max_seq_len: int) -> bool:
        """Another token would still fit its max_tokens and max_seq_len, counting those in flight:
        a decode step for it is not wasted."""
        held = len(self.tokens) + self.in_flight
        return held - self.prompt_len < self.params.max_tokens and held < max_seq_len

    def next_input(self, n: int) -> list[int]:
        return self.tokens[self.computed : self.computed + n]

    def emit(
        self,
        token_ids: list[int],
        text: str,
        finish: FinishReason | None,
        logprobs: list[float] | None = None,
        top: list[TopLogprobs] | None = None,
        end_token: EndToken | None = None,
    ) -> None:
        first = not self.started_streaming
        self.started_streaming = True
        want = self.params.logprobs is not None
        self.deliver(StreamDelta(
            token_ids=token_ids,
            text=text,
            logprobs=(logprobs or []) if want else None,
            top_logprobs=(top or []) if want else None,
            finish_reason=finish,
            prompt_logprobs=self.prompt_logprobs if first else None,
            prompt_top_logprobs=self.prompt_top if first else None,
            queue_s=self.queue_s if first else None,
            cached_tokens=self.cached_tokens if first else None,
            end_token=end_token,
        ))

    def deliver(self, item: StreamDelta | BaseException) -> None:
        """A sink that fails (its caller is gone) ends this request at the next step, never the engine."""
        try:
            self.sink(item)
        except Exception:  # noqa: BLE001
            log.warning("request %s: its delta could not be delivered; aborting it", self.request_id, exc_info=True)
            self.abort_requested = True
