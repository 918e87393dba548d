"""Sampling: vLLM's allowed tokens and repetition penalty, OpenAI's penalties and logit bias,
then temperature, min-p, top-k, top-p (nucleus) and greedy, one token at a time; and logprobs.

Top-p is done as Meta's reference does it. The engine gives every sampled request a seeded
torch.Generator of its own, so its draws depend on nothing else in the batch and on no rank.
"""
from __future__ import annotations

import torch

from llama.engine.device_io import to_device


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs (bsz, vocab) -> token ids (bsz, 1). Drops every token whose preceding cumulative
    mass already exceeds p, renormalises, draws one."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort.masked_fill_(mask, 0.0)  # not probs_sort[mask] = 0: a boolean index waits for the GPU
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def adjust_logits(
    logits: torch.Tensor,
    generated: list[int],
    presence_penalty: float,
    frequency_penalty: float,
    logit_bias: tuple[tuple[int, float], ...],
    *,
    seen: list[int] = (),  # type: ignore[assignment]
    repetition_penalty: float = 1.0,
    banned: tuple[int, ...] | frozenset[int] = (),
    allowed: tuple[int, ...] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (vocab,) -> new float32 logits (vocab,) for the draw, in vLLM's order:
    - `allowed`: every other token gets -inf; `banned` tokens get -inf (min_tokens' end tokens);
      so does every token `mask` (vocab,) bool (a grammar's) leaves out;
    - OpenAI's bias: logits[t] + bias[t];
    - vLLM's repetition penalty on each token in `seen` (the prompt and the generated tokens):
      logits[t] / repetition_penalty where positive, logits[t] * repetition_penalty otherwise;
    - OpenAI's penalties: logits[t] - frequency_penalty * count(t) - presence_penalty * (count(t) > 0),
      where count(t) is how often t occurs in `generated` (the generated tokens, not the prompt).
    Only the draw sees these; logprobs stay the model's own."""
    out = logits.float().clone()  # (vocab,); .float() alone would alias float32 logits
    if allowed is not None:
        keep = torch.full_like(out, float("-inf"))
        ids = to_device(list(allowed), out.device)
        out = keep.index_copy_(0, ids, out.index_select(0, ids))
    if mask is not None:
        out.masked_fill_(~mask.to(out.device, non_blocking=True), float("-inf"))
    if banned:
        out.index_fill_(0, to_device(list(banned), out.device), float("-inf"))
    if logit_bias:
        ids = to_device([t for t, _ in logit_bias], out.device)
        out.index_add_(0, ids, to_device([b for _, b in logit_bias], out.device, out.dtype))
    if seen and repetition_penalty != 1:
        ids = to_device(sorted(set(seen)), out.device)
        picked = out.index_select(0, ids)
        out.index_copy_(0, ids, torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty))
    if generated and (presence_penalty or frequency_penalty):
        ids = to_device(generated, out.device)
        counts = torch.zeros_like(out).index_add_(0, ids, torch.ones_like(ids, dtype=out.dtype))  # bincount would wait for the GPU
        out -= frequency_penalty * counts + presence_penalty * (counts > 0).float()
    return out


# Temperatures below this draw greedily (vLLM's threshold): dividing float32 logits by 1e-40
# overflows to inf, and the draw would fail the engine rather than the request.
GREEDY_BELOW = 1e-5
# Temperatures above this draw as this one does (as good as uniformly among the tokens left): a
# Python float past float32's range divides float32 logits as inf, and -inf / inf is nan.
HOTTEST = 1e30


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None,
    min_p: float = 0.0,
) -> torch.Tensor:
    """logits (vocab,) -> one token id, a 0-d tensor on the logits' device (nothing is read back
    to the host). After temperature, min_p (when > 0) drops every token less likely than min_p
    times the most likely one; then top_k (when > 0) keeps the k most likely tokens, and top_p is
    applied to their renormalised probabilities (vLLM's order). One multinomial draw from
    `generator` per call, whatever the distribution."""
    if temperature < GREEDY_BELOW:
        return torch.argmax(logits)
    probs = torch.softmax(logits.float() / min(temperature, HOTTEST), dim=-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if 0 < top_k < probs.shape[-1]:
        kept, idx = torch.topk(probs, top_k)  # sorted, most likely first
        kept = kept / kept.sum()
        choice = sample_top_p(kept[None], top_p, generator)[0, 0]
        return idx[choice]
    return sample_top_p(probs[None], top_p, generator)[0, 0]


def logprobs_on_device(logits: torch.Tensor, chosen: torch.Tensor, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (R, vocab), chosen (R,) -> float32 tensors on their device: the chosen tokens'
    logprobs (R,), and the k most likely tokens' logprobs and ids (R, k), best first, of the
    model's own distribution (before temperature)."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    top_lp, top_id = torch.topk(lsm, k, dim=-1)
    return lsm.gather(-1, chosen[:, None])[:, 0], top_lp, top_id


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """logprobs_on_device, read back: the chosen tokens' logprobs and the k most likely
    (token, logprob) per row."""
    chosen_lp, top_lp, top_id = logprobs_on_device(logits, chosen, k)
    return chosen_lp.tolist(), [list(zip(ids, lps)) for ids, lps in zip(top_id.tolist(), top_lp.tolist())]


def validate_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
