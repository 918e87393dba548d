"""pack() (packed tokens, attention groups, masks, logit rows) and ModelRunner.execute (frees, copies, plan checks)."""
from __future__ import annotations

import pytest
import torch

from llama.checkpoints.load import inspect_checkpoint, load_into
from llama.engine.runner import ModelRunner, pack
from llama.engine.step_plan import LOGITS_ALL, LOGITS_LAST, LOGITS_NONE, Segment, SlotCopy, StepPlan
from llama.model.transformer import Transformer

CPU = torch.device("cpu")
INF = float("-inf")


# ---------------------------------------------------------------- pack


def _mixed() -> StepPlan:
    """Two decodes (slots 3 and 1), a prefill chunk continuing slot 0 at position 4, and a new
    prompt in slot 2."""
    return StepPlan(
        (Segment(3, 7, 1, LOGITS_LAST), Segment(0, 4, 3, LOGITS_NONE), Segment(1, 5, 1, LOGITS_LAST),
         Segment(2, 0, 2, LOGITS_ALL)),
        (11, 12, 13, 14, 15, 16, 17),
    )


def test_pack_lays_the_segments_end_to_end():
    b = pack(_mixed(), CPU)
    assert b.tokens.tolist() == [11, 12, 13, 14, 15, 16, 17]
    assert b.positions.tolist() == [7, 4, 5, 6, 5, 0, 1]
    assert b.token_slots.tolist() == [3, 0, 0, 0, 1, 2, 2]
    assert b.tokens.dtype == b.positions.dtype == b.token_slots.dtype == torch.long


def test_decodes_and_prefill_chunks_attend_in_separate_groups_sorted_by_slot():
    decodes, prefills = pack(_mixed(), CPU).groups
    assert decodes.slots.tolist() == [1, 3]  # sorted by slot
    assert decodes.query_index.tolist() == [[4], [0]]  # packed index of slot 1's token, then slot 3's
    assert decodes.valid.tolist() == [[True], [True]]
    assert decodes.kv_len == 8  # slot 3 reads positions 0..7
    assert prefills.slots.tolist() == [0, 2]
    # rows padded to the longest chunk (3); padding repeats index 0 and is marked invalid
    assert prefills.query_index.tolist() == [[1, 2, 3], [5, 6, 0]]
    assert prefills.valid.tolist() == [[True, True, True], [True, True, False]]
    assert prefills.valid_rows.tolist() == [0, 1, 2, 3, 4]  # flat (g, l) of the valid rows: not 5, the padding
    assert prefills.valid_targets.tolist() == [1, 2, 3, 5, 6]  # where each one's output goes
    assert prefills.kv_len == 7  # slot 0's chunk ends at position 6


def test_a_plan_of_one_kind_has_one_group():
    assert len(pack(StepPlan((Segment(0, 3, 1, LOGITS_LAST),), (5,)), CPU).groups) == 1
    assert len(pack(StepPlan.prefill([[1, 2], [3, 4, 5]]), CPU).groups) == 1


def test_the_mask_lets_each_query_see_exactly_the_keys_at_or_before_its_position():
    _, prefills = pack(_mixed(), CPU).groups
    assert prefills.mask.shape == (2, 1, 3, 7)  # (G, 1, L, K)
    m = prefills.mask[:, 0]
    starts = [4, 0]  # slot 0's chunk starts at 4, slot 2's at 0
    for g, start in enumerate(starts):
        for j in range(prefills.valid[g].sum().item()):
            q = start + j
            want = [0.0 if k <= q else INF for k in range(7)]
            assert m[g, j].tolist() == want, (g, j)
    decodes, _ = pack(_mixed(), CPU).groups
    assert decodes.mask[:, 0].tolist() == [[[0.0] * 6 + [INF] * 2], [[0.0] * 8]]  # slot 1 at 5, slot 3 at 7


def test_slot_range_is_set_only_for_consecutive_slots():
    def ranges(slots: list[int]):
        plan = StepPlan(tuple(Segment(s, 2, 1, LOGITS_LAST) for s in slots), tuple(range(len(slots))))
        return pack(plan, CPU).groups[0].slot_range

    assert ranges([2, 3, 4]) == (2, 5)
    assert ranges([4, 2, 3]) == (2, 5)  # consecutive once sorted
    assert ranges([0]) == (0, 1)
    assert ranges([0, 2]) is None
    assert ranges([1, 3, 4]) is None


