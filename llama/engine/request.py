"""What one generation asks for and what it returns: plain dataclasses that cross process
boundaries (replica -> driver -> ranks, and back) unchanged.

A request's results arrive as a stream of StreamDeltas; `collect` joins a finished stream into
one GenerationOutput.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llama.engine.grammar import Grammar
from llama.engine.sampling import validate_sampling

MAX_LOGPROBS = 20  # top alternatives per token at most (OpenAI's chat limit)
MAX_PENALTY = 2  # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's range)
MAX_LOGIT_BIAS = 100  # a logit bias lies in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS] (OpenAI's range)

# (token id, logprob) of the most likely tokens at one position, most likely first.
TopLogprobs = list[tuple[int, float]]


@dataclass(frozen=True)
class SamplingParams:
    # Generated tokens at most (the prompt does not count). 0, with echo, scores the prompt: its
    # tokens' logprobs, and nothing generated (what lm-evaluation-harness's loglikelihood sends).
    max_tokens: int
    temperature: float = 0.6  # 0 is greedy
    top_p: float = 0.9
    top_k: int = 0  # sample among the k most likely tokens only; 0 means no limit
    # Seeds a per-request RNG so the draw depends neither on what else is in the batch nor on the
    # model-parallel size. None: the engine draws one from its own seeded RNG.
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    # None: no logprobs. k >= 0: each token's logprob (of the model's distribution, before
    # temperature) and the k most likely alternatives at its position.
    logprobs: int | None = None
    echo: bool = False  # also return the prompt tokens' logprobs (when logprobs is set)
    # OpenAI's penalties, applied on the driver before temperature, top-k, top-p and greedy:
    # logits[t] -= frequency_penalty * count(t) + presence_penalty * (count(t) > 0), counting t
    # among the generated tokens only (not the prompt), as OpenAI and vLLM do.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs added to the logits with the penalties; +100 all but forces a token,
    # -100 all but bans it. A tuple, not a dict, so the params stay hashable.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's sampling extensions, with its names, defaults and meaning:
    # min_p: after temperature, drop every token less likely than min_p times the most likely one
    # (before top-k and top-p); 0 is off. Greedy draws are unaffected.
    min_p: float = 0.0
    # repetition_penalty: vLLM's multiplicative penalty on every token in the prompt or generated
    # so far: its logit is divided by the penalty when positive, multiplied by it otherwise,
    # before the other penalties. 1 is off; it steers greedy draws too.
    repetition_penalty: float = 1.0
    # min_tokens: no end token (the tokenizer's, and stop_token_ids) is drawn, and no stop string
    # matches, before this many tokens are generated.
    min_tokens: int = 0
    # ignore_eos: the tokenizer's end tokens do not end the sequence; they are kept as generated
    # tokens, and it runs on to max_tokens, a stop string or stop_token_ids.
    ignore_eos: bool = False
    # stop_token_ids: more token ids that end the sequence as an end token does (finish_reason
    # "stop"; the token is not in the output).
    stop_token_ids: tuple[int, ...] = ()
    # allowed_token_ids: draw only among these (greedy too); None: any token.
    allowed_token_ids: tuple[int, ...] | None = None
    # bad_words: token-id sequences (vLLM's bad_words, as the HTTP layer encodes each word) that
    # are never generated: a sequence's last token is banned wherever the generated tokens end
    # with the rest of it (a one-token word everywhere).
    bad_words: tuple[tuple[int, ...], ...] = ()
    # include_stop_str_in_output: the text ends after the stop string found, not before it.
    include_stop_str_in_output: bool = False
    # skip_special_tokens: special tokens (headers, reserved ids) write no text. False (here, as in
    # Meta's decode) writes their text; vLLM's HTTP default is True, and deploy/ sends that.
    skip_special_tokens: bool = False
    # grammar: structured outputs; the generated text must match it (a JSON schema, a regular
    # expression, choices or a Lark grammar; llama/engine/grammar.py), enforced as a token mask on
    # the draw (greedy too). Once it is complete only an end token may follow ("stop").
    grammar: Grammar | None = None
    # Penalties, bias and masks steer the draw only: the logprobs reported stay those of the
    # model's own distribution, as they are before temperature.

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}.")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it is only meaningful with echo (to score the prompt); "
                             "ask for at least one token, or set echo.")
        validate_sampling(self.temperature, self.top_p)
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 means no limit), got {self.top_k!r}.")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty.")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS} alternatives, got {self.logprobs}.")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(f"{name} must be between {-MAX_PENALTY} and {MAX_PENALTY}, got {getattr(self, name)}.")
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}.")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias for token {token} must be between {-MAX_LOGIT_BIAS} and "
                                 f"{MAX_LOGIT_BIAS}, got {bias}.")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 is off), got {self.min_p}.")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}.")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer between 0 and max_tokens ({self.max_tokens}), "
                             f"got {self.min_tokens!r}.")
        for name in ("stop_token_ids", "allowed_token_ids"):
            for token in getattr(self, name) or ():
                if not isinstance(token, int) or token < 0:
                    raise ValueError(f"{name} must be token ids (integers >= 0), got {token!r}.")
        for word in self.bad_words:
            if not word or any(not isinstance(t, int) or t < 0 for t in word):
                raise ValueError(f"bad_words must be non-empty sequences of token ids (integers >= 0), got {word!r}.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty: no token could be drawn; leave it out for any token.")

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties, a bias or a mask change the logits before the draw; when not, the
        engine skips that work entirely."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.repetition_penalty != 1
                    or self.min_tokens or self.allowed_token_ids is not None or self.bad_words
                    or self.grammar is not None)

    @property
    def counts_history(self) -> bool:
        """Whether the draw reads the tokens generated so far (not only how many)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or any(len(word) > 1 for word in self.bad_words) or self.grammar is not None)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_tokens: tuple[int, ...]
    params: SamplingParams
    # Seconds the request may spend in the engine, from its arrival at the driver; past it the
    # request ends at the next step boundary with finish_reason "timeout". None: no limit.
    timeout_s: float | None = None


