"""From outside the cluster, as a client would: wait until the served app answers, then print
GET /cluster's rank IPs and the golden prompts' completion tokens."""
import json
import sys
import time

import httpx

from tests.conftest import GOLDEN_DIR

base, model, timeout_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
c = json.loads((GOLDEN_DIR / "reference.json").read_text())["completions"]
deadline = time.monotonic() + timeout_s
with httpx.Client(timeout=120) as http:
    while True:
        try:
            if http.get(base + "/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base}/health did not answer 200 within {timeout_s}s")
        time.sleep(2)
    cluster = http.get(base + "/cluster").json()
    body = {"model": model, "prompt": c["prompt_token_ids"], "max_tokens": c["max_gen_len"], "temperature": 0,
            "return_token_ids": True}
    done = http.post(base + "/v1/completions", json=body).json()
print(json.dumps({"rank_ips": [r["node_ip"] for r in cluster["ranks"]],
                  "tokens": [ch["token_ids"] for ch in sorted(done["choices"], key=lambda ch: ch["index"])]}))
