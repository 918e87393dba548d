"""pack() (packed tokens, pool offsets, attention groups and their block tables, masks, logit
rows) and ModelRunner.execute (table changes, frees, plan checks), on a paged cache."""
from __future__ import annotations

import pytest
import torch

from llama.checkpoints.load import inspect_checkpoint, load_into
from llama.engine.runner import ModelRunner, forward_rows, pack
from llama.engine.step_plan import LOGITS_ALL, LOGITS_LAST, LOGITS_NONE, Segment, StepPlan, TableRun
from llama.model.kv_cache import KVCache
from llama.model.transformer import Transformer

CPU = torch.device("cpu")
INF = float("-inf")
BS = 4  # positions per block in these tests


# ---------------------------------------------------------------- pack


def _cache() -> KVCache:
    """4 rows; row r's blocks are scattered over the pool (row 0: 7, 2; row 1: 5, 1; ...)."""
    cache = KVCache(n_layers=1, num_blocks=12, block_size=BS, max_rows=4, max_blocks_per_row=4, n_kv_heads=1,
                    head_dim=2, device=CPU, dtype=torch.float32)
    for row, blocks in {0: [7, 2], 1: [5, 1], 2: [3], 3: [9, 4]}.items():
        cache.assign(row, 0, blocks)
    return cache


def _mixed() -> StepPlan:
    """Two decodes (rows 3 and 1), a prefill chunk continuing row 0 at position 4, and a new
    prompt in row 2."""
    return StepPlan(
        (Segment(3, 7, 1, LOGITS_LAST), Segment(0, 4, 3, LOGITS_NONE), Segment(1, 5, 1, LOGITS_LAST),
         Segment(2, 0, 2, LOGITS_ALL)),
        (11, 12, 13, 14, 15, 16, 17),
    )


def test_pack_lays_the_segments_end_to_end_and_writes_each_token_into_its_block():
    b = pack(_mixed(), _cache(), CPU)
    assert b.tokens.tolist() == [11, 12, 13, 14, 15, 16, 17]
    assert b.positions.tolist() == [7, 4, 5, 6, 5, 0, 1]
    # row 3 position 7: block 4 offset 3; row 0 positions 4..6: block 2; row 1 position 5: block 1
    assert b.write_index.tolist() == [4 * BS + 3, 2 * BS, 2 * BS + 1, 2 * BS + 2, 1 * BS + 1, 3 * BS, 3 * BS + 1]
    assert b.tokens.dtype == b.positions.dtype == b.write_index.dtype == torch.long


def test_decodes_and_prefill_chunks_attend_in_separate_groups_through_their_tables():
    decodes, prefills = pack(_mixed(), _cache(), CPU).groups
    assert decodes.query_index.tolist() == [[0], [4]]  # row 3's token, then row 1's, in segment order
    assert decodes.tables.tolist() == [[9, 4], [5, 1]]  # 2 blocks cover position 7
    assert decodes.kv_len == 2 * BS
    # rows padded to the longest chunk (3); padding repeats index 0 and is marked invalid
    assert prefills.query_index.tolist() == [[1, 2, 3], [5, 6, 0]]
    assert prefills.valid.tolist() == [[True, True, True], [True, True, False]]
    assert prefills.valid_rows.tolist() == [0, 1, 2, 3, 4]  # flat (g, l) of the valid rows: not 5, the padding
    assert prefills.valid_targets.tolist() == [1, 2, 3, 5, 6]  # where each one's output goes
    assert prefills.tables.tolist() == [[7, 2], [3, 0]]  # row 2 has one block: the null block pads it
    assert prefills.kv_len == 2 * BS  # row 0's chunk ends at position 6


def test_a_plan_of_one_kind_has_one_group():
    cache = _cache()
    assert len(pack(StepPlan((Segment(0, 3, 1, LOGITS_LAST),), (5,)), cache, CPU).groups) == 1
    assert len(pack(StepPlan((Segment(0, 0, 2, LOGITS_ALL), Segment(1, 0, 3, LOGITS_ALL)), (1, 2, 3, 4, 5)),
                    cache, CPU).groups) == 1


def test_the_mask_lets_each_query_see_exactly_the_keys_at_or_before_its_position():
    decodes, prefills = pack(_mixed(), _cache(), CPU).groups
    K = 2 * BS
    assert prefills.mask.shape == (2, 1, 3, K)  # (G, 1, L, K)
    m = prefills.mask[:, 0]
    for g, start in enumerate([4, 0]):  # row 0's chunk starts at 4, row 2's at 0
        for j in range(prefills.valid[g].sum().item()):
            assert m[g, j].tolist() == [0.0 if k <= start + j else INF for k in range(K)], (g, j)
    assert decodes.mask[:, 0].tolist() == [[[0.0] * 8], [[0.0] * 6 + [INF] * 2]]  # row 3 at 7, row 1 at 5


def test_logit_index_follows_each_segments_mode_in_segment_order():
    cache = _cache()
    assert pack(_mixed(), cache, CPU).logit_index.tolist() == [0, 4, 5, 6]  # LAST of row 3, none of row 0, LAST, ALL
    plan = StepPlan((Segment(0, 0, 3, LOGITS_NONE), Segment(1, 0, 2, LOGITS_LAST)), (1, 2, 3, 4, 5))
    assert pack(plan, cache, CPU).logit_index.tolist() == [4]
    none = StepPlan((Segment(0, 0, 3, LOGITS_NONE),), (1, 2, 3))
    assert pack(none, cache, CPU).logit_index.tolist() == []


