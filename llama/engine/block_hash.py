"""block_hashes: the keys of full KV blocks, each chained over its tokens and every token
before it, so that equal keys mean equal keys and values (prefix caching, and the routing that
prefers the replica holding a prompt's prefix: deploy/routing.py).

A block's keys and values depend on its tokens, their positions and everything before them;
the chain covers all three. Nothing else changes them here (no adapters, no images): a model's
blocks are only ever compared within one engine, or between replicas of one model. BLAKE2b
with 16-byte digests, so a collision (two different prefixes sharing cached keys) is out of
reach rather than merely unlikely, as vLLM's default sha256 keys.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT = b""  # the parent of a sequence's first block


def block_hashes(tokens: Sequence[int], block_size: int, start: int = 0, parent: bytes = ROOT) -> list[bytes]:
    """Keys of the full blocks start, start+1, ... of `tokens` (block i: tokens[i*bs:(i+1)*bs]),
    the first chained from `parent`, the key of block start-1 (ROOT for block 0)."""
    out = []
    for i in range(start, len(tokens) // block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes())
        parent = h.digest()
        out.append(parent)
    return out
