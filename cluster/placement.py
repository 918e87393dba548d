"""Placement: which resource bundles a gang needs (a pure function) and getting them from Ray.

A Serve replica's gang is one placement group: bundle 0 holds the replica, bundles 1..N hold
the N rank actors. Outside Serve (tests, scripts) the group holds just the N ranks.
"""
from __future__ import annotations

import logging
import time

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from cluster.errors import PlacementTimeoutError

log = logging.getLogger(__name__)

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def rank_bundle(use_gpu: bool, cpus_per_rank: float) -> dict[str, float]:
    """One rank's resources: a whole GPU each on GPU machines, CPUs otherwise."""
    bundle: dict[str, float] = {"CPU": cpus_per_rank}
    if use_gpu:
        bundle["GPU"] = 1
    return bundle


def plan_bundles(
    model_parallel_size: int,
    use_gpu: bool,
    cpus_per_rank: float = 1.0,
    replica_cpus: float | None = None,
) -> list[dict[str, float]]:
    """Bundles for one gang, in order: [replica bundle] + one bundle per rank.

    replica_cpus None means no replica bundle (the caller is not a Serve replica)."""
    if model_parallel_size < 1:
        raise ValueError(f"model_parallel_size must be >= 1, got {model_parallel_size}.")
    if cpus_per_rank <= 0:
        raise ValueError(f"cpus_per_rank must be > 0, got {cpus_per_rank}.")
    head = [] if replica_cpus is None else [{"CPU": replica_cpus}]
    return head + [rank_bundle(use_gpu, cpus_per_rank) for _ in range(model_parallel_size)]


def gpus_in_cluster() -> float:
    return ray.cluster_resources().get("GPU", 0.0)


def want_gpu(device: str, model_parallel_size: int) -> bool:
    """Whether rank bundles ask for GPUs: 'cuda' always, 'auto' when the cluster has enough."""
    if device == "cuda":
        return True
    if device == "cpu":
        return False
    return gpus_in_cluster() >= model_parallel_size


def acquire(bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> PlacementGroup:
    """Reserve the bundles; raise PlacementTimeoutError (and release them) if not ready in time."""
    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy must be one of {STRATEGIES}, got {strategy!r}.")
    t0 = time.perf_counter()
    pg = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        have = ray.available_resources()
        raise PlacementTimeoutError(
            f"the cluster could not place bundles {bundles} with strategy {strategy} within "
            f"{timeout_s:.0f}s (available now: CPU {have.get('CPU', 0)}, GPU {have.get('GPU', 0)}). "
            f"Add nodes, lower model_parallel_size, or use a looser strategy than {strategy}."
        )
    log.info("placement group of %d bundles ready in %.2fs", len(bundles), time.perf_counter() - t0)
    return pg
