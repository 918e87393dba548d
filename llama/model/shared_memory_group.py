"""SharedMemoryGroup: the model's collectives among ranks on one CPU machine, through shared memory.

Gloo carries each collective over loopback sockets and its own I/O threads. Between two rank
processes of one thread each on the project's 2-core machine, its all-reduce of a decode step's
hidden states (1 or 16 rows of 1,024 floats) took 1.4-2.0 ms a call, against 0.09-0.25 ms here
(`python bench/collectives.py`), and a step makes two all-reduces a layer and two all-gathers
(the embedding's, the output's): 18 calls for the peer benchmark's 8 layers.

Here every rank maps one file in /dev/shm: each writes its tensor into a slot of its own, marks
its arrival with the call's sequence number, and waits (spinning, then yielding its core, then
sleeping) until every rank has arrived; then each reads the slots it needs. An all-reduce adds
the slots in rank order on every rank, so all ranks hold the same bits (at two ranks gloo's bits
too; at more, gloo's ring adds in another order). vLLM's CPU backend does the same for its
tensor-parallel ranks (its shm all-reduce).

Slots alternate between two halves by the call's parity: a rank writes half p at call s only
after every rank has arrived at call s-1, which each does only after reading half p at call s-2.

Only for ranks on one machine, and only on x86-64, whose cores see another core's stores in the
order they were made (a slot's data before its flag); weaker memory orders would need fences that
Python cannot issue. A tensor larger than a slot goes through the fallback group (gloo). A wait
checks its peers' processes every 0.1 s and raises when one has died, and raises past timeout_s,
as a gloo collective would.
"""
from __future__ import annotations

import mmap
import os
import platform
import tempfile
import time

import torch
import torch.distributed as dist

_LINE = 8  # int64s per flag: each rank's flag on a 64-byte cache line of its own
# How long a wait yields its core between looks before it sleeps (a sleep's wake-up comes late:
# up to MAX_SLEEP_S). Inside a step the other ranks are that close; a follower waiting for the driver's
# next plan waits out the driver's sampling and planning between steps, longer.
YIELD_S = 0.005
MAX_SLEEP_S = 0.005  # an idle wait (a follower between requests) wakes 200 times a second


def shared_memory_supported() -> bool:
    """Whether this machine can run the group (x86-64: stores seen in program order)."""
    return platform.machine().lower() in ("x86_64", "amd64")


class PeerLostError(RuntimeError):
    """A peer rank's process ended, or a collective waited past its timeout."""


