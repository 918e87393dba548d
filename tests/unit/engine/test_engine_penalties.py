"""OpenAI's presence and frequency penalties and logit_bias in the engine: greedy tokens against
a cache-free loop that applies OpenAI's formula itself; counts over the generated tokens only;
bias that forces or bans a token; logprobs that stay the model's own; seeded draws the same
whatever the batch; and requests without them never paying for them."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_engine import Driver, golden_model, greedy, random_prompts, step_mode  # noqa: F401 (fixtures)

from llama.engine.request import GenerationRequest, SamplingParams


def reference(model, tok, prompt: list[int], n: int, presence: float = 0.0, frequency: float = 0.0,
              bias: dict[int, float] | None = None) -> tuple[list[int], list[float]]:
    """Greedy with OpenAI's formula written out, a fresh forward over the whole sequence per token:
    the tokens, and each one's logprob under the model's own (unpenalised) distribution."""
    from llama.engine.runner import forward_rows

    seq, out, lps = list(prompt), [], []
    with torch.inference_mode():
        while len(out) < n:
            logits = forward_rows(model, [seq])[-1].float()
            steered = logits.clone()
            for t, count in Counter(out).items():  # generated tokens only: the prompt is not counted
                steered[t] -= frequency * count + presence
            for t, b in (bias or {}).items():
                steered[t] += b
            nxt = int(torch.argmax(steered))
            if nxt in tok.stop_ids:
                break
            out.append(nxt)
            seq.append(nxt)
            lps.append(float(torch.log_softmax(logits, dim=-1)[nxt]))
    return out, lps


@pytest.fixture(scope="module")
def repeating(golden_model) -> list[int]:
    """A prompt whose plain greedy continuation repeats one token over and over (396, 19 times)."""
    return random_prompts(6, golden_model[1].n_words, seed=30)[3]


@pytest.mark.parametrize("presence, frequency", [(0.0, 2.0), (2.0, 0.0), (0.3, 0.4), (0.0, 0.15), (-1.0, -0.5)])
def test_penalised_greedy_follows_openais_formula(golden_model, repeating, presence, frequency):
    model, tok = golden_model
    prompts = [repeating, *random_prompts(2, tok.n_words, seed=31)]
    out = Driver(model, tok).run([greedy(p, 20, presence_penalty=presence, frequency_penalty=frequency)
                                  for p in prompts])
    for p, o in zip(prompts, out):
        assert o.token_ids == reference(model, tok, p, 20, presence, frequency)[0]


def test_a_large_frequency_penalty_stops_a_repeated_token_and_a_negative_one_repeats_it(golden_model, repeating):
    model, tok = golden_model
    plain, stopped, repeated = Driver(model, tok).run([greedy(repeating, 20),
                                                       greedy(repeating, 20, frequency_penalty=2.0),
                                                       greedy(repeating, 20, frequency_penalty=-2.0)])
    top, count = Counter(plain.token_ids).most_common(1)[0]
    assert count >= 10
    assert stopped.token_ids[0] == top and stopped.token_ids.count(top) == 1  # nothing generated yet: no penalty
    assert max(Counter(stopped.token_ids).values()) == 1
    assert repeated.token_ids == [top] * 20


def test_penalties_count_the_generated_tokens_not_the_prompt(golden_model, repeating):
    model, tok = golden_model
    plain = Driver(model, tok).run([greedy(repeating, 8)])[0]
    top = plain.token_ids[1]
    assert plain.token_ids[:8] == [top] * 8  # the prompt continued below already holds `top` many times
    prompt = repeating + plain.token_ids[:6]
    o = Driver(model, tok).run([greedy(prompt, 4, presence_penalty=2.0, frequency_penalty=2.0)])[0]
    assert o.token_ids[0] == top and top not in o.token_ids[1:]


def test_logit_bias_forces_or_bans_a_token_and_logprobs_stay_the_models(golden_model, repeating):
    model, tok = golden_model
    forced_id = 7
    seeded = SamplingParams(max_tokens=6, temperature=1.0, seed=3, logit_bias=((forced_id, 100.0),))
    forced, sampled, banned = Driver(model, tok).run([
        greedy(repeating, 6, logit_bias=((forced_id, 100.0),), logprobs=1),
        GenerationRequest(tuple(repeating), seeded),
        greedy(repeating, 20, logit_bias=((396, -100.0),)),
    ])
    assert forced.token_ids == sampled.token_ids == [forced_id] * 6 and forced.finish_reason == "length"
    assert 396 not in banned.token_ids and banned.token_ids == reference(model, tok, repeating, 20, bias={396: -100})[0]
    # The reported logprobs are the model's distribution, not the biased one (where 7 is ~0).
    _, model_lps = reference(model, tok, repeating, 6, bias={forced_id: 100.0})
    assert forced.logprobs == pytest.approx(model_lps, abs=1e-4) and max(forced.logprobs) < -1
    assert all(top[0][0] != forced_id for top in forced.top_logprobs)  # the model's favourite is another token


def test_seeded_penalised_requests_are_the_same_alone_and_in_a_batch_of_8(golden_model):
    model, tok = golden_model
    prompts = random_prompts(8, tok.n_words, seed=32)
    steer = [dict(presence_penalty=0.5), dict(frequency_penalty=1.0), dict(logit_bias=((11, 5.0), (49, -3.0))),
             dict(presence_penalty=-0.5, frequency_penalty=0.7, logit_bias=((100, 2.0),)), {}]
    reqs = [GenerationRequest(tuple(p), SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=40,
                                                       seed=200 + i, **steer[i % len(steer)]))
            for i, p in enumerate(prompts)]
    batch = Driver(model, tok, max_batch_size=8).run(reqs)
    for r, o in zip(reqs, batch):
        assert Driver(model, tok, max_batch_size=1).run([r])[0].token_ids == o.token_ids
    unsteered = [GenerationRequest(r.prompt_tokens, SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95,
                                                                   top_k=40, seed=r.params.seed)) for r in reqs[:4]]
    assert [o.token_ids for o in Driver(model, tok).run(unsteered)] != [o.token_ids for o in batch[:4]]


def test_requests_without_penalties_or_bias_never_adjust_logits(golden_model, monkeypatch):
    import llama.engine.draw

    model, tok = golden_model
    calls = []
    real = llama.engine.draw.adjust_logits
    monkeypatch.setattr(llama.engine.draw, "adjust_logits", lambda *a, **k: calls.append(a) or real(*a, **k))
    p = random_prompts(3, tok.n_words, seed=33)
    plain = [greedy(p[0], 5, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=()),
             GenerationRequest(tuple(p[1]), SamplingParams(max_tokens=5, temperature=0.8, seed=1))]
    Driver(model, tok).run(plain)
    assert calls == []
    Driver(model, tok).run([greedy(p[2], 5, presence_penalty=0.1)])
    assert len(calls) == 5  # one per drawn token of the penalised request


def test_a_bias_outside_the_vocabulary_is_refused_at_submit_and_the_engine_goes_on(golden_model):
    model, tok = golden_model
    d = Driver(model, tok)
    with pytest.raises(ValueError, match=f"logit_bias has token ids outside the vocabulary \\[0, {tok.n_words}\\)"):
        d.submit("x", greedy([1, 5], 3, logit_bias=((tok.n_words, 1.0),)))
    assert d.run([greedy([1, 5], 3, logit_bias=((tok.n_words - 1, 1.0),))])[0].finish_reason in ("stop", "length")
