"""`build_app` as deploy/config.yaml would have it, STRICT_SPREAD at MP=2 (replica and two ranks on
three nodes), served by Ray Serve: the start stages GET /health named until ready, GET /cluster's
ranks (address, load progress) and the completions' tokens."""
import json
import sys

import httpx
import ray
from ray import serve

from tests.conftest import GOLDEN_DIR
from tests.multinode.drivers.serving import serve_golden, wait_ready

address, host = sys.argv[1], sys.argv[1].split(":")[0]
ray.init(address=address, log_to_driver=False)
c = json.loads((GOLDEN_DIR / "reference.json").read_text())["completions"]
try:
    base = serve_golden(host, placement_strategy="STRICT_SPREAD")
    with httpx.Client(timeout=120) as http:
        stages = wait_ready(http, base)
        cluster = http.get(base + "/cluster").json()
        body = {"model": "golden", "prompt": c["prompt_token_ids"], "max_tokens": c["max_gen_len"], "temperature": 0,
                "return_token_ids": True}
        done = http.post(base + "/v1/completions", json=body).json()
finally:
    serve.shutdown()
print(json.dumps({"rank_ips": [r["node_ip"] for r in cluster["ranks"]], "collectives": cluster["collectives"],
                  "stages_seen": stages,
                  "start": cluster["start"], "loads": [r["load"] for r in cluster["ranks"]],
                  "tokens": [ch["token_ids"] for ch in sorted(done["choices"], key=lambda ch: ch["index"])]}))
