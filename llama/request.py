"""What one generation asks for and what it returns: plain dataclasses that cross process
boundaries (replica -> driver -> ranks) unchanged."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llama.sampling import validate_sampling


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int  # generated tokens at most (the prompt does not count)
    temperature: float = 0.6  # 0 is greedy
    top_p: float = 0.9
    # Seeds a per-request RNG so the draw does not depend on what else is in the batch, and so
    # every rank draws the same token. None uses the process RNG (the reference's behaviour).
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    logprobs: bool = False  # return the log-probability of each token
    echo: bool = False  # also return the prompt's logprobs (when logprobs is set)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}.")
        validate_sampling(self.temperature, self.top_p)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty.")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_tokens: tuple[int, ...]
    params: SamplingParams


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationOutput:
    prompt_tokens: list[int]
    token_ids: list[int]  # generated ids, cut before EOS; up to the stop string's last token
    text: str  # decoded generated text, cut before a stop string
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": max_tokens or max_seq_len
    logprobs: list[float] | None = None  # one per token_ids entry
    prompt_logprobs: list[float] | None = None  # one per prompt token (the first is 0.0), when echo
    extra: dict = field(default_factory=dict)
