"""cluster/doctor.py's verdict from the probes' reports, without a cluster: each kind of
disagreement becomes a failed row on the right rank, with a fix; the table says how many failed."""
from __future__ import annotations

from cluster.doctor import Probe, compare, render

VERSIONS = {"python": "3.11.7", "torch": "2.13.0", "ray": "2.60.0", "nccl": "-"}
FILES = {"consolidated.00.pth": "10:aa", "params.json": "2:bb"}
GOOD = {"all_reduce_ms": 0.5, "broadcast_gbps": 9.0, "sum": 3.0}


def probe(rank: int, **changes) -> Probe:
    base = dict(rank=rank, node_ip=f"198.51.100.{rank + 1}", versions=VERSIONS, backend="gloo", gpu="cpu",
                interface="eth0", env={"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}, files=FILES)
    return Probe(**{**base, **changes})


def failures(probes, collective=None) -> set[tuple[int, str]]:
    rows = compare(probes, collective or {0: GOOD, 1: GOOD}, "/ckpt")
    assert all(r.fix for r in rows if not r.ok) and not any(r.fix for r in rows if r.ok)
    return {(r.rank, r.check) for r in rows if not r.ok}


def test_agreeing_ranks_pass():
    rows = compare([probe(0), probe(1)], {0: GOOD, 1: GOOD}, "/ckpt")
    assert all(r.ok for r in rows) and len(rows) == 12
    assert render(rows).endswith("12 checks ok, 0 failed")


def test_each_disagreement_fails_its_own_row_on_its_own_rank():
    assert failures([probe(0), probe(1, versions={**VERSIONS, "torch": "2.12.0"})]) == {(1, "versions")}
    assert failures([probe(0), probe(1, files={**FILES, "params.json": "missing"})]) == {(1, "checkpoint")}
    assert failures([probe(0), probe(1, env={"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "eth0"})]) == {
        (1, "interface")}
    assert failures([probe(0), probe(1, problems={"gpu": "CUDA_VISIBLE_DEVICES='0' but Ray assigned ['1']"})]) == {
        (1, "gpu")}
    assert failures([probe(0), probe(1)], {0: GOOD, 1: "failed: RuntimeError: timed out"}) == {(1, "collectives")}
    assert failures([probe(0), probe(1)], {0: {**GOOD, "sum": 4.0}, 1: GOOD}) == {(0, "collectives")}


def test_the_fix_names_the_machine_and_the_path():
    rows = compare([probe(0), probe(1, files={**FILES, "consolidated.00.pth": "10:cc"})], {0: GOOD, 1: GOOD}, "/ckpt")
    (bad,) = [r for r in rows if not r.ok]
    assert "198.51.100.2" in bad.fix and "/ckpt" in bad.fix and "10:cc here, 10:aa on rank 0" in bad.detail
    assert "fix: " in render(rows) and render(rows).endswith("11 checks ok, 1 failed")


def test_in_a_pipeline_each_stage_link_is_a_row_on_its_sending_rank():
    """Two stages of one rank: rank 0 hands its hidden states to rank 1, whose echo must be its own rank."""
    link = {"to": 1, "round_trip_ms": 0.3, "gbps": 8.0, "echo": 1.0}
    rows = compare([probe(0), probe(1)], {0: {**GOOD, "stage_link": link}, 1: GOOD}, "/ckpt")
    (row,) = [r for r in rows if r.check == "stage link"]
    assert (row.rank, row.ok) == (0, True) and "to rank 1 (198.51.100.2): round trip 0.30 ms, 8.00 Gbit/s" in row.detail
    assert failures([probe(0), probe(1)], {0: {**GOOD, "stage_link": {**link, "echo": 0.0}}, 1: GOOD}) == {
        (0, "stage link")}
