"""Prefix caching: time to first token of a request whose long system prompt an earlier request
already ran, with the engine's prefix cache on and off, in one run.

    .venv/bin/python bench/prefix_cache.py [--rounds 5 --system-tokens 1000 --prefill-chunk 64]

The demo checkpoint (demo/ckpt, MP=1) on one engine per setting (prefix_caching true, false),
each on its own thread as a server runs it. Each round takes a new --system-tokens prompt (a
slice of demo/corpus.txt, so no round finds another's blocks) and sends, one after the other:
  A = system prompt + one question, then, once A has finished,
  B = the same system prompt + another question (a few greedy tokens each).
TTFT is from submit to the first delta (its first token). cached is the first delta's
cached_tokens: prompt tokens the engine found in its prefix cache (B can reuse the system
prompt's full blocks only: floor(system / block_size) * block_size tokens). The rounds
alternate which setting goes first; the table gives medians over rounds and first / second
(how much sooner B's first token comes than A's). Last: B's TTFT off / on, the engine's own hit
counters, and whether every request's greedy tokens are the same with the cache on and off.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch

from llama.checkpoints.load import inspect_checkpoint, load_into
from llama.distributed import init_model_parallel, init_single_process_group
from llama.engine.config import EngineConfig
from llama.engine.core import Engine
from llama.engine.request import GenerationRequest, SamplingParams
from llama.model.transformer import Transformer
from llama.tokenizers.load import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["Q: What is the largest animal?\nA:", "Q: How long is a blue whale?\nA:",
             "Q: What do llamas eat?\nA:", "Q: What is the capital of France?\nA:"]


def first_delta(engine: Engine, rid: str, prompt: list[int], max_tokens: int) -> tuple[float, int, list[int]]:
    """Submit one request and wait for its end: (seconds from submit to its first delta, its
    cached_tokens, its tokens)."""
    first: list[tuple[float, int]] = []
    tokens: list[int] = []
    done = threading.Event()

    def sink(d) -> None:
        if isinstance(d, BaseException):
            done.set()
            raise d
        if not first:
            first.append((time.perf_counter(), d.cached_tokens))
        tokens.extend(d.token_ids)
        if d.finish_reason is not None:
            done.set()

    t0 = time.perf_counter()
    engine.submit(rid, GenerationRequest(tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0)), sink)
    done.wait()
    return first[0][0] - t0, first[0][1], tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(REPO / "demo" / "ckpt"))
    p.add_argument("--corpus", default=str(REPO / "demo" / "corpus.txt"), help="text the system prompts are cut from")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=EngineConfig.prefill_chunk)
    p.add_argument("--block-size", type=int, default=EngineConfig.block_size)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    init_single_process_group("gloo")
    init_model_parallel(1)
    info = inspect_checkpoint(a.ckpt)
    model = Transformer(info.args, a.max_seq_len)
    load_into(model, info, 0, 1)
    tok = load_tokenizer(info.tokenizer_path)
    corpus = tok.encode(Path(a.corpus).read_text(), bos=False, eos=False)
    n = a.system_tokens - 1  # after BOS
    if len(corpus) < a.rounds * n:
        raise ValueError(f"{a.corpus} has {len(corpus)} tokens: {a.rounds} rounds of {n} need {a.rounds * n}. "
                         f"Lower --rounds or --system-tokens.")
    questions = [tok.encode(q, bos=False, eos=False) for q in QUESTIONS]

    engines, stop, loops = {}, threading.Event(), []
    for caching in (True, False):
        engines[caching] = Engine(model, tok, EngineConfig(max_seq_len=a.max_seq_len, prefill_chunk=a.prefill_chunk,
                                                           block_size=a.block_size, prefix_caching=caching))
        loops.append(threading.Thread(target=engines[caching].run, args=(stop,), daemon=True))
        loops[-1].start()
        first_delta(engines[caching], "warm-up", [1] + corpus[-40:], 2)  # lazy initialisations; no round's prefix

    before = engines[True].load()
    results: dict[bool, list[tuple[float, int, float, int]]] = {True: [], False: []}
    outputs: dict[bool, list[list[int]]] = {True: [], False: []}
    for r in range(a.rounds):
        system = [1] + corpus[r * n : (r + 1) * n]
        qa, qb = questions[r % len(questions)], questions[(r + 1) % len(questions)]
        for caching in ((True, False) if r % 2 == 0 else (False, True)):
            e = engines[caching]
            ttft_a, cached_a, out_a = first_delta(e, f"{r}-a", system + qa, a.max_tokens)
            ttft_b, cached_b, out_b = first_delta(e, f"{r}-b", system + qb, a.max_tokens)
            results[caching].append((ttft_a, cached_a, ttft_b, cached_b))
            outputs[caching] += [out_a, out_b]
            print(f"round {r}, prefix_caching {str(caching):<5}: A {ttft_a * 1e3:7.1f} ms (cached {cached_a:4}), "
                  f"B {ttft_b * 1e3:7.1f} ms (cached {cached_b:4})", flush=True)
    stop.set()
    for t in loops:
        t.join()

    params = sum(x.numel() for x in model.parameters())
    print(f"\n{a.ckpt}: {params / 1e6:.2f}M parameters; system prompt {a.system_tokens} tokens + a question of "
          f"{min(map(len, questions))}-{max(map(len, questions))}; {a.max_tokens} greedy tokens; prefill chunk "
          f"{a.prefill_chunk}, block size {a.block_size}; {a.rounds} rounds, medians; {torch.get_num_threads()} torch thread(s)")
    print("| prefix_caching | TTFT first (A) ms | TTFT second (B) ms | first / second | cached A | cached B |")
    print("|---|---|---|---|---|---|")
    for caching in (True, False):
        rows = results[caching]
        ta, tb = statistics.median(x[0] for x in rows), statistics.median(x[2] for x in rows)
        ca, cb = statistics.median(x[1] for x in rows), statistics.median(x[3] for x in rows)
        print(f"| {str(caching).lower()} | {ta * 1e3:.1f} | {tb * 1e3:.1f} | {ta / tb:.2f} | {ca:.0f} | {cb:.0f} |")
    on, off = results[True], results[False]
    after = engines[True].load()
    same = sum(x == y for x, y in zip(outputs[True], outputs[False]))
    print(f"B's TTFT, caching off / on: x{statistics.median(x[2] for x in off) / statistics.median(x[2] for x in on):.2f}; "
          f"engine counters (caching on, these rounds): {after['prefix_cache_hit_tokens'] - before['prefix_cache_hit_tokens']} "
          f"of {after['prefix_cache_query_tokens'] - before['prefix_cache_query_tokens']} prompt tokens found cached; "
          f"greedy tokens equal with caching on and off for {same}/{len(outputs[True])} requests")


if __name__ == "__main__":
    main()
