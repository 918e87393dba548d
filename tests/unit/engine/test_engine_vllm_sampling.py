"""vLLM's sampling extensions in the engine (repetition_penalty, min_p, min_tokens, ignore_eos,
stop_token_ids, allowed_token_ids): greedy tokens against the formula written out, in both step
modes (each test runs sync and overlapped)."""
from __future__ import annotations

import pytest
import torch
from test_engine import Driver, golden_model, greedy, random_prompts, step_mode  # noqa: F401 (fixtures)

from llama.engine.request import GenerationRequest, SamplingParams


def repetition_reference(model, tok, prompt: list[int], n: int, penalty: float) -> list[int]:
    """Greedy with vLLM's repetition penalty written out, a fresh forward over the whole sequence per token."""
    from llama.engine.runner import forward_rows

    seq, out = list(prompt), []
    with torch.inference_mode():
        while len(out) < n:
            logits = forward_rows(model, [seq])[-1].float().clone()
            for t in set(seq):  # the prompt and the generated tokens
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            nxt = int(torch.argmax(logits))
            if nxt in tok.stop_ids:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


@pytest.mark.parametrize("penalty", [1.3, 2.0, 0.7])
def test_repetition_penalised_greedy_follows_vllms_formula(golden_model, penalty):
    model, tok = golden_model
    prompts = random_prompts(3, tok.n_words, seed=41)
    plain = Driver(model, tok).run([greedy(p, 16) for p in prompts])
    out = Driver(model, tok).run([greedy(p, 16, repetition_penalty=penalty) for p in prompts])
    for p, o in zip(prompts, out):
        assert o.token_ids == repetition_reference(model, tok, p, 16, penalty)
    assert [o.token_ids for o in out] != [o.token_ids for o in plain]  # it did steer


def test_stop_token_ids_end_the_sequence_and_min_tokens_holds_them_back(golden_model):
    model, tok = golden_model
    prompt = random_prompts(1, tok.n_words, seed=42)[0]
    plain = Driver(model, tok).run([greedy(prompt, 12)])[0].token_ids
    stop = plain[2]
    first = plain.index(stop)
    stopped, held = Driver(model, tok).run([greedy(prompt, 12, stop_token_ids=(stop,)),
                                           greedy(prompt, 12, stop_token_ids=(stop,), min_tokens=6)])
    assert stopped.token_ids == plain[:first] and stopped.finish_reason == "stop"
    assert len(held.token_ids) >= 6 and stop not in held.token_ids[:6]


def test_ignore_eos_runs_to_max_tokens_and_keeps_the_end_token(golden_model):
    model, tok = golden_model
    eos = next(iter(tok.stop_ids))
    prompt = random_prompts(1, tok.n_words, seed=43)[0]
    # A bias that all but forces the end token: without ignore_eos the sequence ends at once.
    ended, ran = Driver(model, tok).run([greedy(prompt, 5, logit_bias=((eos, 100.0),)),
                                        greedy(prompt, 5, logit_bias=((eos, 100.0),), ignore_eos=True)])
    assert ended.token_ids == [] and ended.finish_reason == "stop"
    assert ran.token_ids == [eos] * 5 and ran.finish_reason == "length"


def test_min_tokens_bans_the_end_token_until_it_is_reached(golden_model):
    model, tok = golden_model
    eos = next(iter(tok.stop_ids))
    prompt = random_prompts(1, tok.n_words, seed=44)[0]
    out = Driver(model, tok).run([greedy(prompt, 10, logit_bias=((eos, 100.0),), min_tokens=4)])[0]
    assert len(out.token_ids) == 4 and eos not in out.token_ids and out.finish_reason == "stop"


