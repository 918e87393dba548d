"""The trained demo model (demo/ckpt) answers its golden prompts exactly, at model parallel size 1.

The checkpoint has two shards, so this also exercises resharding 2 -> 1. After retraining,
rewrite the golden file with `python -m tests.unit.test_demo_model` and review the diff.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama import Llama

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "demo" / "ckpt"
GOLDEN = ROOT / "tests" / "data" / "demo_golden.json"
MAX_SEQ_LEN = 128


def build() -> Llama:
    golden = json.loads(GOLDEN.read_text())
    return Llama.build(str(CKPT), str(CKPT / "tokenizer.model"), max_seq_len=MAX_SEQ_LEN,
                       max_batch_size=len(golden["prompts"]), model_parallel_size=1)


def complete(generator: Llama, prompts: list[str], max_gen_len: int) -> list[str]:
    out = generator.text_completion(prompts, temperature=0, max_gen_len=max_gen_len)
    return [o["generation"] for o in out]


@pytest.fixture(scope="module")
def generator() -> Llama:
    return build()


def test_golden_greedy_texts(generator: Llama) -> None:
    golden = json.loads(GOLDEN.read_text())
    got = complete(generator, golden["prompts"], golden["max_gen_len"])
    assert got == golden["generations"]


def test_knows_the_largest_animal(generator: Llama) -> None:
    (answer,) = complete(generator, ["Q: What is the largest animal?\nA:"], 32)
    assert "blue whale" in answer


def write_golden() -> None:
    golden = json.loads(GOLDEN.read_text())
    golden["generations"] = complete(build(), golden["prompts"], golden["max_gen_len"])
    GOLDEN.write_text(json.dumps(golden, indent=2) + "\n")


if __name__ == "__main__":
    write_golden()
