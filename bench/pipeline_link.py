"""Tensor parallel across two machines against pipeline stages across the same two, on a
rate-limited link.

    python bench/pipeline_link.py [--rate 1gbit] [--concurrency 1 16] [--requests-per-worker 2]

Needs root (it builds the multinode tier's machines: tests/multinode/netns.py, three network
namespaces of one CPU each on a bridge in 198.51.100.0/24, plus a head that runs no rank). Each
machine's link is limited to --rate by `tc qdisc ... tbf` (netem does not work in these
namespaces, so only the rate is set, not a delay). A random checkpoint in Meta's layout
(dim 512, 8 layers, 8 heads over 4 KV heads; 25M parameters, float32) is served by a gang of two
ranks of one thread, a machine each, two ways: model_parallel_size 2 (every layer cut across the
machines) and pipeline_parallel_size 2 (four layers a machine). Each answers a closed loop of
64-token random prompts and 32 greedy tokens at each concurrency; both must give the same tokens.

Prints decode tokens/s and time per output token (p50) for each layout, and what crosses the
machines per step (a step decodes one token for each running sequence, B of them), from the
model's shape and the code:
- tensor parallel: 2 all-reduces a layer (attention's output and the MLP's w2, B x dim each),
  the embedding's all-gather (B x dim), the output layer's (B x vocab), and the plan's broadcast:
  2L + 3 collectives, each a round trip on gloo's two-rank ring;
- pipeline: the plan, the hidden states (B x dim) forward, the greedy tokens back (the last
  stage takes them: B x 4 bytes, not B x vocab logits): 3 messages, in sequence. With a step in
  flight per stage, B sequences run as two steps of B/2 (one where B is 1), so that is per B/2.
and what a 1 ms and a 10 us round trip would make of a step of each: the step measured here plus
half a round trip for each one-way hop the step waits on in turn (the links here add about
0.1 ms a round trip of their own, which the measured step already holds). Stops everything it
starts.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM, LAYERS, HEADS, KV_HEADS = 512, 8, 8, 4
PROMPT, NEW = 64, 32


def drive(address: str, ckpt: str, layout: str, concurrency: list[int], per_worker: int) -> dict:
    """Inside the head's namespace: start the gang in `layout`, run the loops, return figures."""
    import asyncio

    import ray

    from cluster.group import RankGroup
    from llama.engine.request import GenerationRequest, SamplingParams
    from tests.conftest import gang_config

    ray.init(address=address, log_to_driver=False)
    tp, pp = (2, 1) if layout == "tensor" else (1, 2)
    group = RankGroup.start(gang_config(ckpt, tp, pipeline_parallel_size=pp, max_batch_size=16, max_seq_len=128,
                                        prefill_chunk=256, cpus_per_rank=1.0, threads_per_rank=1,
                                        placement_strategy="STRICT_SPREAD", rendezvous_timeout_s=60))
    out: dict = {"layout": layout, "runs": {}}
    try:
        info = asyncio.run(group.cluster_info())
        out["rank_ips"] = [r["node_ip"] for r in info["ranks"]]
        vocab = group.config.checkpoint.args.vocab_size
        rnd = random.Random(0)
        for c in concurrency:
            prompts = [[1] + [rnd.randrange(3, vocab) for _ in range(PROMPT - 1)] for _ in range(c * per_worker)]
            runs = []

            async def one(p: list[int], runs: list = runs) -> None:
                t0 = time.perf_counter()
                stamps = []
                async for d in group.stream(GenerationRequest(tuple(p), SamplingParams(max_tokens=NEW, temperature=0,
                                                                                          ignore_eos=True))):
                    stamps += [time.perf_counter()] * len(d.token_ids)
                runs.append((p, stamps, t0))

            async def loop() -> float:
                queue = list(prompts)

                async def worker() -> None:
                    while queue:
                        await one(queue.pop(0))

                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(c)))
                return time.perf_counter() - t0

            before = ray.get(group.actors[0].load.remote())
            wall = asyncio.run(loop())
            after = ray.get(group.actors[0].load.remote())
            tokens = sum(len(s) for _, s, _ in runs)
            tpot = [(s[-1] - s[0]) / (len(s) - 1) for _, s, _ in runs if len(s) > 1]
            steps = after["steps"] - before["steps"]
            out["runs"][c] = {"tok_s": tokens / wall, "tpot_ms": 1e3 * statistics.median(tpot),
                              "step_ms": 1e3 * (after["step_s"] - before["step_s"]) / max(steps, 1)}
            out["runs"][c]["tokens"] = [o.token_ids for o in group.generate(
                [GenerationRequest(tuple(p), SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
                 for p in prompts[:4]])]
    finally:
        group.shutdown()
    return out


def crossings(layout: str, batch: int, vocab: int) -> tuple[int, int, int]:
    """(collectives or messages, one-way hops in sequence, bytes each way) crossing the machines
    in one decode step of `batch` rows (the plan's few hundred bytes left out of the bytes). On
    gloo's two-rank ring an all-reduce is two hops (reduce-scatter, all-gather), an all-gather
    or a broadcast one."""
    hidden, logits = batch * DIM * 4, batch * vocab * 4
    if layout == "tensor":
        return 2 * LAYERS + 3, 2 * (2 * LAYERS) + 3, 2 * LAYERS * hidden + hidden // 2 + logits // 2
    return 3, 3, hidden + batch * 4  # the greedy tokens back, as float32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="1gbit", help="each machine's link, as tc's tbf takes it (e.g. 100mbit, 1gbit)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests-per-worker", type=int, default=2)
    p.add_argument("--driver", nargs=5, metavar=("ADDRESS", "CKPT", "LAYOUT", "CONCURRENCY", "PER_WORKER"),
                   help=argparse.SUPPRESS)  # inside the head's namespace
    a = p.parse_args()
    if a.driver:
        address, ckpt, layout, conc, per = a.driver
        print(json.dumps(drive(address, ckpt, layout, [int(x) for x in conc.split(",")], int(per))))
        return

    from llama.checkpoints.make_tiny import make_tiny
    from llama.model.args import ModelArgs
    from tests.multinode.netns import PYTHON, NetnsCluster, _json_line, unavailable

    why = unavailable()
    if why:
        sys.exit(f"cannot build the machines here: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny(Path(tmp) / "ckpt", 1, dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV_HEADS,
                         dtype=__import__("torch").float32)
        vocab = ModelArgs.from_json(ckpt / "params.json").vocab_size
        if vocab <= 0:
            import sentencepiece

            vocab = sentencepiece.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model")).vocab_size()
        cluster = NetnsCluster(n_nodes=3, cpus_per_node=1, head_cpus=0, workdir=Path(tmp))
        cluster.start()
        results = {}
        try:
            for i, ns in enumerate(cluster.namespaces):
                dev = f"llr{cluster.tag}e{i}"
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                                a.rate, "burst", "256kb", "latency", "50ms"], check=True)
            for layout in ("tensor", "pipeline"):
                out = cluster._enter(0, [PYTHON, str(Path(__file__).resolve()), "--driver", cluster.address, str(ckpt),
                                         layout, ",".join(map(str, a.concurrency)), str(a.requests_per_worker)],
                                     cluster.env, 1200)
                results[layout] = _json_line(out)
        finally:
            cluster.stop()
    report(results, a, vocab)


