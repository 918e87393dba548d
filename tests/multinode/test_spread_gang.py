"""A gang spread over Ray nodes: one rank per node (STRICT_SPREAD), rendezvous at rank 0's
node, the same tokens as Meta's reference; and a clear error when the cluster is too small."""
from __future__ import annotations

import pytest

from cluster.errors import PlacementTimeoutError
from llama.request import GenerationRequest, SamplingParams
from tests.conftest import GOLDEN_CKPT, gang_config


def test_two_ranks_on_two_nodes_match_the_reference(three_nodes, golden):
    import asyncio

    from cluster.group import RankGroup

    cfg = gang_config(GOLDEN_CKPT, 2, max_batch_size=6, placement_strategy="STRICT_SPREAD")
    g = RankGroup.start(cfg)
    try:
        info = asyncio.run(g.cluster_info())
        assert len({r["node_id"] for r in info["ranks"]}) == 2  # each rank on its own node
        c = golden["completions"]
        reqs = [GenerationRequest(tuple(p), SamplingParams(max_tokens=c["max_gen_len"], temperature=0))
                for p in c["prompt_token_ids"]]
        assert [o.token_ids for o in g.generate(reqs)] == c["generated_token_ids"]
    finally:
        g.shutdown()


def test_too_few_nodes_is_a_placement_timeout_that_says_what_to_do(three_nodes, tiny_ckpts):
    from cluster.group import RankGroup

    cfg = gang_config(tiny_ckpts["mha1"], 4, max_batch_size=6, placement_strategy="STRICT_SPREAD",
                      placement_timeout_s=5)
    with pytest.raises(PlacementTimeoutError, match="Add nodes, lower model_parallel_size"):
        RankGroup.start(cfg)
