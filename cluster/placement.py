"""Placement: which resource bundles a gang needs (a pure function) and getting them from Ray.

A Serve replica's gang is one placement group: bundle 0 holds the replica, bundles 1..N hold
the N rank actors. Outside Serve (tests, scripts) the group holds just the N ranks.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import STRATEGIES, ParallelConfig
from cluster.errors import PlacementImpossibleError, PlacementTimeoutError

log = logging.getLogger(__name__)


def plan_bundles(parallel: ParallelConfig, replica_cpus: float | None = None) -> list[dict[str, float]]:
    """Bundles for one gang, in order: [the replica's] + one per rank (a whole GPU each on GPU
    clusters), or, with pipeline stages, one per stage holding its model_parallel_size ranks (so
    a stage's ranks share a machine, and placement_strategy places the stages). replica_cpus
    None: no replica bundle (the caller is not a Serve replica). The device must be settled
    (settle_device): 'auto' cannot size a bundle."""
    if parallel.device == "auto":
        raise ValueError("plan_bundles needs a settled device ('cpu' or 'cuda'); call settle_device first.")
    per = 1 if parallel.pipeline_parallel_size == 1 else parallel.model_parallel_size  # ranks a bundle holds
    rank: dict[str, float] = {"CPU": parallel.cpus_per_rank * per}
    if parallel.device == "cuda":
        rank["GPU"] = per
    head = [] if replica_cpus is None else [{"CPU": replica_cpus}]
    return head + [dict(rank) for _ in range(parallel.world_size // per)]


def rank_bundles(parallel: ParallelConfig, first_bundle: int = 0) -> list[int]:
    """The bundle of each of the gang's ranks, in rank order, its rank bundles starting at first_bundle."""
    return [first_bundle + parallel.bundle_of(r) for r in range(parallel.world_size)]


def rank_options(parallel: ParallelConfig, placement: PlacementGroup, bundle: int,
                 bundles: list[int] | None = None) -> dict:
    """Ray actor options for one rank's process (or the doctor's probe of it) on `bundle`: its
    resources, the variables every rank gets (parallel.env, and OMP_NUM_THREADS: its threads),
    its place. bundles: each rank's bundle (rank_bundles; None: from bundle 0)."""
    threads = rank_threads(parallel, placement, bundle, bundles if bundles is not None else rank_bundles(parallel))
    return {
        "num_cpus": parallel.cpus_per_rank,
        "num_gpus": 1 if parallel.device == "cuda" else 0,
        # Before the process starts: OpenMP reads it once, and a pool that first ran one thread
        # and is then told two runs oneDNN's matmul several times slower than one started at two.
        "runtime_env": {"env_vars": {**parallel.env, "OMP_NUM_THREADS": str(threads)}},
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=bundle),
    }


def rank_threads(parallel: ParallelConfig, placement: PlacementGroup, bundle: int, bundles: list[int]) -> int:
    """The threads of the rank on `bundle` (parallel.threads_per_rank): unless set, its node's CPUs
    (as Ray counts them) shared by the gang's ranks placed on that node (bundles: each rank's)."""
    if parallel.threads_per_rank is not None:
        return parallel.threads_per_rank
    nodes = ray.util.placement_group_table(placement)["bundles_to_node_id"]
    node = nodes[bundle]
    cpus = int(next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == node), 1.0))
    if node == ray.get_runtime_context().get_node_id():
        cpus = min(cpus, len(os.sched_getaffinity(0)))  # a Ray started with more CPUs than this machine has
    return parallel.threads(sum(nodes[b] == node for b in bundles), cpus)


def settle_device(parallel: ParallelConfig) -> ParallelConfig:
    """The one GPU decision of a start: device 'auto' becomes 'cuda' when the Ray cluster has a
    GPU per rank (this machine's GPUs before Ray is up), else 'cpu', so the bundles and the
    ranks agree. Settled settings pass through."""
    if parallel.device != "auto":
        return parallel
    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else torch.cuda.device_count()
    return replace(parallel, device="cuda" if gpus >= parallel.world_size else "cpu")


