"""`build_app` as deploy/config.yaml would have it, STRICT_SPREAD at MP=2 (replica and two ranks on
three nodes), served by Ray Serve; print GET /cluster's rank IPs and the completions' tokens."""
import json
import sys

import httpx
import ray
from ray import serve

from deploy.app import build_app
from llama.distributed import free_port
from tests.conftest import GOLDEN_CKPT, GOLDEN_DIR

address, host = sys.argv[1], sys.argv[1].split(":")[0]
ray.init(address=address, log_to_driver=False)
c = json.loads((GOLDEN_DIR / "reference.json").read_text())["completions"]
port = free_port(host)
serve.start(http_options={"host": host, "port": port})
try:
    serve.run(build_app({
        "model": "golden", "ckpt_dir": str(GOLDEN_CKPT), "replica_cpus": 0.5,
        "engine": {"max_seq_len": 96, "max_batch_size": 6},
        "parallel": {"model_parallel_size": 2, "device": "cpu", "cpus_per_rank": 0.5,
                     "placement_strategy": "STRICT_SPREAD", "init_timeout_s": 120},
    }), name="llama", route_prefix="/")
    base = f"http://{host}:{port}"
    with httpx.Client(timeout=120) as http:
        cluster = http.get(base + "/cluster").json()
        body = {"model": "golden", "prompt": c["prompt_token_ids"], "max_tokens": c["max_gen_len"], "temperature": 0,
                "return_token_ids": True}
        done = http.post(base + "/v1/completions", json=body).json()
finally:
    serve.shutdown()
print(json.dumps({"rank_ips": [r["node_ip"] for r in cluster["ranks"]],
                  "tokens": [ch["token_ids"] for ch in sorted(done["choices"], key=lambda ch: ch["index"])]}))
