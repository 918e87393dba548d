"""bench/engine_decode.py on the CPU, tiny shape: its two loops (the engine, and the eager loop
with the reference's algorithm) give the same greedy tokens on the same weights, which is what
makes its speed ratio a comparison of like with like; and it prints the whole table."""
from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "engine_decode.py"


def test_the_engine_and_the_reference_loop_agree_and_the_table_is_whole(mp1) -> None:
    spec = importlib.util.spec_from_file_location("engine_decode", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parser().parse_args(["--shape", "tiny", "--device", "cpu", "--batches", "1", "3", "--new-tokens",
                                      "6", "--ttft-prompts", "16", "40"])
    table = bench.run(args)
    rows = [line.strip("| ").split(" | ") for line in table if line.startswith("| ") and "batch" not in line]
    assert [(r[0], r[-1]) for r in rows] == [("1", "1/1"), ("3", "3/3")]  # every row's greedy tokens equal
    ttft = [line for line in table if line.startswith("time to first token")]
    assert [line.split(", ")[2].split("-")[0] for line in ttft] == ["16", "40"]
    assert table[-1].startswith("start-up: the batch runs' engine (max_batch_size 3, max_seq_len 134) built in ")
