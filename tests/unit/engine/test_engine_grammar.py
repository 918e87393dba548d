"""Structured outputs in the engine (llama/engine/grammar.py): a random model sampling at
temperature 1 under 50 generated JSON schemas writes JSON that parses and validates, every time;
regular expressions, choices and grammars (Lark, GBNF) hold; a seeded draw is the same alone and in a
batch; a grammar the library refuses is a ValueError at submit that says what is wrong, and the
engine goes on. Each test runs in both step modes (sync and overlapped)."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
from test_engine import Driver, golden_model, greedy, random_prompts, step_mode  # noqa: F401 (fixtures)

from llama.engine.grammar import Grammar, check_grammar
from llama.engine.request import GenerationRequest, SamplingParams
from tests.json_schemas import WORDS, random_schema

def sampled(prompt, grammar: Grammar, seed: int, max_tokens: int = 88, **kw) -> GenerationRequest:
    kw = {"temperature": 1.0, "top_p": 1.0} | kw
    return GenerationRequest(tuple(prompt), SamplingParams(max_tokens=max_tokens, seed=seed, grammar=grammar, **kw))


def test_fifty_generated_json_schemas_always_give_json_that_validates(golden_model):
    model, tok = golden_model
    rng = random.Random(2026)
    schemas = [random_schema(rng) if k % 5 else {"type": "object", "properties": {"x": random_schema(rng, 1)},
                                                   "required": ["x"], "additionalProperties": False}
               for k in range(50)]
    prompts = random_prompts(50, tok.n_words, seed=51, hi=4)
    out = Driver(model, tok, max_batch_size=8).run(
        [sampled(p, Grammar.json_schema(s), seed=k) for k, (p, s) in enumerate(zip(prompts, schemas))])
    unfinished = [(schema, o.text) for schema, o in zip(schemas, out) if o.finish_reason != "stop"]
    assert not unfinished, unfinished
    for schema, o in zip(schemas, out):
        jsonschema.validate(json.loads(o.text), schema)
    assert len({o.text for o in out}) > 40  # the model wrote them, not one canned answer


def test_regex_choice_lark_and_gbnf_grammars_hold(golden_model):
    model, tok = golden_model
    prompts = random_prompts(12, tok.n_words, seed=52, hi=4)
    lark = 'start: "(" item (", " item)* ")"\nitem: /[0-9]{1,3}/ | "x"'
    gbnf = 'root ::= "(" item (", " item)* ")"\nitem ::= [0-9] [0-9]? [0-9]? | "x"'  # llama.cpp's GBNF, the same language
    grammars = [Grammar("regex", r"[a-c]{2,5}-[0-9]{1,2}")] * 4 + [Grammar.choice(["alpha", "beta", "gamma"])] * 4 \
        + [Grammar("grammar", lark)] * 2 + [Grammar("grammar", gbnf)] * 2
    out = Driver(model, tok).run([sampled(p, g, seed=k, max_tokens=60)
                                                   for k, (p, g) in enumerate(zip(prompts, grammars))])
    texts = [o.text for o in out]
    assert all(o.finish_reason == "stop" for o in out), texts
    assert all(re.fullmatch(r"[a-c]{2,5}-[0-9]{1,2}", t) for t in texts[:4]), texts
    assert all(t in ("alpha", "beta", "gamma") for t in texts[4:8]), texts
    assert all(re.fullmatch(r"\((?:[0-9]{1,3}|x)(?:, (?:[0-9]{1,3}|x))*\)", t) for t in texts[8:]), texts


def test_greedy_follows_the_grammar_and_seeded_draws_are_the_same_alone_and_in_a_batch(golden_model):
    model, tok = golden_model
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "b": {"enum": WORDS}}, "required": ["a", "b"],
              "additionalProperties": False}
    g = Grammar.json_schema(schema)
    prompts = random_prompts(6, tok.n_words, seed=53, hi=4)
    g_out = Driver(model, tok).run([greedy(p, 60, grammar=g) for p in prompts[:2]])
    for o in g_out:
        jsonschema.validate(json.loads(o.text), schema)
    reqs = [sampled(p, g, seed=90 + k, max_tokens=60) for k, p in enumerate(prompts)]
    batch = Driver(model, tok).run(reqs)
    alone = [Driver(model, tok).run([r])[0] for r in reqs[:2]]
    assert [o.token_ids for o in alone] == [o.token_ids for o in batch[:2]]
    plain = Driver(model, tok).run([greedy(p, 20) for p in prompts[:2]])
    assert [o.token_ids for o in plain] != [o.token_ids for o in g_out]  # it did steer


@pytest.mark.parametrize("grammar, says", [
    (Grammar("regex", "a(b"), "(?s)the regular expression cannot be used: .*unclosed group"),
    (Grammar.json_schema({"type": "string", "pattern": "[("}), "(?s)the JSON schema cannot be used: .*\\[\\(.*unclosed character class"),
    (Grammar.json_schema({"type": "nonsense"}), "the JSON schema cannot be used: Invalid type: nonsense"),
    (Grammar("grammar", "start: missing_rule"), "(?s)the grammar cannot be used: .*unknown name: .missing_rule"),
    (Grammar.choice([]), "the choices cannot be used"),
])
def test_a_grammar_the_library_refuses_is_a_value_error_at_submit_and_the_engine_goes_on(golden_model, grammar, says):
    model, tok = golden_model
    with pytest.raises(ValueError, match=says):
        check_grammar(grammar)
    d = Driver(model, tok)
    with pytest.raises(ValueError, match=says):
        d.submit("bad", greedy([1, 5, 6], 4, grammar=grammar))
    assert len(d.run([greedy([1, 5, 6], 4)])[0].token_ids) == 4



def test_a_complete_grammar_ends_its_sequence_even_with_ignore_eos_and_any_temperature(golden_model):
    # Found by the fuzz tier: json_object with ignore_eos at temperature 9.26e307 (inf once made
    # float32: the mask's -inf / inf is nan) drew from nan and failed the engine.
    model, tok = golden_model
    prompts = random_prompts(3, tok.n_words, seed=54, hi=4)
    obj, pick = Grammar.json_schema({"type": "object"}), Grammar.choice(["yes", "no"])
    out = Driver(model, tok).run([
        sampled(prompts[0], obj, seed=1, max_tokens=24, ignore_eos=True, temperature=9.26e307, min_p=0.89, top_p=0.86),
        sampled(prompts[1], pick, seed=2, max_tokens=24, ignore_eos=True),
        greedy(prompts[2], 24, grammar=pick, ignore_eos=True)])
    assert out[0].finish_reason in ("stop", "length") and out[0].text.startswith("{")
    assert [o.finish_reason for o in out[1:]] == ["stop", "stop"] and {o.text for o in out[1:]} <= {"yes", "no"}
    assert len(Driver(model, tok).run([greedy(prompts[0], 4)])[0].token_ids) == 4  # the engine goes on
