"""DecodeStep (llama/engine/decode_step.py), eager on the CPU: the static-shaped decode gives the logits
the packed forward gives for the same tokens (GQA and MHA, across shape buckets, each row's
blocks scattered over the pool), writes only the positions it decodes (rows without a token
into the null block), and the runner puts its rows back in segment order beside a prefill
chunk's. The engine's token-exact tests (golden, MP=1 and MP=2
under torchrun and Ray) all run through it as well."""
from __future__ import annotations

import pytest
import torch

from llama.checkpoints.load import inspect_checkpoint, load_into
from llama.engine.decode_step import DecodeStep, bucket_of, buckets
from llama.engine.runner import ModelRunner, pack
from llama.engine.step_plan import LOGITS_ALL, LOGITS_LAST, LOGITS_NONE, Segment, StepPlan, TableRun
from llama.model.transformer import Transformer

MAX_SEQ_LEN = 160  # 10 blocks of 16: buckets of 4, 8 and 10 blocks


def test_buckets_double_up_to_the_limit() -> None:
    assert buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6] and buckets(1) == [1]
    assert buckets(160, 64) == [64, 128, 160] and buckets(32, 32) == [32] and buckets(10, 4) == [4, 8, 10]
    assert [bucket_of(n, [1, 2, 4, 6]) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]


@pytest.fixture(params=["gqa1", "mha1"])
def model(request, tiny_ckpts, mp1) -> Transformer:
    info = inspect_checkpoint(tiny_ckpts[request.param])
    m = Transformer(info.args, MAX_SEQ_LEN)
    load_into(m, info, 0, 1)
    return m


def prefilled(model: Transformer, lengths: dict[int, int]) -> ModelRunner:
    """A runner (4 rows) whose rows hold prompts of the given lengths, each row's table a
    random choice of the pool's blocks, for every position up to MAX_SEQ_LEN."""
    runner = ModelRunner(model, model.new_cache(4, MAX_SEQ_LEN))
    g = torch.Generator().manual_seed(0)
    blocks = (torch.randperm(runner.cache.num_blocks, generator=g) + 1).tolist()
    w = runner.cache.max_blocks_per_row
    for row in range(4):
        runner.execute(StepPlan((), (), table=(TableRun(row, 0, tuple(blocks[row * w : (row + 1) * w])),)))
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
                                 tuple(tokens)), runner.cache, model.device), runner.cache)
    # Each layer writes its keys and values at these positions before it reads them: the decode
    # overwrites what the packed forward wrote there with its own.
    static = DecodeStep(model, runner.cache, runner.sampled).run(slots, positions, tokens)
    assert static.shape == packed.shape and static.dtype == torch.float32
    assert torch.allclose(static, packed, atol=1e-5, rtol=0)
    assert torch.equal(static.argmax(-1), packed.argmax(-1))


def test_rows_that_do_not_decode_are_left_as_they_were(model) -> None:
    runner = prefilled(model, {0: 6, 1: 6, 2: 6})
    cache = runner.cache
    first = [int(cache.host_table[r, 0]) for r in range(4)]  # each row's block of positions 0..15
    before = [(k.clone(), v.clone()) for k, v in zip(cache.k, cache.v)]
    DecodeStep(model, cache, runner.sampled).run([0, 2], [6, 6], [5, 9])  # bucket B=4: rows 1 and 3 write the null block
    for (k0, v0), k, v in zip(before, cache.k, cache.v):
        changed = {b for b in range(cache.num_blocks + 1) if not torch.equal(k[b], k0[b])}
        assert changed <= {0, first[0], first[2]} and {first[0], first[2]} <= changed
        for row in (0, 2):  # written at position 6 only
            b = first[row]
            assert torch.equal(k[b, :6], k0[b, :6]) and not torch.equal(k[b, 6], k0[b, 6])
            assert torch.equal(k[b, 7:], k0[b, 7:]) and torch.equal(v[b, :6], v0[b, :6])


def test_the_runner_returns_decode_and_prefill_rows_in_segment_order(model) -> None:
    runner = prefilled(model, {0: 4, 2: 8})
    plan = StepPlan((Segment(2, 8, 1, LOGITS_LAST), Segment(1, 0, 3, LOGITS_ALL), Segment(0, 4, 1, LOGITS_LAST),
                     Segment(3, 0, 2, LOGITS_NONE)), (21, 1, 5, 9, 22, 1, 7))
    snapshot = ([k.clone() for k in runner.cache.k], [v.clone() for v in runner.cache.v])
    got = runner.execute(plan)
    for layer in range(len(snapshot[0])):
        runner.cache.k[layer].copy_(snapshot[0][layer])
        runner.cache.v[layer].copy_(snapshot[1][layer])
    want = model(pack(plan, runner.cache, model.device), runner.cache)  # all of it packed, the reference's way
    assert got.shape == (5, model.args.vocab_size)  # 1 + 3 + 1 + 0 rows
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
