"""llama/engine/grammar.py without a model: with each kind of tokenizer the project reads, a
random walk over the tokens each mask allows always spells text that matches the grammar, and
ends on an end token once the grammar is complete."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from llama.engine.grammar import Grammar

WORDS = ["red", "green", "blue", "cat", "dog", "yes", "no"]



@pytest.fixture(scope="module")
def every_tokenizer(tmp_path_factory):
    """One tokenizer of each kind the project reads: sentencepiece (the golden tokenizer.model),
    tiktoken (Meta's Llama 3 tokenizer.model) and tokenizer.json (Llama 2's and Llama 3's)."""
    from llama.tokenizers.load import load_tokenizer
    from tests.conftest import GOLDEN_CKPT
    from tests.tokenizer_files import llama3_tokenizer_model, write_hf_tokenizer

    return {"sentencepiece": load_tokenizer(GOLDEN_CKPT / "tokenizer.model"),
            "tiktoken": load_tokenizer(llama3_tokenizer_model()),
            **{f"tokenizer.json ({kind})": load_tokenizer(write_hf_tokenizer(tmp_path_factory.mktemp(kind), kind))
               for kind in ("llama2", "llama3")}}


@pytest.mark.parametrize("kind", ["sentencepiece", "tiktoken", "tokenizer.json (llama2)", "tokenizer.json (llama3)"])
def test_the_mask_holds_with_every_tokenizer_the_project_reads(every_tokenizer, kind):
    """A random walk over the tokens each mask allows (no model): the decoded text matches."""
    from llama.engine.grammar import GrammarCompiler

    tok = every_tokenizer[kind]
    compiler = GrammarCompiler(tok)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "n": {"type": "integer", "minimum": -5, "maximum": 500},
                                               "tags": {"type": "array", "items": {"enum": WORDS}, "maxItems": 3}},
              "required": ["city", "n", "tags"], "additionalProperties": False}
    rng = random.Random(kind)
    for g, ok in [(Grammar.json_schema(schema), lambda t: jsonschema.validate(json.loads(t), schema) is None),
                  (Grammar("regex", "[a-c]{2,5}-é[0-9]{1,2}"), lambda t: re.fullmatch("[a-c]{2,5}-é[0-9]{1,2}", t))]:
        for _ in range(5):
            m, out = compiler.matcher(g), []
            for _ in range(300):
                allowed = m.allowed().nonzero().flatten().tolist()
                token = rng.choice(allowed)
                if token in tok.stop_ids:
                    break
                m.take(token)
                out.append(token)
            assert out and token in tok.stop_ids and m.failed is None, (kind, tok.decode(out))
            assert ok(tok.decode(out)), (kind, tok.decode(out))
