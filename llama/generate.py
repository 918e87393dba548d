"""The batch generation loop: a static batch of prompts decoded together, Meta's way.

Decoding starts at the shortest prompt; a row still inside its prompt keeps its prompt token.
Each row has its own sampling settings and limits and ends on EOS, a stop string or its
length. Every model-parallel rank runs this same loop on the same inputs; with identical
logits (gathered) and identical RNG use, every rank picks the same tokens.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from llama.kv_cache import KVCache
from llama.model import Transformer
from llama.request import GenerationOutput, GenerationRequest
from llama.sampling import sample, sample_rows
from llama.tokenizer import Tokenizer


class PromptTooLongError(ValueError):
    pass


def check_prompts(requests: list[GenerationRequest], max_seq_len: int, max_batch_size: int, vocab_size: int) -> None:
    """Raise ValueError for a batch the model cannot run. Called on every rank before any
    collective, so a bad request fails everywhere at once and no rank is left waiting."""
    if not requests:
        raise ValueError("no prompts given.")
    if len(requests) > max_batch_size:
        raise ValueError(f"{len(requests)} prompts in one batch; this model was built for max_batch_size {max_batch_size}.")
    for i, r in enumerate(requests):
        if not r.prompt_tokens:
            raise ValueError(f"prompt {i} is empty: send at least one token.")
        if len(r.prompt_tokens) >= max_seq_len:
            raise PromptTooLongError(
                f"prompt {i} is {len(r.prompt_tokens)} tokens; this model serves at most "
                f"max_seq_len {max_seq_len} tokens, prompt and generation together. Shorten the prompt."
            )
        bad = [t for t in r.prompt_tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}.")


@torch.inference_mode()
def generate_batch(
    model: Transformer,
    tokenizer: Tokenizer,
    cache: KVCache,
    requests: list[GenerationRequest],
    on_token: Callable[[int, int], None] | None = None,
) -> list[GenerationOutput]:
    """Run a static batch to the end. `on_token(row, token)` is called for each generated
    token as it is picked (the benchmark times first tokens with it)."""
    max_seq_len = cache.max_seq_len
    check_prompts(requests, max_seq_len, cache.max_batch_size, model.args.vocab_size)
    device = model.device
    bsz = len(requests)
    params = [r.params for r in requests]
    plens = [len(r.prompt_tokens) for r in requests]
    ends = [min(max_seq_len, n + p.max_tokens) for n, p in zip(plens, params)]  # exclusive
    total_len = max(ends)
    min_plen = min(plens)
    pad = -1

    tokens = torch.full((bsz, total_len), pad, dtype=torch.long, device=device)
    for i, r in enumerate(requests):
        tokens[i, : plens[i]] = torch.tensor(r.prompt_tokens, dtype=torch.long, device=device)
    want_lp = any(p.logprobs is not None for p in params)
    token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=device) if want_lp else None

    # The reference's batch-wide draw (global RNG) when rows agree and none is seeded.
    shared = all(p.seed is None and (p.temperature, p.top_p) == (params[0].temperature, params[0].top_p) for p in params)
    generators = [
        None if p.seed is None else torch.Generator(device=device).manual_seed(p.seed) for p in params
    ]
    temps = [p.temperature for p in params]
    top_ps = [p.top_p for p in params]

    last = list(plens)  # per row: exclusive end of the tokens kept
    finish: list[str | None] = [None if plens[i] < ends[i] else "length" for i in range(bsz)]
    texts: list[str | None] = [None] * bsz

    if min_plen == total_len and token_logprobs is not None:
        logits = model(tokens, 0, cache)
        token_logprobs = -F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none", ignore_index=pad)

    prev = 0
    plen_t = torch.tensor(plens, device=device)
    for cur in range(min_plen, total_len):
        if all(f is not None for f in finish):
            break
        logits = model(tokens[:, prev:cur], prev, cache)  # (bsz, cur-prev, vocab)
        if shared:
            nxt = sample(logits[:, -1], temps[0], top_ps[0])
        else:
            active = [cur >= n and f is None for n, f in zip(plens, finish)]
            nxt = sample_rows(logits[:, -1], temps, top_ps, generators, active)
        in_prompt = plen_t > cur
        nxt = torch.where(in_prompt, tokens[:, cur], nxt)
        tokens[:, cur] = nxt
        if token_logprobs is not None:
            token_logprobs[:, prev + 1 : cur + 1] = -F.cross_entropy(
                logits.transpose(1, 2), tokens[:, prev + 1 : cur + 1], reduction="none", ignore_index=pad
            )
        prev = cur
        for i, tok in enumerate(nxt.tolist()):
            if finish[i] is not None or cur < plens[i]:
                continue
            if tok == tokenizer.eos_id:
                finish[i] = "stop"
                continue
            last[i] = cur + 1
            if on_token is not None:
                on_token(i, tok)
            if params[i].stop:
                text = tokenizer.decode(tokens[i, plens[i] : last[i]].tolist())
                hits = [text.find(s) for s in params[i].stop if s in text]
                if hits:
                    finish[i], texts[i] = "stop", text[: min(hits)]
                    continue
            if last[i] >= ends[i]:
                finish[i] = "length"

    rows = tokens.tolist()
    lps = token_logprobs.tolist() if token_logprobs is not None else None
    outputs = []
    for i in range(bsz):
        gen = rows[i][plens[i] : last[i]]
        p = params[i]
        outputs.append(
            GenerationOutput(
                prompt_tokens=list(requests[i].prompt_tokens),
                token_ids=gen,
                text=texts[i] if texts[i] is not None else tokenizer.decode(gen),
                finish_reason=finish[i] or "length",
                logprobs=lps[i][plens[i] : last[i]] if p.logprobs is not None and lps else None,
                prompt_logprobs=lps[i][: plens[i]] if p.logprobs is not None and p.echo and lps else None,
            )
        )
    return outputs
