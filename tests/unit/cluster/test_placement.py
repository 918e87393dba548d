"""Placement without a cluster: plan_bundles (the replica's bundle, one per rank, GPUs on cuda) and settle_device."""
from __future__ import annotations

import pytest
import ray
import torch

from cluster.config import ParallelConfig
from cluster.placement import plan_bundles, rank_bundles, settle_device


def test_the_replica_bundle_comes_first_then_one_cpu_bundle_per_rank():
    parallel = ParallelConfig(model_parallel_size=3, device="cpu", cpus_per_rank=0.5)
    assert plan_bundles(parallel, replica_cpus=2.0) == [{"CPU": 2.0}] + [{"CPU": 0.5}] * 3


def test_without_a_replica_the_gang_is_just_its_ranks():
    parallel = ParallelConfig(model_parallel_size=2, device="cpu")
    assert plan_bundles(parallel) == [{"CPU": 1.0}, {"CPU": 1.0}]


def test_cuda_ranks_each_take_a_whole_gpu_and_the_replica_none():
    parallel = ParallelConfig(model_parallel_size=2, device="cuda", cpus_per_rank=4.0)
    assert plan_bundles(parallel, replica_cpus=1.0) == [{"CPU": 1.0}, {"CPU": 4.0, "GPU": 1}, {"CPU": 4.0, "GPU": 1}]


def test_the_rank_bundles_are_separate_dicts():
    bundles = plan_bundles(ParallelConfig(model_parallel_size=2, device="cpu"))
    bundles[0]["CPU"] = 99
    assert bundles[1] == {"CPU": 1.0}


def test_pipeline_stages_take_a_bundle_each_holding_their_ranks():
    """Each stage's ranks share one bundle, so one machine; the strategy places the stages."""
    parallel = ParallelConfig(model_parallel_size=2, pipeline_parallel_size=3, device="cuda", cpus_per_rank=4.0)
    assert plan_bundles(parallel, replica_cpus=1.0) == [{"CPU": 1.0}] + [{"CPU": 8.0, "GPU": 2}] * 3
    assert rank_bundles(parallel, first_bundle=1) == [1, 1, 2, 2, 3, 3]
    one_rank_stages = ParallelConfig(pipeline_parallel_size=2, device="cpu", cpus_per_rank=0.5)
    assert plan_bundles(one_rank_stages) == [{"CPU": 0.5}] * 2 and rank_bundles(one_rank_stages) == [0, 1]
    # without a pipeline, a bundle per rank as before (ranks of one stage may spread over machines)
    assert rank_bundles(ParallelConfig(model_parallel_size=3, device="cpu"), first_bundle=1) == [1, 2, 3]


def test_an_unsettled_device_is_refused():
    with pytest.raises(ValueError, match="settle_device"):
        plan_bundles(ParallelConfig(model_parallel_size=1, device="auto"))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_settled_device_passes_through(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: pytest.fail("a settled device needs no look"))
    parallel = ParallelConfig(model_parallel_size=2, device=device)
    assert settle_device(parallel) is parallel


def test_auto_before_ray_counts_this_machines_gpus():
    assert not ray.is_initialized()  # the unit tier never starts Ray
    parallel = ParallelConfig(model_parallel_size=1, device="auto", cpus_per_rank=0.5)
    settled = settle_device(parallel)
    assert settled.device == ("cuda" if torch.cuda.device_count() >= 1 else "cpu")
    assert settled == ParallelConfig(model_parallel_size=1, device=settled.device, cpus_per_rank=0.5)  # only the device


