"""`from llama import Llama` under torchrun (gloo; the model's collectives through shared memory,
all ranks being on this machine): with two processes, the golden tokens; with
two and four, Meta's reference tokens from Llama 2 and Llama 3 files cut for 1, 2 and 4 ranks
(resharded both ways); every rank exits cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


import pytest

from llama.model.shared_memory_group import shared_memory_supported


def _torchrun(script: str, nproc: int, *args: str) -> None:
    """`torchrun --standalone --nproc_per_node nproc` on tests/unit/`script`, which must exit 0."""
    # Its own session, so a hang can be ended with every worker it started.
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         str(Path(__file__).with_name(script)), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]


def test_torchrun_two_ranks_reproduce_the_reference(tmp_path):
    out = tmp_path / "result.json"
    _torchrun("torchrun_golden.py", 2, str(out))
    got = json.loads(out.read_text())
    assert {k: got[k] for k in ("world_size", "rank", "match")} == {"world_size": 2, "rank": 0, "match": True}
    # the model's collectives went through shared memory (llama/model/shared_memory_group.py)
    assert (got["shared_memory_calls"] > 100) == shared_memory_supported()


@pytest.mark.parametrize("nproc", [2, 4])
def test_meta_files_cut_for_any_size_give_the_reference_tokens_at_two_and_four_ranks(tmp_path, meta_files,
                                                                                     meta_references, nproc):
    pytest.importorskip("llama_models")
    cases = []
    for (version, _), ckpt in sorted(meta_files.items()):
        prompts, want = meta_references[version]
        cases.append({"ckpt": str(ckpt), "prompts": prompts, "max_gen_len": max(len(t) for t, _ in want),
                      "tokens": [t for t, _ in want], "logprobs": [lp for _, lp in want]})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    _torchrun("torchrun_meta_files.py", nproc, str(tmp_path / "cases.json"), str(tmp_path / "out.json"))
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["world_size"] == nproc and len(out["results"]) == 6
    for r in out["results"]:
        assert r["match"] and r["max_logprob_diff"] < 1e-4, r


@pytest.mark.parametrize("nproc,stages,layers", [(4, 2, "even"), (3, 3, "even")], ids=["pp2xtp2", "pp3"])
def test_pipeline_stages_reproduce_the_reference(tmp_path, nproc, stages, layers):
    """`Llama.build(..., pipeline_parallel_size=P)`: the golden files (cut for 2 ranks) as P
    stages of nproc / P model-parallel ranks each; every rank gets the golden tokens, and their
    logprobs to 1e-4. Each stage holds only its layers, the first the embedding, the last the
    output; hidden states went forward and logits back, with a step in flight per stage. (Two stages of one rank, and an uneven
    split, run in tests/ray/test_pipeline_gang.py.)"""
    out = tmp_path / "result.json"
    _torchrun("torchrun_pipeline.py", nproc, str(out), str(stages), layers)
    got = [json.loads((tmp_path / f"result.{r}.json").read_text()) for r in range(nproc)]
    tp = nproc // stages
    counts = [2, 1] if stages == 2 else [1, 1, 1]
    for r in got:
        s = r["rank"] // tp
        assert r["match"] and r["max_logprob_diff"] < 1e-4, r
        assert (r["stage"], r["layers"], r["holds_embedding"], r["holds_output"]) == (
            s, counts[s], s == 0, s == stages - 1), r
        if s < stages - 1 or r["rank"] == (stages - 1) * tp:
            assert r["sent_bytes"] > 0, r  # hidden states forward; logits back from the last stage's first rank
    # P steps in flight, each with its own prompts (6 golden prompts: P shares): every rank made
    # the same steps, nearly all launched while an earlier one was still in the pipe
    assert len({r["steps"] for r in got}) == 1 and all(r["overlapped"] > 0.9 * r["steps"] for r in got), got
