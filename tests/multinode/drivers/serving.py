"""What the Serve drivers share: serve build_app's app for the golden checkpoint on this
cluster, and wait until GET /health says ready, noting each start stage it named meanwhile."""
import time

import httpx
from ray import serve

from deploy.app import build_app
from llama.distributed import free_port
from tests.conftest import GOLDEN_CKPT


def golden_args(replica_cpus: float = 0.5, **parallel) -> dict:
    """deploy/config.yaml's args for the golden checkpoint at MP=2 on CPUs, `parallel` on top."""
    return {"model": "golden", "ckpt_dir": str(GOLDEN_CKPT), "replica_cpus": replica_cpus,
            "engine": {"max_seq_len": 96, "max_batch_size": 6},
            "parallel": {"model_parallel_size": 2, "device": "cpu", "cpus_per_rank": 0.5, "rendezvous_timeout_s": 60,
                         **parallel}}


def serve_golden(host: str, **parallel) -> str:
    """Serve the golden checkpoint (golden_args) with Serve's Python API; the base URL."""
    port = free_port(host)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(golden_args(**parallel)), name="llama", route_prefix="/")
    return f"http://{host}:{port}"


def wait_ready(http: httpx.Client, base: str, timeout_s: float = 180.0) -> list[str]:
    """Poll GET /health until 200; the start stages its 503s named, in order, without repeats.
    (Before the app is deployed, Serve's proxy itself answers, in plain text.)"""
    stages: list[str] = []
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = http.get(base + "/health")
        except httpx.TransportError:  # the proxy is not listening yet
            r = None
        if r is not None and r.status_code == 200:
            return stages
        body = r.json() if r is not None and r.headers.get("content-type") == "application/json" else {}
        if body.get("status") == "starting":
            assert r.status_code == 503 and r.headers["retry-after"] == "5", (r.status_code, body)
            if not stages or stages[-1] != body["start"]["stage"]:
                stages.append(body["start"]["stage"])
        assert time.monotonic() < deadline, f"not ready after {timeout_s}s: {None if r is None else r.text[:500]}"
        time.sleep(0.2)
