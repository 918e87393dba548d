"""A gang spread over nodes that have their own addresses: one rank per node (STRICT_SPREAD),
collectives bound to each node's interface, rendezvous at rank 0's node; Meta's golden tokens,
directly and through Serve; and a clear error when the cluster is too small."""
from __future__ import annotations


def test_two_ranks_on_two_nodes_match_the_reference(three_nodes, golden):
    got = three_nodes.run("gang_golden.py")
    assert len(set(got["rank_ips"])) == 2 and set(got["rank_ips"]) <= set(three_nodes.ips)
    assert got["tokens"] == golden["completions"]["generated_token_ids"]


def test_served_over_three_nodes_the_cluster_page_shows_each_rank_on_its_own_address(three_nodes, golden):
    got = three_nodes.run("serve_golden.py")
    assert len(set(got["rank_ips"])) == 2 and set(got["rank_ips"]) <= set(three_nodes.ips)
    assert got["tokens"] == golden["completions"]["generated_token_ids"]


def test_too_few_nodes_is_a_placement_timeout_that_says_what_to_do(three_nodes, tiny_ckpts):
    got = three_nodes.run("too_few_nodes.py", "4", str(tiny_ckpts["mha1"]))
    assert "Add nodes, lower model_parallel_size" in got["error"]
