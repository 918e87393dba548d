"""The routers' choices (deploy/routing.py). ReadyFirstRouter: replicas whose gang is ready
first, starting ones only as the second rank; a replica not yet heard from counts as starting.
PrefixAffinityRouter: the replica holding the longest prefix, new prefixes spread to the
emptiest, the least loaded when queues are unbalanced, what it remembers capped."""
from __future__ import annotations

from types import SimpleNamespace

from deploy.routing import HeldPrefixes, prompt_of, rank_by_prefix, rank_ready_first
from llama.engine.block_hash import block_hashes
from llama.engine.request import GenerationRequest, SamplingParams


def replica(name: str, **stats) -> SimpleNamespace:
    return SimpleNamespace(name=name, routing_stats=stats)


def names(ranks) -> list[list[str]]:
    return [sorted(r.name for r in rank) for rank in ranks]


def first_two(group, k):
    return group[:k]


def test_ready_replicas_come_first_and_starting_ones_after():
    replicas = [replica("a", ready=False), replica("b", ready=True), replica("c"), replica("d", ready=True)]
    assert names(rank_ready_first(replicas, first_two)) == [["b", "d"], ["a", "c"]]


def test_power_of_two_within_each_rank():
    replicas = [replica(str(k), ready=True) for k in range(5)]
    assert [len(r) for r in rank_ready_first(replicas)] == [2]


def test_with_none_ready_the_starting_ones_are_the_only_rank():
    assert names(rank_ready_first([replica("a"), replica("b", ready=False)], first_two)) == [["a", "b"]]
    assert rank_ready_first([]) == []


# ---------------------------------------------------------------- PrefixAffinityRouter's choice

SYSTEMS = [[s] * 64 for s in (3, 4, 5, 6)]  # 4 blocks of 16 each


def gang(name: str, ready: bool = True) -> SimpleNamespace:
    return SimpleNamespace(name=name, replica_id=name, routing_stats={"ready": ready, "kv_blocks": 100, "block_size": 16})


def keys(tokens: list[int]) -> list[bytes]:
    return block_hashes(tokens, 16)


def chosen(ranks) -> str:
    return ranks[0][0].name


def test_the_replica_holding_the_longest_prefix_comes_first():
    a, b = gang("a"), gang("b")
    held = HeldPrefixes()
    held.add("a", keys(SYSTEMS[0])[:2], 100)
    held.add("b", keys(SYSTEMS[0]), 100)
    ranks = rank_by_prefix(keys(SYSTEMS[0] + [9] * 20), [a, b], held, {}, imbalance=8, sample=first_two)
    assert names(ranks) == [["b"], ["a"]]
    # nobody holds this one: it goes to the replica holding fewest keys, whatever its queue
    assert chosen(rank_by_prefix(keys(SYSTEMS[1]), [a, b], held, {"a": 3}, 8, first_two)) == "a"


def test_a_prefix_nobody_holds_goes_to_the_replica_holding_fewest_which_spreads_prompts():
    reps = [gang("a"), gang("b")]
    held = HeldPrefixes()
    where = {}
    for s in SYSTEMS:  # each new system prompt to the emptier replica, then its repeats follow it
        k = keys(s)
        where[s[0]] = chosen(rank_by_prefix(k, reps, held, {}, 8, first_two))
        held.add(where[s[0]], k, 100)
    assert sorted(where.values()) == ["a", "a", "b", "b"]
    for s in SYSTEMS:
        assert chosen(rank_by_prefix(keys(s + [7, 8]), reps, held, {}, 8, first_two)) == where[s[0]]


def test_unbalanced_queues_send_the_request_to_the_least_loaded_whatever_it_holds():
    a, b = gang("a"), gang("b")
    held = HeldPrefixes()
    held.add("a", keys(SYSTEMS[0]), 100)
    assert chosen(rank_by_prefix(keys(SYSTEMS[0]), [a, b], held, {"a": 8, "b": 0}, 8, first_two)) == "a"
    assert chosen(rank_by_prefix(keys(SYSTEMS[0]), [a, b], held, {"a": 9, "b": 0}, 8, first_two)) == "b"


def test_starting_replicas_come_last_and_alone_they_are_the_only_rank():
    a, s = gang("a"), gang("s", ready=False)
    held = HeldPrefixes()
    held.add("s", keys(SYSTEMS[0]), 100)
    assert names(rank_by_prefix(keys(SYSTEMS[0]), [a, s], held, {}, 8, first_two)) == [["a"], ["s"]]
    assert names(rank_by_prefix(keys(SYSTEMS[0]), [s], held, {}, 8, first_two)) == [["s"]]


def test_what_the_router_remembers_per_replica_is_capped_least_recent_first():
    held = HeldPrefixes()
    held.add("a", keys(SYSTEMS[0]), 6)
    held.add("a", keys(SYSTEMS[1]), 6)  # 8 keys into 6: SYSTEMS[0]'s first two go
    assert held.size("a") == 6 and held.matched("a", keys(SYSTEMS[0])) == 0
    assert held.matched("a", keys(SYSTEMS[1])) == 4
    held.forget("a")
    assert held.size("a") == 0


def test_the_prompt_is_read_from_a_run_call_only():
    r = GenerationRequest((1, 2, 3), SamplingParams(max_tokens=2))
    assert prompt_of(SimpleNamespace(args=[[r, r]], kwargs={})) == (1, 2, 3)
    assert prompt_of(SimpleNamespace(args=[], kwargs={})) is None  # cluster_info, check_ready
    assert prompt_of(None) is None
