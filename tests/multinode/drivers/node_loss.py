"""Serve the golden model (MP=2, PACK over the three nodes; or the parallel settings in argv[3],
JSON); note the start stages GET /health named until ready and what GET /cluster shows; while a
request streams, have a node that holds a rank killed (the test kills it when asked through files
in WORKDIR), then time how long the stream takes to end with an error and how long until answers
are right again."""
import json
import sys
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from tests.conftest import GOLDEN_DIR
from tests.multinode.drivers.serving import serve_golden, wait_ready

address, workdir = sys.argv[1], Path(sys.argv[2])
settings = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
host = address.split(":")[0]
ray.init(address=address, log_to_driver=False)
c = json.loads((GOLDEN_DIR / "reference.json").read_text())["completions"]
base = serve_golden(host, **settings)
body = {"model": "golden", "prompt": c["prompt_token_ids"], "max_tokens": c["max_gen_len"], "temperature": 0,
        "return_token_ids": True}


def right(http: httpx.Client) -> bool:
    r = http.post(base + "/v1/completions", json=body)
    return r.status_code == 200 and [ch["token_ids"] for ch in r.json()["choices"]] == c["generated_token_ids"]


out = {}
with httpx.Client(timeout=60) as http:
    out["stages_seen"] = wait_ready(http, base)
    assert right(http)
    cluster = http.get(base + "/cluster").json()
    out["collectives"], out["start"] = cluster["collectives"], cluster["start"]
    out["loads"] = [r["load"] for r in cluster["ranks"]]
    out["rank_ips_before"] = [r["node_ip"] for r in cluster["ranks"]]
    out["stages_before"] = [r["stage"] for r in cluster["ranks"]]
    out["replica_ip_before"] = cluster["replica_node_ip"]
    # A machine with a rank on it but not the replica: the gang breaks, the replica lives to say so.
    victim = next(ip for ip in out["rank_ips_before"] if ip not in (host, cluster["replica_node_ip"]))
    stream = {"model": "golden", "prompt": "hello", "max_tokens": 90, "temperature": 0, "stream": True,
              "extra_body": None}
    stream.pop("extra_body")
    events = []
    with http.stream("POST", base + "/v1/completions", json=stream) as r:
        lines = r.iter_lines()
        for line in lines:  # the stream is under way
            if line.startswith("data: "):
                events.append(line)
                break
        (workdir / "kill").write_text(victim)
        while not (workdir / "killed").exists():
            time.sleep(0.05)
        t_kill = time.monotonic()
        try:
            for line in lines:
                if line.startswith("data: "):
                    events.append(line)
        except httpx.HTTPError as e:  # the connection ended without an end to the stream
            events.append(f"connection lost: {type(e).__name__}")
        out["stream_end_s"] = time.monotonic() - t_kill
    out["last_event"] = events[-1][:300]
    out["victim"] = victim
    t_back = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if right(http):
                t_back = time.monotonic() - t_kill
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    out["right_again_s"] = t_back
    out["rank_ips_after"] = [r["node_ip"] for r in http.get(base + "/cluster").json()["ranks"]] if t_back else None
serve.shutdown()
print(json.dumps(out))
