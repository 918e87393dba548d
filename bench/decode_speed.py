"""Decode speed of one rank against the memory-bandwidth limit, measured in the same run.

    python bench/decode_speed.py [--dim 2048 --n-layers 16 ...] [--device auto] [--dtype auto]

A decode step must read every weight once, so (weight bytes / copy bandwidth) is the fastest a
step can be; the ratio printed is that limit over the measured step time (1.0 = at the limit).
The step is the engine's own (llama/engine/runner.py: a plan of one decode segment per slot, packed,
through the model), without sampling. Random weights, one process, no Ray.
"""
from __future__ import annotations

import argparse
import time

import torch

from llama.checkpoints.make_tiny import add_shape_args
from llama.distributed import (
    choose_backend,
    init_model_parallel,
    init_single_process_group,
    resolve_device,
    resolve_dtype,
)
from llama.engine.runner import ModelRunner, fixed_tables
from llama.engine.step_plan import LOGITS_LAST, LOGITS_NONE, Segment, StepPlan
from llama.model.args import ModelArgs
from llama.model.transformer import Transformer

from engine_decode import copy_bandwidth, sync  # bench/, beside this script

MAX_SEQ_LEN = 512


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p, dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, vocab_size=32000)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    a = p.parse_args()
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    init_single_process_group(choose_backend(device))
    init_model_parallel(1)
    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                     vocab_size=a.vocab_size, multiple_of=256)
    model = Transformer(args, MAX_SEQ_LEN, device=device, dtype=dtype)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.02)
    weight_bytes = sum(prm.numel() * prm.element_size() for prm in model.parameters())
    bw = copy_bandwidth(device, min(1 << 30, 4 * weight_bytes))
    limit_s = weight_bytes / (bw / 2)  # a step reads each weight once: half a copy's traffic
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), dtype {dtype}, "
          f"{weight_bytes / 1e9:.3f} GB of weights, copy bandwidth {bw / 1e12:.3f} TB/s (read+write)")
    print(f"bandwidth-limited decode step: {limit_s * 1e3:.3f} ms")

    for bsz in (1, 8):
        runner = ModelRunner(model, model.new_cache(bsz, MAX_SEQ_LEN))
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, a.vocab_size, (16,), generator=g).tolist() for _ in range(bsz)]
        runner.execute(StepPlan(tuple(Segment(i, 0, 16, LOGITS_NONE) for i in range(bsz)),
                                tuple(t for p in prompts for t in p), table=fixed_tables(runner.cache)))
        tokens = tuple(torch.randint(0, a.vocab_size, (bsz,), generator=g).tolist())

        def decode(pos: int) -> None:  # one decode token per slot, as the engine's steady state
            runner.execute(StepPlan(tuple(Segment(i, pos, 1, LOGITS_LAST) for i in range(bsz)), tokens))

        for pos in range(16, 20 + a.steps):  # warm-up over the same positions as the timed loop
            decode(pos)
        sync(device)
        t0 = time.perf_counter()
        for pos in range(20, 20 + a.steps):
            decode(pos)
        sync(device)
        step_s = (time.perf_counter() - t0) / a.steps
        print(f"batch {bsz}: engine decode step (no sampling) {step_s * 1e3:.3f} ms = {limit_s / step_s:.3f} of the "
              f"bandwidth limit; {bsz / step_s:.1f} tokens/s")

if __name__ == "__main__":
    main()
