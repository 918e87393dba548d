"""The pre-flight doctor on machines with their own addresses: all checks pass on a healthy
cluster; a machine whose checkpoint file differs, and collectives bound to an interface the
other machines cannot reach, each fail with the right row and its fix; on a gang in pipeline
stages, the link between the stages' machines is timed."""
from __future__ import annotations

import json
import shutil

from tests.conftest import GOLDEN_CKPT

SHARD = GOLDEN_CKPT / "consolidated.01.pth"


def _doctor(nodes, **parallel) -> tuple[list[dict], str]:
    got = nodes.run("doctor.py", json.dumps(parallel))
    print("\n" + got["table"])
    return got["rows"], got["table"]


def test_a_healthy_cluster_passes_every_check(nodes):
    rows, _ = _doctor(nodes)
    assert all(r["ok"] for r in rows)
    assert {r["check"] for r in rows} == {"versions", "backend", "gpu", "interface", "checkpoint", "collectives"}
    assert len({r["node_ip"] for r in rows}) == 2  # one rank per machine


def test_a_machine_whose_checkpoint_differs_is_named_with_the_fix(nodes, tmp_path):
    # Machines 2 and 3 read different bytes at the shard's path (each its own mount), machine 1
    # the real file: whichever two machines the ranks get, they disagree.
    for i in (2, 3):
        bad = tmp_path / f"ckpt{i}"
        shutil.copytree(GOLDEN_CKPT, bad)
        with open(bad / SHARD.name, "r+b") as f:
            f.seek(100)
            f.write(bytes([i]) * 8)
        nodes.node_shell(i, f"mount --bind {bad} {GOLDEN_CKPT}")
    try:
        rows, _ = _doctor(nodes)
    finally:
        for i in (2, 3):
            nodes.node_shell(i, f"umount {GOLDEN_CKPT}")
    failed = [r for r in rows if not r["ok"]]
    assert [r["check"] for r in failed] == ["checkpoint"] and failed[0]["rank"] == 1
    assert "consolidated.01.pth" in failed[0]["detail"] and "on rank 0" in failed[0]["detail"]
    assert failed[0]["node_ip"] in failed[0]["fix"] and str(GOLDEN_CKPT) in failed[0]["fix"]


def test_collectives_on_an_interface_the_others_cannot_reach_fail_with_the_fix(nodes):
    # An operator's wrong setting; the collectives then wait out the doctor's timeout (6 s here).
    rows, _ = _doctor(nodes, env={"GLOO_SOCKET_IFNAME": "lo"}, timeout_s=6)
    failed = [r for r in rows if not r["ok"]]
    assert {(r["rank"], r["check"]) for r in failed} == {(k, c) for k in (0, 1) for c in ("interface", "collectives")}
    assert all("GLOO_SOCKET_IFNAME" in r["fix"] for r in failed)


def test_the_doctor_on_a_pipeline_times_each_link_between_its_stages(nodes):
    """Two stages of two ranks (a machine each): the four ranks' checks, and a row for each link
    from a rank of the first stage to its rank in the second, across the machines."""
    rows, _ = _doctor(nodes, pipeline_parallel_size=2, cpus_per_rank=0.5)
    assert all(r["ok"] for r in rows)
    ip = {r["rank"]: r["node_ip"] for r in rows}
    assert sorted(ip) == [0, 1, 2, 3] and ip[0] == ip[1] != ip[2] == ip[3]
    links = [r for r in rows if r["check"] == "stage link"]
    assert [(r["rank"], r["detail"].split(":")[0]) for r in links] == [(0, f"to rank 2 ({ip[2]})"),
                                                                      (1, f"to rank 3 ({ip[3]})")]
