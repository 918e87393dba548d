"""ParallelConfig, EngineConfig, GangConfig.inspect and AppArgs (deploy/config.yaml): bad values refused by name,
API keys never quoted."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr, ValidationError

from cluster.config import GangConfig, ParallelConfig
from deploy.auth import ApiKeySource
from deploy.settings import AppArgs
from llama.checkpoints.errors import CheckpointError
from llama.engine.config import EngineConfig

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
    ("threads_per_rank", 0),
    ("threads_per_rank", 1.5),
    ("threads_per_rank", True),
    ("shared_memory", "yes"),
    ("autoscaling", 1),
    ("pipeline_parallel_size", 0),
    ("pipeline_parallel_size", True),
    ("pipeline_layers", [2, 2]),  # one count per stage: the default is 1 stage
    ("pipeline_layers", "2,2"),
])
def test_parallel_config_refuses_a_bad_value_by_name(setting, value):
    with pytest.raises(ValueError, match=f"parallel settings: {setting} must be"):
        ParallelConfig(**{setting: value})


@pytest.mark.parametrize("setting,value", [("device", "cuda"), ("dtype", "bf16"), ("backend", "gloo"),
                                           ("placement_strategy", "STRICT_SPREAD"), ("model_parallel_size", 64),
                                           ("shared_memory", False), ("pipeline_parallel_size", 4)])
def test_parallel_config_accepts_the_documented_choices(setting, value):
    assert getattr(ParallelConfig(**{setting: value}), setting) == value


def test_a_ranks_threads_share_its_machines_cores_unless_set():
    assert ParallelConfig().threads(ranks_here=1, cores=2) == 2
    assert ParallelConfig().threads(ranks_here=2, cores=2) == 1
    assert ParallelConfig().threads(ranks_here=4, cores=2) == 1  # never 0
    assert ParallelConfig().threads(ranks_here=2, cores=16) == 8
    assert ParallelConfig(threads_per_rank=3).threads(ranks_here=2, cores=2) == 3


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
    ("async_scheduling", "yes"),
    ("async_scheduling", 1),
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
    # max_seq_len settled once, here: the model's context (Llama 2's 4096), which the CPU's pool holds
    assert gang.parallel is parallel and gang.engine == EngineConfig(max_batch_size=2, max_seq_len=4096)
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
    from llama.engine.config import EngineConfig

    with pytest.raises(ValueError, match="max_batch_size"):
        EngineConfig(max_batch_size=True)
    with pytest.raises(ValueError, match="model_parallel_size"):
        ParallelConfig(model_parallel_size=True)


# ---------------------------------------------------------------- AppArgs: API keys (deploy/auth.py)

SECRET = "sk-secret-0123456789"  # no error message or repr may show it, whole or in part


def test_api_keys_come_from_the_args_and_name_a_variable_for_the_replica():
    args = AppArgs.parse({"api_keys": [SECRET, "second-key"], "api_keys_env": "LLAMA_API_KEYS"})
    assert [k.get_secret_value() for k in args.api_keys] == [SECRET, "second-key"]
    assert args.api_key_source() == ApiKeySource((SecretStr(SECRET), SecretStr("second-key")), "LLAMA_API_KEYS")
    assert AppArgs().api_key_source() == ApiKeySource()  # the default: no keys, no authentication


def test_the_shipped_config_serves_without_keys_and_its_commented_key_lines_parse(shipped_args):
    assert "api_keys" not in shipped_args and "api_keys_env" not in shipped_args
    lines = re.findall(r"^ *# (api_keys(?:_env)?: [^#\n]*)", CONFIG_YAML.read_text(), flags=re.M)
    assert len(lines) == 2, lines
    args = AppArgs.parse({**shipped_args, **yaml.safe_load("\n".join(lines))})
    assert ([k.get_secret_value() for k in args.api_keys], args.api_keys_env) == (["KEY1", "KEY2"], "LLAMA_API_KEYS")


def test_no_key_shows_in_the_args_repr():
    args = AppArgs.parse({"api_keys": [SECRET]})
    for text in (repr(args), str(args), args.model_dump_json(), repr(args.api_key_source())):
        assert SECRET not in text, text


@pytest.mark.parametrize("raw,named", [
    ({"api_keys": [f"{SECRET} x"]}, "api_keys[0] has whitespace"),
    ({"api_keys": ["ok", f"{SECRET}\n"]}, "api_keys[1] has whitespace"),
    ({"api_keys": [f"{SECRET}é"]}, "outside printable ASCII"),
    ({"api_keys": [""]}, "api_keys[0] is empty"),
    ({"api_keys": SECRET}, "api_keys"),  # a string, not a list
    ({"api_keys": [12345678901]}, "api_keys.0"),
    ({"api_keys": [{"key": SECRET}]}, "api_keys.0"),
    ({"api_keys_env": SECRET}, "api_keys_env must be the name of an environment variable"),  # a key in its place
    ({"api_keys_env": "LLAMA API KEYS"}, "api_keys_env"),
    ({"api_key": [SECRET]}, "api_key"),  # a typo: refused as unknown, value unquoted
    ({"api_keys": [SECRET], "model": 5}, "model"),  # another field's error quotes no key either
])
def test_a_bad_key_setting_is_refused_by_name_without_its_value(raw, named):
    with pytest.raises(ValueError) as e:
        AppArgs.parse(raw)
    message = str(e.value)
    assert named in message, message
    assert SECRET not in message and "12345678901" not in message and SECRET[:8] not in message, message
