"""Cache-aware routing across replicas (bench/prefix_routing.py's scenario, smaller): two gangs
whose KV pools each hold the blocks of two of four long system prompts, requests in random
order through HTTP. Through LlamaIngress (prefix routing) at least 80% of the cacheable prompt
tokens are prefix-cache hits and neither replica serves more than 65% of the requests; the same
requests through the default app (Serve's power of two) are printed beside them, and hit less."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "prefix_routing.py"


def test_prefix_routing_hits_the_cache_and_keeps_the_replicas_balanced(ray_local, tmp_path):
    from llama.checkpoints.make_tiny import make_tiny

    spec = importlib.util.spec_from_file_location("prefix_routing", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ckpt = make_tiny(tmp_path / "ckpt", shards=1)
    routed, default = (bench.run(ckpt, prefix_routing, requests=48, concurrency=4, system_tokens=160, seed=1,
                                 kv_blocks=26) for prefix_routing in (True, False))
    for r in (routed, default):
        print(f"prefix_routing {r['prefix_routing']}: hits {r['cached']}/{r['cacheable']} ({r['hit_share']:.0%}), "
              f"requests per replica {r['replica_finished']}, preemptions {r['preemptions']}")
    assert routed["replicas_seen"] == default["replicas_seen"] == 2
    assert sum(routed["replica_finished"]) == 48
    assert routed["hit_share"] >= 0.8
    assert max(routed["replica_finished"]) <= 0.65 * 48
    assert routed["hit_share"] > default["hit_share"]