def acquire(bundles: list[dict[str, float]], strategy: str, timeout_s: float,
            autoscaling: bool = False) -> PlacementGroup:
    """Reserve the bundles. Raise PlacementImpossibleError at once if the cluster's nodes could
    never hold them (unless the cluster adds nodes on demand), PlacementTimeoutError (and
    release them) if they are not ready in time."""
    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if not autoscaling:
        check_possible(bundles, strategy, ray.nodes())
    t0 = time.perf_counter()
    pg = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementTimeoutError(
            f"the cluster could not place the gang within {timeout_s:.0f}s: {describe_need(bundles, strategy)}; "
            f"{describe_nodes(ray.nodes())}; free now, in all: {_brief(ray.available_resources())}. Other work holds "
            f"the rest: free it, add nodes, lower model_parallel_size or pipeline_parallel_size, or use a looser "
            f"strategy than {strategy}."
        )
    log.info("placement group of %d bundles ready in %.2fs", len(bundles), time.perf_counter() - t0)
    return pg


def check_possible(bundles: list[dict[str, float]], strategy: str, nodes: list[dict]) -> None:
    """Raise PlacementImpossibleError, naming what the bundles need and what the nodes have,
    when the alive nodes (ray.nodes() entries) could not hold the bundles under `strategy` even
    if nothing else ran on them."""
    capacities = [n["Resources"] for n in nodes if n.get("Alive")]
    if not fits(bundles, strategy, capacities):
        raise PlacementImpossibleError(
            f"this cluster can never place the gang: {describe_need(bundles, strategy)}; {describe_nodes(nodes)}. "
            f"Add nodes, lower model_parallel_size, pipeline_parallel_size or the CPUs per bundle "
            f"(parallel.cpus_per_rank, replica_cpus), or use a looser strategy than {strategy}. On a cluster that "
            f"adds nodes on demand, set parallel.autoscaling: true to wait for them instead."
        )


def fits(bundles: list[dict[str, float]], strategy: str, capacities: list[dict[str, float]],
         max_steps: int = 100_000) -> bool:
    """Whether the bundles can be put on nodes of these total resources under `strategy`: Ray's
    STRICT_PACK needs one node for all, STRICT_SPREAD a node each, PACK and SPREAD any
    assignment (searched exactly; a search too long to finish answers True, never a false no)."""
    def holds(free: dict[str, float], need: dict[str, float]) -> bool:
        return all(free.get(k, 0.0) >= v - 1e-9 for k, v in need.items() if v > 0)

    if strategy == "STRICT_PACK":
        total: dict[str, float] = {}
        for b in bundles:
            for k, v in b.items():
                total[k] = total.get(k, 0.0) + v
        return any(holds(c, total) for c in capacities)
    if strategy == "STRICT_SPREAD":  # a matching of bundles to distinct nodes (augmenting paths)
        owner: dict[int, int] = {}

        def place(b: int, seen: set[int]) -> bool:
            for n, c in enumerate(capacities):
                if n not in seen and holds(c, bundles[b]):
                    seen.add(n)
                    if n not in owner or place(owner[n], seen):
                        owner[n] = b
                        return True
            return False

        return all(place(b, set()) for b in range(len(bundles)))
    order = sorted(bundles, key=lambda b: sorted(b.items(), reverse=True), reverse=True)  # big ones first
    free = [dict(c) for c in capacities]
    steps = 0

    def search(i: int) -> bool:
        nonlocal steps
        steps += 1
        if i == len(order) or steps > max_steps:
            return True
        tried: list[dict[str, float]] = []
        for f in free:
            if holds(f, order[i]) and f not in tried:  # nodes left alike are tried once
                tried.append(dict(f))
                for k, v in order[i].items():
                    f[k] = f.get(k, 0.0) - v
                if search(i + 1):
                    return True
                for k, v in order[i].items():
                    f[k] += v
        return False

    return search(0)


def describe_need(bundles: list[dict[str, float]], strategy: str) -> str:
    """'3 bundles, STRICT_SPREAD (each on its own node): [{CPU: 0.5}, {CPU: 0.5}, {CPU: 0.5}]'."""
    how = {"STRICT_SPREAD": "each on its own node", "STRICT_PACK": "all on one node"}.get(strategy, "anywhere")
    return f"{len(bundles)} bundles, {strategy} ({how}): {bundles}"


def describe_nodes(nodes: list[dict]) -> str:
    """What each alive node has in all (ray.nodes() entries): 'nodes: 198.51.100.2 {CPU: 1.0}, ...'."""
    alive = [n for n in nodes if n.get("Alive")]
    shown = ", ".join(f"{n['NodeManagerAddress']} {_brief(n['Resources'])}" for n in alive)
    return f"the cluster's {len(alive)} alive node(s) have in all: {shown or 'none'}"


def _brief(resources: dict[str, float]) -> str:
    """'{CPU: 1, GPU: 2}': the resources bundles ask for."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")) + "}"
