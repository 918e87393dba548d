"""BlockPool: the driver's account of the KV cache's blocks: which are free, which hold a
sequence's positions (and how many sequences share each), which hold a cached prefix.

Ids 1..num_blocks (0 is the null block, llama/model/kv_cache.py). A block is in exactly one of
three states: used (referenced by at least one running sequence), cached (referenced by none,
but full and keyed by its chained hash, so a later prompt that begins the same way takes it
instead of recomputing it), or free. Blocks are given out free ones first, then the least
recently used cached ones, whose keys are forgotten then. With prefix caching off, a block's
key lasts only while a sequence uses it: the choices of one prompt and running twins still
share their prompt's blocks, and nothing stays cached once they end.
"""
from __future__ import annotations

import random
from collections import OrderedDict, deque


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache has room for {num_blocks} blocks; it needs at least one.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(1, num_blocks + 1))
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, keyed: oldest first
        self._ref = [0] * (num_blocks + 1)
        self._key_of: dict[int, bytes] = {}
        self._by_key: dict[bytes, int] = {}
        self.used = 0  # blocks with a reference
        self.evicted = 0  # cached blocks given out again (their keys forgotten)

    @property
    def available(self) -> int:
        """Blocks a sequence could be given now: free and cached."""
        return len(self._free) + len(self._cached)

    @property
    def cached(self) -> int:
        return len(self._cached)

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks holding the longest run of `keys` from the first (a prompt's cached
        prefix), not yet taken."""
        out = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            out.append(block)
        return out

    def cost(self, hit: list[int], new: int) -> int:
        """Available blocks that taking `hit` (from lookup) and `new` fresh ones would use."""
        return sum(1 for b in hit if b in self._cached) + new

    def take(self, hit: list[int], new: int) -> list[int]:
        """Reference the blocks `hit` and give out `new` more; hit + the new ones, in order.
        The caller checked cost(hit, new) <= available."""
        for b in hit:
            if self._ref[b] == 0:
                del self._cached[b]
                self.used += 1
            self._ref[b] += 1
        fresh = []
        for _ in range(new):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._cached.popitem(last=False)  # least recently used
                del self._by_key[self._key_of.pop(b)]
                self.evicted += 1
            self._ref[b] = 1
            self.used += 1
            fresh.append(b)
        return list(hit) + fresh

    def release(self, blocks: list[int]) -> None:
        """A sequence lets go of its blocks (in its order). Keyed ones stay cached, the later
        ones of a sequence nearer eviction than its first (a prefix outlives its tails)."""
        for b in reversed(blocks):
            self._ref[b] -= 1
            assert self._ref[b] >= 0, f"block {b} released more often than it was taken"
            if self._ref[b]:
                continue
            self.used -= 1
            if b in self._key_of and self.prefix_caching:
                self._cached[b] = None
            else:
                key = self._key_of.pop(b, None)
                if key is not None:
                    del self._by_key[key]
                self._free.append(b)

    def register(self, block: int, key: bytes) -> None:
        """A used block is full and its keys and values computed (or queued before any reader):
        later prompts that begin with `key`'s chain may take it. A key already held by another
        block (two sequences computed the same prefix at once) keeps that one."""
        if key not in self._by_key and block not in self._key_of:
            self._by_key[key] = block
            self._key_of[block] = key

    def has(self, key: bytes) -> bool:
        return key in self._by_key

    def shuffle(self, rng: random.Random) -> None:
        """Give free blocks out in a random order (tests: no result may depend on where a
        sequence's blocks lie in memory)."""
        free = list(self._free)
        rng.shuffle(free)
        self._free = deque(free)

    def check(self) -> None:
        """The counts add up (tests, and after a failure): every block is used, cached or free."""
        used = sum(1 for r in self._ref[1:] if r > 0)
        assert used == self.used, f"{used} blocks referenced, the pool counts {self.used}"
        assert used + len(self._cached) + len(self._free) == self.num_blocks, \
            f"{used} used + {len(self._cached)} cached + {len(self._free)} free != {self.num_blocks} blocks"
        assert all(self._ref[b] == 0 for b in self._cached) and all(self._ref[b] == 0 for b in self._free)
        assert all(self._by_key[k] == b for b, k in self._key_of.items()) and len(self._by_key) == len(self._key_of)
