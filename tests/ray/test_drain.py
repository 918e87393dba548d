"""Drain (deploy/drain.py): when Serve stops a replica (the application deleted, or a redeploy),
a request it has not started gets a 503 with Retry-After at once, a stream it is running goes
on to its end with the tokens an undisturbed run gives, and a stream still running when the
grace period is nearly spent ends with a 503 error event instead of a cut connection. No new
request reaches a stopping replica: once the application is deleted, Serve's proxy answers its
routes with 404; on a redeploy, the new replica answers them.

The application is deployed as `serve run deploy/config.yaml` deploys it, with
graceful_shutdown_timeout_s set under `deployments:` (60 s in deploy/config.yaml)."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from llama.distributed import free_port

MODEL = "llama-demo"
ENGINE = {"max_batch_size": 2, "max_waiting": 2, "max_seq_len": 8192}
# EOS is banned so that each answer runs to max_tokens: 100 tokens take a few seconds at MP=2 on
# a CPU, 8,000 far longer than the grace period (900 did not on a fast CPU: 1,632 came in 10 s).
SHORT = {"model": MODEL, "prompt": "Q: What is a llama?\nA:", "max_tokens": 100, "temperature": 0,
         "logit_bias": {"2": -100}, "return_token_ids": True}
LONG = {**SHORT, "prompt": "Q: Where do llamas live?\nA:", "max_tokens": 8000}


class Reader(threading.Thread):
    """One streamed completion, read to its end: its token ids, finish reason, error event, and
    whether the response ended cleanly (a cut connection raises in httpx)."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__()
        self.url, self.body = url, {**body, "stream": True}
        self.token_ids: list[int] = []
        self.finish_reason = self.error = self.broken = None
        self.done = False
        self.first_token = threading.Event()
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=120) as r:
                for line in r.iter_lines():
                    event = json.loads(line[6:]) if line.startswith("data: {") else None
                    if event is not None and "error" in event:
                        self.error = event["error"]
                    elif event is not None:
                        self.token_ids += event["choices"][0].get("token_ids") or []
                        self.finish_reason = event["choices"][0]["finish_reason"]
                        self.first_token.set()
                    elif line == "data: [DONE]":
                        self.done = True
        except httpx.HTTPError as e:
            self.broken = repr(e)
        self.ended_at = time.monotonic()


def deploy(url_port: int, engine: dict, grace_s: float, blocking: bool = True) -> None:
    """The application as `serve run deploy/config.yaml` deploys it (a redeploy, when it runs)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    args = {"model": MODEL, "engine": engine, "parallel": {"model_parallel_size": 2, "device": "cpu"}}
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[{
        "name": "llama", "route_prefix": "/", "import_path": "deploy.app:build_app", "args": args,
        "deployments": [{"name": "LlamaDeployment", "graceful_shutdown_timeout_s": grace_s}]}]), _blocking=blocking)


def post_later(url: str, body: dict, into: dict, retry_draining: bool = False) -> threading.Thread:
    """POST body in a thread; `into` gets the response ("r") and when it came ("at"). With
    retry_draining, as a client that honours Retry-After: a 503 from a draining replica is sent
    again after the seconds it names (up to 30 times), and `into["refused"]` counts those 503s."""

    def post() -> None:
        refused = 0
        while True:
            r = httpx.post(url + "/v1/completions", json=body, timeout=120)
            draining = r.status_code == 503 and r.json()["error"]["code"] == "replica_draining"
            if not (retry_draining and draining and refused < 30):
                break
            refused += 1
            time.sleep(float(r.headers["retry-after"]))
        into.update(r=r, at=time.monotonic(), refused=refused)

    t = threading.Thread(target=post)
    t.start()
    return t


def fill_then_wait(url: str, streams: list[dict]) -> tuple[list[Reader], dict, threading.Thread]:
    """The engine's slots taken by `streams` (each started once the one before has its first
    token), then one more request sent, returned once it waits in the engine for a slot: the
    readers, the waiting request's `post_later` result and its thread."""
    readers = []
    for body in streams:
        readers.append(Reader(url, body))
        readers[-1].start()
        assert readers[-1].first_token.wait(60)
    waiting: dict = {}
    waiter = post_later(url, SHORT, waiting)
    deadline = time.monotonic() + 30
    while httpx.get(url + "/cluster", timeout=10).json()["engine"]["waiting"] < 1:
        assert time.monotonic() < deadline, "no request ever waited in the engine"
        time.sleep(0.05)
    return readers, waiting, waiter


