"""ParallelConfig, EngineConfig, GangConfig.inspect and AppArgs (deploy/config.yaml): bad values refused by name."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cluster.config import GangConfig, ParallelConfig
from deploy.settings import AppArgs
from llama.checkpoint import CheckpointError
from llama.engine import EngineConfig

CONFIG_YAML = Path(__file__).resolve().parents[2] / "deploy" / "config.yaml"


def test_the_defaults_are_valid():
    ParallelConfig()
    EngineConfig()
    assert AppArgs.parse(None) == AppArgs()


@pytest.mark.parametrize("setting,value", [
    ("model_parallel_size", 0),
    ("model_parallel_size", 65),
    ("model_parallel_size", 1.5),
    ("device", "tpu"),
    ("dtype", "int8"),
    ("backend", "mpi"),
    ("placement_strategy", "SCATTER"),
    ("cpus_per_rank", 0),
    ("placement_timeout_s", -1.0),
    ("actors_timeout_s", 0),
    ("rendezvous_timeout_s", 0),
    ("collective_timeout_s", -1),
    ("load_timeout_s", 0),
    ("call_timeout_s", -5),
    ("call_timeout_s", float("nan")),
])
def test_parallel_config_refuses_a_bad_value_by_name(setting, value):
    with pytest.raises(ValueError, match=f"parallel settings: {setting} must be"):
        ParallelConfig(**{setting: value})


@pytest.mark.parametrize("setting,value", [("device", "cuda"), ("dtype", "bf16"), ("backend", "gloo"),
                                           ("placement_strategy", "STRICT_SPREAD"), ("model_parallel_size", 64)])
def test_parallel_config_accepts_the_documented_choices(setting, value):
    assert getattr(ParallelConfig(**{setting: value}), setting) == value


def test_every_bad_parallel_setting_is_named_at_once():
    with pytest.raises(ValueError) as e:
        ParallelConfig(model_parallel_size=0, device="tpu", call_timeout_s=0)
    assert all(k in str(e.value) for k in ("model_parallel_size", "device", "call_timeout_s"))


@pytest.mark.parametrize("setting,value", [
    ("max_batch_size", 0),
    ("max_batch_size", 2.0),
    ("max_seq_len", 1),
    ("prefill_chunk", 0),
    ("prefill_chunk", -8),
    ("request_timeout_s", 0),
    ("request_timeout_s", -1.0),
    ("heartbeat_s", 0),
    ("heartbeat_s", -0.5),
])
def test_engine_config_refuses_a_bad_value_by_name(setting, value):
    with pytest.raises(ValueError, match=f"engine settings: {setting} must be"):
        EngineConfig(**{setting: value})


def test_engine_config_takes_no_request_timeout_as_no_limit():
    assert EngineConfig(request_timeout_s=None).request_timeout_s is None
    assert EngineConfig(max_batch_size=1, max_seq_len=2, prefill_chunk=1).max_seq_len == 2  # the smallest allowed


def test_the_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().max_batch_size = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ParallelConfig().device = "cpu"  # type: ignore[misc]


# ---------------------------------------------------------------- GangConfig


def test_gang_config_inspects_the_checkpoint_for_its_model_parallel_size(tiny_ckpts):
    parallel = ParallelConfig(model_parallel_size=2, device="cpu")
    gang = GangConfig.inspect(tiny_ckpts["gqa1"], None, parallel, EngineConfig(max_batch_size=2))
    assert gang.parallel is parallel and gang.engine == EngineConfig(max_batch_size=2)
    assert gang.checkpoint.args.n_heads == 4
    assert gang.checkpoint.tokenizer_path == tiny_ckpts["gqa1"] / "tokenizer.model"


@pytest.mark.parametrize("mp", [3, 4])  # 4 heads, 2 KV heads
def test_gang_config_refuses_a_model_parallel_size_the_heads_do_not_allow(tiny_ckpts, mp):
    with pytest.raises(CheckpointError, match=f"cannot be split into {mp} model-parallel ranks") as e:
        GangConfig.inspect(tiny_ckpts["gqa1"], None, ParallelConfig(model_parallel_size=mp))
    assert isinstance(e.value, ValueError)
    assert "e.g. one of [1, 2]" in str(e.value)  # the fix: sizes that do divide the model


# ---------------------------------------------------------------- AppArgs and deploy/config.yaml


@pytest.fixture(scope="module")
def shipped_args() -> dict:
    doc = yaml.safe_load(CONFIG_YAML.read_text())
    (app,) = doc["applications"]
    return app["args"]


def test_the_shipped_config_parses_into_the_nested_settings_objects(shipped_args):
    args = AppArgs.parse(shipped_args)
    assert isinstance(args.engine, EngineConfig) and isinstance(args.parallel, ParallelConfig)
    for key, value in shipped_args.items():
        if key not in ("engine", "parallel"):
            assert getattr(args, key) == value, key
    assert shipped_args["engine"] and shipped_args["parallel"]
    assert args.engine == EngineConfig(**shipped_args["engine"])
    assert args.parallel == ParallelConfig(**shipped_args["parallel"])
    for key, value in shipped_args["engine"].items():
        assert getattr(args.engine, key) == value, key
    for key, value in shipped_args["parallel"].items():
        assert getattr(args.parallel, key) == value, key


@pytest.mark.parametrize("where", [None, "engine", "parallel"])
def test_an_unknown_key_is_refused_at_the_top_and_in_each_section(shipped_args, where):
    raw = {**shipped_args, "engine": dict(shipped_args["engine"]), "parallel": dict(shipped_args["parallel"])}
    (raw if where is None else raw[where])["max_slots"] = 4  # a typo, or a setting's old name
    with pytest.raises(ValueError, match="max_slots") as e:
        AppArgs.parse(raw)
    assert "deploy/config.yaml args are invalid" in str(e.value)


@pytest.mark.parametrize("raw,named", [
    ({"engine": {"max_batch_size": 0}}, "max_batch_size"),
    ({"engine": {"request_timeout_s": -1}}, "request_timeout_s"),
    ({"parallel": {"model_parallel_size": 0}}, "model_parallel_size"),
    ({"parallel": {"device": "tpu"}}, "device"),
    ({"parallel": {"placement_strategy": "pack"}}, "placement_strategy"),
    ({"parallel": {"load_timeout_s": -1}}, "load_timeout_s"),
    ({"replica_cpus": 0}, "replica_cpus"),
    ({"tokenizer_path": "/x/tokenizer.model"}, "tokenizer_path"),
])
def test_app_args_refuse_a_bad_value_by_name(raw, named):
    with pytest.raises(ValueError, match=named):
        AppArgs.parse(raw)


def test_app_args_are_frozen(shipped_args):
    args = AppArgs.parse(shipped_args)
    with pytest.raises(ValidationError, match="frozen"):
        args.model = "other"  # type: ignore[misc]


def test_a_boolean_is_not_a_count():
    from cluster.config import ParallelConfig
    from llama.engine import EngineConfig

    with pytest.raises(ValueError, match="max_batch_size"):
        EngineConfig(max_batch_size=True)
    with pytest.raises(ValueError, match="model_parallel_size"):
        ParallelConfig(model_parallel_size=True)
