"""A gang in pipeline stages on machines with their own addresses: two stages of two ranks, a
machine each, give Meta's golden tokens and logprobs (the hidden states and logits cross the
machines, each stage's own collectives do not); two stages of one rank served through Serve,
a machine each, give them too, and when a stage's machine is lost mid-stream the request ends
with the error event at once and Serve replaces the gang on the machines left. (Its own module:
the loss takes a machine for good, and tests/multinode/test_spread_gang.py loses one of its own.)"""
from __future__ import annotations

import json

from llama.model.shared_memory_group import shared_memory_supported


def test_two_stages_of_two_ranks_on_two_machines_match_the_reference(nodes, golden):
    got = nodes.run("pipeline_golden.py", "2", "2")
    c = golden["completions"]
    assert got["tokens"] == c["generated_token_ids"] and got["max_logprob_diff"] < 1e-4
    ips = [ip for ip, _, _, _ in got["ranks"]]
    assert ips[0] == ips[1] != ips[2] == ips[3] and set(ips) <= set(nodes.ips)  # a stage's ranks share a machine
    assert [(stage, t, layers) for _, stage, t, layers in got["ranks"]] == [
        (s, t, [[0, 2], [2, 3]][s]) for s in range(2) for t in range(2)]
    # rank 0's stage on one machine: its collectives through shared memory, the links through gloo
    assert got["collectives"] == ("shared memory" if shared_memory_supported() else "gloo")


def test_losing_a_stages_machine_ends_the_stream_with_an_error_and_service_comes_back(nodes, tmp_path):
    settings = {"model_parallel_size": 1, "pipeline_parallel_size": 2, "placement_strategy": "SPREAD"}
    got = nodes.run_killing_a_node("node_loss.py", tmp_path, json.dumps(settings))
    print(f"\npipeline node loss: the stream ended {got['stream_end_s']:.2f}s after the kill of stage "
          f"{got['stages_before'][got['rank_ips_before'].index(got['victim'])]}'s machine; right answers again "
          f"{got['right_again_s']:.1f}s after it, ranks on {got['rank_ips_after']}")
    # before: the golden tokens through Serve (the driver checks them), each stage on its own machine
    assert got["stages_before"] == [0, 1] and len(set(got["rank_ips_before"])) == 2
    assert got["last_event"].startswith('data: {"error"') and "replica will be replaced" in got["last_event"]
    assert got["stream_end_s"] < 5
    assert got["right_again_s"] is not None and got["victim"] not in got["rank_ips_after"]