def assert_refused_by_the_drain(r: httpx.Response) -> None:
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("service_unavailable_error", "replica_draining")
    assert "had not started your request" in err["message"]


@pytest.fixture
def serve_port(ray_local):
    from ray import serve

    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def test_a_deleted_application_refuses_what_it_has_not_started_finishes_what_it_has_and_ends_the_rest_cleanly(
        serve_port):
    from ray import serve

    url, grace_s = f"http://127.0.0.1:{serve_port}", 12.0
    deploy(serve_port, ENGINE, grace_s)
    undisturbed = httpx.post(url + "/v1/completions", json=SHORT, timeout=120).json()["choices"][0]["token_ids"]
    assert len(undisturbed) == 100

    (long, short), waiting, waiter = fill_then_wait(url, [LONG, SHORT])  # both slots, and one waiting

    stopped = time.monotonic()
    serve.delete("llama", _blocking=False)  # Serve stops the replica: it drains
    time.sleep(1.5)
    late = httpx.post(url + "/v1/completions", json={**SHORT, "max_tokens": 2}, timeout=30)
    for t in (waiter, short, long):
        t.join(60)
        assert not t.is_alive()

    # Not started: a 503 at once, which tells the client to retry.
    assert_refused_by_the_drain(waiting["r"])
    assert waiting["at"] - stopped < grace_s / 2
    # Started: runs to its end, undisturbed.
    assert (short.token_ids, short.finish_reason, short.done, short.broken) == (undisturbed, "length", True, None)
    assert short.ended_at > waiting["at"]  # it ran on after the drain had begun
    # Still running when the grace period is nearly spent: an error event, then a clean end.
    assert long.broken is None and not long.done and 0 < len(long.token_ids) < LONG["max_tokens"]
    assert (long.error["code"], long.error["type"]) == ("replica_draining", "service_unavailable_error")
    assert "grace period ended before your request finished" in long.error["message"]
    assert long.ended_at - stopped < grace_s
    assert late.status_code == 404  # the route is gone; the stopping replica got nothing new
    print(f"drain: the waiting request's 503 came {waiting['at'] - stopped:.1f} s after the delete, the running "
          f"stream ended whole {short.ended_at - stopped:.1f} s after, the long stream's error event "
          f"{long.ended_at - stopped:.1f} s after ({len(long.token_ids)} tokens), grace {grace_s:.0f} s")


def test_a_redeploy_drains_the_old_replica_while_the_new_one_takes_the_new_requests(serve_port):
    url, grace_s = f"http://127.0.0.1:{serve_port}", 45.0  # far past the running stream: it must not be cut
    one_slot = {**ENGINE, "max_batch_size": 1}
    deploy(serve_port, one_slot, grace_s)
    reference = httpx.post(url + "/v1/completions", json=SHORT, timeout=120).json()["choices"][0]["token_ids"]

    # In the one slot, a stream long enough to outlast the new replica's start (600 tokens).
    (running,), waiting, waiter = fill_then_wait(url, [{**SHORT, "max_tokens": 600}])

    redeployed = time.monotonic()
    deploy(serve_port, {**one_slot, "max_waiting": 3}, grace_s, blocking=False)  # changed args: a new replica
    waiter.join(60)
    assert_refused_by_the_drain(waiting["r"])  # once Serve began to stop the old replica
    after: dict = {}
    # Sent once the old replica was draining. Serve's router may still hand it the old replica for
    # a moment; that refuses it with a 503 and Retry-After, and the retry reaches the new one.
    post_later(url, SHORT, after, retry_draining=True).join(150)
    running.join(60)
    assert (len(running.token_ids), running.token_ids[:100], running.finish_reason, running.done, running.broken) == (
        600, reference, "length", True, None)
    assert running.ended_at > waiting["at"]  # it ran on after the drain had begun
    assert after["r"].status_code == 200, after["r"].text
    assert after["r"].json()["choices"][0]["token_ids"] == reference
    print(f"redeploy: the old replica's waiting request got its 503 {waiting['at'] - redeployed:.1f} s after the "
          f"redeploy, its running stream ended whole {running.ended_at - redeployed:.1f} s after, and the new "
          f"replica answered a request sent then {after['at'] - redeployed:.1f} s after "
          f"({after['refused']} retries after a 503 from the draining replica)")
