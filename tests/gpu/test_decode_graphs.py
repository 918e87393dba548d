"""On a CUDA device: the decode captured as CUDA graphs (llama/decode_step.py) gives the eager
decode's logits, step after step, in fp32 and bf16, through buckets of several batch sizes and
kv lengths; and the engine, which captures them, still gives Meta's tokens (test_cuda.py)."""
from __future__ import annotations

import pytest
import torch

from llama.checkpoint import inspect_checkpoint, load_into
from llama.model import Transformer
from llama.runner import ModelRunner
from llama.step_plan import LOGITS_LAST, LOGITS_NONE, Segment, StepPlan
from tests.conftest import GOLDEN_CKPT


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_captured_decode_gives_the_eager_decodes_logits(mp1_cuda, dtype, atol):
    info = inspect_checkpoint(GOLDEN_CKPT)
    model = Transformer(info.args, 160, device="cuda", dtype=dtype)
    load_into(model, info, 0, 1)
    runners = [ModelRunner(model, model.new_cache(6, 160), graphs=g) for g in (False, True)]
    g = torch.Generator().manual_seed(0)
    lengths = {0: 5, 2: 60, 3: 17, 5: 40}  # slots 1 and 4 stay empty: scratch rows in the bucket
    tokens = {s: torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist() for s, n in lengths.items()}
    for r in runners:
        for s, t in tokens.items():
            r.execute(StepPlan((Segment(s, 0, len(t), LOGITS_NONE),), tuple(t)))
    last = {s: t[-1] for s, t in tokens.items()}
    at = dict(lengths)  # each slot's next position
    for step in range(40):
        if step == 25:  # two sequences end: the B bucket falls from 6 to 4
            del last[3], last[5], at[3], at[5]
        slots = sorted(last)  # slot 2 crosses the 64-position kv bucket at step 4
        plan = StepPlan(tuple(Segment(s, at[s], 1, LOGITS_LAST) for s in slots), tuple(last[s] for s in slots))
        eager, graph = (r.execute(plan) for r in runners)
        assert torch.allclose(graph, eager, atol=atol, rtol=0), (step, (graph - eager).abs().max().item())
        for s, t in zip(slots, eager.argmax(-1).tolist()):
            last[s], at[s] = t, at[s] + 1
    assert runners[1].decode.capture_s > 0 and len(runners[1].decode._captured) >= 2
