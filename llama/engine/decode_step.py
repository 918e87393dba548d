"""DecodeStep: a step's one-token segments as one static-shaped decode (Transformer.decode),
captured as a CUDA graph per shape bucket on CUDA, run eagerly on the CPU (the same code).

Rows are slots. A step whose one-token segments sit in slots up to s runs the bucket of B >
s rows (slots 0..B-1), each at its own position, against the first S positions of its own
slot, S the bucket above the furthest position. Slots with no token this step run too, on
inputs that write into the cache's scratch row, and their logits are dropped; the scheduler
gives the lowest free slot first, which keeps B near the number of running sequences. A
row's input may be a reference to a token the previous step sampled, resolved on the device
inside the graph, so the step never waits for the host to learn it.

Buckets: B in 1, 2, 4, ... up to max_batch_size; S in 64, 128, ... up to max_seq_len. On CUDA
every (B, S) is captured at start-up (`capture_all`; one a step needs that is not yet captured
is captured then), all of them into one memory pool; a run
copies its inputs into the bucket's device buffer and replays the graph: one launch for the
whole forward, nothing allocated, nothing read back. The positions index the cache on the
device, so a block table can later replace the slot rows.
"""
from __future__ import annotations

import time

import torch

from llama.engine.device_io import to_device
from llama.model.kv_cache import KVCache
from llama.model.transformer import Transformer

MIN_KV_BUCKET = 64


def buckets(limit: int, first: int = 1) -> list[int]:
    """first, 2*first, 4*first, ... below limit, then limit."""
    out, b = [], first
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket_of(n: int, sizes: list[int]) -> int:
    return next(b for b in sizes if b >= n)


class DecodeStep:
    def __init__(self, model: Transformer, cache: KVCache, sampled: torch.Tensor, graphs: bool | None = None):
        """sampled: the runner's (max_batch_size,) device buffer of the previous step's tokens."""
        self.model, self.cache, self.sampled = model, cache, sampled
        self.graphs = model.device.type == "cuda" if graphs is None else graphs  # CUDA graphs need CUDA
        self.batch_buckets = buckets(cache.max_batch_size)
        self.kv_buckets = buckets(cache.max_seq_len, min(MIN_KV_BUCKET, cache.max_seq_len))
        self._inputs: dict[int, torch.Tensor] = {}  # B -> (3, B) on the device: tokens, positions, write slots
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.capture_s = 0.0  # time spent capturing, for start-up figures

    def run(self, slots: list[int], positions: list[int], tokens: list[int]) -> torch.Tensor:
        """Float32 logits (len(slots), vocab): row i for tokens[i] at positions[i] in slots[i]
        (distinct slots, each holding its sequence's positions below positions[i]). A token < 0
        is -1-j: row j of `sampled`, the tokens the previous step sampled (on the device)."""
        B = bucket_of(max(slots) + 1, self.batch_buckets)
        S = bucket_of(max(positions) + 1, self.kv_buckets)
        host = torch.zeros(3, B, dtype=torch.long)
        host[2] = self.cache.scratch
        rows = torch.tensor(slots, dtype=torch.long)
        host[0, rows] = torch.tensor(tokens, dtype=torch.long)
        host[1, rows] = torch.tensor(positions, dtype=torch.long)
        host[2, rows] = rows
        if self.graphs:
            graph, out = self._graph(B, S)
            self._inputs[B].copy_(host.pin_memory(), non_blocking=True)  # one upload, queued after the last replay
            graph.replay()
        else:
            out = self._forward(to_device(host, self.model.device), S)
        return out[to_device(rows, out.device)]  # a copy: the graph's output is overwritten by its next replay

    def _forward(self, inputs: torch.Tensor, S: int) -> torch.Tensor:
        """inputs (3, B): tokens (or sampled-token references), positions, write slots."""
        tokens = torch.where(inputs[0] >= 0, inputs[0], self.sampled[(-1 - inputs[0]).clamp(min=0)])
        return self.model.decode(tokens, inputs[1], inputs[2], S, self.cache)

    def capture_all(self) -> float:
        """Capture every bucket now (what a server's start-up can pay once); returns the seconds."""
        for B in self.batch_buckets:
            for S in self.kv_buckets:
                self._graph(B, S)
        return self.capture_s

    def _graph(self, B: int, S: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if (B, S) not in self._captured:
            t0 = time.perf_counter()
            if B not in self._inputs:
                self._inputs[B] = torch.empty(3, B, dtype=torch.long, device=self.model.device)
            inputs = self._inputs[B]
            inputs[:2].zero_()  # every row a scratch row while warming up and capturing
            inputs[2].fill_(self.cache.scratch)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, kernel selection
                for _ in range(2):
                    self._forward(inputs, S)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(inputs, S)
            self._pool = graph.pool()
            self._captured[(B, S)] = (graph, out)
            self.capture_s += time.perf_counter() - t0
        return self._captured[(B, S)]
