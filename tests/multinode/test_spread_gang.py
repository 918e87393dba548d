"""A gang spread over nodes that have their own addresses: one rank per node (STRICT_SPREAD),
collectives bound to each node's interface, rendezvous at rank 0's node; Meta's golden tokens,
directly and through Serve, whose pages name the start's stages and each rank's machine; a clear
error when the cluster is too small; and a machine lost mid-stream: the request ends with an
error at once, Serve replaces the gang on the others."""
from __future__ import annotations

import json

from tests.conftest import GOLDEN_CKPT


def test_two_ranks_on_two_nodes_match_the_reference(nodes, golden):
    got = nodes.run("gang_golden.py")
    assert len(set(got["rank_ips"])) == 2 and set(got["rank_ips"]) <= set(nodes.ips)
    assert got["tokens"] == golden["completions"]["generated_token_ids"]


def test_machines_without_the_checkpoint_get_their_slices_through_the_object_store(nodes, golden):
    # Only the head has the checkpoint: the three machines that run ranks have an empty directory
    # mounted over it (in their own mount namespace), so every rank's slices travel: two pipeline
    # stages of two ranks, a machine each, so each rank's are its stage's layers, cut for its rank.
    hidden = (1, 2, 3)
    for i in hidden:
        nodes.node_shell(i, f"mount -t tmpfs tmpfs {GOLDEN_CKPT}")
    try:
        got = nodes.run("gang_golden.py", json.dumps({"pipeline_parallel_size": 2, "cpus_per_rank": 0.5}))
    finally:
        for i in hidden:
            nodes.node_shell(i, f"umount {GOLDEN_CKPT}")
    assert got["tokens"] == golden["completions"]["generated_token_ids"]
    ips = got["rank_ips"]
    assert got["stages"] == [0, 0, 1, 1] and ips[0] == ips[1] != ips[2] == ips[3]
    assert len(got["weights_from"]) == 4 and all(w.startswith("object store from node") for w in got["weights_from"])


def test_a_gang_the_cluster_can_never_hold_fails_at_once_saying_what_to_do(nodes, tiny_ckpts):
    got = nodes.run("too_few_nodes.py", "4", str(tiny_ckpts["mha1"]))  # 4 ranks, 3 machines with CPUs
    assert got["type"] == "PlacementImpossibleError" and got["seconds"] < 30  # not the 60 s placement timeout
    assert "can never place the gang" in got["error"] and "Add nodes, lower model_parallel_size" in got["error"]
    assert "4 bundles, STRICT_SPREAD (each on its own node)" in got["error"] and "4 alive node(s)" in got["error"]


def test_served_over_three_machines_then_losing_one_ends_the_stream_with_an_error_and_service_comes_back(
        nodes, tmp_path):
    # SPREAD: the replica and the two ranks a machine each (the driver checks the golden tokens
    # first); after the loss the gang packs on the two machines left.
    got = nodes.run_killing_a_node("node_loss.py", tmp_path, json.dumps({"placement_strategy": "SPREAD"}))
    ips = got["rank_ips_before"]
    assert len(set(ips)) == 2 and set(ips) <= set(nodes.ips) and got["replica_ip_before"] not in ips
    assert got["collectives"] == "gloo"  # ranks on two machines: never shared memory
    # While the gang started, GET /health named its stages in order (polled: some may be missed) ...
    stages = ["placement", "actors", "rendezvous", "collective", "weights", "ready"]
    assert got["stages_seen"] and got["stages_seen"] == sorted(got["stages_seen"], key=stages.index)
    # ... and GET /cluster shows how each stage went, and each rank's load (all of its bytes read).
    assert [s["stage"] for s in got["start"]["finished_stages"]] == stages and got["start"]["stage"] == "ready"
    print(f"\nstart stages: {got['start']['finished_stages']}; seen by /health: {got['stages_seen']}")
    assert all(ld["done_bytes"] == ld["total_bytes"] > 0 and ld["finished"] for ld in got["loads"])
    print(f"\nnode loss: the stream ended {got['stream_end_s']:.2f}s after the kill with {got['last_event'][:80]}...; "
          f"right answers again {got['right_again_s']:.1f}s after it, ranks on {got['rank_ips_after']}")
    # The request in flight is told at once (an error event, not a timeout or a cut connection) ...
    assert got["last_event"].startswith('data: {"error"') and "replica will be replaced" in got["last_event"]
    assert got["stream_end_s"] < 5
    # ... and Serve replaces the gang on the machines left, without a person.
    assert got["right_again_s"] is not None and got["victim"] not in got["rank_ips_after"]