def test_logit_index_follows_each_segments_mode_in_segment_order():
    assert pack(_mixed(), CPU).logit_index.tolist() == [0, 4, 5, 6]  # LAST of slot 3, none of slot 0, LAST, ALL
    plan = StepPlan((Segment(0, 0, 3, LOGITS_NONE), Segment(1, 0, 2, LOGITS_LAST)), (1, 2, 3, 4, 5))
    assert pack(plan, CPU).logit_index.tolist() == [4]
    none = StepPlan((Segment(0, 0, 3, LOGITS_NONE),), (1, 2, 3))
    assert pack(none, CPU).logit_index.tolist() == []


# ---------------------------------------------------------------- ModelRunner.execute

PROMPT = [1, 5, 9, 30, 44, 2]


@pytest.fixture(scope="module")
def model(tiny_ckpts, mp1) -> Transformer:
    info = inspect_checkpoint(tiny_ckpts["gqa1"])
    model = Transformer(info.args, 64)
    load_into(model, info, 0, 1)
    return model


@pytest.fixture
def runner(model) -> ModelRunner:
    return ModelRunner(model, model.new_cache(4, 32))


def _prefill(runner: ModelRunner, slot: int, tokens: list[int], mode: int = LOGITS_ALL) -> torch.Tensor:
    return runner.execute(StepPlan((Segment(slot, 0, len(tokens), mode),), tuple(tokens)))


def test_execute_returns_the_rows_the_plan_asks_for(runner, model):
    out = runner.execute(StepPlan((Segment(0, 0, 4, LOGITS_NONE), Segment(1, 0, 3, LOGITS_ALL)),
                                  (1, 5, 9, 30, 1, 7, 7)))
    assert out.shape == (3, model.args.vocab_size) and out.dtype == torch.float32
    assert runner.active == {0, 1}


def test_a_copied_slot_continues_as_the_source_would(runner):
    full = _prefill(runner, 0, PROMPT)  # (6, vocab)
    plan = StepPlan((Segment(2, 5, 1, LOGITS_LAST),), (PROMPT[5],), copies=(SlotCopy(0, 2, 5),))
    got = runner.execute(plan)
    assert runner.active == {0, 2}
    for layer in range(len(runner.cache.k)):
        assert torch.equal(runner.cache.k[layer][2, :5], runner.cache.k[layer][0, :5])
        assert torch.equal(runner.cache.v[layer][2, :5], runner.cache.v[layer][0, :5])
    assert torch.allclose(got[0], full[5], atol=1e-5, rtol=0)


def test_freed_slots_leave_the_active_set_and_cannot_be_continued_or_copied(runner):
    _prefill(runner, 0, PROMPT[:3], LOGITS_LAST)
    _prefill(runner, 1, PROMPT[:3], LOGITS_LAST)
    runner.execute(StepPlan((), (), freed=(0,)))
    assert runner.active == {1}
    with pytest.raises(AssertionError, match="continues slot 0"):
        runner.execute(StepPlan((Segment(0, 3, 1, LOGITS_LAST),), (4,)))
    with pytest.raises(AssertionError, match="copies slot 0"):
        runner.execute(StepPlan((), (), copies=(SlotCopy(0, 2, 3),)))


def test_a_freed_slot_can_start_a_new_sequence_at_position_0(runner):
    _prefill(runner, 0, PROMPT[:3], LOGITS_LAST)
    out = runner.execute(StepPlan((Segment(0, 0, 2, LOGITS_LAST),), (1, 7), freed=(0,)))
    assert out.shape[0] == 1 and runner.active == {0}


def test_a_plan_continuing_a_slot_nobody_started_trips_the_runner(runner):
    with pytest.raises(AssertionError, match="continues slot 3, which holds no sequence"):
        runner.execute(StepPlan((Segment(3, 4, 1, LOGITS_LAST),), (9,)))


def test_a_plan_running_past_the_cache_trips_the_runner(runner):
    _prefill(runner, 0, PROMPT[:3], LOGITS_LAST)
    with pytest.raises(AssertionError, match="max_seq_len"):
        runner.execute(StepPlan((Segment(0, 31, 2, LOGITS_LAST),), (9, 9)))


def test_an_empty_plan_returns_no_rows(runner, model):
    out = runner.execute(StepPlan((), ()))
    assert out.shape == (0, model.args.vocab_size)
    _prefill(runner, 1, PROMPT[:2], LOGITS_LAST)
    assert runner.execute(StepPlan((), (), freed=(1,))).shape == (0, model.args.vocab_size)
    assert runner.active == set()
