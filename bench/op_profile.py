"""Where a loop of engine steps spent its time, op by op, by torch's profiler: each op's own
(self) time a step, the most first. Shared by bench/step_profile.py (this project's engine) and
bench/peer_engine.py (vLLM's, in the peer's venv), so the two steps compare op against op: the
same names where both call torch (SDPA, index_select), their own where not (our oneDNN linear
layers are `mkldnn::_linear_pointwise`, vLLM's `_C::onednn_mm`; its attention
`_C::cpu_attention_with_kv_cache`, its fused elementwise code `Call CompiledFxGraph`).

An op's time is its wall time on the thread that called it (its OpenMP threads work inside it);
what the table's total leaves of the wall time is Python between the ops and the engine's own
bookkeeping. The profiler adds a few microseconds to every op: the loop runs slower under it than
unwrapped, by more where ops are many and small.
"""
from __future__ import annotations

import torch


def recording() -> torch.profiler.profile:
    """A context manager; what it records goes to table()."""
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def table(prof: torch.profiler.profile, steps: int, wall_s: float, rows: int = 14) -> str:
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    lines = [f"  ops {total_ms / steps:.2f} ms a step of {1e3 * wall_s / steps:.2f} ms (profiled; the rest is "
             f"Python between ops)"]
    for e in events[:rows]:
        lines.append(f"  {e.key[:52]:52s} {e.self_cpu_time_total / 1e3 / steps:7.2f} ms/step  "
                     f"{e.count / steps:6.1f} calls/step")
    return "\n".join(lines)
