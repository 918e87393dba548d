"""ReadyFirstRouter's choice (deploy/routing.py): replicas whose gang is ready first, starting
ones only as the second rank; a replica not yet heard from counts as starting."""
from __future__ import annotations

from types import SimpleNamespace

from deploy.routing import rank_ready_first


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
