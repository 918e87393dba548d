"""Continuous batching against one-batch-at-a-time, on the same model, machine and workload.

    python bench/continuous_batching.py [--requests 192 --rate 80 --max-batch 8] [--mp2]

An open-loop workload: requests arrive at Poisson times (seeded), with varied prompt and output
lengths, greedy. The same arrivals are served in this process (MP=1) by the same engine
(llama.engine.core.Engine) under two admission policies:
  - static: one batch at a time, as servers without iteration-level scheduling do: wait for the
    running batch to end, then admit up to max-batch waiting requests, prefilled in one step;
  - continuous: the engine on its own thread, requests submitted as they arrive.
It prints generated tokens/s, time to first token and latency, and the ratios. Both policies
must give the same tokens.
With --mp2 it then serves the workload through a RankGroup at model-parallel size 2 (Ray,
gloo) and reports the driver's plan broadcast as a share of its step time.
The default model has random weights in the demo model's shape (3.5M parameters), so output
lengths follow the workload instead of ending early at EOS; --ckpt serves any checkpoint.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch

from llama.engine.request import GenerationRequest, SamplingParams


@dataclass
class Arrival:
    at: float  # seconds after the start
    request: GenerationRequest
    first_token: float | None = None
    done: float | None = None
    tokens: list[int] = field(default_factory=list)


def workload(n: int, rate: float, vocab: int, max_seq_len: int, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        plen = rng.choice([rng.randint(4, 24), rng.randint(24, 120)])
        gen = rng.choice([rng.randint(8, 32), rng.randint(32, 96)])
        gen = min(gen, max_seq_len - plen)
        prompt = (1,) + tuple(rng.randrange(3, vocab) for _ in range(plen - 1))
        out.append(Arrival(t, GenerationRequest(prompt, SamplingParams(max_tokens=gen, temperature=0))))
    return out


def summary(name: str, arrivals: list[Arrival], t_end: float) -> dict:
    ttft = [a.first_token - a.at for a in arrivals]
    lat = [a.done - a.at for a in arrivals]
    toks = sum(len(a.tokens) for a in arrivals)
    span = t_end - arrivals[0].at
    r = {"name": name, "tok_s": toks / span, "ttft_p50": statistics.median(ttft),
         "ttft_p90": sorted(ttft)[int(0.9 * len(ttft))], "lat_p50": statistics.median(lat), "tokens": toks, "span": span}
    print(f"  {name:<11} {r['tok_s']:8.1f} tok/s   TTFT p50 {r['ttft_p50'] * 1e3:7.0f} ms  p90 {r['ttft_p90'] * 1e3:7.0f} ms"
          f"   latency p50 {r['lat_p50']:6.2f} s   ({toks} tokens in {span:.1f} s)")
    return r


def wait_until(t0: float, at: float) -> None:
    delay = t0 + at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _sink(a: Arrival, t0: float, finished: threading.Semaphore | None = None):
    """Records an arrival's first token, tokens and end as its deltas come."""

    def sink(d) -> None:
        now = time.perf_counter() - t0
        if isinstance(d, BaseException):
            raise d
        if a.first_token is None and (d.token_ids or d.finish_reason):
            a.first_token = now
        a.tokens.extend(d.token_ids)
        if d.finish_reason is not None:
            a.done = now
            if finished is not None:
                finished.release()

    return sink


def run_static(model, tokenizer, arrivals: list[Arrival], max_batch: int, max_seq_len: int) -> float:
    from llama.engine.config import EngineConfig
    from llama.engine.core import Engine

    # The whole batch prefills in its first step, as a static batch loop does.
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=max_batch, max_seq_len=max_seq_len,
                                                   prefill_chunk=max_batch * max_seq_len))
    t0 = time.perf_counter()
    queue = list(enumerate(arrivals))
    while queue:
        wait_until(t0, queue[0][1].at)
        now = time.perf_counter() - t0
        batch = [(i, a) for i, a in queue[:max_batch] if a.at <= now]
        queue = queue[len(batch):]
        for i, a in batch:
            engine.submit(str(i), a.request, _sink(a, t0))
        while engine.step():  # no request joins until the whole batch has ended
            pass
    return max(a.done for a in arrivals)


def run_continuous(model, tokenizer, arrivals: list[Arrival], max_batch: int, max_seq_len: int, chunk: int):
    from llama.engine.config import EngineConfig
    from llama.engine.core import Engine

    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=max_batch, max_seq_len=max_seq_len, prefill_chunk=chunk))
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    loop.start()
    t0 = time.perf_counter()
    finished = threading.Semaphore(0)
    for i, a in enumerate(arrivals):
        wait_until(t0, a.at)
        engine.submit(str(i), a.request, _sink(a, t0, finished))
    for _ in arrivals:
        finished.acquire()
    stop.set()
    loop.join()
    return max(a.done for a in arrivals), engine.stats


