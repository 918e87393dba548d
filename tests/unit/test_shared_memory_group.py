"""SharedMemoryGroup on real spawned ranks (no Ray): its all-reduce, all-gather and broadcast give
gloo's results bit for bit (at three ranks the all-reduce the exact sum, its additions in rank
order where gloo's ring has another), over many calls in a row with the ranks out of step; a tensor past a
slot goes through gloo; a dead or hung peer raises instead of hanging; nothing is left in /dev/shm."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import random
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from llama.distributed import free_port
from llama.model.shared_memory_group import shared_memory_supported

pytestmark = pytest.mark.skipif(not shared_memory_supported(), reason="shared-memory collectives are x86-64 only")

SLOT = 64 * 1024  # bytes: 16,384 float32s


def _tensors(rank: int, i: int) -> torch.Tensor:
    """Call i's input on `rank`: a shape and dtype of its own, seeded by (rank, i)."""
    g = torch.Generator().manual_seed(1000 * rank + i)
    shape = [(1, 1024), (16, 1024), (3, 7), (257, 33), (4096,)][i % 5]
    dtype = torch.bfloat16 if i % 3 == 2 else torch.float32
    return torch.randn(shape, generator=g).to(dtype)


def _rank(rank: int, world: int, port: int, out_dir: str, scenario: str) -> None:
    import torch.distributed as dist

    from llama.model.shared_memory_group import PeerLostError, SharedMemoryGroup

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank,
                            timeout=timedelta(seconds=60))
    out: dict = {}
    try:
        before = {p.name for p in Path("/dev/shm").glob("llama-collectives-*")}
        group = SharedMemoryGroup.create(dist.group.WORLD, SLOT, timeout_s=0.5 if scenario == "hung" else 30)
        out["left"] = sorted({p.name for p in Path("/dev/shm").glob("llama-collectives-*")} - before)
        if scenario == "agree":
            rng = random.Random(rank)
            ours, gloos = [], []
            for i in range(300):
                if rng.random() < 0.2:
                    time.sleep(rng.random() * 0.002)  # the ranks arrive out of step
                x = _tensors(rank, i)
                op = i % 3
                if op == 0:
                    a, b = x.clone(), x.clone()
                    group.all_reduce_(a)
                    dist.all_reduce(b)
                elif op == 1:
                    a = group.all_gather_last(x)
                    parts = [torch.empty_like(x) for _ in range(world)]
                    dist.all_gather(parts, x)
                    b = torch.cat(parts, dim=-1)
                else:
                    a, b = x.clone(), x.clone()
                    group.broadcast_(a, src=i % world)
                    dist.broadcast(b, src=i % world)
                ours.append(a)
                gloos.append(b)
            big = torch.full((SLOT // 4 + 1,), float(rank + 1))  # one float32 past the slot
            group.all_reduce_(big)
            out.update(ours=ours, gloos=gloos, big=big[:3].tolist(), calls=group.calls, fallbacks=group.fallbacks)
        elif scenario in ("dead", "hung"):
            if rank == 1:
                if scenario == "dead":
                    os._exit(0)  # gone without arriving
                time.sleep(5)  # alive, never arriving
                os._exit(0)
            t0 = time.monotonic()
            try:
                group.all_reduce_(torch.ones(8))
                out["raised"] = None
            except PeerLostError as e:
                out["raised"] = str(e)
            out["after_s"] = time.monotonic() - t0
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(out))
    finally:
        if scenario == "agree":
            dist.destroy_process_group()
        else:
            os._exit(0)  # a peer is gone: leave without gloo's teardown


def _run(world: int, scenario: str, tmp_path: Path, join_s: float = 60) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=_rank, args=(r, world, port, str(tmp_path), scenario), daemon=True)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(join_s)
        assert not [r for r, p in enumerate(procs) if p.is_alive()], "a rank is still waiting"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [pickle.loads(f.read_bytes()) if (f := tmp_path / f"rank{r}.pkl").exists() else None
            for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_its_collectives_give_gloos_bits_over_many_calls_out_of_step(tmp_path, world):
    results = _run(world, "agree", tmp_path)
    for rank, got in enumerate(results):
        assert got["left"] == [], "the shared file was not unlinked once every rank had mapped it"
        for i, (a, b) in enumerate(zip(got["ours"], got["gloos"])):
            assert a.dtype == b.dtype and a.shape == b.shape, (rank, i)
            if world == 2 or i % 3:  # two addends sum alike in any order; gathers and broadcasts copy
                assert torch.equal(a, b), f"rank {rank}, call {i}: differs from gloo's"
            else:  # three: gloo's ring adds in another order than rank order, so the last bit may differ
                exact = sum(_tensors(r, i).double() for r in range(world))
                tol = 1e-2 if a.dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(a.double(), exact, rtol=tol, atol=tol)
        # The oversized call went through gloo, and every other one through shared memory.
        assert got["big"] == [world * (world + 1) / 2] * 3
        assert got["fallbacks"] == 1 and got["calls"] == 300
    # Every rank holds the same bits (an all-reduce adds in rank order everywhere).
    for i in range(300):
        assert all(torch.equal(results[0]["ours"][i], r["ours"][i]) for r in results[1:])


@pytest.mark.parametrize("scenario", ["dead", "hung"])
def test_a_lost_or_hung_peer_raises_instead_of_hanging(tmp_path, scenario):
    driver, _ = _run(2, scenario, tmp_path, join_s=30)
    assert driver["raised"] is not None
    if scenario == "dead":
        assert "model-parallel rank 1" in driver["raised"] and "ended" in driver["raised"]
        assert driver["after_s"] < 2.0
    else:
        assert "past its timeout of 0.5s" in driver["raised"]
        assert 0.5 <= driver["after_s"] < 2.0