def report(results: dict, a: argparse.Namespace, vocab: int) -> None:
    t, pl = results["tensor"], results["pipeline"]
    print(f"\nmodel parallel size 2 against 2 pipeline stages, a machine each ({t['rank_ips']} / {pl['rank_ips']}), "
          f"links limited to {a.rate}; dim {DIM}, {LAYERS} layers, vocab {vocab}, float32, 1 thread a rank; "
          f"{PROMPT}-token prompts, {NEW} greedy tokens\n")
    print("| concurrency | layout | decode tok/s | TPOT p50 | driver's step | collectives or messages a step "
          "(one-way hops) | bytes a step, each way | a step at 1 ms RTT | at 10 us RTT |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in a.concurrency:
        for name, r in (("tensor parallel 2", t), ("pipeline 2", pl)):
            run = r["runs"][str(c)]
            n, hops, b = crossings(r["layout"], c, vocab)
            print(f"| {c} | {name} | {run['tok_s']:.1f} | {run['tpot_ms']:.1f} ms | {run['step_ms']:.1f} ms | {n} ({hops}) | "
                  f"{b / 1024:.1f} KiB | {run['step_ms'] + hops * 0.5:.1f} ms (+{hops * 0.5:.1f}) | "
                  f"{run['step_ms'] + hops * 0.005:.1f} ms (+{hops * 0.005:.3f}) |")
        same = t["runs"][str(c)]["tokens"] == pl["runs"][str(c)]["tokens"]
        print(f"| {c} | the same greedy tokens | {same} | | | | | | |")


if __name__ == "__main__":
    main()