def test_allowed_token_ids_confine_greedy_and_sampled_draws(golden_model):
    model, tok = golden_model
    allowed = tuple(sorted({5, 77, tok.n_words // 2, tok.n_words - 1}))
    prompts = random_prompts(2, tok.n_words, seed=45)
    out = Driver(model, tok).run(
        [greedy(prompts[0], 10, allowed_token_ids=allowed),
         GenerationRequest(tuple(prompts[1]), SamplingParams(max_tokens=10, temperature=1.0, top_p=1.0, seed=3,
                                                             allowed_token_ids=allowed))])
    for o in out:
        assert o.token_ids and set(o.token_ids) <= set(allowed)


def test_min_p_one_keeps_only_the_most_likely_token(golden_model):
    model, tok = golden_model
    prompts = random_prompts(2, tok.n_words, seed=46)
    plain = Driver(model, tok).run([greedy(p, 10) for p in prompts])
    hot = [GenerationRequest(tuple(p), SamplingParams(max_tokens=10, temperature=1.5, top_p=1.0, seed=s, min_p=mp))
           for p in prompts for s, mp in ((7, 1.0), (7, 0.0))]
    out = Driver(model, tok).run(hot)
    assert [out[0].token_ids, out[2].token_ids] == [o.token_ids for o in plain]
    assert [out[1].token_ids, out[3].token_ids] != [o.token_ids for o in plain]  # without it, the draw wanders


@pytest.mark.parametrize("bad", [dict(min_p=1.5), dict(repetition_penalty=0.0), dict(min_tokens=9),
                                 dict(stop_token_ids=(-1,)), dict(allowed_token_ids=())])
def test_out_of_range_extensions_are_refused_with_the_field_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(max_tokens=8, **bad)


@pytest.mark.parametrize("field", ["stop_token_ids", "allowed_token_ids"])
def test_token_ids_outside_the_vocabulary_are_refused_before_the_engine(field):
    from llama.engine.config import check_request

    request = GenerationRequest((1, 2, 3), SamplingParams(max_tokens=4, **{field: (3, 500)}))
    with pytest.raises(ValueError, match=f"{field} has token ids outside the vocabulary \\[0, 500\\): \\[500\\]"):
        check_request(request, max_seq_len=64, vocab_size=500)
    check_request(request, max_seq_len=64, vocab_size=501)  # the last id is in


def test_bad_words_ban_a_words_last_token_only_where_the_rest_of_it_was_just_generated(golden_model):
    model, tok = golden_model
    prompt = random_prompts(1, tok.n_words, seed=47)[0]
    plain = Driver(model, tok).run([greedy(prompt, 12)])[0].token_ids
    pair, single = (plain[3], plain[4]), (plain[2],)
    with_pair, with_single = Driver(model, tok).run([greedy(prompt, 12, bad_words=(pair,)),
                                                     greedy(prompt, 12, bad_words=(single,))])
    assert with_pair.token_ids[:4] == plain[:4] and with_pair.token_ids[4] != plain[4]
    ids = with_pair.token_ids
    assert all((ids[k], ids[k + 1]) != pair for k in range(len(ids) - 1))  # nowhere, not only at 4
    assert with_single.token_ids[:2] == plain[:2] and single[0] not in with_single.token_ids


def test_include_stop_str_in_output_ends_the_text_after_the_stop_string(golden_model):
    model, tok = golden_model
    prompt = random_prompts(1, tok.n_words, seed=12)[0]
    full = Driver(model, tok).run([greedy(prompt, 24)])[0]
    stop = full.text[5:8]
    cut, kept = Driver(model, tok).run([greedy(prompt, 24, stop=(stop,)),
                                        greedy(prompt, 24, stop=(stop,), include_stop_str_in_output=True)])
    end = full.text.find(stop)
    assert (cut.text, kept.text) == (full.text[:end], full.text[:end + len(stop)])
    assert kept.token_ids == cut.token_ids and kept.finish_reason == "stop"


def test_skip_special_tokens_leaves_special_tokens_out_of_the_text(golden_model):
    import copy

    model, tok = golden_model
    prompt = random_prompts(1, tok.n_words, seed=12)[0]
    full = Driver(model, tok).run([greedy(prompt, 24)])[0]
    special = copy.copy(tok)  # one of the tokens it writes counts as special, as Llama 3's headers do
    special.special_tokens = {**tok.special_tokens, "<|x|>": full.token_ids[4]}
    written, skipped = Driver(model, special).run([greedy(prompt, 24), greedy(prompt, 24, skip_special_tokens=True)])
    assert written.text == full.text and written.token_ids == skipped.token_ids == full.token_ids
    assert skipped.text == tok.decode([t for t in full.token_ids if t != full.token_ids[4]]) != full.text


def test_bans_that_leave_no_token_never_draw_from_nothing(golden_model):
    # Found by the fuzz tier: min_tokens bans the end token, and it is the only one allowed.
    model, tok = golden_model
    eos = next(iter(tok.stop_ids))
    prompt = random_prompts(1, tok.n_words, seed=48)[0]
    conflicting = [GenerationRequest(tuple(prompt), SamplingParams(max_tokens=4, temperature=t, top_p=1.0, seed=1,
                                                                   min_tokens=3, allowed_token_ids=(eos,)))
                   for t in (0, 1.0)] + [greedy(prompt, 4, bad_words=((5,),), allowed_token_ids=(5,))]
    d = Driver(model, tok)
    out = d.run(conflicting)
    assert [o.finish_reason for o in out] == ["stop", "stop", "length"] and out[2].token_ids == [5] * 4
    assert len(d.run([greedy(prompt, 4)])[0].token_ids) == 4  # the engine goes on
