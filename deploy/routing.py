"""Serve's request routers for LlamaDeployment.

ReadyFirstRouter (HTTP straight to the gangs' replicas, deploy/config.yaml's default): replicas
whose gang is ready come first; a replica still starting its gang (which would make the request
wait) only gets requests when no ready replica can take them. Within each, power of two
choices, as Serve's default router: two picked at random, the one with the shorter queue wins.

PrefixAffinityRouter (behind LlamaIngress, deploy/ingress.py, with `prefix_routing: true`):
the ingress calls a gang's replica with the request's prompt tokens, so the router can see
them (Serve's HTTP proxy hands a replica the request before its body is read). It prefers the
ready replica that already holds the longest run of the prompt's full KV blocks, keyed by the
engine's own chained hashes (llama/engine/block_hash.py), as Ray Serve LLM's prefix-affinity
router does with text: it remembers the keys of each prompt it sent to each replica, at most as
many as that replica's pool holds, the least recently sent forgotten first. A prompt no replica
holds goes to the one holding fewest keys, which spreads distinct prefixes over the replicas.
When the replicas' queues differ by more than `imbalance` requests, the least loaded one wins
whatever it holds: affinity never piles every request on one replica.

Each replica reports {"ready": bool, "kv_blocks": int, "block_size": int} through
record_routing_stats (deploy/server.py); a replica not yet heard from counts as starting.
"""
from __future__ import annotations

import random
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from llama.engine.block_hash import block_hashes
from llama.engine.request import GenerationRequest

DEFAULT_BLOCK_SIZE = 16
DEFAULT_HELD_BLOCKS = 4096  # a replica that has not said its pool's size yet


def rank_ready_first(replicas: list, sample=random.sample) -> list[list]:
    """[up to two ready replicas, up to two starting ones], leaving out an empty rank."""
    ready = [r for r in replicas if r.routing_stats.get("ready")]
    starting = [r for r in replicas if not r.routing_stats.get("ready")]
    return [sample(group, min(2, len(group))) for group in (ready, starting) if group]


class ReadyFirstRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        return rank_ready_first(candidate_replicas)


class HeldPrefixes:
    """The block keys the router has sent to each replica, least recently sent first, capped at
    the replica's pool size: what its prefix cache holds, as far as the router can tell."""

    def __init__(self) -> None:
        self._held: dict[object, OrderedDict[bytes, None]] = {}

    def matched(self, replica_id, keys: list[bytes]) -> int:
        """Leading keys of `keys` the replica holds."""
        held = self._held.get(replica_id, {})
        n = 0
        while n < len(keys) and keys[n] in held:
            n += 1
        return n

    def size(self, replica_id) -> int:
        return len(self._held.get(replica_id, ()))

    def add(self, replica_id, keys: list[bytes], capacity: int) -> None:
        held = self._held.setdefault(replica_id, OrderedDict())
        for k in keys:
            held[k] = None
            held.move_to_end(k)
        while len(held) > capacity:
            held.popitem(last=False)

    def forget(self, replica_id) -> None:
        self._held.pop(replica_id, None)


def rank_by_prefix(keys: list[bytes], replicas: list, held: HeldPrefixes, loads: dict, imbalance: int,
                   sample=random.sample) -> list[list]:
    """The replicas ranked for a prompt whose full blocks have `keys`: [the chosen one, the other
    ready ones, up to two starting ones]. loads: replica_id -> requests it is serving."""
    ready = [r for r in replicas if r.routing_stats.get("ready")]
    starting = [r for r in replicas if not r.routing_stats.get("ready")]
    tail = [sample(starting, min(2, len(starting)))] if starting else []
    if not ready:
        return tail
    load = {r.replica_id: loads.get(r.replica_id, 0) for r in ready}
    least = min(load.values())
    if max(load.values()) - least > imbalance:  # unbalanced: the least loaded, whatever it holds
        chosen = sample([r for r in ready if load[r.replica_id] == least], 1)[0]
    else:
        match = {r.replica_id: held.matched(r.replica_id, keys) for r in ready}
        best = max(match.values())
        if best:
            pick = [r for r in ready if match[r.replica_id] == best]
        else:  # nobody holds it: the replica holding the fewest prefixes takes it
            fewest = min(held.size(r.replica_id) for r in ready)
            pick = [r for r in ready if held.size(r.replica_id) == fewest]
        lightest = min(load[r.replica_id] for r in pick)
        chosen = sample([r for r in pick if load[r.replica_id] == lightest], 1)[0]
    others = [r for r in ready if r is not chosen]
    return [[chosen]] + ([others] if others else []) + tail


def prompt_of(pending_request: PendingRequest | None) -> tuple[int, ...] | None:
    """The prompt tokens of a LlamaDeployment.run call (its first choice's), else None."""
    args = pending_request.args if pending_request is not None else None
    if args and isinstance(args[0], list) and args[0] and isinstance(args[0][0], GenerationRequest):
        return args[0][0].prompt_tokens
    return None


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    imbalance = 8  # requests: past this difference between queues, load wins over affinity

    def initialize_state(self, **kwargs) -> None:
        self.held = HeldPrefixes()

    def _keys(self, prompt: tuple[int, ...], replicas: list) -> list[bytes]:
        block = next((r.routing_stats["block_size"] for r in replicas if "block_size" in r.routing_stats),
                     DEFAULT_BLOCK_SIZE)
        return block_hashes(prompt[:-1], block)  # the last token always runs: its blocks are never a hit

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        prompt = prompt_of(pending_request)
        if prompt is None:
            return rank_ready_first(candidate_replicas)
        loads = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) or 0 for r in candidate_replicas}
        return rank_by_prefix(self._keys(prompt, candidate_replicas), candidate_replicas, self.held, loads,
                              self.imbalance)

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        prompt = prompt_of(pending_request)
        replica = self.curr_replicas.get(replica_id)
        if prompt is None or replica is None:
            return
        stats = replica.routing_stats
        self.held.add(replica_id, self._keys(prompt, [replica]), stats.get("kv_blocks", DEFAULT_HELD_BLOCKS))

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.held.forget(replica_id)
