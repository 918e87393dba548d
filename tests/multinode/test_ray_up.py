"""The README's walk-through on three namespaced machines that each run an SSH server: `ray up`
of cluster/ray_up/onprem.yaml (as shipped but for the machines' addresses and key) starts Ray on
each over SSH with the cluster's token; `ray exec ... serve run` of deploy/config.yaml (the
golden model at MP=2, STRICT_SPREAD); a client outside the cluster gets Meta's golden tokens and
GET /cluster shows one rank per machine; `ray down` stops Ray everywhere."""
from __future__ import annotations

import json
import time

import pytest
import yaml

from tests.conftest import GOLDEN_CKPT
from tests.multinode.netns import PYTHON, RAY, ROOT, NetnsCluster, unavailable

ONPREM = ROOT / "cluster" / "ray_up" / "onprem.yaml"


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    why = unavailable(ssh=True)
    if why is not None:
        pytest.skip(why)
    cluster = NetnsCluster(n_nodes=3, cpus_per_node=1, workdir=tmp_path_factory.mktemp("rayup"), ssh=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _last_json(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def _serve_config(path) -> None:
    """deploy/config.yaml for the golden checkpoint, one rank per machine, answering on the
    head's address (not only its loopback) so a client outside the cluster can reach it."""
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text())
    config["http_options"]["host"] = "0.0.0.0"
    app = config["applications"][0]
    app["args"].update(model="golden", ckpt_dir=str(GOLDEN_CKPT))
    app["args"]["engine"].update(max_seq_len=96, max_batch_size=6)
    app["args"]["parallel"].update(model_parallel_size=2, device="cpu", placement_strategy="STRICT_SPREAD")
    path.write_text(yaml.safe_dump(config))


def test_ray_up_serve_run_query_ray_down(machines, golden):
    cfg = yaml.safe_load(ONPREM.read_text())
    cfg["provider"].update(head_ip=machines.ips[0], worker_ips=machines.ips[1:])
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(machines.workdir / "id")}
    config = machines.workdir / "cluster.yaml"
    config.write_text(yaml.safe_dump(cfg))
    serve_config = machines.workdir / "serve.yaml"
    _serve_config(serve_config)
    head = f"{machines.ips[0]}:6379"
    on_head = "cd ~/llama-ray && RAY_AUTH_MODE=token PYTHONPATH=. "

    t0 = time.monotonic()
    machines.client_run(RAY, "up", "-y", "--no-config-cache", str(config))
    # The head's autoscaler starts Ray on the workers over SSH after `ray up` returns.
    nodes = _last_json(machines.client_run(
        RAY, "exec", str(config), on_head + f".venv/bin/python tests/multinode/drivers/wait_for_nodes.py {head} 3 300"))
    assert sorted(nodes["ips"]) == sorted(machines.ips)
    up_s = time.monotonic() - t0
    machines.client_run(RAY, "exec", str(config), on_head + f".venv/bin/serve run --non-blocking {serve_config}")
    served = _last_json(machines.client_run(
        PYTHON, str(ROOT / "tests" / "multinode" / "drivers" / "query_golden.py"),
        f"http://{machines.ips[0]}:8000", "golden", "300"))
    assert len(set(served["rank_ips"])) == 2 and set(served["rank_ips"]) <= set(machines.ips)
    assert served["tokens"] == golden["completions"]["generated_token_ids"]
    machines.client_run(RAY, "down", "-y", str(config))
    print(f"ray up to 3 machines in {up_s:.0f}s; served and answered {time.monotonic() - t0 - up_s:.0f}s later")
