"""A rank's load progress: bytes of its slices known before reading (rank_nbytes), counted as
copy_into lands each slice, with rate and time left."""
from __future__ import annotations

import pytest
import torch

from llama.checkpoints.load import copy_into, inspect_checkpoint, load_rank_state, rank_nbytes
from llama.checkpoints.load_progress import LoadProgress
from llama.model.transformer import Transformer


@pytest.mark.parametrize("ckpt,world_size", [("mha1", 1), ("mha4", 2), ("gqa1", 2), ("mha4", 4)])
def test_the_total_is_known_before_reading_and_equals_the_bytes_read(tiny_ckpts, ckpt, world_size):
    info = inspect_checkpoint(tiny_ckpts[ckpt], model_parallel_size=world_size)
    for rank in range(world_size):
        read = sum(t.numel() * t.element_size() for t in load_rank_state(info, rank, world_size).values())
        assert rank_nbytes(info, rank, world_size) == read


def test_copy_into_counts_each_slice_as_it_lands(tiny_ckpts, mp1):
    info = inspect_checkpoint(tiny_ckpts["mha1"])
    model = Transformer(info.args, 32, device=torch.device("cpu"), dtype=torch.float32)
    progress = LoadProgress(rank_nbytes(info, 0, 1))
    seen = []

    def slices():
        for item in load_rank_state(info, 0, 1).items():
            seen.append(progress.done_bytes)
            yield item

    copy_into(model, slices(), progress)
    progress.finish()
    assert seen[0] == 0 and seen == sorted(seen) and len(set(seen)) == len(seen)  # grows with every slice
    d = progress.as_dict()
    assert d["done_bytes"] == d["total_bytes"] and d["percent"] == 100.0 and d["finished"] and d["seconds_left"] == 0


def test_rate_and_time_left_midway(monkeypatch):
    import llama.checkpoints.load_progress as lp

    p = LoadProgress(total_bytes=1_000_000_000, started=0.0)
    p.add(250_000_000)
    monkeypatch.setattr(lp.time, "monotonic", lambda: 5.0)
    d = p.as_dict()
    assert (d["percent"], d["mb_per_s"], d["seconds_left"], d["finished"]) == (25.0, 50.0, 15.0, False)
    assert p.describe() == "250.0 of 1000.0 MB (25.0%), 50.0 MB/s, 15.0 s left"


def test_nothing_read_yet_has_no_estimate(monkeypatch):
    import llama.checkpoints.load_progress as lp

    p = LoadProgress(total_bytes=10, started=0.0)
    monkeypatch.setattr(lp.time, "monotonic", lambda: 1.0)
    assert p.as_dict()["seconds_left"] is None and p.describe().endswith("? s left")
