"""The model's collectives between rank processes on one machine: gloo against shared memory.

    .venv/bin/python bench/collectives.py [--world 2] [--iters 400] [--threads 1]

Spawns --world processes of --threads threads each (as parallel.threads_per_rank gives a gang's
ranks on a machine of that many cores), joined in a gloo group over loopback, as the gang's ranks
are. Each times, per call, the all-reduce of a step's hidden states (1 and 16 rows of dim 1024,
float32: a decode of one and of sixteen sequences) through gloo and through
llama/model/shared_memory_group.py, first back to back, then with a matmul between calls (a rank's
share of one linear layer at that row count, 1408 x 1024), as in a step, where the other rank's
lateness and the cores' other work are part of a collective's cost. Prints ms per call and
gloo/shared memory as a ratio, from the last of two passes.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rank(rank: int, world: int, port: int, iters: int, threads: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from llama.model.shared_memory_group import SharedMemoryGroup

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank)
    group = SharedMemoryGroup.create(dist.group.WORLD, 16 * 1024 * 4, timeout_s=60)
    rows_out = {}
    for rows in (1, 16):
        x = torch.randn(rows, 1408)
        w = torch.randn(1024, 1408)
        for work in (False, True):
            for way in ("gloo", "shared memory"):
                reduce = dist.all_reduce if way == "gloo" else group.all_reduce_
                for _ in range(2):  # the second pass is the one kept
                    dist.barrier()
                    t0, in_collective = time.perf_counter(), 0.0
                    y = torch.randn(rows, 1024)
                    for _ in range(iters):
                        if work:
                            y = x @ w.t()
                        t1 = time.perf_counter()
                        reduce(y)
                        in_collective += time.perf_counter() - t1
                    total = time.perf_counter() - t0
                rows_out[(rows, work, way)] = (total / iters * 1e3, in_collective / iters * 1e3)
    if rank == 0:
        queue.put(rows_out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    from llama.distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_rank, args=(r, args.world, port, args.iters, args.threads, queue), daemon=True)
             for r in range(args.world)]
    for proc in procs:
        proc.start()
    try:
        got = queue.get(timeout=600)
        for proc in procs:
            proc.join(60)
    finally:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, 9)
    print(f"{args.world} ranks of {args.threads} thread(s) on {os.cpu_count()} CPUs; ms per all-reduce of rows x 1024 "
          f"float32 ({args.iters} calls)")
    print(f"{'rows':>4}  {'between calls':<16} {'gloo':>8} {'shared memory':>14} {'gloo / shm':>10}   "
          f"{'step: gloo':>10} {'step: shm':>9}")
    for rows in (1, 16):
        for work in (False, True):
            g, s = got[(rows, work, "gloo")], got[(rows, work, "shared memory")]
            print(f"{rows:>4}  {'a matmul' if work else 'nothing':<16} {g[1]:>8.3f} {s[1]:>14.3f} {g[1] / s[1]:>10.1f}   "
                  f"{g[0]:>10.3f} {s[0]:>9.3f}")


if __name__ == "__main__":
    main()
