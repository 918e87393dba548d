"""A gang in two pipeline stages of two ranks served through Serve on machines with their own
addresses: each stage's ranks share a machine, the stages and the replica have one each, and
Meta's golden tokens come back (the hidden states and logits cross the machines, each stage's
own collectives do not); when a stage's machine is lost mid-stream the request ends with the
error event at once and Serve replaces the gang on the machines left. (Its own module: the loss
takes a machine for good, and tests/multinode/test_spread_gang.py loses one of its own. The
doctor's test runs the same layout across two machines.)"""
from __future__ import annotations

import json


def test_losing_a_stages_machine_ends_the_stream_with_an_error_and_service_comes_back(nodes, tmp_path):
    settings = {"model_parallel_size": 2, "pipeline_parallel_size": 2, "cpus_per_rank": 0.25,
                "placement_strategy": "SPREAD"}
    got = nodes.run_killing_a_node("node_loss.py", tmp_path, json.dumps(settings))
    print(f"\npipeline node loss: the stream ended {got['stream_end_s']:.2f}s after the kill of stage "
          f"{got['stages_before'][got['rank_ips_before'].index(got['victim'])]}'s machine; right answers again "
          f"{got['right_again_s']:.1f}s after it, ranks on {got['rank_ips_after']}")
    # before: the golden tokens through Serve (the driver checks them), a machine per stage
    ips = got["rank_ips_before"]
    assert got["stages_before"] == [0, 0, 1, 1] and ips[0] == ips[1] != ips[2] == ips[3]
    assert got["replica_ip_before"] not in ips
    assert got["last_event"].startswith('data: {"error"') and "replica will be replaced" in got["last_event"]
    assert got["stream_end_s"] < 5
    assert got["right_again_s"] is not None and got["victim"] not in got["rank_ips_after"]
