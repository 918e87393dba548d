"""DecodeStep (llama/engine/decode_step.py), eager on the CPU: the static-shaped decode gives the logits
the packed forward gives for the same tokens (GQA and MHA, across shape buckets), writes only
the slots it decodes (the rest into the scratch row), and the runner puts its rows back in
segment order beside a prefill chunk's. The engine's token-exact tests (golden, MP=1 and MP=2
under torchrun and Ray) all run through it as well."""
from __future__ import annotations

import pytest
import torch

from llama.checkpoints.load import inspect_checkpoint, load_into
from llama.engine.decode_step import DecodeStep, bucket_of, buckets
from llama.engine.runner import ModelRunner, pack
from llama.engine.step_plan import LOGITS_ALL, LOGITS_LAST, LOGITS_NONE, Segment, StepPlan
from llama.model.transformer import Transformer

MAX_SEQ_LEN = 160  # S buckets 64, 128, 160


def test_buckets_double_up_to_the_limit() -> None:
    assert buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6] and buckets(1) == [1]
    assert buckets(160, 64) == [64, 128, 160] and buckets(32, 32) == [32]
    assert [bucket_of(n, [1, 2, 4, 6]) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]


@pytest.fixture(params=["gqa1", "mha1"])
def model(request, tiny_ckpts, mp1) -> Transformer:
    info = inspect_checkpoint(tiny_ckpts[request.param])
    m = Transformer(info.args, MAX_SEQ_LEN)
    load_into(m, info, 0, 1)
    return m


def prefilled(model: Transformer, lengths: dict[int, int]) -> ModelRunner:
    """A runner (4 slots) whose slots hold prompts of the given lengths."""
    runner = ModelRunner(model, model.new_cache(4, MAX_SEQ_LEN))
    g = torch.Generator().manual_seed(0)
    for slot, n in lengths.items():
        tokens = torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist()
        runner.execute(StepPlan((Segment(slot, 0, n, LOGITS_NONE),), tuple(tokens)))
    return runner


@pytest.mark.parametrize("lengths", [{0: 5}, {0: 7, 1: 63, 2: 64, 3: 130}, {1: 9, 3: 100}])
def test_the_static_decode_gives_the_packed_forwards_logits(model, lengths) -> None:
    runner = prefilled(model, lengths)
    slots = sorted(lengths, reverse=True)  # any order
    positions = [lengths[s] for s in slots]
    tokens = [11 + s for s in slots]
    packed = model(pack(StepPlan(tuple(Segment(s, p, 1, LOGITS_LAST) for s, p in zip(slots, positions)),
                                 tuple(tokens)), model.device), runner.cache)
    # Each layer writes its keys and values at these positions before it reads them: the decode
    # overwrites what the packed forward wrote there with its own.
    static = DecodeStep(model, runner.cache, runner.sampled).run(slots, positions, tokens)
    assert static.shape == packed.shape and static.dtype == torch.float32
    assert torch.allclose(static, packed, atol=1e-5, rtol=0)
    assert torch.equal(static.argmax(-1), packed.argmax(-1))


def test_slots_that_do_not_decode_are_left_as_they_were(model) -> None:
    runner = prefilled(model, {0: 6, 1: 6, 2: 6})
    before = [(k[:3].clone(), v[:3].clone()) for k, v in zip(runner.cache.k, runner.cache.v)]
    DecodeStep(model, runner.cache, runner.sampled).run([0, 2], [6, 6], [5, 9])  # bucket B=4: slots 1 and 3 run on scratch inputs
    for (k0, v0), k, v in zip(before, runner.cache.k, runner.cache.v):
        assert torch.equal(k[1], k0[1]) and torch.equal(v[1], v0[1])  # untouched
        assert torch.equal(k[0, :6], k0[0, :6]) and not torch.equal(k[0, 6], k0[0, 6])  # written at 6 only
        assert torch.equal(k[2, :6], k0[2, :6]) and not torch.equal(k[2, 6], k0[2, 6])


def test_the_runner_returns_decode_and_prefill_rows_in_segment_order(model) -> None:
    runner = prefilled(model, {0: 4, 2: 8})
    plan = StepPlan((Segment(2, 8, 1, LOGITS_LAST), Segment(1, 0, 3, LOGITS_ALL), Segment(0, 4, 1, LOGITS_LAST),
                     Segment(3, 0, 2, LOGITS_NONE)), (21, 1, 5, 9, 22, 1, 7))
    snapshot = ([k.clone() for k in runner.cache.k], [v.clone() for v in runner.cache.v])
    got = runner.execute(plan)
    for layer in range(len(snapshot[0])):
        runner.cache.k[layer].copy_(snapshot[0][layer])
        runner.cache.v[layer].copy_(snapshot[1][layer])
    want = model(pack(plan, model.device), runner.cache)  # all of it packed, the reference's way
    assert got.shape == (5, model.args.vocab_size)  # 1 + 3 + 1 + 0 rows
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
