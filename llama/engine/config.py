"""EngineConfig, the engine's settings (their only home, with their defaults and checks), and
check_request: what a request must satisfy before it enters the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from llama.engine.request import GenerationRequest
from llama.model.args import ModelArgs


@dataclass(frozen=True)
class EngineConfig:
    """How one model is served: the only home of these settings and their defaults. Filled from
    deploy/config.yaml's `engine:` section (or Llama.build's arguments) and passed down whole."""

    max_batch_size: int = 8  # sequences running at once (rows of the block table)
    # Prompt and generation together, per sequence. None: the model's own context
    # (ModelArgs.context_length), less where the KV cache could not hold one such sequence.
    max_seq_len: int | None = None
    prefill_chunk: int = 64  # prompt tokens run per step at most, over all prefilling sequences
    block_size: int = 16  # positions per KV-cache block
    # The KV cache's memory per rank, in GiB. None: on CUDA, 90% of what is free once the
    # weights are loaded, less 2 GiB for activations and CUDA graphs; on the CPU, 4 GiB, or
    # less when max_batch_size sequences of max_seq_len need less (llama/engine/kv_memory.py).
    kv_cache_memory_gb: float | None = None
    # Full blocks stay cached (keyed by their prefix) after their requests end, until their
    # memory is needed: a prompt that begins as an earlier one did prefills only the rest.
    prefix_caching: bool = True
    request_timeout_s: float | None = None  # a request still running this long after arrival ends ("timeout")
    seed: int = 1  # seeds the RNG that draws a seed for each sampled request that brings none
    heartbeat_s: float = 1.0  # an idle driver still sends a plan this often, so followers' waits never time out
    # Requests a replica holds beyond its max_batch_size running ones; more are refused at once
    # (HTTP 429 with Retry-After) rather than left to wait for their deadline.
    max_waiting: int = 64
    # Plan and send step N+1 while the device runs step N, reading step N's tokens back after
    # (null: on CUDA). A sequence that ends on a stop token or string then runs one more row, which
    # is dropped. On the CPU, where nothing runs beside the host, overlapping only delays each
    # token by a step. A pipeline keeps a step in flight per stage instead (llama/engine/core.py).
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        least = {"max_batch_size": 1, "max_seq_len": 2, "prefill_chunk": 1, "max_waiting": 0, "block_size": 1}
        bad = [f"{k} must be an integer >= {n}, got {getattr(self, k)!r}" for k, n in least.items()
               if (getattr(self, k) is not None or k != "max_seq_len")
               and (type(getattr(self, k)) is not int or getattr(self, k) < n)]  # bool is no count
        if self.kv_cache_memory_gb is not None and not (type(self.kv_cache_memory_gb) in (int, float)
                                                        and self.kv_cache_memory_gb > 0):
            bad.append(f"kv_cache_memory_gb must be > 0 (or null for the default), got {self.kv_cache_memory_gb!r}")
        if not isinstance(self.prefix_caching, bool):
            bad.append(f"prefix_caching must be true or false, got {self.prefix_caching!r}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            bad.append(f"request_timeout_s must be > 0 seconds (or null for no limit), got {self.request_timeout_s}")
        if not (self.async_scheduling is None or isinstance(self.async_scheduling, bool)):
            bad.append(f"async_scheduling must be true, false or null (on CUDA), got {self.async_scheduling!r}")
        if not self.heartbeat_s > 0:
            bad.append(f"heartbeat_s must be > 0 seconds, got {self.heartbeat_s}")
        if bad:
            raise ValueError("engine settings: " + "; ".join(bad) + ".")

    def for_model(self, args: ModelArgs, pool_tokens: int | None = None) -> "EngineConfig":
        """These settings with max_seq_len settled for the model: as set, else the model's
        context, cut to what a pool of pool_tokens positions holds (None: not known yet). A
        max_seq_len set above the pool stands: a request that could never fit is refused when
        it is submitted, saying how many blocks it needs and how many exist (check_request)."""
        if self.max_seq_len is not None:
            return self
        length = args.context_length
        if pool_tokens is not None:
            length = min(length, pool_tokens)
        return replace(self, max_seq_len=length)


def check_request(request: GenerationRequest, max_seq_len: int, vocab_size: int,
                  block_size: int | None = None, num_blocks: int | None = None) -> None:
    """Raise ValueError for a request this model cannot run, before it enters the engine (on the
    driver, so no rank ever sees it)."""
    tokens = request.prompt_tokens
    if not tokens:
        raise ValueError("the prompt is empty: send at least one token.")
    if len(tokens) >= max_seq_len:
        raise ValueError(f"the prompt is {len(tokens)} tokens; this model serves at most max_seq_len {max_seq_len} "
                         f"tokens, prompt and generation together. Shorten the prompt.")
    if num_blocks is not None:
        longest = min(len(tokens) + request.params.max_tokens, max_seq_len)
        need = -(-longest // block_size)
        if need > num_blocks:
            raise ValueError(f"the prompt ({len(tokens)} tokens) and max_tokens ({request.params.max_tokens}) need "
                             f"{need} KV blocks of {block_size} positions, and this server's cache holds "
                             f"{num_blocks}. Send a shorter prompt or a lower max_tokens.")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}.")
    bad = [t for t, _ in request.params.logit_bias if not t < vocab_size]  # SamplingParams checked >= 0
    if bad:
        raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}.")
    for field in ("stop_token_ids", "allowed_token_ids"):
        bad = [t for t in getattr(request.params, field) or () if not t < vocab_size]  # SamplingParams checked >= 0
        if bad:
            raise ValueError(f"{field} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}.")
