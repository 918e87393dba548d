"""cluster/rank.py's watchdog, in process (no Ray runtime): a rank whose step has run past
call_timeout_s fails its ping, so the gang's health check fails and Serve replaces it."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from cluster.rank import RankActor
from tests.conftest import GOLDEN_CKPT, gang_config


@pytest.mark.parametrize("rank", [0, 1])  # the driver (its engine's runner) and a follower (its runner)
def test_a_step_past_call_timeout_fails_the_ping_and_a_short_one_does_not(rank: int):
    actor = RankActor(gang_config(GOLDEN_CKPT, 2, call_timeout_s=5.0), rank)
    runner = SimpleNamespace(busy_since=None)
    if rank == 0:
        actor.engine = SimpleNamespace(runner=runner)
    else:
        actor.runner = runner
    assert asyncio.run(actor.ping()) == rank  # idle
    runner.busy_since = time.monotonic() - 1.0
    assert asyncio.run(actor.ping()) == rank  # a step under way, within the limit
    runner.busy_since = time.monotonic() - 6.0
    with pytest.raises(RuntimeError, match="past call_timeout_s 5s: a collective or the device is hung"):
        asyncio.run(actor.ping())


def test_the_runner_marks_its_step_busy_while_it_runs(tiny_ckpts, mp1):
    import torch

    from llama.checkpoints.load import inspect_checkpoint, load_into
    from llama.engine.runner import ModelRunner
    from llama.engine.step_plan import StepPlan
    from llama.model.transformer import Transformer

    info = inspect_checkpoint(tiny_ckpts["gqa1"])
    model = Transformer(info.args, 32, dtype=torch.float32)
    load_into(model, info, 0, 1)
    runner = ModelRunner(model, model.new_cache(1, 32))
    seen = []
    original = model.forward
    model.forward = lambda *a: (seen.append(runner.busy_since), original(*a))[1]
    runner.execute(StepPlan.prefill([[1, 5, 9]], runner.cache.block_size))
    assert seen and seen[0] is not None and runner.busy_since is None


def test_the_engine_marks_its_read_back_busy(tiny_ckpts, mp1):
    """On a GPU the forward only queues work; a hung device or collective is waited for in the
    read-back, so the watchdog must see that wait too."""
    import torch

    from llama.checkpoints.load import inspect_checkpoint, load_into
    from llama.engine.config import EngineConfig
    from llama.engine.core import Engine
    from llama.engine.request import GenerationRequest, SamplingParams
    from llama.model.transformer import Transformer
    from llama.tokenizers.load import load_tokenizer

    info = inspect_checkpoint(tiny_ckpts["gqa1"])
    model = Transformer(info.args, 32, dtype=torch.float32)
    load_into(model, info, 0, 1)
    engine = Engine(model, load_tokenizer(info.tokenizer_path), EngineConfig(max_batch_size=1, max_seq_len=32))
    seen = []
    launch = engine._launch

    def watched(*a):
        step = launch(*a)
        tolist = step.readback.tolist
        step.readback.tolist = lambda: (seen.append(engine.runner.busy_since), tolist())[1]
        return step

    engine._launch = watched
    engine.submit("r", GenerationRequest((1, 5, 9), SamplingParams(max_tokens=2, temperature=0)), lambda d: None)
    while engine.step():
        pass
    assert len(seen) == 2 and all(t is not None for t in seen) and engine.runner.busy_since is None
