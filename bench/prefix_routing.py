"""Cache-aware routing across replicas: prefix routing (LlamaIngress + PrefixAffinityRouter,
deploy/routing.py) against Serve's power-of-two routing (the default app), same requests.

    .venv/bin/python bench/prefix_routing.py [--requests 80 --concurrency 4]

Two replicas of a tiny random model (make_tiny, MP=1 each, CPU), each KV pool sized to hold
the blocks of about two of the four long system prompts (--system-tokens each) beside its
running requests. Requests (a system prompt drawn at random, then a short question of its
own; a few greedy tokens) go through HTTP with `concurrency` clients. Printed for each way of
routing: the share of the cacheable prompt tokens (the system prompts' full blocks) that were
prefix-cache hits (usage.prompt_tokens_details.cached_tokens), and each replica's share of the
requests (its engine's finished count, read through the gangs' handle, minus its warm-up).
`run` is what tests/ray/test_prefix_routing.py calls.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCK = 16


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _engines(gangs, deadline: float) -> dict:
    """Both gangs' engine sections (GET /cluster's), by placement group, once both are ready:
    the handle picks a replica at random for a call without a prompt, so ask until both answered."""
    engines: dict = {}
    while len(engines) < 2:
        info = gangs.cluster_info.remote().result()
        if info.get("ready", True) and "engine" in info and "kv_blocks" in info["engine"]:
            engines[info["placement_group_id"]] = info["engine"]
        elif time.monotonic() > deadline:
            raise TimeoutError(f"the two gangs were not both ready in time: {info}")
        else:
            time.sleep(0.2)
    return engines


def run(ckpt: Path, prefix_routing: bool, requests: int, concurrency: int, system_tokens: int, seed: int,
        kv_blocks: int) -> dict:
    """One app, served, driven, measured and shut down (Ray must be up)."""
    from ray import serve

    from deploy.app import application
    from deploy.settings import AppArgs
    from llama.distributed import free_port
    from llama.engine.kv_memory import GIB, token_nbytes
    from llama.model.args import ModelArgs

    params = ModelArgs.from_json(ckpt / "params.json")
    gb = kv_blocks * BLOCK * token_nbytes(params, 1, 4) / GIB
    args = AppArgs.parse({
        "model": "tiny", "ckpt_dir": str(ckpt), "replica_cpus": 0.1, "prefix_routing": prefix_routing,
        "engine": {"max_seq_len": system_tokens + 64, "max_batch_size": 4, "prefill_chunk": 256,
                   "kv_cache_memory_gb": gb, "max_waiting": 64},
        "parallel": {"model_parallel_size": 1, "device": "cpu", "cpus_per_rank": 0.5},
    })
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 300) for _ in range(system_tokens)] for _ in range(4)]
    work = []
    for k in range(requests):
        s = rng.randrange(4)
        work.append((s, systems[s] + [rng.randrange(3, 300) for _ in range(rng.randint(3, 8))]))
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(args, num_replicas=2), name="llama", route_prefix="/")
    try:
        url = f"http://127.0.0.1:{port}/v1/completions"
        gangs = serve.get_deployment_handle("LlamaDeployment", "llama")
        engines = _engines(gangs, deadline=time.monotonic() + 300)  # both gangs up
        time.sleep(2)  # and their routing stats (ready, pool size) reported to the routers
        before = {pg: e["finished"] for pg, e in engines.items()}
        t0 = time.perf_counter()

        def one(item):
            _, prompt = item
            body = _post(url, {"model": "tiny", "prompt": [1] + prompt, "max_tokens": 4, "temperature": 0})
            return body["usage"]["prompt_tokens_details"]["cached_tokens"]

        with ThreadPoolExecutor(concurrency) as pool:
            cached = list(pool.map(one, work))
        wall = time.perf_counter() - t0
        engines = _engines(gangs, deadline=time.monotonic() + 60)
    finally:
        serve.shutdown()
    cacheable = sum((1 + len(systems[s])) // BLOCK * BLOCK for s, _ in work)
    return {"prefix_routing": prefix_routing, "hit_share": sum(cached) / cacheable, "cached": sum(cached),
            "cacheable": cacheable, "replica_finished": sorted(e["finished"] - before[pg] for pg, e in engines.items()),
            "replicas_seen": len(engines), "wall_s": wall, "requests": requests,
            "preemptions": sum(e["preemptions"] for e in engines.values()),
            "per_request": [(s, c) for (s, _), c in zip(work, cached)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=80)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=160)
    p.add_argument("--kv-blocks", type=int, default=26, help="each replica's pool, in blocks of 16: two system prompts and the running requests")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    import ray

    from llama.checkpoints.make_tiny import make_tiny

    ckpt = make_tiny(Path(tempfile.mkdtemp(prefix="bench-routing-")) / "ckpt", shards=1)
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        rows = [run(ckpt, pr, a.requests, a.concurrency, a.system_tokens, a.seed, a.kv_blocks) for pr in (True, False)]
    finally:
        ray.shutdown()
    print(f"2 replicas (tiny model, MP=1 each, CPU), pools of {a.kv_blocks} blocks of {BLOCK}; 4 system prompts of "
          f"{a.system_tokens} tokens; {a.requests} requests in random order, {a.concurrency} at a time")
    print("| routing | prefix-cache hits / cacheable prompt tokens | requests per replica | preemptions | wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        name = "prefix (LlamaIngress)" if r["prefix_routing"] else "power of two (Serve's default)"
        print(f"| {name} | {r['cached']}/{r['cacheable']} ({r['hit_share']:.0%}) | {r['replica_finished']} | {r['preemptions']} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
