"""PlanChannel and follow on a real 2-process gloo group (loopback, no Ray): plans arrive in order; stop ends the
loop; a real MP=2 engine and follower give Meta's tokens with and without overlap, the model's collectives
through gloo and through shared memory."""
from __future__ import annotations

import functools
import multiprocessing as mp
import pickle
import time
from datetime import timedelta
from pathlib import Path

import pytest

from llama.distributed import free_port
from llama.engine.step_plan import LOGITS_ALL, LOGITS_LAST, LOGITS_NONE, Segment, StepPlan, TableRun
from llama.model.shared_memory_group import shared_memory_supported

MAX_BATCH_SIZE, PREFILL_CHUNK = 4, 8
JOIN_S = 25  # both ranks together; a healthy run takes a few seconds (mostly imports)

PLANS = [
    StepPlan((Segment(0, 0, 5, LOGITS_NONE), Segment(1, 0, 3, LOGITS_ALL)), (1, 5, 9, 30, 44, 1, 7, 7)),
    StepPlan((Segment(1, 3, 1, LOGITS_LAST), Segment(0, 5, 2, LOGITS_LAST)), (8, 2, 3), freed=(2,),
             table=(TableRun(1, 0, (6, 2)), TableRun(3, 4, (9,)))),
    StepPlan((), (), freed=(0, 3)),  # an idle driver's heartbeat, handing back rows
    StepPlan((Segment(1, 4, 1, LOGITS_LAST),), (11,)),
    StepPlan((), (), stop=True),
]


class RecordingRunner:
    """Stands in for ModelRunner: follow only ever calls execute(plan)."""

    def __init__(self) -> None:
        self.plans: list[StepPlan] = []

    def execute(self, plan: StepPlan) -> None:
        self.plans.append(plan)


def _rank(rank: int, port: int, out_dir: str, shared_memory: bool = False) -> None:
    """One process of the gang: rank 0 publishes PLANS, rank 1 follows them; each writes what it saw."""
    import torch.distributed as dist

    from cluster.lockstep import PlanChannel, follow

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank,
                            timeout=timedelta(seconds=30))
    try:
        channel = PlanChannel(StepPlan.capacity(MAX_BATCH_SIZE, PREFILL_CHUNK, 16), timeout_s=30,
                              shared_memory=shared_memory)
        assert (channel.shared is not None) == shared_memory
        if rank == 0:
            for i, plan in enumerate(PLANS):
                if i == 2:
                    time.sleep(0.3)  # an idle driver: the follower's wait goes to sleep, then wakes
                channel.publish(plan)
            result = {"sent": channel.sent}
        else:
            runner = RecordingRunner()
            follow(runner, channel)  # returns only on the stop plan
            result = {"executed": runner.plans}
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def run_two_ranks(target, tmp_path: Path, join_s: float) -> tuple[dict, dict]:
    """target(rank, port, out_dir) in two spawned processes; what each wrote. Neither outlives this."""
    ctx = mp.get_context("spawn")
    port = free_port("127.0.0.1")
    procs = [ctx.Process(target=target, args=(r, port, str(tmp_path)), daemon=True) for r in range(2)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(join_s)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {join_s}s: a rank waits for a plan or collective that never comes?"
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return tuple(pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2))


@pytest.mark.parametrize("shared_memory", [False, True], ids=["gloo", "shared-memory"])
def test_a_follower_runs_every_plan_the_driver_publishes_and_leaves_on_stop(tmp_path, shared_memory):
    if shared_memory and not shared_memory_supported():
        pytest.skip("shared-memory collectives are x86-64 only")
    driver, follower = run_two_ranks(functools.partial(_rank, shared_memory=shared_memory), tmp_path, JOIN_S)
    assert driver == {"sent": len(PLANS)}
    assert follower["executed"] == PLANS[:-1]  # every step and the heartbeat, in order; the stop plan is not run


