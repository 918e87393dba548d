"""How often each process on the machine wakes, and how often the rank is preempted, from /proc.

A thread's `voluntary_ctxt_switches` counts the times it slept and so each time it woke again;
`nonvoluntary_ctxt_switches` the times the kernel took its core for another thread. On a machine
whose cores the rank's OpenMP threads fill, every wake-up of another thread preempts one of them,
and the other waits for it at the next parallel region (bench/serve_path.py measures what that
costs the step). Counts the threads alive at the window's end (the bench's are long-lived; one
that started within it counts from zero, one that exited within it is missed). Linux only.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path


def _name(pid: str) -> str:
    """The process's title as `ps` shows it, cut to its first word (ray::RankActor, gcs_server, ...)."""
    try:
        words = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
    except OSError:
        return "?"
    if not words:
        return "?"
    name = words[0].rsplit("/", 1)[-1]
    if name.startswith("python") and len(words) > 1:  # a Python program: the script or module it runs
        rest = [w for w in words[1:] if not w.startswith("-")]
        name = rest[0].rsplit("/", 1)[-1] if rest else name
    return name.split(".")[0] if name.startswith("ray::") else name


def snapshot() -> dict[tuple[str, str], tuple[str, int, int]]:
    """(pid, tid) -> (process name, voluntary switches, involuntary switches) for every thread."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        name = _name(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            vol = invol = 0
            try:
                for line in open(f"/proc/{pid}/task/{tid}/status"):
                    if line.startswith("voluntary_ctxt_switches"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol = int(line.split()[1])
            except OSError:
                continue
            out[(pid, tid)] = (name, vol, invol)
    return out


def rates(before: dict, after: dict, seconds: float, rank: str | int) -> dict:
    """Wake-ups a second, machine-wide and by process name, over one window; and the rank's
    preemptions a second. `rank`: the rank process's pid, or its name (the first such process)."""
    by_name: Counter[str] = Counter()
    preempted = 0
    rank_pid = str(rank) if isinstance(rank, int) else next(
        (pid for (pid, _), (name, _, _) in after.items() if name == rank), None)
    for key, (name, vol, invol) in after.items():
        name0, vol0, invol0 = before.get(key, (name, 0, 0))
        if name0 != name or vol < vol0 or invol < invol0:  # the id was reused by a new thread: count it from zero
            vol0 = invol0 = 0
        by_name[name] += vol - vol0
        if key[0] == rank_pid:
            preempted += invol - invol0
    return {"wakeups": sum(by_name.values()) / seconds, "rank_preempted": preempted / seconds,
            "top": [(n, round(v / seconds)) for n, v in by_name.most_common(6)]}  # rounded to whole wake-ups a second
