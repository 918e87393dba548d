"""StepPlan: its wire tensor (round trip, stated capacity whatever the context, stop plan,
malformed input), prefill() and idle."""
from __future__ import annotations

import pytest
import torch

from llama.engine.step_plan import (LOGITS_ALL, LOGITS_LAST, LOGITS_NONE, LOGITS_TOKEN, Segment, StepPlan, TableRun,
                                     logit_rows, table_budget)


def test_step_plan_round_trips_through_its_tensor():
    plan = StepPlan((Segment(3, 10, 1, LOGITS_LAST), Segment(0, 0, 5, LOGITS_ALL)), (7, 1, 2, 3, 4, 5), freed=(2,),
                    table=(TableRun(3, 1, (9,)), TableRun(0, 0, (4, 2, 7))))
    cap = StepPlan.capacity(4, 8, 16)
    assert StepPlan.from_tensor(plan.to_tensor(cap)) == plan
    assert StepPlan.from_tensor(StepPlan((), (), stop=True).to_tensor(cap)).stop
    with pytest.raises(AssertionError):
        StepPlan((Segment(0, 0, 400, 1),), tuple(range(400))).to_tensor(cap)


def test_a_pipelines_token_rows_are_counted_among_the_logits_rows_and_travel_with_the_plan():
    segs = (Segment(0, 4, 1, LOGITS_TOKEN), Segment(1, 0, 3, LOGITS_ALL), Segment(2, 0, 2, LOGITS_NONE),
            Segment(3, 9, 1, LOGITS_LAST), Segment(4, 2, 2, LOGITS_TOKEN))
    plan = StepPlan(segs, (5, 1, 2, 3, 1, 2, 8, 6, 7))
    assert [logit_rows(s) for s in segs] == [1, 3, 0, 1, 1]
    assert plan.token_rows() == [0, 5]  # rows 1-3 are the echo's, row 4 the sampled one's
    assert StepPlan.from_tensor(plan.to_tensor(StepPlan.capacity(8, 16, 16))).token_rows() == [0, 5]


def _worst_case(max_batch_size: int, prefill_chunk: int, block_size: int) -> StepPlan:
    """The largest plan the scheduler can make: every row a segment, a decode token per row
    plus the whole prefill budget, every row freed since the last plan, a table run for every
    row and the most block ids a plan carries."""
    m, chunk = max_batch_size, prefill_chunk
    segments = [Segment(i, 30 + i, 1, LOGITS_LAST) for i in range(m - 1)]
    segments.append(Segment(m - 1, 0, 1 + chunk, LOGITS_NONE))  # 1 + chunk: keeps the token count at m + chunk
    tokens = tuple(range(100, 100 + m + chunk))
    ids = table_budget(m, chunk, block_size)
    table = tuple(TableRun(i, 0, (i + 1,)) for i in range(m - 1)) + (TableRun(m - 1, 3, tuple(range(1, ids - m + 2))),)
    return StepPlan(tuple(segments), tokens, freed=tuple(range(m)), table=table)


@pytest.mark.parametrize("max_batch_size,prefill_chunk,block_size", [(1, 1, 1), (4, 8, 16), (8, 64, 16), (64, 512, 32)])
def test_the_worst_case_plan_fits_its_capacity_exactly_and_one_int_more_does_not(max_batch_size, prefill_chunk,
                                                                                 block_size):
    cap = StepPlan.capacity(max_batch_size, prefill_chunk, block_size)
    plan = _worst_case(max_batch_size, prefill_chunk, block_size)
    t = plan.to_tensor(cap)
    assert t.shape == (cap,) and t.dtype == torch.int64
    assert t[-1].item() != 0  # the last int is used: no slack in the stated capacity
    assert StepPlan.from_tensor(t) == plan
    one_more = StepPlan(plan.segments, plan.tokens + (5,), plan.freed, plan.table)
    with pytest.raises(AssertionError, match="exceeds its capacity"):
        one_more.to_tensor(cap)


def test_the_stop_plan_crosses_as_stop_and_nothing_else():
    cap = StepPlan.capacity(2, 4, 16)
    got = StepPlan.from_tensor(StepPlan((), (), stop=True).to_tensor(cap))
    assert got == StepPlan((), (), stop=True)
    assert got.idle
    assert not StepPlan.from_tensor(StepPlan((), ()).to_tensor(cap)).stop


def test_a_heartbeat_with_freed_slots_round_trips():
    cap = StepPlan.capacity(4, 4, 16)
    beat = StepPlan((), (), freed=(3, 0))
    assert StepPlan.from_tensor(beat.to_tensor(cap)) == beat


@pytest.mark.parametrize("kind", [0, 3, -1])
def test_a_malformed_kind_is_a_runtime_error(kind):
    t = StepPlan((), ()).to_tensor(StepPlan.capacity(2, 4, 16))
    t[0] = kind
    with pytest.raises(RuntimeError, match=f"malformed step plan \\(kind {kind}\\)"):
        StepPlan.from_tensor(t)


def test_prefill_puts_row_i_in_table_row_i_from_position_0_with_every_logit():
    plan = StepPlan.prefill([[1, 5, 9], [1, 7]], 2)
    assert plan.segments == (Segment(0, 0, 3, LOGITS_ALL), Segment(1, 0, 2, LOGITS_ALL))
    assert plan.tokens == (1, 5, 9, 1, 7)
    assert plan.table == (TableRun(0, 0, (1, 2)), TableRun(1, 0, (3,)))
    assert plan.freed == () and not plan.stop


def test_idle_means_no_forward_to_run():
    assert StepPlan((), ()).idle
    assert StepPlan((), (), freed=(1,)).idle  # a heartbeat that hands back rows runs no forward
    assert StepPlan((), (), table=(TableRun(0, 0, (1,)),)).idle  # nor one that only sends a table
    assert not StepPlan((Segment(0, 0, 1, LOGITS_LAST),), (5,)).idle
