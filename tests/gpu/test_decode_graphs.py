"""On a CUDA device: the decode captured as CUDA graphs (llama/engine/decode_step.py) gives the eager
decode's logits, step after step, in fp32 and bf16, through buckets of several batch sizes and
kv lengths; the engine, which captures them, still gives Meta's tokens (test_cuda.py); and an
overlapped engine waits for the GPU only where it reads a step back."""
from __future__ import annotations

import pytest
import torch

from llama.checkpoints.load import inspect_checkpoint, load_into
from llama.engine.runner import ModelRunner, fixed_tables
from llama.engine.step_plan import LOGITS_LAST, LOGITS_NONE, Segment, StepPlan
from llama.model.transformer import Transformer
from tests.conftest import GOLDEN_CKPT


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_captured_decode_gives_the_eager_decodes_logits(mp1_cuda, dtype, atol):
    info = inspect_checkpoint(GOLDEN_CKPT)
    model = Transformer(info.args, 160, device="cuda", dtype=dtype)
    load_into(model, info, 0, 1)
    runners = [ModelRunner(model, model.new_cache(6, 160), graphs=g) for g in (False, True)]
    g = torch.Generator().manual_seed(0)
    lengths = {0: 5, 2: 60, 3: 17, 5: 40}  # rows 1 and 4 stay empty: they write the null block in the bucket
    tokens = {s: torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist() for s, n in lengths.items()}
    for r in runners:
        r.execute(StepPlan((), (), table=fixed_tables(r.cache)))  # each row its own blocks
        for s, t in tokens.items():
            r.execute(StepPlan((Segment(s, 0, len(t), LOGITS_NONE),), tuple(t)))
    last = {s: t[-1] for s, t in tokens.items()}
    at = dict(lengths)  # each slot's next position
    for step in range(40):
        if step == 25:  # two sequences end: the B bucket falls from 6 to 4
            del last[3], last[5], at[3], at[5]
        slots = sorted(last)  # row 2 crosses the 4-block (64-position) kv bucket at step 4
        plan = StepPlan(tuple(Segment(s, at[s], 1, LOGITS_LAST) for s in slots), tuple(last[s] for s in slots))
        eager, graph = (r.execute(plan) for r in runners)
        assert torch.allclose(graph, eager, atol=atol, rtol=0), (step, (graph - eager).abs().max().item())
        for s, t in zip(slots, eager.argmax(-1).tolist()):
            last[s], at[s] = t, at[s] + 1
    assert runners[1].decode.capture_s > 0 and len(runners[1].decode._captured) >= 2


def test_an_overlapped_engine_queues_its_steps_without_waiting_for_the_gpu(mp1_cuda, golden):
    """Only reading a step back may wait for the GPU: planning, the prefill, the captured decode,
    the sampling and the read-back's start must not (CUDA's sync debug mode raises on any that does)."""
    from llama.engine.config import EngineConfig
    from llama.engine.core import Engine
    from llama.engine.request import GenerationRequest, SamplingParams, collect
    from llama.tokenizers.load import load_tokenizer

    info = inspect_checkpoint(GOLDEN_CKPT)
    model = Transformer(info.args, 96, device="cuda", dtype=torch.float32)
    load_into(model, info, 0, 1)
    engine = Engine(model, load_tokenizer(info.tokenizer_path),
                    EngineConfig(max_batch_size=4, max_seq_len=96, prefill_chunk=16, async_scheduling=True,
                                 kv_cache_memory_gb=1))
    assert engine.capture_s > 0 and len(engine.runner.decode._captured) == 3 * 2  # B 1, 2, 4 x 4, 6 blocks (64, 96)
    c = golden["completions"]
    reqs = [GenerationRequest(tuple(p), SamplingParams(max_tokens=c["max_gen_len"], temperature=0, logprobs=2))
            for p in c["prompt_token_ids"][:4]]
    sinks = [[] for _ in reqs]
    for i, r in enumerate(reqs):
        engine.submit(str(i), r, sinks[i].append)
    complete, waits = engine._complete, []

    def read_back(step):  # the one place allowed to wait
        torch.cuda.set_sync_debug_mode(0)
        try:
            waits.append(1)
            complete(step)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    engine._complete = read_back
    torch.cuda.set_sync_debug_mode("error")
    try:
        while engine.step():
            pass
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [collect(list(r.prompt_tokens), s).token_ids for r, s in zip(reqs, sinks)] == c["generated_token_ids"][:4]
    assert len(waits) == engine.stats.steps
