"""Where the engine's step time goes, on the peer benchmark's model and workload, in one process.

    .venv/bin/python bench/step_profile.py [--concurrency 1 16] [--requests 32] [--threads 2] [--ops]

The model is bench/peer.py's Hugging Face folder (written on first use with this venv's
transformers: dim 1024, 8 layers, 16 heads over 4 KV heads, FFN 2816, vocab 32,000, float32,
random weights), served by the library's Engine in this process at MP=1, with peer.py's settings:
16 sequences at most, a prefill budget of 256 tokens a step, model length 1024. A closed loop keeps
--concurrency requests in flight (256-token random prompts, 128 greedy tokens, no end token) until
--requests have been answered. Every part of a step is timed by wrapping it (exclusive wall time,
nested parts subtracted; the CPU runs each op before returning, so wall time is the op's):
the linear layers (q/k/v and the MLP's w1/w3, fused where packed; attention's o; the MLP's w2; the
output layer), SDPA, writing
and gathering KV blocks, rotary, norms, the MLP's SiLU and product, the rest of the forward,
packing the batch, sampling, planning, reading back and emitting (detokenising included).
Prints output tokens/s and, per concurrency, each part's share of the time in steps and its ms
per step. A second figure times the same loop unwrapped, so the wrappers' own cost shows.

--matmuls: first, each of the model's linear shapes at 1, 4, 16 and 256 rows through MKL's F.linear,
through oneDNN over a packed weight (llama/model/linear.py: the blocked layout oneDNN picks with no
batch hint) and through oneDNN over the weight packed for one row (a batch hint of 1, which gives
the plain row-major layout), ms and GFLOPS; each on more weights than the caches hold.
--unfused: pack q, k, v and w1, w3 each on its own (the A/B of fusing them).
--unpacked: no packing at all, every linear layer on MKL's F.linear (the A/B of oneDNN).
--split-threads: build the engine on one thread and step it on another, as a rank did before
cluster/compute_thread.py (two OpenMP worker pools on the same cores).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


class Timers:
    """Exclusive wall time per label over nested wrapped calls."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [label, start, children's time]
        self.undo: list = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            timers.stack.append([label, time.perf_counter(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                lab, t0, child = timers.stack.pop()
                took = time.perf_counter() - t0
                timers.total[lab] += took - child
                if timers.stack:
                    timers.stack[-1][2] += took

        setattr(owner, name, timed)
        self.undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)
        self.undo.clear()


def instrument(engine, timers: Timers) -> None:
    import torch.nn.functional as F

    import llama.engine.draw as draw
    import llama.engine.runner as runner
    import llama.model.transformer as tr
    from llama.engine.decode_step import DecodeStep
    from llama.engine.scheduler import Scheduler
    from llama.model.kv_cache import KVCache
    from llama.tokenizers.detokenizer import TextStream

    model = engine.model
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        timers.wrap(a.wo, "forward", "linear: attention o")
        timers.wrap(f.w2, "forward", "linear: MLP w2")
        timers.wrap(layer.attention_norm, "forward", "RMSNorm")
        timers.wrap(layer.ffn_norm, "forward", "RMSNorm")
        timers.wrap(f, "forward", "MLP SiLU and product")
        timers.wrap(a, "forward", "attention, the rest")
        timers.wrap(a, "decode", "attention, the rest")
        timers.wrap(layer, "forward", "layer, the rest (residuals)")
        timers.wrap(layer, "decode", "layer, the rest (residuals)")
    timers.wrap(model.norm, "forward", "RMSNorm")
    timers.wrap(model.output, "forward", "linear: output (logits)")
    timers.wrap(model.tok_embeddings, "forward", "embedding")
    timers.wrap(model, "forward", "forward, the rest")
    timers.wrap(model, "decode", "forward, the rest")
    timers.wrap(F, "scaled_dot_product_attention", "SDPA")
    timers.wrap(tr, "apply_rotary_emb", "rotary")
    timers.wrap(tr, "columns", "linear: q/k/v, MLP w1/w3 (fused)")
    timers.wrap(KVCache, "write", "KV write")
    timers.wrap(KVCache, "gather", "KV gather")
    timers.wrap(runner, "pack", "pack (prefill batch)")
    timers.wrap(DecodeStep, "run", "decode inputs")
    timers.wrap(engine.runner, "execute", "runner, the rest")
    timers.wrap(draw, "sample", "sampling")
    timers.wrap(Scheduler, "schedule", "planning (scheduler)")
    timers.wrap(engine, "_plan", "planning (plan)")
    timers.wrap(TextStream, "push", "detokenising")
    timers.wrap(engine, "_complete", "read back and emit")
    timers.wrap(engine, "_launch", "sampling")
    timers.wrap(engine, "step", "step, the rest")


def build(ckpt: Path, threads: int):
    from peer import MAX_SEQS, MODEL_LEN, PREFILL

    from llama.checkpoints.load import inspect_checkpoint, load_into
    from llama.distributed import init_model_parallel, init_single_process_group
    from llama.engine.config import EngineConfig
    from llama.engine.core import Engine
    from llama.model.transformer import Transformer
    from llama.tokenizers.load import load_tokenizer

    torch.set_num_threads(threads)
    init_single_process_group("gloo")
    init_model_parallel(1)
    info = inspect_checkpoint(str(ckpt))
    model = Transformer(info.args, MODEL_LEN)
    load_into(model, info, 0, 1)
    tok = load_tokenizer(info.tokenizer_path)
    tok.stop_ids = frozenset()  # no end token: every request runs to max_tokens
    cfg = EngineConfig(max_batch_size=MAX_SEQS, max_seq_len=MODEL_LEN, prefill_chunk=PREFILL)
    return Engine(model, tok, cfg)


def closed_loop(engine, concurrency: int, requests: int, vocab: int, seed: int) -> tuple[int, float, int]:
    """Keep `concurrency` requests in flight until `requests` are answered: tokens, wall s, steps."""
    from peer import MAX_TOKENS, PROMPT_LEN

    from llama.engine.request import GenerationRequest, SamplingParams

    rng = random.Random(seed)
    done: list[int] = []
    generated = [0]

    def sink(d) -> None:
        if isinstance(d, BaseException):
            raise d
        generated[0] += len(d.token_ids)
        if d.finish_reason is not None:
            done.append(1)

    sent = 0

    def send() -> None:
        nonlocal sent
        prompt = tuple([1] + [rng.randrange(3, vocab) for _ in range(PROMPT_LEN - 1)])
        engine.submit(f"{seed}-{sent}", GenerationRequest(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0)),
                      sink)
        sent += 1

    steps0 = engine.stats.steps
    t0 = time.perf_counter()
    for _ in range(min(concurrency, requests)):
        send()
    while len(done) < requests:
        finished = len(done)
        engine.step()
        for _ in range(len(done) - finished):
            if sent < requests:
                send()
    return generated[0], time.perf_counter() - t0, engine.stats.steps - steps0


def matmuls(threads: int, dtype: torch.dtype = torch.float32) -> None:
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    print(f"matmuls, {dtype}, {threads} threads: ms per call (GFLOPS), MKL F.linear / oneDNN packed (blocked) / "
          "oneDNN packed for one row (plain)")
    for out_f, in_f, what in ((1536, 1024, "q/k/v fused"), (1024, 1024, "attention o"), (5632, 1024, "w1/w3 fused"),
                              (1024, 2816, "w2"), (32000, 1024, "output")):
        ws = [torch.randn(out_f, in_f, dtype=dtype) for _ in range(max(2, 64 * 2**20 // (out_f * in_f * 4)))]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]  # more weights than the caches hold
        plain = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
        row = []
        for m in (1, 4, 16, 256):
            x = torch.randn(m, in_f, dtype=dtype)
            took = []
            for call in (lambda: [F.linear(x, w) for w in ws],
                         lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed],
                         lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in plain]):
                call()
                t0 = time.perf_counter()
                for _ in range(3):
                    call()
                took.append((time.perf_counter() - t0) / 3 / len(ws))
            row.append(f"{m} rows " + " / ".join(f"{1e3 * t:.2f} ({2 * m * out_f * in_f / t / 1e9:.0f})" for t in took))
        print(f"  {what:12s} ({out_f}x{in_f}): " + "; ".join(row))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=32, help="answered per concurrency (at least the concurrency)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=str(REPO / "bench" / ".peer"))
    p.add_argument("--matmuls", action="store_true", help="first, the linear shapes through MKL and oneDNN (two layouts)")
    p.add_argument("--split-threads", action="store_true", help="build on one thread, step on another")
    p.add_argument("--unfused", action="store_true", help="pack each linear layer's weight on its own")
    p.add_argument("--unpacked", action="store_true", help="no oneDNN packing: fairscale's F.linear (MKL), dense weights")
    p.add_argument("--ops", action="store_true", help="then each concurrency again under torch's profiler, op by "
                                                      "op (bench/op_profile.py; compare bench/peer_engine.py --ops)")
    a = p.parse_args(argv)
    import peer

    if a.matmuls:
        matmuls(a.threads)
    if a.unfused:
        import functools

        import llama.engine.runner as runner
        from llama.model.linear import pack_for_cpu

        runner.pack_for_cpu = functools.partial(pack_for_cpu, fuse=False)
    if a.unpacked:
        import llama.engine.runner as runner

        runner.pack_for_cpu = lambda model, fuse=True: 0
    ckpt = peer.ensure_checkpoint(Path(a.workdir) / "ckpt", Path(sys.executable))
    if a.split_threads:
        from concurrent.futures import ThreadPoolExecutor

        builder, stepper = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        engine = builder.submit(build, ckpt, a.threads).result()
        stepper.submit(profile, engine, a).result()
    else:
        profile(build(ckpt, a.threads), a)


def profile(engine, a: argparse.Namespace) -> None:
    import peer

    ckpt = Path(a.workdir) / "ckpt"
    vocab = engine.model.args.vocab_size
    closed_loop(engine, 2, 2, vocab, seed=99)  # warm-up
    print(f"{peer.MODEL} model {ckpt}, {a.threads} threads, torch {torch.__version__}; "
          f"{peer.PROMPT_LEN}-token prompts, {peer.MAX_TOKENS} greedy tokens"
          + ("; built on one thread, stepped on another" if a.split_threads else ""))
    for c in a.concurrency:
        n = max(a.requests, c)
        tokens, wall, steps = closed_loop(engine, c, n, vocab, seed=c)
        print(f"\nconcurrency {c}, {n} requests, unwrapped: {tokens / wall:.1f} output tok/s, "
              f"{1000 * wall / steps:.1f} ms per step ({steps} steps)")
        timers = Timers()
        instrument(engine, timers)
        try:
            tokens, wall, steps = closed_loop(engine, c, n, vocab, seed=1000 + c)
        finally:
            timers.restore()
        total = sum(timers.total.values())
        print(f"wrapped: {tokens / wall:.1f} output tok/s, {1000 * wall / steps:.1f} ms per step; "
              f"timed parts {total:.2f} s of {wall:.2f} s")
        for label, s in sorted(timers.total.items(), key=lambda kv: -kv[1]):
            print(f"  {label:34s} {100 * s / total:5.1f}%  {1000 * s / steps:7.2f} ms/step")
        if a.ops:
            import op_profile

            with op_profile.recording() as prof:
                tokens, wall, steps = closed_loop(engine, c, n, vocab, seed=2000 + c)
            print(f"op by op: {tokens / wall:.1f} output tok/s, {steps} steps\n{op_profile.table(prof, steps, wall)}")


if __name__ == "__main__":
    main()