def _gang_rank(rank: int, port: int, out_dir: str, shared_memory: bool = False) -> None:
    """One rank of a real MP=2 gang on the golden checkpoint: rank 0 runs the Engine (sync, then
    overlapped), rank 1 follows its plans with a ModelRunner; the model's collectives through gloo
    or shared memory. Writes what each saw."""
    import json

    import torch.distributed as dist

    from cluster.lockstep import PlanChannel, follow
    from llama.checkpoints.load import inspect_checkpoint, load_into
    from llama.distributed import init_model_parallel
    from llama.model.collectives import shared_memory_group, use_shared_memory
    from llama.engine.config import EngineConfig
    from llama.engine.core import Engine
    from llama.engine.request import GenerationRequest, SamplingParams, collect
    from llama.engine.runner import ModelRunner
    from llama.model.transformer import Transformer
    from llama.tokenizers.load import load_tokenizer
    from tests.conftest import GOLDEN_CKPT, GOLDEN_DIR

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank,
                            timeout=timedelta(seconds=60))
    try:
        init_model_parallel(2)
        if shared_memory:
            assert use_shared_memory(4 << 20, timeout_s=60)
        ref = json.loads((GOLDEN_DIR / "reference.json").read_text())
        c = ref["completions"]
        info = inspect_checkpoint(GOLDEN_CKPT)
        model = Transformer(info.args, ref["max_seq_len"])
        load_into(model, info, rank, 2)
        config = dict(max_batch_size=4, max_seq_len=ref["max_seq_len"], prefill_chunk=PREFILL_CHUNK)
        channel = PlanChannel(StepPlan.capacity(4, PREFILL_CHUNK, 16), timeout_s=60, shared_memory=shared_memory)
        result = {}
        for overlap in (False, True):
            if rank == 0:
                engine = Engine(model, load_tokenizer(info.tokenizer_path),
                                EngineConfig(**config, async_scheduling=overlap), publish=channel.publish)
                requests = [GenerationRequest(tuple(p), SamplingParams(max_tokens=c["max_gen_len"], temperature=0))
                            for p in c["prompt_token_ids"]]
                requests.append(GenerationRequest(tuple(c["prompt_token_ids"][0]),
                                                  SamplingParams(max_tokens=20, temperature=0.8, seed=5)))
                deltas = [[] for _ in requests]
                for i, r in enumerate(requests):
                    engine.submit(str(i), r, deltas[i].append)
                while engine.step():
                    pass
                channel.publish(StepPlan((), (), stop=True))
                result[str(overlap)] = [collect(list(r.prompt_tokens), d).token_ids for r, d in zip(requests, deltas)]
                result["golden"] = c["generated_token_ids"]
            else:
                runner = ModelRunner(model, model.new_cache(4, ref["max_seq_len"]), share_sampled=True)
                took = []
                execute = runner.execute
                runner.execute = lambda plan: (took.append(plan.takes_sampled), execute(plan))[1]
                follow(runner, channel)
                result[str(overlap)] = sum(took)
        group = shared_memory_group()
        result["shared"] = None if group is None else (group.calls, group.fallbacks)
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shared_memory", [False, True], ids=["gloo", "shared-memory"])
def test_an_overlapped_driver_hands_its_sampled_tokens_to_the_follower_on_the_device(tmp_path, shared_memory):
    """MP=2 on the golden checkpoint: the overlapped driver's decodes name last step's tokens
    instead of carrying them, the follower takes them from the driver's broadcast, and both
    modes give Meta's tokens (and the same seeded draw), with the model's collectives through
    gloo and through shared memory (llama/model/shared_memory_group.py)."""
    if shared_memory and not shared_memory_supported():
        pytest.skip("shared-memory collectives are x86-64 only")
    driver, follower = run_two_ranks(functools.partial(_gang_rank, shared_memory=shared_memory), tmp_path, 120)
    n = len(driver["golden"])
    assert driver["False"][:n] == driver["True"][:n] == driver["golden"]
    assert driver["False"][n] == driver["True"][n] and len(driver["True"][n]) > 0  # the seeded draw
    assert follower["False"] == 0 and follower["True"] > 10  # plans that took the driver's tokens
    for rank in (driver, follower):
        if shared_memory:  # every collective of every step went through it, none past a slot
            calls, fallbacks = rank["shared"]
            assert calls > 100 and fallbacks == 0
        else:
            assert rank["shared"] is None
