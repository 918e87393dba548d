"""Sampling: greedy, top-p (Meta's nucleus), top-k before top-p, seeded repeats, logprobs with
alternatives; OpenAI's penalties and logit bias, and the SamplingParams that carry them."""
from __future__ import annotations

import pytest
import torch

from llama.engine.request import SamplingParams
from llama.engine.sampling import adjust_logits, logprobs_of, sample, sample_top_p


def test_greedy_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert [int(sample(row, 0.0, 0.9, 0, None)) for row in logits] == [1, 0]
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
    draws = [int(sample(logits, 2.0, 1.0, 3, torch.Generator().manual_seed(s))) for s in range(100)]
    assert set(draws) == best3  # a hot temperature reaches all three, never a fourth
    assert int(sample(logits, 1.0, 1.0, 1, torch.Generator())) == int(torch.argmax(logits))  # top_k 1 is greedy
    again = [int(sample(logits, 2.0, 1.0, 3, torch.Generator().manual_seed(s))) for s in range(100)]
    assert again == draws


def test_logprobs_are_the_models_own_with_k_alternatives_best_first():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    chosen, tops = logprobs_of(logits, torch.tensor([2, 0]), k=2)
    lsm = torch.log_softmax(logits, dim=-1)
    assert chosen == pytest.approx([lsm[0, 2].item(), lsm[1, 0].item()])
    assert [t for t, _ in tops[0]] == [1, 2] and tops[0][0][1] == pytest.approx(lsm[0, 1].item())


def test_adjust_logits_is_openais_formula_over_the_generated_tokens():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    out = adjust_logits(logits, [2, 2, 4], presence_penalty=0.5, frequency_penalty=1.0,
                        logit_bias=((1, 3.0), (5, -100.0)))
    # token 2: twice (-2 - 0.5); token 4: once (-1 - 0.5); 1 and 5 biased; 0 and 3 untouched
    assert out.tolist() == [1.0, 5.0, 0.5, 4.0, 3.5, -94.0]
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # the model's logits stay as they were (logprobs)
    negative = adjust_logits(logits, [3], presence_penalty=-1.0, frequency_penalty=-2.0, logit_bias=())
    assert negative.tolist() == [1.0, 2.0, 3.0, 7.0, 5.0, 6.0]  # negative penalties favour repeats
    half = adjust_logits(logits.to(torch.bfloat16), [], 2.0, 2.0, ())
    assert half.dtype == torch.float32 and half.tolist() == logits.tolist()  # nothing generated: nothing to count


def test_logit_bias_forces_or_bans_a_token_greedy_or_sampled():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    best = int(torch.argmax(logits))
    forced = adjust_logits(logits, [], 0.0, 0.0, ((7, 100.0),))
    banned = adjust_logits(logits, [], 0.0, 0.0, ((best, -100.0),))
    assert int(sample(forced, 0.0, 1.0, 0, None)) == 7
    assert {int(sample(forced, 1.0, 1.0, 0, torch.Generator().manual_seed(s))) for s in range(50)} == {7}
    assert int(sample(banned, 0.0, 1.0, 0, None)) != best
    assert best not in {int(sample(banned, 1.0, 1.0, 0, torch.Generator().manual_seed(s))) for s in range(200)}


@pytest.mark.parametrize("params, message", [
    (dict(max_tokens=0), "only meaningful with echo"),
    (dict(max_tokens=0, logprobs=1), "only meaningful with echo"),
    (dict(max_tokens=-1, echo=True), "integer >= 0"),
    (dict(max_tokens=1, presence_penalty=2.5), "presence_penalty must be between -2 and 2,"),
    (dict(max_tokens=1, frequency_penalty=-2.1), "frequency_penalty must be between"),
    (dict(max_tokens=1, frequency_penalty=float("nan")), "frequency_penalty must be between"),
    (dict(max_tokens=1, logit_bias=((3, 101.0),)), "logit_bias for token 3 must be between"),
    (dict(max_tokens=1, logit_bias=((-1, 1.0),)), "token ids"),
])
def test_sampling_params_refuse_what_no_engine_can_run(params: dict, message: str):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params)


def test_only_penalties_or_a_bias_adjust_the_logits():
    assert SamplingParams(max_tokens=0, echo=True).max_tokens == 0  # scoring: echo, nothing generated
    assert not SamplingParams(max_tokens=1, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=()).adjusts_logits
    assert SamplingParams(max_tokens=1, presence_penalty=0.1).adjusts_logits
    assert SamplingParams(max_tokens=1, frequency_penalty=-0.1).adjusts_logits
    assert SamplingParams(max_tokens=1, logit_bias=((3, 0.0),)).adjusts_logits


def test_a_temperature_too_small_to_divide_by_draws_greedily():
    """1e-40 (or 5e-324, which float32 makes 0) would overflow the logits to inf and fail the draw."""
    logits = torch.tensor([0.5, 3.0, 2.9])
    g = torch.Generator().manual_seed(0)
    assert [int(sample(logits, t, 1.0, 0, g)) for t in (1e-40, 5e-324, 9e-6)] == [1, 1, 1]