def test_the_prefill_plan_gives_each_row_blocks_of_its_own():
    plan = StepPlan.prefill([[1, 2, 3, 4, 5], [6, 7]], BS)
    assert plan.table == (TableRun(0, 0, (1, 2)), TableRun(1, 0, (3,)))


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
    return ModelRunner(model, model.new_cache(4, 32, num_blocks=16, block_size=BS))


def _prefill(runner: ModelRunner, slot: int, tokens: list[int], blocks: tuple[int, ...],
             mode: int = LOGITS_ALL) -> torch.Tensor:
    return runner.execute(StepPlan((Segment(slot, 0, len(tokens), mode),), tuple(tokens),
                                   table=(TableRun(slot, 0, blocks),)))


def test_execute_returns_the_rows_the_plan_asks_for(runner, model):
    out = runner.execute(StepPlan((Segment(0, 0, 4, LOGITS_NONE), Segment(1, 0, 3, LOGITS_ALL)),
                                  (1, 5, 9, 30, 1, 7, 7), table=(TableRun(0, 0, (3,)), TableRun(1, 0, (8,)))))
    assert out.shape == (3, model.args.vocab_size) and out.dtype == torch.float32
    assert runner.active == {0, 1}


def test_a_row_that_starts_from_anothers_full_blocks_continues_as_that_one_would(runner, model):
    full = _prefill(runner, 0, PROMPT, (6, 2))  # (6, vocab); block 6 holds positions 0..3
    # Row 2 shares block 6 (its first 4 positions) and computes the rest in a block of its own.
    got = runner.execute(StepPlan((Segment(2, 4, 2, LOGITS_ALL),), tuple(PROMPT[4:]), table=(TableRun(2, 0, (6, 11)),)))
    assert runner.active == {0, 2}
    assert torch.allclose(got, full[4:], atol=1e-5, rtol=0)
    assert torch.allclose(full, forward_rows(model, [PROMPT]), atol=1e-5, rtol=0)


def test_table_changes_extend_a_row_block_by_block(runner, model):
    whole = forward_rows(model, [PROMPT + [7, 8, 9]])
    _prefill(runner, 1, PROMPT[:4], (13,), LOGITS_NONE)
    rows = []
    for pos, tok in enumerate(PROMPT[4:] + [7, 8, 9], start=4):
        table = (TableRun(1, 1, (4,)),) if pos == 4 else (TableRun(1, 2, (15,)),) if pos == 8 else ()
        rows.append(runner.execute(StepPlan((Segment(1, pos, 1, LOGITS_LAST),), (tok,), table=table))[0])
    assert torch.allclose(torch.stack(rows), whole[4:], atol=1e-5, rtol=0)
    assert runner.cache.host_table[1, :3].tolist() == [13, 4, 15]


def test_freed_rows_leave_the_active_set_their_tables_cleared(runner):
    _prefill(runner, 0, PROMPT[:3], (1,), LOGITS_LAST)
    _prefill(runner, 1, PROMPT[:3], (2,), LOGITS_LAST)
    runner.execute(StepPlan((), (), freed=(0,)))
    assert runner.active == {1} and runner.cache.host_table[0].tolist() == [0] * 8
    with pytest.raises(AssertionError, match="row 0, which holds no sequence"):
        runner.execute(StepPlan((Segment(0, 3, 1, LOGITS_LAST),), (4,)))


def test_a_freed_row_can_start_a_new_sequence_in_the_same_plan(runner):
    _prefill(runner, 0, PROMPT[:3], (1,), LOGITS_LAST)
    out = runner.execute(StepPlan((Segment(0, 0, 2, LOGITS_LAST),), (1, 7), freed=(0,), table=(TableRun(0, 0, (5,)),)))
    assert out.shape[0] == 1 and runner.active == {0} and runner.cache.host_table[0, :2].tolist() == [5, 0]


def test_a_plan_running_a_row_past_its_blocks_trips_the_runner(runner):
    _prefill(runner, 0, PROMPT[:3], (1,), LOGITS_LAST)
    with pytest.raises(AssertionError, match="past the blocks it was given"):
        runner.execute(StepPlan((Segment(0, 3, 2, LOGITS_LAST),), (9, 9)))


def test_a_plan_running_past_the_cache_trips_the_runner(runner):
    _prefill(runner, 0, PROMPT[:3], (1,), LOGITS_LAST)
    with pytest.raises(AssertionError, match="max_seq_len"):
        runner.execute(StepPlan((Segment(0, 31, 2, LOGITS_LAST),), (9, 9)))


def test_table_changes_outside_the_pool_or_the_table_trip_the_runner(runner):
    with pytest.raises(AssertionError, match="outside the pool"):
        runner.execute(StepPlan((), (), table=(TableRun(0, 0, (17,)),)))
    with pytest.raises(AssertionError, match="outside the table"):
        runner.execute(StepPlan((), (), table=(TableRun(0, 7, (1, 2)),)))


def test_an_empty_plan_returns_no_rows(runner, model):
    out = runner.execute(StepPlan((), ()))
    assert out.shape == (0, model.args.vocab_size)
    _prefill(runner, 1, PROMPT[:2], (3,), LOGITS_LAST)
    assert runner.execute(StepPlan((), (), freed=(1,))).shape == (0, model.args.vocab_size)
    assert runner.active == set()