def fresh(arrivals: list[Arrival]) -> list[Arrival]:
    return [Arrival(a.at, a.request) for a in arrivals]


def run_mp2(ckpt: str, arrivals: list[Arrival], max_batch: int, max_seq_len: int, chunk: int) -> None:
    import ray

    from cluster.config import GangConfig, ParallelConfig
    from cluster.group import RankGroup
    from llama.engine.config import EngineConfig

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    # An open loop: every arrival may be waiting at once, as it may for the MP=1 engine above (the
    # replica's admission bound, max_waiting, would otherwise refuse the burst with a 429).
    engine = EngineConfig(max_batch_size=max_batch, max_seq_len=max_seq_len, prefill_chunk=chunk,
                          max_waiting=len(arrivals))
    group = RankGroup.start(GangConfig.inspect(ckpt, None, ParallelConfig(model_parallel_size=2), engine))
    try:
        group.generate([arrivals[0].request])  # warm up
        before = ray.get(group.actors[0].load.remote())

        async def serve() -> float:
            t0 = time.perf_counter()

            async def one(a: Arrival) -> None:
                await asyncio.sleep(max(0.0, t0 + a.at - time.perf_counter()))
                async for d in group.stream(a.request):
                    if a.first_token is None and (d.token_ids or d.finish_reason):
                        a.first_token = time.perf_counter() - t0
                    a.tokens.extend(d.token_ids)
                a.done = time.perf_counter() - t0

            await asyncio.gather(*(one(a) for a in arrivals))
            return max(a.done for a in arrivals)

        t_end = asyncio.run(serve())
        after = ray.get(group.actors[0].load.remote())
    finally:
        group.shutdown()
        ray.shutdown()
    print("model parallel size 2 (Ray actors, gloo), continuous:")
    summary("continuous", arrivals, t_end)
    steps = after["steps"] - before["steps"]
    step_s = after["step_s"] - before["step_s"]
    pub = after["publish_s"] - before["publish_s"]
    fwd = after["forward_s"] - before["forward_s"]
    print(f"  driver: {steps} steps, {step_s / steps * 1e3:.2f} ms per step (forward {fwd / steps * 1e3:.2f} ms); "
          f"plan broadcast {pub / steps * 1e3:.3f} ms per step = {100 * pub / step_s:.1f}% of step time")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a Meta-format checkpoint; default: random weights in the demo model's shape")
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--rate", type=float, default=80.0, help="mean arrivals per second (Poisson); the default is more than the static path sustains")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    p.add_argument("--mp2", action="store_true", help="also serve the workload at model-parallel size 2 through Ray")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from llama.checkpoints.load import inspect_checkpoint, load_into
    from llama.distributed import init_model_parallel, init_single_process_group
    from llama.model.transformer import Transformer
    from llama.tokenizers.load import load_tokenizer

    ckpt = a.ckpt
    if ckpt is None:
        from llama.checkpoints.make_tiny import make_tiny

        ckpt = str(make_tiny(tempfile.mkdtemp(prefix="bench-ckpt-"), shards=2, dim=256, n_layers=4, n_heads=8,
                             n_kv_heads=4, vocab_size=512, multiple_of=64, seed=0))
    init_single_process_group("gloo")
    init_model_parallel(1)
    info = inspect_checkpoint(ckpt)
    model = Transformer(info.args, a.max_seq_len)
    load_into(model, info, 0, 1)
    tok = load_tokenizer(info.tokenizer_path)
    params = sum(p.numel() for p in model.parameters())
    arrivals = workload(a.requests, a.rate, tok.n_words, a.max_seq_len, a.seed)
    print(f"model {params / 1e6:.2f}M parameters, {a.requests} requests at {a.rate}/s (Poisson), max batch "
          f"{a.max_batch}, prefill chunk {a.prefill_chunk}, {torch.get_num_threads()} torch thread(s)")
    print("model parallel size 1, in one process:")
    static = fresh(arrivals)
    s = summary("static", static, run_static(model, tok, static, a.max_batch, a.max_seq_len))
    cont = fresh(arrivals)
    t_end, stats = run_continuous(model, tok, cont, a.max_batch, a.max_seq_len, a.prefill_chunk)
    c = summary("continuous", cont, t_end)
    same = sum(x.tokens == y.tokens for x, y in zip(static, cont))
    print(f"  continuous / static: throughput x{c['tok_s'] / s['tok_s']:.2f}, median TTFT x{s['ttft_p50'] / c['ttft_p50']:.1f} "
          f"lower, median latency x{s['lat_p50'] / c['lat_p50']:.1f} lower; identical tokens for {same}/{len(cont)} requests")
    print(f"  engine: {stats.steps} steps, {stats.step_s / stats.steps * 1e3:.2f} ms per step")
    if a.mp2:
        run_mp2(ckpt, fresh(arrivals), a.max_batch, a.max_seq_len, a.prefill_chunk)


if __name__ == "__main__":
    main()
