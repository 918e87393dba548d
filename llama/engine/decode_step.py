"""DecodeStep: a step's one-token segments as one decode (Transformer.decode): static-shaped
and captured as a CUDA graph per shape bucket on CUDA; on the CPU (eager), the same forward on
exactly the rows that decode and the blocks they reach, since there padding buys nothing and
every padded key would be gathered for nothing.

With graphs: rows are block-table rows. A step whose one-token segments sit in rows up to r runs the bucket
of B > r rows (rows 0..B-1), each at its own position, against the first n blocks of its own
table, n the bucket above the furthest position's block (the table is padded with the null
block). Rows with no token this step run too, on inputs that write into the null block, and
their logits are dropped; the scheduler gives the lowest free row first, which keeps B near the
number of running sequences. A row's input may be a reference to a token the previous step
sampled, resolved on the device inside the graph, so the step never waits for the host to
learn it.

Buckets: B in 1, 2, 4, ... up to max_batch_size; n in blocks of 64 positions, doubling, up to
the table's width. On CUDA every (B, n) is captured at start-up (`capture_all`; one a step
needs that is not yet captured is captured then), all of them into one memory pool; a run
copies its inputs (tokens, positions, pool offsets to write) into the bucket's device buffer
and replays the graph: one launch for the whole forward, nothing allocated, nothing read back.
The graph reads the block table in place, so table changes need no new capture.
"""
from __future__ import annotations

import time

import torch

from llama.engine.device_io import to_device
from llama.model.kv_cache import KVCache
from llama.model.transformer import Transformer

MIN_KV_BUCKET = 64  # positions


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
        """sampled: the runner's (max_rows,) device buffer of the previous step's tokens."""
        self.model, self.cache, self.sampled = model, cache, sampled
        self.graphs = model.device.type == "cuda" if graphs is None else graphs  # CUDA graphs need CUDA
        self.batch_buckets = buckets(cache.max_rows)
        width = cache.max_blocks_per_row
        self.kv_buckets = buckets(width, min(max(MIN_KV_BUCKET // cache.block_size, 1), width))  # in blocks
        self._inputs: dict[int, torch.Tensor] = {}  # B -> (3, B) on the device: tokens, positions, write offsets
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.capture_s = 0.0  # time spent capturing, for start-up figures

    def run(self, slots: list[int], positions: list[int], tokens: list[int]) -> torch.Tensor:
        """Float32 logits (len(slots), vocab): row i for tokens[i] at positions[i] in table row
        slots[i] (distinct rows, each holding its sequence's positions below positions[i] and a
        block for positions[i]). A token < 0 is -1-j: row j of `sampled`, the tokens the
        previous step sampled (on the device)."""
        bs = self.cache.block_size
        rows = torch.tensor(slots, dtype=torch.long)
        pos = torch.tensor(positions, dtype=torch.long)
        write = self.cache.host_table[rows, pos // bs] * bs + pos % bs
        if not self.graphs:
            # Eager (the CPU): exactly the rows that decode and the blocks they need. Padding
            # only serves a graph's static shapes, and here every padded key is copied for nothing.
            n = max(positions) // bs + 1
            inputs = to_device(torch.stack([torch.tensor(tokens, dtype=torch.long), pos, write]), self.model.device)
            tables = to_device(self.cache.host_table[rows, :n], self.model.device)
            tokens_in = torch.where(inputs[0] >= 0, inputs[0], self.sampled[(-1 - inputs[0]).clamp(min=0)])
            return self.model.decode(tokens_in, inputs[1], inputs[2], tables, self.cache)
        B = bucket_of(max(slots) + 1, self.batch_buckets)
        n = bucket_of(max(positions) // bs + 1, self.kv_buckets)
        host = torch.zeros(3, B, dtype=torch.long)  # rows without a token: token 0 at 0, into the null block
        host[0, rows] = torch.tensor(tokens, dtype=torch.long)
        host[1, rows] = pos
        host[2, rows] = write
        graph, out = self._graph(B, n)
        self._inputs[B].copy_(host.pin_memory(), non_blocking=True)  # one upload, queued after the last replay
        graph.replay()
        return out[to_device(rows, out.device)]  # a copy: the graph's output is overwritten by its next replay

    def _forward(self, inputs: torch.Tensor, n: int) -> torch.Tensor:
        """inputs (3, B): tokens (or sampled-token references), positions, pool offsets to write;
        each row reads its table's first n blocks."""
        tokens = torch.where(inputs[0] >= 0, inputs[0], self.sampled[(-1 - inputs[0]).clamp(min=0)])
        return self.model.decode(tokens, inputs[1], inputs[2], self.cache.table[: inputs.shape[1], :n], self.cache)

    def capture_all(self) -> float:
        """Capture every bucket now (what a server's start-up can pay once); returns the seconds."""
        for B in self.batch_buckets:
            for n in self.kv_buckets:
                self._graph(B, n)
        return self.capture_s

    def _graph(self, B: int, n: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if (B, n) not in self._captured:
            t0 = time.perf_counter()
            if B not in self._inputs:
                self._inputs[B] = torch.empty(3, B, dtype=torch.long, device=self.model.device)
            inputs = self._inputs[B]
            inputs.zero_()  # every row writes into the null block while warming up and capturing
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, kernel selection
                for _ in range(2):
                    self._forward(inputs, n)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(inputs, n)
            self._pool = graph.pool()
            self._captured[(B, n)] = (graph, out)
            self.capture_s += time.perf_counter() - t0
        return self._captured[(B, n)]
