"""`serve run` of a YAML like deploy/config.yaml with num_replicas: 2, each gang packed on a
machine of its own (STRICT_PACK, MP=2). Clients send the golden prompts back to back, and with
pauses after the kill; the test kills one gang's machine when asked (files in WORKDIR). Prints
every request's outcome, timed from the kill, and where the gangs were before and after."""
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from llama.distributed import free_port
from tests.conftest import GOLDEN_DIR
from tests.multinode.drivers.serving import golden_args, wait_ready

address, workdir = sys.argv[1], Path(sys.argv[2])
host = address.split(":")[0]
port = free_port(host)
base = f"http://{host}:{port}"
config = {
    "proxy_location": "HeadOnly",
    "http_options": {"host": host, "port": port},
    "applications": [{"name": "llama", "route_prefix": "/", "import_path": "deploy.app:build_app",
                      "args": golden_args(replica_cpus=0.25, placement_strategy="STRICT_PACK", cpus_per_rank=0.25),
                      "deployments": [{"name": "LlamaDeployment", "num_replicas": 2}]}],
}
(workdir / "serve.yaml").write_text(yaml.safe_dump(config))
serve_cli = str(Path(sys.executable).with_name("serve"))
# SIGINT as a terminal would deliver it: a process started in the background of a shell that
# has no job control (CI's, a setsid'd run) inherits SIGINT ignored, and `serve run` would then
# sit out the whole wait below before being killed.
server = subprocess.Popen([serve_cli, "run", str(workdir / "serve.yaml"), "--address", address],
                          stdout=open(workdir / "serve.log", "w"), stderr=subprocess.STDOUT,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
c = json.loads((GOLDEN_DIR / "reference.json").read_text())["completions"]
body = {"model": "golden", "prompt": c["prompt_token_ids"], "max_tokens": c["max_gen_len"], "temperature": 0,
        "return_token_ids": True}


def replica_ips(http: httpx.Client, want: int, timeout_s: float) -> set[str]:
    """The machines of the replicas answering GET /cluster (requests spread over them)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < want and time.monotonic() < deadline:
        info = http.get(base + "/cluster").json()
        if info.get("ready"):
            assert {r["node_ip"] for r in info["ranks"]} == {info["replica_node_ip"]}  # packed on one machine
            seen.add(info["replica_node_ip"])
        time.sleep(0.1)
    return seen


def replaced(http: httpx.Client, victim: str, timeout_s: float) -> set[str]:
    """After the kill: the machines of ready replicas answering GET /cluster, polled until two
    not the victim's have answered and the survivor has taken traffic a while (at least 10 s and
    20 requests sent after the kill)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = http.get(base + "/cluster", timeout=10).json()
            if info.get("ready"):
                seen.add(info["replica_node_ip"])
        except (httpx.HTTPError, ValueError):
            pass  # a request Serve routed to the dead replica before it knew
        after = sum(1 for o in list(outcomes) if o["sent"] is not None and o["sent"] >= 0)
        if len(seen - {victim}) >= 2 and time.monotonic() - t_kill[0] >= 10 and after >= 20:
            break
        time.sleep(0.2)
    return seen


outcomes: list[dict] = []
stop = threading.Event()
t_kill = [None]


def client() -> None:
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = http.post(base + "/v1/completions", json=body)
                ok = r.status_code == 200 and [ch["token_ids"] for ch in r.json()["choices"]] == c["generated_token_ids"]
                what = r.status_code if r.status_code != 200 else ("right" if ok else "WRONG")
                detail = "" if r.status_code == 200 else r.text[:200]
            except httpx.HTTPError as e:
                what, detail = "transport", f"{type(e).__name__}: {e}"[:200]
            t1 = time.monotonic()
            k = t_kill[0]
            outcomes.append({"sent": None if k is None else round(t0 - k, 2), "ended": None if k is None else round(t1 - k, 2),
                             "outcome": what, "detail": detail})
            # Back to back until the kill, so that the victim holds requests when it dies; after
            # it, steady traffic with pauses: three clients back to back kept the survivor's ranks
            # on both of this machine's cores, and the replacement gang's start (its processes'
            # imports, the warm-up) took 40-64 s instead of about 32.
            if t_kill[0] is not None:
                stop.wait(2.0)


out = {}
try:
    with httpx.Client(timeout=60) as http:
        wait_ready(http, base)
        before = replica_ips(http, 2, 120)
        assert len(before) == 2, f"two ready replicas never showed: {before}"
        out["replicas_before"] = sorted(before)
        clients = [threading.Thread(target=client) for _ in range(3)]
        for t in clients:
            t.start()
        time.sleep(3)  # traffic on both replicas
        victim = sorted(before)[0]
        (workdir / "kill").write_text(victim)
        while not (workdir / "killed").exists():
            time.sleep(0.05)
        t_kill[0] = time.monotonic()
        # Serve notices, replaces the gang elsewhere; the survivor answers meanwhile
        after = replaced(http, victim, 150)
        out["replaced_s"] = round(time.monotonic() - t_kill[0], 1)
        stop.set()
        for t in clients:
            t.join()
        out["victim"] = victim
        out["replicas_after"] = sorted(after)
finally:
    stop.set()
    t_stop = time.monotonic()
    server.send_signal(signal.SIGINT)  # as Ctrl-C: `serve run` shuts Serve down and exits
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
    out["shutdown_s"] = round(time.monotonic() - t_stop, 1)
out["outcomes"] = outcomes
print(json.dumps(out))
