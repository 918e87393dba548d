"""What structured outputs cost per decoded token: the same requests with and without a grammar.

    PYTHONPATH=. python bench/grammar_cost.py [--batches 1 16] [--new-tokens 64] [--rounds 3] [--threads 2]

The engine in this process (llama/engine/core.py, no Ray): the demo checkpoint (demo/ckpt,
dim 256, 4 layers, sentencepiece vocabulary of 512), loaded at MP=1; for each batch size, B
greedy requests of --new-tokens tokens each on the same prompts, twice alternating per round:
plain (ignore_eos, so every request runs its full length), and under a JSON schema (an array of
at least 200 objects {"name": string, "n": integer}, which no request completes within its
tokens, so both ways decode the same number). Prints per batch size the decode time per step
and per token each way (medians over rounds), what the grammar adds per decoded token, and the
time inside the grammar's two calls (the mask before each draw, taking the token after),
measured around them. The grammar's compile happens once, before the rounds (its cache), and is
printed on its own.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "array", "minItems": 200,
          "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                     "n": {"type": "integer"}},
                    "required": ["name", "n"], "additionalProperties": False}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    from llama.checkpoints.load import inspect_checkpoint, load_into
    from llama.distributed import init_model_parallel, init_single_process_group
    from llama.engine import grammar as grammar_module
    from llama.engine.config import EngineConfig
    from llama.engine.core import Engine
    from llama.engine.grammar import Grammar
    from llama.engine.request import GenerationRequest, SamplingParams
    from llama.model.transformer import Transformer
    from llama.tokenizers.load import load_tokenizer

    torch.set_num_threads(a.threads)
    init_single_process_group("gloo")
    init_model_parallel(1)
    info = inspect_checkpoint(REPO / "demo" / "ckpt")
    max_len = 32 + a.new_tokens
    model = Transformer(info.args, max_len)
    load_into(model, info, 0, 1)
    tok = load_tokenizer(info.tokenizer_path)
    engine = Engine(model, tok, EngineConfig(max_batch_size=max(a.batches), max_seq_len=max_len, prefill_chunk=512))
    g = Grammar.json_schema(SCHEMA)
    t0 = time.perf_counter()
    engine._grammars.compile(g)
    compile_ms = (time.perf_counter() - t0) * 1e3

    inside = [0.0]  # seconds in GrammarMatcher.allowed and .take
    matcher = grammar_module.GrammarMatcher
    for name in ("allowed", "take"):
        real = getattr(matcher, name)

        def timed(self, *args, _real=real):
            t = time.perf_counter()
            try:
                return _real(self, *args)
            finally:
                inside[0] += time.perf_counter() - t
        setattr(matcher, name, timed)

    words = "the cat sat on a mat and then it ran far away".split()

    def run(batch: int, constrained: bool) -> tuple[float, int, float, list[str]]:
        texts = {i: [] for i in range(batch)}
        for i in range(batch):
            prompt = tok.encode(" ".join(words[(i + k) % len(words)] for k in range(12)), bos=True, eos=False)
            params = SamplingParams(max_tokens=a.new_tokens, temperature=0, ignore_eos=True,
                                    grammar=g if constrained else None)
            engine.submit(str(i), GenerationRequest(tuple(prompt), params),
                          lambda d, i=i: texts[i].append(d.text) if not isinstance(d, BaseException) else None)
        while engine.scheduler.waiting or any(s.computed < s.target for s in engine.scheduler.running):
            engine.step()  # the prefills, outside the timed decode
        inside[0], steps, t = 0.0, 0, time.perf_counter()
        while engine.step():
            steps += 1
        return time.perf_counter() - t, steps, inside[0], ["".join(texts[i]) for i in range(batch)]

    run(1, True)
    run(1, False)  # warm-up
    print(f"compiling the grammar: {compile_ms:.1f} ms (once; cached after)")
    print("| batch | ms per decode step, plain / grammar | ms per decoded token, plain / grammar | "
          "added per decoded token | of which in the grammar's calls |")
    print("|---|---|---|---|---|")
    for batch in a.batches:
        rows = {True: [], False: []}
        for r in range(a.rounds):
            for constrained in ((True, False) if r % 2 else (False, True)):
                rows[constrained].append(run(batch, constrained))
        tokens = batch * (a.new_tokens - 1)

        def med(c, k):
            return statistics.median(x[k] for x in rows[c])
        step = {c: med(c, 0) / statistics.median(x[1] for x in rows[c]) * 1e3 for c in rows}
        per_tok = {c: med(c, 0) / tokens * 1e3 for c in rows}
        print(f"| {batch} | {step[False]:.2f} / {step[True]:.2f} | {per_tok[False]:.3f} / {per_tok[True]:.3f} | "
              f"{per_tok[True] - per_tok[False]:.3f} ms ({per_tok[True] / per_tok[False]:.2f}x) | "
              f"{med(True, 2) / tokens * 1e3:.3f} ms |")
        print(f"  a constrained answer: {rows[True][0][3][0][:70]!r}")


if __name__ == "__main__":
    main()
