"""Run by tests/unit/test_torchrun.py under `torchrun --nproc_per_node N`: `Llama.build` on each
checkpoint of argv[1]'s cases (Meta's files cut for 1, 2 or 4 ranks, loaded at N), greedy with
logprobs; every rank checks the reference's tokens, rank 0 writes each case's result to argv[2]."""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from llama import Llama

cases = json.loads(Path(sys.argv[1]).read_text())
results = []
for case in cases:
    ckpt = case["ckpt"]
    generator = Llama.build(ckpt, f"{ckpt}/tokenizer.model", 128, len(case["prompts"]))
    tokens, logprobs = generator.generate(case["prompts"], case["max_gen_len"], temperature=0, logprobs=True)
    diff = max(abs(a - b) for got, want in zip(logprobs, case["logprobs"]) for a, b in zip(got, want))
    results.append({"ckpt": ckpt, "match": tokens == case["tokens"], "max_logprob_diff": diff})
if dist.get_rank() == 0:
    Path(sys.argv[2]).write_text(json.dumps({"world_size": dist.get_world_size(), "results": results}))
assert all(r["match"] for r in results), f"rank {dist.get_rank()}: tokens differ from the reference: {results}"