class SharedMemoryGroup:
    def __init__(self, path: str, rank: int, world: int, slot_bytes: int, pids: list[int], fallback,
                 timeout_s: float, yield_s: float = YIELD_S):
        self.rank, self.world, self.pids, self.fallback, self.timeout_s = rank, world, pids, fallback, timeout_s
        self.yield_s = yield_s
        self.slot_bytes = -(-slot_bytes // 64) * 64
        header = world * _LINE * 8
        with open(path, "r+b") as f:
            self._mm = mmap.mmap(f.fileno(), header + 2 * world * self.slot_bytes)
        self._flags = memoryview(self._mm)[:header].cast("q")
        data = torch.frombuffer(self._mm, dtype=torch.uint8, offset=header)
        self._halves = data.view(2, world, self.slot_bytes)
        self.seq = 0
        self.calls = self.fallbacks = 0
        # Peers whose processes this one can see (not so across PID namespaces with a shared
        # /proc): only those are watched; the timeout covers the rest.
        self._watched = [(r, pid) for r, pid in enumerate(pids) if r != rank and _alive(pid)]

    @classmethod
    def create(cls, group, slot_bytes: int, timeout_s: float, yield_s: float = YIELD_S) -> "SharedMemoryGroup | None":
        """Collective over `group` (a gloo group of ranks on this machine, which stays the
        fallback): rank 0 makes the file (in /dev/shm, else the temporary directory), every rank
        maps it, and it is unlinked once all have, so nothing is left behind however the ranks
        end. None on every rank when no file of that size could be made."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        slot_bytes = -(-slot_bytes // 64) * 64
        size = world * _LINE * 8 + 2 * world * slot_bytes
        names: list = [None]
        if rank == 0:
            names[0] = _make_file(size)
        dist.broadcast_object_list(names, src=dist.get_global_rank(group, 0), group=group)
        if names[0] is None:
            return None
        try:
            pids: list = [None] * world
            dist.all_gather_object(pids, os.getpid(), group=group)
            made = cls(names[0], rank, world, slot_bytes, pids, group, timeout_s, yield_s)
            dist.barrier(group=group)  # every rank has mapped it
        finally:
            if rank == 0 and os.path.exists(names[0]):
                os.unlink(names[0])
        dist.barrier(group=group)  # and it is gone, on whichever rank looks
        return made

    def fits(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.numel() * t.element_size() <= self.slot_bytes

    # ------------------------------------------------------------------ the collectives
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum t over the ranks, in place (rank order on every rank)."""
        if not self.fits(t):
            return self._fallback(dist.all_reduce, t)
        flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
        slots = self._exchange(flat)
        torch.add(slots[0], slots[1], out=flat)
        for r in range(2, self.world):
            flat.add_(slots[r])
        if flat.data_ptr() != t.data_ptr():
            t.copy_(flat.view(t.shape))
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's t, concatenated along the last dimension, in rank order."""
        if not self.fits(t):
            parts = [torch.empty_like(t) for _ in range(self.world)]
            self._fallback(dist.all_gather, parts, t)
            return torch.cat(parts, dim=-1)
        slots = self._exchange(t.reshape(-1))
        return torch.cat([s.view(t.shape) for s in slots], dim=-1)

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """src's t into every rank's t, in place."""
        if not self.fits(t):
            return self._fallback(dist.broadcast, t, src=dist.get_global_rank(self.fallback, src))
        flat = t.reshape(-1)
        slots = self._exchange(flat if self.rank == src else None, flat.numel(), t.dtype)
        if self.rank != src:
            t.copy_(slots[src].view(t.shape))
        return t

    # ------------------------------------------------------------------ the protocol
    def _fallback(self, op, *args, **kwargs):
        # Every rank takes the fallback for the same call (the same shapes everywhere), so the
        # sequence numbers stay in step without this call.
        self.fallbacks += 1
        op(*args, group=self.fallback, **kwargs)
        return args[0]

    def _exchange(self, flat: torch.Tensor | None, numel: int | None = None,
                  dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Write flat (if any) into this rank's slot, arrive, wait for every rank: the slots of
        this call, as `dtype` tensors of `numel`."""
        self.calls += 1
        self.seq += 1
        half = self._halves[self.seq & 1]
        if flat is not None:
            numel, dtype = flat.numel(), flat.dtype
            half[self.rank, : numel * flat.element_size()].copy_(flat.view(torch.uint8))
        self._flags[self.rank * _LINE] = self.seq
        self._wait(self.seq)
        nbytes = numel * dtype.itemsize
        return [half[r, :nbytes].view(dtype) for r in range(self.world)]

    def _arrived(self, seq: int) -> bool:
        flags = self._flags
        for r in range(self.world):
            if flags[r * _LINE] < seq:
                return False
        return True

    def _wait(self, seq: int) -> None:
        for _ in range(200):  # the peers are usually a few microseconds away
            if self._arrived(seq):
                return
        start = time.monotonic()
        check, pause = start + 0.1, 0.0
        while not self._arrived(seq):
            now = time.monotonic()
            if now - start < self.yield_s:
                os.sched_yield()  # another process may need this core more than this wait does
            else:
                pause = min(max(pause * 2, 50e-6), MAX_SLEEP_S)
                time.sleep(pause)
            if now >= check:
                check = now + 0.1
                self._check_peers(now - start)

    def _check_peers(self, waited: float) -> None:
        for r, pid in self._watched:
            if not _alive(pid):
                raise PeerLostError(f"rank {self.rank}: model-parallel rank {r} (pid {pid}) ended while this rank "
                                    f"waited for it in a collective; the gang must be replaced")
        if waited > self.timeout_s:
            raise PeerLostError(f"rank {self.rank}: a collective waited {waited:.0f}s for the other ranks, past its "
                                f"timeout of {self.timeout_s:g}s; a rank is hung and the gang must be replaced")


def _make_file(size: int) -> str | None:
    """A file of `size` bytes whose pages are reserved (zeros), so that a full /dev/shm fails
    here and not as a SIGBUS when a rank first writes."""
    for where in ("/dev/shm", tempfile.gettempdir()):
        if not os.path.isdir(where):
            continue
        fd, path = tempfile.mkstemp(prefix="llama-collectives-", dir=where)
        try:
            os.posix_fallocate(fd, 0, size)
            return path
        except OSError:
            os.unlink(path)
        finally:
            os.close(fd)
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        return True