@pytest.mark.parametrize("gpus,mp,want", [(0, 1, "cpu"), (2, 2, "cuda"), (2, 1, "cuda"), (2, 4, "cpu")])
def test_auto_wants_a_gpu_for_every_rank(gpus, mp, want, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert settle_device(ParallelConfig(model_parallel_size=mp, device="auto")).device == want


def test_a_placement_timeout_names_what_the_gang_needs_and_what_each_node_has():
    from cluster.placement import describe_need, describe_nodes

    need = describe_need([{"CPU": 0.5}] * 4, "STRICT_SPREAD")
    assert need == "4 bundles, STRICT_SPREAD (each on its own node): [{'CPU': 0.5}, {'CPU': 0.5}, {'CPU': 0.5}, {'CPU': 0.5}]"
    nodes = [{"Alive": True, "NodeManagerAddress": "198.51.100.2", "Resources": {"CPU": 1.0, "memory": 5e9}},
             {"Alive": False, "NodeManagerAddress": "198.51.100.3", "Resources": {"CPU": 1.0}},
             {"Alive": True, "NodeManagerAddress": "198.51.100.4", "Resources": {"CPU": 2.0, "GPU": 1.0}}]
    assert describe_nodes(nodes) == ("the cluster's 2 alive node(s) have in all: 198.51.100.2 {CPU: 1}, "
                                     "198.51.100.4 {CPU: 2, GPU: 1}")


# ---- whether the cluster could ever hold a gang (fail fast instead of waiting) --------------
from cluster.errors import PlacementImpossibleError  # noqa: E402
from cluster.placement import check_possible, fits  # noqa: E402

ONE_CPU = {"CPU": 1.0, "memory": 1e9}


@pytest.mark.parametrize("strategy,bundles,nodes,ok", [
    ("STRICT_SPREAD", [{"CPU": 0.5}] * 3, [ONE_CPU] * 3, True),
    ("STRICT_SPREAD", [{"CPU": 0.5}] * 4, [ONE_CPU] * 3, False),  # one node each: 4 bundles, 3 nodes
    ("STRICT_SPREAD", [{"CPU": 2.0}, {"CPU": 0.5}], [{"CPU": 2.0}, {"CPU": 0.5}], True),  # needs the matching
    ("STRICT_SPREAD", [{"CPU": 0.5}, {"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 0.5}], True),  # ... in either order
    ("STRICT_PACK", [{"CPU": 0.5}] * 2, [ONE_CPU, ONE_CPU], True),
    ("STRICT_PACK", [{"CPU": 0.5}] * 3, [ONE_CPU, ONE_CPU], False),  # 1.5 CPUs on one node
    ("PACK", [{"CPU": 0.5}] * 6, [ONE_CPU] * 3, True),
    ("PACK", [{"CPU": 0.5}] * 7, [ONE_CPU] * 3, False),
    ("SPREAD", [{"CPU": 0.6}] * 3, [ONE_CPU] * 2, False),  # 1.8 CPUs in all, but 0.6 twice fits no node
    ("PACK", [{"CPU": 1.0, "GPU": 1}] * 2, [{"CPU": 8.0, "GPU": 1}] * 2, True),
    ("PACK", [{"CPU": 1.0, "GPU": 1}] * 2, [{"CPU": 8.0, "GPU": 1}, {"CPU": 8.0}], False),  # a GPU each
    ("PACK", [{"CPU": 0.0}], [{}], True),  # nothing asked, nothing needed
    ("PACK", [{"CPU": 3.0}, {"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 1.0}], [{"CPU": 4.0}, {"CPU": 4.0}], True),  # 3+1, 2+2
])
def test_whether_the_nodes_could_ever_hold_the_bundles(strategy, bundles, nodes, ok):
    assert fits(bundles, strategy, nodes) is ok


def test_a_search_too_long_to_finish_never_says_no():
    assert not fits([{"CPU": 0.6}] * 3, "PACK", [ONE_CPU] * 2)
    assert fits([{"CPU": 0.6}] * 3, "PACK", [ONE_CPU] * 2, max_steps=2)  # cut short: "maybe", so Ray decides


def test_an_impossible_gang_is_refused_naming_its_bundles_and_what_the_nodes_have():
    nodes = [{"Alive": True, "NodeManagerAddress": f"198.51.100.{k}", "Resources": {"CPU": 1.0, "memory": 1e9}}
             for k in (2, 3)] + [{"Alive": False, "NodeManagerAddress": "198.51.100.9", "Resources": {"CPU": 8.0}}]
    with pytest.raises(PlacementImpossibleError) as e:
        check_possible([{"CPU": 0.5}] * 3, "STRICT_SPREAD", nodes)
    msg = str(e.value)
    assert "3 bundles, STRICT_SPREAD (each on its own node): [{'CPU': 0.5}, {'CPU': 0.5}, {'CPU': 0.5}]" in msg
    assert "2 alive node(s) have in all: 198.51.100.2 {CPU: 1}, 198.51.100.3 {CPU: 1}" in msg
    assert "Add nodes" in msg and "parallel.autoscaling: true" in msg
    check_possible([{"CPU": 0.5}] * 2, "STRICT_SPREAD", nodes)  # possible: no error
