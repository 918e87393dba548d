"""Sampling: greedy, top-p (Meta's nucleus), top-k before top-p, seeded repeats, and logprobs with alternatives."""
from __future__ import annotations

import pytest
import torch

from llama.sampling import logprobs_of, sample, sample_top_p


def test_greedy_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert [sample(row, 0.0, 0.9, 0, None) for row in logits] == [1, 0]
    # top_p so small that only the most likely token survives: sampling becomes greedy
    probs = torch.softmax(logits, dim=-1)
    for _ in range(20):
        assert sample_top_p(probs, 0.01).reshape(-1).tolist() == [1, 0]


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = {int(sample_top_p(probs.clone(), 0.7, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 covers 0.7; tokens 2 and 3 are dropped


def test_top_k_restricts_the_draw_before_top_p_and_a_seed_repeats_it():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    best3 = set(torch.topk(logits, 3).indices.tolist())
    draws = [sample(logits, 2.0, 1.0, 3, torch.Generator().manual_seed(s)) for s in range(100)]
    assert set(draws) == best3  # a hot temperature reaches all three, never a fourth
    assert sample(logits, 1.0, 1.0, 1, torch.Generator()) == int(torch.argmax(logits))  # top_k 1 is greedy
    again = [sample(logits, 2.0, 1.0, 3, torch.Generator().manual_seed(s)) for s in range(100)]
    assert again == draws


def test_logprobs_are_the_models_own_with_k_alternatives_best_first():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    chosen, tops = logprobs_of(logits, torch.tensor([2, 0]), k=2)
    lsm = torch.log_softmax(logits, dim=-1)
    assert chosen == pytest.approx([lsm[0, 2].item(), lsm[1, 0].item()])
    assert [t for t, _ in tops[0]] == [1, 2] and tops[0][0][1] == pytest.approx(lsm[0, 1].item())
