"""Placement: which resource bundles a gang needs (a pure function) and getting them from Ray.

A Serve replica's gang is one placement group: bundle 0 holds the replica, bundles 1..N hold
the N rank actors. Outside Serve (tests, scripts) the group holds just the N ranks.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import STRATEGIES, ParallelConfig
from cluster.errors import PlacementTimeoutError

log = logging.getLogger(__name__)


def plan_bundles(parallel: ParallelConfig, replica_cpus: float | None = None) -> list[dict[str, float]]:
    """Bundles for one gang, in order: [the replica's] + one per rank (a whole GPU each on GPU
    clusters). replica_cpus None: no replica bundle (the caller is not a Serve replica). The
    device must be settled (settle_device): 'auto' cannot size a bundle."""
    if parallel.device == "auto":
        raise ValueError("plan_bundles needs a settled device ('cpu' or 'cuda'); call settle_device first.")
    rank: dict[str, float] = {"CPU": parallel.cpus_per_rank}
    if parallel.device == "cuda":
        rank["GPU"] = 1
    head = [] if replica_cpus is None else [{"CPU": replica_cpus}]
    return head + [dict(rank) for _ in range(parallel.model_parallel_size)]


def rank_options(parallel: ParallelConfig, placement: PlacementGroup, bundle: int) -> dict:
    """Ray actor options for one rank's process (or the doctor's probe of it) on `bundle`: its
    resources, the variables every rank gets (parallel.env), its place."""
    return {
        "num_cpus": parallel.cpus_per_rank,
        "num_gpus": 1 if parallel.device == "cuda" else 0,
        "runtime_env": {"env_vars": dict(parallel.env)} if parallel.env else None,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=bundle),
    }


def settle_device(parallel: ParallelConfig) -> ParallelConfig:
    """The one GPU decision of a start: device 'auto' becomes 'cuda' when the Ray cluster has a
    GPU per rank (this machine's GPUs before Ray is up), else 'cpu', so the bundles and the
    ranks agree. Settled settings pass through."""
    if parallel.device != "auto":
        return parallel
    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else torch.cuda.device_count()
    return replace(parallel, device="cuda" if gpus >= parallel.model_parallel_size else "cpu")


def acquire(bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> PlacementGroup:
    """Reserve the bundles; raise PlacementTimeoutError (and release them) if not ready in time."""
    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy must be one of {STRATEGIES}, got {strategy!r}.")
    t0 = time.perf_counter()
    pg = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementTimeoutError(
            f"the cluster could not place the gang within {timeout_s:.0f}s: {describe_need(bundles, strategy)}; "
            f"{describe_nodes(ray.nodes())}. Add nodes, lower model_parallel_size, or use a looser strategy "
            f"than {strategy}."
        )
    log.info("placement group of %d bundles ready in %.2fs", len(bundles), time.perf_counter() - t0)
    return pg


def describe_need(bundles: list[dict[str, float]], strategy: str) -> str:
    """'3 bundles, STRICT_SPREAD (each on its own node): [{CPU: 0.5}, {CPU: 0.5}, {CPU: 0.5}]'."""
    how = {"STRICT_SPREAD": "each on its own node", "STRICT_PACK": "all on one node"}.get(strategy, "anywhere")
    return f"{len(bundles)} bundles, {strategy} ({how}): {bundles}"


def describe_nodes(nodes: list[dict]) -> str:
    """What each alive node has in all (ray.nodes() entries): 'nodes: 198.51.100.2 {CPU: 1.0}, ...'."""
    alive = [n for n in nodes if n.get("Alive")]
    shown = ", ".join(f"{n['NodeManagerAddress']} {{{', '.join(f'{k}: {v:g}' for k, v in sorted(n['Resources'].items()) if k in ('CPU', 'GPU'))}}}"
                      for n in alive)
    return f"the cluster's {len(alive)} alive node(s) have in all: {shown or 'none'}"
