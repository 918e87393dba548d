"""A gang's start in stages (cluster/start.py), on a fake clock: what each stage is, how long the
finished ones took, a stage past its deadline named with its fix, a failure kept, a cancel."""
from __future__ import annotations

import pytest

from cluster.config import ParallelConfig
from cluster.errors import GangStartError
from cluster.start import STAGE_FIXES, STAGES, StartProgress, stage_deadlines


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def progress(clock) -> StartProgress:
    return StartProgress(stage_deadlines(ParallelConfig(rendezvous_timeout_s=30, load_timeout_s=900)), clock)


def test_every_stage_has_its_deadline_from_the_setting_that_owns_it():
    par = ParallelConfig(placement_timeout_s=1, actors_timeout_s=2, rendezvous_timeout_s=3, collective_timeout_s=4,
                         load_timeout_s=5, call_timeout_s=6)
    assert stage_deadlines(par) == dict(zip(STAGES, (1, 2, 3, 4, 5, 6)))
    assert set(STAGE_FIXES) == set(STAGES)


def test_the_stages_in_order_each_timed_then_ready(progress, clock):
    for k, stage in enumerate(STAGES):
        progress.enter(stage)
        assert progress.as_dict()["stage"] == stage and progress.as_dict()["stage_number"] == k + 1
        clock.now += k + 1
        progress.check()  # on time
    assert not progress.ready
    progress.done()
    d = progress.as_dict()
    assert progress.ready and d["stage"] == "ready" and d["stage_seconds"] is None and d["seconds"] == 21
    assert d["finished_stages"] == [{"stage": s, "seconds": k + 1} for k, s in enumerate(STAGES)]
    assert progress.describe() == "ready after 21.0s"


def test_a_stage_past_its_deadline_fails_the_check_naming_the_stage_and_the_fix(progress, clock):
    progress.enter("placement")
    progress.enter("actors")
    progress.enter("rendezvous")
    clock.now += 29.5
    progress.check()
    assert progress.describe() == "stage rendezvous (3 of 6), 29.5s in, deadline 30s"
    clock.now += 1
    with pytest.raises(GangStartError) as e:
        progress.check()
    assert "stage 'rendezvous' (3 of 6: waiting for every rank to join the process group" in str(e.value)
    assert "within its 30s deadline" in str(e.value) and "python -m deploy.doctor" in str(e.value)


def test_a_failure_is_kept_and_raised_by_every_check(progress):
    progress.enter("weights")
    error = ValueError("no machine of the cluster has the checkpoint")
    progress.fail(error)
    with pytest.raises(ValueError, match="no machine"):
        progress.check()
    assert progress.as_dict()["error"] == "ValueError: no machine of the cluster has the checkpoint"
    assert progress.describe().startswith("failed in stage weights: ValueError")


def test_a_cancelled_start_stops_at_its_next_stage(progress):
    progress.enter("actors")
    progress.cancel()
    with pytest.raises(GangStartError, match="cancelled"):
        progress.enter("rendezvous")


def test_unknown_stages_and_missing_deadlines_are_refused(clock):
    with pytest.raises(ValueError, match="a deadline for each"):
        StartProgress({"placement": 1.0}, clock)
    with pytest.raises(ValueError, match="unknown stage"):
        StartProgress(dict.fromkeys(STAGES, 1.0), clock).enter("warmup")
