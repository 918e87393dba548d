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
- one process again, beside a process that does nothing but sleep and wake WAKER_HZ times a second
  (what wake-ups alone cost the step).
For each, at each concurrency: output tokens/s and the driver's mean step (its engine's own
counters: GET /cluster's engine section through Serve, the actor's load() on Ray), both against
the one-process figure; and from /proc (bench/wakeups.py), how many times a second the machine's
threads woke, which processes woke most, and how often the rank's threads were preempted.
Loopback only; what it starts it stops.
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
import wakeups  # noqa: E402

WAKER_HZ = 2000  # the side process's wake-ups a second, about the Serve row's own at concurrency 1


def in_process(concurrency: list[int], rounds: int) -> dict[int, tuple[float, float, dict]]:
    import os
    import time

    from step_profile import build, closed_loop

    engine = build(Path(REPO / "bench" / ".peer" / "ckpt"), 2)
    vocab = engine.model.args.vocab_size
    closed_loop(engine, 2, 2, vocab, seed=99)  # warm-up
    out = {}
    for c in concurrency:
        s0, w0, t0 = engine.stats.step_s, wakeups.snapshot(), time.perf_counter()
        tokens, wall, steps = closed_loop(engine, c, c * rounds, vocab, seed=c)
        woke = wakeups.rates(w0, wakeups.snapshot(), time.perf_counter() - t0, os.getpid())
        out[c] = (tokens / wall, (engine.stats.step_s - s0) / steps, woke)
    return out


def beside_waker(concurrency: list[int], rounds: int) -> dict[int, tuple[float, float, dict]]:
    """One process again, beside a process that only sleeps and wakes WAKER_HZ times a second."""
    waker = subprocess.Popen([sys.executable, "-c", f"import time\nwhile True: time.sleep({1 / WAKER_HZ})"])
    try:
        return in_process(concurrency, rounds)
    finally:
        waker.kill()
        waker.wait()


def on_ray(concurrency: list[int], rounds: int) -> dict[int, tuple[float, float, dict]]:
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
            t0, tokens, w0 = time.perf_counter(), 0, wakeups.snapshot()
            for _ in range(rounds):
                reqs = [GenerationRequest(tuple(rng.randrange(3, 32000) for _ in range(peer.PROMPT_LEN)),
                                          SamplingParams(max_tokens=peer.MAX_TOKENS, temperature=0)) for _ in range(c)]
                tokens += sum(len(o.token_ids) for o in group.generate(reqs))
            wall = time.perf_counter() - t0
            woke = wakeups.rates(w0, wakeups.snapshot(), wall, "ray::RankActor")
            after = ray.get(group.actors[0].load.remote())
            out[c] = (tokens / wall, (after["step_s"] - before["step_s"]) / (after["steps"] - before["steps"]), woke)
        return out
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()


def through_serve(concurrency: list[int], rounds: int) -> dict[int, tuple[float, float, dict]]:
    import time

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
            w0, t0 = wakeups.snapshot(), time.perf_counter()
            results, wall = asyncio.run(peer.load(server.url, prompts, c, c * rounds))
            woke = wakeups.rates(w0, wakeups.snapshot(), time.perf_counter() - t0, "ray::RankActor")
            after = httpx.get(server.url + "/cluster", timeout=30).json()["engine"]
            out[c] = (sum(len(r.tokens) for r in results) / wall,
                      (after["step_s"] - before["step_s"]) / (after["steps"] - before["steps"]), woke)
        return out
    finally:
        server.stop()


MODES = {"one process": in_process, f"one process, beside a process waking {WAKER_HZ}/s": beside_waker,
         "Ray (RankGroup, no Serve)": on_ray, "Serve (HTTP)": through_serve}


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
    cs = a.concurrency
    print("| way | " + " | ".join(f"tok/s at {c}" for c in cs) + " | " + " | ".join(f"driver's step ms at {c}" for c in cs)
          + " | " + " | ".join(f"machine's wake-ups/s at {c}" for c in cs)
          + " | " + " | ".join(f"rank preempted /s at {c}" for c in cs) + " |")
    print("|---" * (1 + 4 * len(cs)) + "|")
    base = figures["one process"]
    for mode, f in figures.items():
        tps = [f"{f[c][0]:.1f} ({f[c][0] / base[c][0]:.2f})" for c in cs]
        step = [f"{1e3 * f[c][1]:.1f} ({f[c][1] / base[c][1]:.2f})" for c in cs]
        woke = [f"{f[c][2]['wakeups']:.0f}" for c in cs] + [f"{f[c][2]['rank_preempted']:.0f}" for c in cs]
        print(f"| {mode} | " + " | ".join(tps + step + woke) + " |")
    print("\nwho wakes (wake-ups a second, by process, at each concurrency):")
    for mode, f in figures.items():
        for c in cs:
            print(f"  {mode} at {c}: " + ", ".join(f"{n} {v}" for n, v in f[c][2]["top"]))


if __name__ == "__main__":
    main()