# "stop": EOS or a stop string. "length": max_tokens or max_seq_len. The engine adds "timeout"
# (deadline passed) and "abort" (cancelled by the caller); the HTTP layer turns both into errors.
FinishReason = Literal["stop", "length", "timeout", "abort"]


@dataclass(frozen=True)
class EndToken:
    """The end token (EOS, Llama 3's <|eot_id|>) that finished a sequence. It is not part of the
    output's token_ids or text; its logprob and alternatives are there when logprobs were asked
    for, since OpenAI-style clients read a generated token's logprob even when it ends the text
    (lm-eval scores an echo with max_tokens 1 by dropping its last logprobs entry)."""

    token_id: int
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None


@dataclass(frozen=True)
class StreamDelta:
    """What one request produced in one or more engine steps. The concatenation of a stream's
    deltas is the request's GenerationOutput (see `collect`)."""

    token_ids: list[int]  # generated since the previous delta (EOS is never included)
    # Text since the previous delta. Text is held back while it could still be the start of a stop
    # string or the first bytes of an unfinished character, so it may lag token_ids.
    text: str
    logprobs: list[float] | None = None  # one per token_ids entry, when requested
    top_logprobs: list[TopLogprobs] | None = None  # one list of k alternatives per token_ids entry
    finish_reason: FinishReason | None = None  # set on a stream's last delta only
    # On the first delta only, when echo and logprobs are set: one per prompt token (the first
    # prompt token has 0.0 and no alternatives: nothing predicts it).
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[TopLogprobs] | None = None
    queue_s: float | None = None  # on the first delta: seconds the request waited to start running
    cached_tokens: int | None = None  # on the first delta: prompt tokens found in the prefix cache
    end_token: EndToken | None = None  # on the last delta, when an end token finished the sequence


@dataclass(frozen=True)
class GenerationOutput:
    prompt_tokens: list[int]
    token_ids: list[int]  # generated ids, cut before EOS; up to the stop string's last token
    text: str  # decoded generated text, cut before a stop string
    finish_reason: FinishReason
    logprobs: list[float] | None = None  # one per token_ids entry
    prompt_logprobs: list[float] | None = None  # one per prompt token (the first is 0.0), when echo
    top_logprobs: list[TopLogprobs] | None = None  # one per token_ids entry, when logprobs is set
    prompt_top_logprobs: list[TopLogprobs] | None = None  # one per prompt token, when echo
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache


def join(deltas: list[StreamDelta]) -> StreamDelta:
    """A finished stream's deltas as one delta: everything the stream said, at once."""
    if not deltas or deltas[-1].finish_reason is None:
        raise ValueError("join() needs a finished stream: its last delta has a finish_reason.")
    want_lp = deltas[0].logprobs is not None  # the engine sends lists on every delta, or on none
    return StreamDelta(
        token_ids=[t for d in deltas for t in d.token_ids],
        text="".join(d.text for d in deltas),
        logprobs=[x for d in deltas for x in (d.logprobs or [])] if want_lp else None,
        top_logprobs=[x for d in deltas for x in (d.top_logprobs or [])] if want_lp else None,
        finish_reason=deltas[-1].finish_reason,
        prompt_logprobs=deltas[0].prompt_logprobs,  # only the first delta has them
        prompt_top_logprobs=deltas[0].prompt_top_logprobs,
        queue_s=deltas[0].queue_s,
        cached_tokens=deltas[0].cached_tokens,
        end_token=deltas[-1].end_token,
    )


def collect(prompt_tokens: list[int], deltas: list[StreamDelta]) -> GenerationOutput:
    """A finished stream as one output."""
    d = join(deltas)
    return GenerationOutput(
        prompt_tokens=list(prompt_tokens),
        token_ids=d.token_ids,
        text=d.text,
        finish_reason=d.finish_reason,
        logprobs=d.logprobs,
        prompt_logprobs=d.prompt_logprobs,
        top_logprobs=d.top_logprobs,
        prompt_top_logprobs=d.prompt_top_logprobs,
        cached_tokens=d.cached_tokens,
    )
