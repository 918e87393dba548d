"""Drain: when Serve stops a replica (here the application is deleted; a redeploy or scale-down
stops it the same way), a stream it is running goes on to its end, with the tokens an
undisturbed run gives, for up to graceful_shutdown_timeout_s (deploy/server.py: 60 s; Serve's
default of 5 s cut such streams short). No new request reaches a stopping replica: once the
application is deleted, Serve's proxy answers its routes with 404."""
from __future__ import annotations

import json
import threading
import time

import httpx

from tests.ray.serving import serving

MODEL = "llama-demo"
# 240 tokens: several seconds at MP=2 on a CPU; EOS is banned so that the answer runs to max_tokens.
LONG = {"model": MODEL, "prompt": "Q: What is a llama?\nA:", "max_tokens": 240, "temperature": 0,
        "logit_bias": {"2": -100}, "return_token_ids": True}


def test_a_stream_in_flight_runs_to_its_end_when_its_replica_is_stopped(ray_local):
    from ray import serve

    with serving({"model": MODEL, "parallel": {"model_parallel_size": 2, "device": "cpu"}}) as url:
        undisturbed = httpx.post(url + "/v1/completions", json=LONG, timeout=120).json()["choices"][0]["token_ids"]
        assert len(undisturbed) == 240

        got: dict = {"token_ids": [], "events": []}
        first_token = threading.Event()

        def read() -> None:
            with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        got["token_ids"] += chunk["choices"][0].get("token_ids") or []
                        got["finish_reason"] = chunk["choices"][0]["finish_reason"]
                        first_token.set()
                    elif line == "data: [DONE]":
                        got["done"] = time.monotonic()

        reader = threading.Thread(target=read)
        reader.start()
        assert first_token.wait(60)
        stopped = time.monotonic()
        serve.delete("llama", _blocking=False)  # Serve stops the replica: it drains
        time.sleep(1.0)
        late = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 2}, timeout=30)
        reader.join(120)
        assert not reader.is_alive()
        assert got["token_ids"] == undisturbed and got["finish_reason"] == "length" and "done" in got
        assert late.status_code == 404  # the route is gone; the stopping replica got nothing new
        print(f"drained: the stream ended {got['done'] - stopped:.1f} s after the application was deleted")
