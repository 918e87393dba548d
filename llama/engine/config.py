"""EngineConfig, the engine's settings (their only home, with their defaults and checks), and
check_request: what a request must satisfy before it enters the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

from llama.engine.request import GenerationRequest


@dataclass(frozen=True)
class EngineConfig:
    """How one model is served: the only home of these settings and their defaults. Filled from
    deploy/config.yaml's `engine:` section (or Llama.build's arguments) and passed down whole."""

    max_batch_size: int = 8  # sequences decoding at once: the KV cache's slots
    max_seq_len: int = 256  # prompt and generation together, per sequence
    prefill_chunk: int = 64  # prompt tokens run per step at most, over all prefilling sequences
    request_timeout_s: float | None = None  # a request still running this long after arrival ends ("timeout")
    seed: int = 1  # seeds the RNG that draws a seed for each sampled request that brings none
    heartbeat_s: float = 1.0  # an idle driver still sends a plan this often, so followers' waits never time out
    # Requests a replica holds beyond its max_batch_size running ones; more are refused at once
    # (HTTP 429 with Retry-After) rather than left to wait for their deadline.
    max_waiting: int = 64
    # Plan and send step N+1 while the device runs step N, reading step N's tokens back after
    # (null: on CUDA). A sequence that ends on a stop token or string then runs one more row, which
    # is dropped. On the CPU, where nothing runs beside the host, overlapping only delays each
    # token by a step.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        least = {"max_batch_size": 1, "max_seq_len": 2, "prefill_chunk": 1, "max_waiting": 0}
        bad = [f"{k} must be an integer >= {n}, got {getattr(self, k)!r}" for k, n in least.items()
               if type(getattr(self, k)) is not int or getattr(self, k) < n]  # bool is no count
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            bad.append(f"request_timeout_s must be > 0 seconds (or null for no limit), got {self.request_timeout_s}")
        if not (self.async_scheduling is None or isinstance(self.async_scheduling, bool)):
            bad.append(f"async_scheduling must be true, false or null (on CUDA), got {self.async_scheduling!r}")
        if not self.heartbeat_s > 0:
            bad.append(f"heartbeat_s must be > 0 seconds, got {self.heartbeat_s}")
        if bad:
            raise ValueError("engine settings: " + "; ".join(bad) + ".")


def check_request(request: GenerationRequest, max_seq_len: int, vocab_size: int) -> None:
    """Raise ValueError for a request this model cannot run, before it enters the engine (on the
    driver, so no rank ever sees it)."""
    tokens = request.prompt_tokens
    if not tokens:
        raise ValueError("the prompt is empty: send at least one token.")
    if len(tokens) >= max_seq_len:
        raise ValueError(f"the prompt is {len(tokens)} tokens; this model serves at most max_seq_len {max_seq_len} "
                         f"tokens, prompt and generation together. Shorten the prompt.")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}.")
    bad = [t for t, _ in request.params.logit_bias if not t < vocab_size]  # SamplingParams checked >= 0
    if bad:
        raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}.")
