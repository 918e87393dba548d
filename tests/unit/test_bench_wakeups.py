"""bench/wakeups.py: the wake-ups it counts are the threads' own, by process, from /proc."""
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "wakeups.py"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _wakeups():
    spec = importlib.util.spec_from_file_location("wakeups", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_thread_that_sleeps_200_times_in_the_window_counts_as_200_wakeups_of_this_process():
    w = _wakeups()
    warm, go, slept, done = threading.Event(), threading.Event(), threading.Event(), threading.Event()

    def sleeper():
        for _ in range(300):  # before the window: not counted
            time.sleep(0.001)
        warm.set()
        go.wait()
        for _ in range(200):
            time.sleep(0.001)
        slept.set()
        done.wait()  # alive until the second snapshot: a thread that has exited is no longer in /proc

    thread = threading.Thread(target=sleeper)
    thread.start()
    warm.wait()
    before, t0 = w.snapshot(), time.perf_counter()
    go.set()
    slept.wait()
    seconds = time.perf_counter() - t0
    after = w.snapshot()
    done.set()
    thread.join()
    r = w.rates(before, after, seconds, os.getpid())
    mine = dict(r["top"]).get(w._name(str(os.getpid())), 0) * seconds
    assert 200 <= mine < 400, r  # its 200 sleeps, and this thread's wait
    assert r["wakeups"] * seconds >= mine - seconds / 2  # "top" is rounded to whole wake-ups a second
    assert r["rank_preempted"] >= 0


def test_a_thread_that_starts_within_the_window_is_counted_from_zero():
    w = _wakeups()
    before = w.snapshot()
    after = dict(before)
    after[("1", "999999999")] = ("newcomer", 7, 3)
    r = w.rates(before, after, 1.0, "newcomer")
    assert ("newcomer", 7) in r["top"] and r["rank_preempted"] == 3


def test_a_thread_id_reused_by_a_new_thread_is_counted_from_zero_not_negative():
    w = _wakeups()
    before = {("1", "5"): ("old", 900, 50)}
    after = {("1", "5"): ("new", 4, 2)}
    r = w.rates(before, after, 1.0, "new")
    assert r["wakeups"] == 4 and r["rank_preempted"] == 2
