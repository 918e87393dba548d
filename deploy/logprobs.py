"""Engine logprobs as OpenAI's logprobs objects, for whole outputs and for stream chunks alike.

The engine gives ids, each token's logprob and its top alternatives as (id, logprob); this
module turns them into text: pieces decoded one token at a time (Meta's reference's "tokens"),
character offsets, and the tokens' own UTF-8 bytes.
"""
from __future__ import annotations

import math

from deploy.responses import CompletionLogprobs, TokenLogprob, TopLogprob
from llama.engine.request import TopLogprobs
from llama.tokenizers.base import Tokenizer

_FLOOR = -9999.0  # what OpenAI sends for an impossible token; JSON has no -inf


def completion_logprobs(
    tokenizer: Tokenizer,
    token_ids: list[int],
    logprobs: list[float],
    top: list[TopLogprobs] | None,
    offset: int,
) -> CompletionLogprobs:
    """One entry per token; text_offset adds up piece lengths from `offset` (the choice's text
    before these tokens: streams continue where the previous chunk ended)."""
    assert len(logprobs) == len(token_ids), f"{len(logprobs)} logprobs for {len(token_ids)} tokens"
    top = top if top is not None else [[] for _ in token_ids]
    tokens, offsets = [], []
    for t in token_ids:
        tokens.append(tokenizer.decode([t]))
        offsets.append(offset)
        offset += len(tokens[-1])
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[_finite(lp) for lp in logprobs],
        top_logprobs=[_top_dict(tokenizer, t, lp, alts) for t, lp, alts in zip(token_ids, logprobs, top)],
        text_offset=offsets,
    )


def prompt_logprobs(
    tokenizer: Tokenizer, prompt_tokens: list[int], logprobs: list[float], top: list[TopLogprobs] | None
) -> CompletionLogprobs:
    """The echoed prompt's entries, from offset 0. Nothing predicts the first prompt token, so its
    logprob and alternatives are null, as in OpenAI's and vLLM's answers."""
    out = completion_logprobs(tokenizer, prompt_tokens, logprobs, top, offset=0)
    out.token_logprobs[0], out.top_logprobs[0] = None, None
    return out


def joined(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + second.text_offset,
    )


def chat_logprobs(
    tokenizer: Tokenizer, token_ids: list[int], logprobs: list[float], top: list[TopLogprobs] | None
) -> list[TokenLogprob]:
    """The `content` entries of chat logprobs: each token with its alternatives (exactly the
    request's top_logprobs of them, most likely first, the chosen token among them or not)."""
    assert len(logprobs) == len(token_ids), f"{len(logprobs)} logprobs for {len(token_ids)} tokens"
    top = top if top is not None else [[] for _ in token_ids]
    return [
        TokenLogprob(token=tokenizer.decode([t]), logprob=_finite(lp), bytes=token_bytes(tokenizer, t),
                     top_logprobs=[_top_entry(tokenizer, a, alp) for a, alp in alts])
        for t, lp, alts in zip(token_ids, logprobs, top)
    ]


def token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    """The token's own UTF-8 bytes (Tokenizer.token_bytes): a byte-fallback piece is one raw byte
    (its decoded text alone is U+FFFD) and a word-initial piece keeps its space, so a client that
    joins the bytes gets the text back (with the leading space that decoding drops); none for a
    control token."""
    return list(tokenizer.token_bytes(token_id))


def _top_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> TopLogprob:
    return TopLogprob(token=tokenizer.decode([token_id]), logprob=_finite(logprob),
                      bytes=token_bytes(tokenizer, token_id))


def _top_dict(tokenizer: Tokenizer, chosen: int, chosen_logprob: float, alts: TopLogprobs) -> dict[str, float]:
    # Most likely first; the chosen token last when it is not among the alternatives. On a clash
    # of texts the more likely token keeps the key.
    entries = alts if any(t == chosen for t, _ in alts) else [*alts, (chosen, chosen_logprob)]
    out: dict[str, float] = {}
    for t, lp in entries:
        out.setdefault(tokenizer.decode([t]), _finite(lp))
    return out


def _finite(logprob: float) -> float:
    return logprob if not math.isinf(logprob) else _FLOOR
