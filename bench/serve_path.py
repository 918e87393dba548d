"""What serving costs the engine's step: the peer model in one process, in a gang on Ray, and
through Serve.

    .venv/bin/python bench/serve_path.py [--concurrency 1 16] [--rounds 3]

bench/peer.py's model and settings at MP=1 with 2 threads (16 sequences at most, a prefill budget
of 256, model length 1024, float32), its 256-token random prompts and 128 greedy tokens, three
ways, each in a process of its own, one after another:
- one process: the library's Engine, stepped by bench/step_profile.py's closed loop;
- Ray: a RankGroup on in-process Ray (the rank in its actor; no Serve, no HTTP), `concurrency`
  requests at a time through `generate`, `rounds` times;
- Serve: `serve run` of bench/peer.py's config, driven over HTTP by peer.py's closed-loop client,
  `concurrency * rounds` requests.
For each, at each concurrency: output tokens/s and the driver's mean step (its engine's own
counters: GET /cluster's engine section through Serve, the actor's load() on Ray), and both
against the one-process figure. Loopback only; what it starts it stops.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import peer  # noqa: E402


def in_process(concurrency: list[int], rounds: int) -> dict[int, tuple[float, float]]:
    from step_profile import build, closed_loop

    engine = build(Path(REPO / "bench" / ".peer" / "ckpt"), 2)
    vocab = engine.model.args.vocab_size
    closed_loop(engine, 2, 2, vocab, seed=99)  # warm-up
    out = {}
    for c in concurrency:
        s0 = engine.stats.step_s
        tokens, wall, steps = closed_loop(engine, c, c * rounds, vocab, seed=c)
        out[c] = (tokens / wall, (engine.stats.step_s - s0) / steps)
    return out


def on_ray(concurrency: list[int], rounds: int) -> dict[int, tuple[float, float]]:
    import time

    import ray

    from cluster.config import GangConfig, ParallelConfig
    from cluster.group import RankGroup
    from llama.engine.config import EngineConfig
    from llama.engine.request import GenerationRequest, SamplingParams

    ray.init(num_cpus=2, include_dashboard=False)
    group = None
    try:
        group = RankGroup.start(GangConfig.inspect(
            REPO / "bench" / ".peer" / "ckpt", None,
            ParallelConfig(model_parallel_size=1, device="cpu", dtype="float32", cpus_per_rank=0.5, threads_per_rank=2),
            EngineConfig(max_batch_size=peer.MAX_SEQS, prefill_chunk=peer.PREFILL, max_seq_len=peer.MODEL_LEN)))
        rng = random.Random(1)
        out = {}
        for c in concurrency:
            before = ray.get(group.actors[0].load.remote())
            t0, tokens = time.perf_counter(), 0
            for _ in range(rounds):
                reqs = [GenerationRequest(tuple(rng.randrange(3, 32000) for _ in range(peer.PROMPT_LEN)),
                                          SamplingParams(max_tokens=peer.MAX_TOKENS, temperature=0)) for _ in range(c)]
                tokens += sum(len(o.token_ids) for o in group.generate(reqs))
            wall = time.perf_counter() - t0
            after = ray.get(group.actors[0].load.remote())
            out[c] = (tokens / wall, (after["step_s"] - before["step_s"]) / (after["steps"] - before["steps"]))
        return out
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()


def through_serve(concurrency: list[int], rounds: int) -> dict[int, tuple[float, float]]:
    import httpx

    work = REPO / "bench" / ".peer"
    rnd = random.Random(1)
    prompts = [[rnd.randrange(3, 32000) for _ in range(peer.PROMPT_LEN)] for _ in range(64)]
    server = peer.ours(work / "ckpt", 1, 2, work, 8000)
    out = {}
    try:
        server.start(work / "serve_path.log")
        for c in concurrency:
            before = httpx.get(server.url + "/cluster", timeout=30).json()["engine"]
            results, wall = asyncio.run(peer.load(server.url, prompts, c, c * rounds))
            after = httpx.get(server.url + "/cluster", timeout=30).json()["engine"]
            out[c] = (sum(len(r.tokens) for r in results) / wall,
                      (after["step_s"] - before["step_s"]) / (after["steps"] - before["steps"]))
        return out
    finally:
        server.stop()


MODES = {"one process": in_process, "Ray (RankGroup, no Serve)": on_ray, "Serve (HTTP)": through_serve}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=3, help="requests per concurrency: this many times it")
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # one way, in this process
    a = p.parse_args(argv)
    if a.mode:
        print(json.dumps(MODES[a.mode](a.concurrency, a.rounds)))
        return
    peer.ensure_checkpoint(REPO / "bench" / ".peer" / "ckpt", peer.ensure_vllm(REPO / "bench" / ".peer" / "venv"))
    figures = {}
    for mode in MODES:
        run = subprocess.run([sys.executable, __file__, "--mode", mode, "--rounds", str(a.rounds), "--concurrency",
                              *map(str, a.concurrency)], capture_output=True, text=True, cwd=REPO)
        if run.returncode != 0:
            sys.exit(f"{mode}: exit {run.returncode}\n{run.stderr[-3000:]}")
        figures[mode] = {int(c): v for c, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}
        print(f"{mode}: done", flush=True)
    print(f"\nthe peer model at MP=1, 2 threads, float32; {peer.PROMPT_LEN}-token prompts, {peer.MAX_TOKENS} greedy "
          f"tokens, {a.rounds} x concurrency requests")
    print("| way | " + " | ".join(f"tok/s at {c}" for c in a.concurrency) + " | "
          + " | ".join(f"driver's step ms at {c}" for c in a.concurrency) + " |")
    print("|---" * (1 + 2 * len(a.concurrency)) + "|")
    base = figures["one process"]
    for mode, f in figures.items():
        tps = [f"{f[c][0]:.1f} ({f[c][0] / base[c][0]:.2f})" for c in a.concurrency]
        step = [f"{1e3 * f[c][1]:.1f} ({f[c][1] / base[c][1]:.2f})" for c in a.concurrency]
        print(f"| {mode} | " + " | ".join(tps + step) + " |")


if __name__ == "__main__":
    main()
