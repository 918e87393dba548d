"""Sampling: temperature, top-p (nucleus) and greedy, as Meta's reference does them.

Each row may carry its own temperature, top_p and torch.Generator (for seeded requests);
rows without a generator draw from the global RNG, which keeps the reference's numbers.
"""
from __future__ import annotations

import torch


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs (bsz, vocab) -> token ids (bsz, 1). Drops every token whose preceding cumulative
    mass already exceeds p, renormalises, draws one."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits (bsz, vocab) -> (bsz,), one setting for the whole batch (the reference's way)."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p).reshape(-1)
    return torch.argmax(logits, dim=-1)


def sample_rows(
    logits: torch.Tensor,
    temperatures: list[float],
    top_ps: list[float],
    generators: list[torch.Generator | None],
    active: list[bool] | None = None,
) -> torch.Tensor:
    """logits (bsz, vocab) -> (bsz,), each row with its own settings and RNG.

    Rows not `active` (still inside their prompt) draw nothing, so a seeded row consumes its
    RNG once per generated token, whatever the other rows' prompt lengths."""
    out = torch.argmax(logits, dim=-1)
    for i, (t, p, g) in enumerate(zip(temperatures, top_ps, generators)):
        if t > 0 and (active is None or active[i]):
            probs = torch.softmax(logits[i : i + 1] / t, dim=-1)
            out[i] = sample_top_p(probs, p, generator=g)[0, 0]
    return out


def validate_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
