"""vLLM's engine in one process, on bench/step_profile.py's model and workload: the peer's side of
an engine-against-engine comparison, with no HTTP server on either side.

    bench/.peer/venv/bin/python bench/peer_engine.py [--concurrency 1 16] [--requests 16] [--ops]

Runs in the peer's venv only (bench/peer.py installs it; never this project's). vLLM's LLM class
with its engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), on bench/peer.py's
Hugging Face folder and settings: float32, 16 sequences at most, a prefill budget of 256 tokens a
step, model length 1024, 2 OpenMP threads bound to cores 0-1. --requests prompts of 256 random
token ids, 128 greedy tokens each, no end token; at concurrency 1 one request at a time, at 16 all
at once (16 sequences at most: the first 16 start together, as in step_profile's closed loop of
16). Prints output tokens/s per concurrency; compare with `bench/step_profile.py` run just before
or after (its "unwrapped" line) on the same machine.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], choices=(1, 16))
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--workdir", default=str(REPO / "bench" / ".peer"))
    p.add_argument("--ops", action="store_true", help="then each concurrency again under torch's profiler, op by "
                                                      "op (bench/op_profile.py; compare bench/step_profile.py --ops)")
    a = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(Path(a.workdir) / "ckpt"), dtype="float32", max_num_seqs=16, max_num_batched_tokens=256,
              max_model_len=1024)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    rng = random.Random(0)

    def prompts(n: int) -> list[dict]:
        # Fresh ones for every run: vLLM caches the prefixes it has seen, and a prompt run before
        # would skip its prefill.
        return [{"prompt_token_ids": [rng.randrange(100, 31000) for _ in range(256)]} for _ in range(n)]

    for c in a.concurrency:
        llm.generate(prompts(1), params, use_tqdm=False)  # warm

        def run() -> tuple[int, float]:
            todo = prompts(a.requests)
            batches = [[q] for q in todo] if c == 1 else [todo]
            t0 = time.perf_counter()
            tokens = sum(len(o.outputs[0].token_ids) for b in batches for o in llm.generate(b, params, use_tqdm=False))
            return tokens, time.perf_counter() - t0

        tokens, took = run()
        print(f"vLLM's engine in one process, concurrency {c}, {a.requests} requests: {tokens / took:.1f} output tok/s "
              f"({tokens} tokens in {took:.1f} s)", flush=True)
        if a.ops:
            sys.path.insert(0, str(REPO / "bench"))
            import op_profile

            with op_profile.recording() as prof:
                tokens, took = run()
            # Its steps: one a token at concurrency 1 (the prompt fits one step's budget); else its CPU
            # attention's metadata, built once a step.
            steps = tokens if c == 1 else sum(e.count for e in prof.key_averages()
                                              if e.key == "_C::get_scheduler_metadata")
            print(f"op by op: {tokens / took:.1f} output tok/s, {steps} steps\n{op_profile.table(prof, steps, took)}",
                  flush=True)


if __name__ == "__main__":
    main()
