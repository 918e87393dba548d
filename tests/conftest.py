"""Shared fixtures: paths to the golden data and tiny checkpoints made on the fly by llama.checkpoints.make_tiny."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
GOLDEN_DIR = DATA / "golden"
GOLDEN_CKPT = GOLDEN_DIR / "ckpt"


def gang_config(ckpt: Path | str, mp: int, **settings):
    """A GangConfig for `ckpt` at model parallel size `mp`: each keyword goes to the settings
    object that owns it (EngineConfig or ParallelConfig)."""
    import dataclasses

    from cluster.config import GangConfig, ParallelConfig
    from llama.engine.config import EngineConfig

    engine_keys = {f.name for f in dataclasses.fields(EngineConfig)}
    engine = EngineConfig(**{"max_seq_len": 96, **{k: v for k, v in settings.items() if k in engine_keys}})
    parallel = ParallelConfig(model_parallel_size=mp, **{k: v for k, v in settings.items() if k not in engine_keys})
    return GangConfig.inspect(ckpt, None, parallel, engine)


def engine_idle(load: dict) -> bool:
    """An engine's load() (GET /cluster's engine section) with nothing running or waiting, every
    table row free, and every KV block free or cached, the pool's counts adding up: no leak."""
    return (load["free_slots"] == load["slots"] and load["running"] == load["waiting"] == 0
            and load["kv_blocks_used"] == 0 and load["kv_blocks_cached"] + load["kv_blocks_free"] == load["kv_blocks"])


def streamed_tool_calls(chunks) -> tuple[str, list[dict], str | None]:
    """An openai chat stream's content, its tool calls put together by index as clients do
    ({"name", "arguments"} each), and its finish reason."""
    content, calls, finish = "", {}, None
    for c in chunks:
        for ch in c.choices:
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                calls.setdefault(d.index, {"name": "", "arguments": ""})
                calls[d.index]["name"] += d.function.name or ""
                calls[d.index]["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def rank_slice(whole: dict, key: str, rank: int, world_size: int):
    """What rank `rank` of `world_size` holds of the whole model's tensor `key` (llama/checkpoints/layout.py)."""
    from llama.checkpoints.layout import rank_dim, shard_range

    d = rank_dim(key)
    if d is None:
        return whole[key]
    start, end = shard_range(whole[key].shape[d], rank, world_size)
    return whole[key].narrow(d, start, end - start)


@pytest.fixture(scope="session")
def golden() -> dict:
    """What Meta's reference code returned for the golden checkpoint (see tests/data/golden/README.md)."""
    return json.loads((GOLDEN_DIR / "reference.json").read_text())


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict[str, Path]:
    """The same seeded tiny GQA model cut for 1 and 2 ranks, plus a 4-head/4-KV-head model cut
    for 1 rank (so it can be resharded to 4)."""
    from llama.checkpoints.make_tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {
        "gqa1": make_tiny(root / "gqa1", shards=1, seed=3, ffn_dim_multiplier=1.3),
        "gqa2": make_tiny(root / "gqa2", shards=2, seed=3, ffn_dim_multiplier=1.3),
        "mha1": make_tiny(root / "mha1", shards=1, n_kv_heads=None, seed=5),
        "mha4": make_tiny(root / "mha4", shards=4, n_kv_heads=None, seed=5),
    }


@pytest.fixture(scope="session")
def meta_files(tmp_path_factory) -> dict[tuple[int, int], Path]:
    """(version, files) -> one seeded tiny model per Llama version, in Meta's layout, written as
    1, 2 and 4 files the way Meta's reference of that version cuts them (Llama 3: the real
    tokenizer and scaled rope). 8 heads and 4 KV heads, so each loads at model-parallel size 1,
    2 and 4 from every cut."""
    from llama.checkpoints.make_tiny import make_tiny
    from tests.meta_reference import make_tiny_llama3

    root = tmp_path_factory.mktemp("meta_files")
    out: dict[tuple[int, int], Path] = {}
    for n in (1, 2, 4):
        out[3, n] = make_tiny_llama3(root / f"llama3-{n}", shards=n, seed=11, n_heads=8, n_kv_heads=4)
        out[2, n] = make_tiny(root / f"llama2-{n}", shards=n, seed=13, n_heads=8, n_kv_heads=4, ffn_dim_multiplier=1.3,
                              qk_std=1.0)
    return out


@pytest.fixture(scope="session")
def meta_references(meta_files) -> dict[int, tuple[list[list[int]], list[tuple[list[int], list[float]]]]]:
    """version -> (prompt ids, Meta's reference's greedy tokens and logprobs) for meta_files
    (tests/meta_reference.py), computed in this process on a one-process group."""
    import torch.distributed as dist

    from llama.distributed import init_model_parallel, init_single_process_group
    from tests.meta_reference import meta_files_reference

    if not dist.is_initialized():
        init_single_process_group("gloo")
    init_model_parallel(1)
    return {v: meta_files_reference(meta_files, v) for v in (2, 3)}
