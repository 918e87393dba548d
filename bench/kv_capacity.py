"""KV-cache capacity at equal memory: the paged engine (a pool of blocks) against the slot engine
it replaced (every sequence reserved max_seq_len positions), on the same model and workload.

    .venv/bin/python bench/kv_capacity.py [--requests 96 --rate 0 --slots 8 --slot-len 2048]

Both engines get the same KV memory: the slot engine (commit 579ee41, checked out as a git
worktree in --slot-tree) has --slots slots of --slot-len positions; the paged one has the same
positions as blocks (slots * slot-len / block-size of them), max_seq_len --slot-len and up to
--max-batch table rows. Each serves the same seeded requests (100-400 prompt tokens, 50-200
greedy output tokens; the tokenizer's end token is switched off, so every request runs to its
max_tokens), all arriving at once by default (--rate > 0: Poisson arrivals), stepped in its
own process, one after the other, so the two trees never load in one process.
The table gives, per engine: the most and the mean (time-weighted) sequences running at once,
generated tokens / wall seconds from the first arrival to the last token, the wall time, the
engine's steps and prompt tokens run (more than the prompts hold when preempted sequences
are recomputed), the KV cache's bytes that sequences can hold (equal, checked) and, for the
paged engine, the most blocks in use and its preemptions; then paged / slot for concurrency
and tok/s, and how many requests' greedy tokens differ from the slot engine's (paging should
change none). A third row holds the paged engine to the slot engine's --slots rows: what a
paged step costs at the same batch, apart from the gain in concurrency. The model has random
weights (make_tiny), so nothing about its text matters; the figures are the engines'.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SLOT_COMMIT = "579ee41"


def workload(n: int, rate: float, vocab: int, seed: int) -> list[dict]:
    """Seeded requests: arrival time (s), prompt tokens, max_tokens."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate) if rate > 0 else 0.0
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(100, 400) - 1)]
        out.append({"at": t, "prompt": prompt, "max_tokens": rng.randint(50, 200)})
    return out


# ---- one engine, in its own process ------------------------------------------------------------


def serve(kind: str, spec: dict) -> dict:
    """Serve spec's workload on this process's tree (PYTHONPATH) and measure it."""
    import llama
    from llama.checkpoints.load import inspect_checkpoint, load_into
    from llama.distributed import init_model_parallel, init_single_process_group
    from llama.engine.config import EngineConfig
    from llama.engine.core import Engine
    from llama.engine.request import GenerationRequest, SamplingParams
    from llama.model.transformer import Transformer
    from llama.tokenizers.load import load_tokenizer

    torch.set_num_threads(spec["threads"])
    init_single_process_group("gloo")
    init_model_parallel(1)
    info = inspect_checkpoint(spec["ckpt"])
    model = Transformer(info.args, spec["slot_len"])
    load_into(model, info, 0, 1)
    tok = load_tokenizer(info.tokenizer_path)
    tok.stop_ids = frozenset()  # no end token: every request runs to its max_tokens
    if kind == "slot":
        engine = Engine(model, tok, EngineConfig(max_batch_size=spec["slots"], max_seq_len=spec["slot_len"],
                                                 prefill_chunk=spec["prefill_chunk"]))
    else:
        cfg = EngineConfig(max_batch_size=spec["max_batch"], max_seq_len=spec["slot_len"],
                           prefill_chunk=spec["prefill_chunk"], block_size=spec["block_size"])
        engine = Engine(model, tok, cfg, num_blocks=spec["slots"] * spec["slot_len"] // spec["block_size"])
    cache = engine.runner.cache
    # Less the slot cache's scratch row, or the paged one's null block: what sequences can hold.
    kv_bytes = sum(t.nbytes for t in cache.k + cache.v) * (cache.k[0].shape[0] - 1) // cache.k[0].shape[0]

    tokens: dict[int, list[int]] = {}

    def sink(i: int):
        def put(d) -> None:
            if isinstance(d, BaseException):
                raise d
            tokens[i].extend(d.token_ids)
        return put

    def submit(i: int, prompt: list[int], max_tokens: int) -> None:
        tokens[i] = []
        engine.submit(str(i), GenerationRequest(tuple(prompt), SamplingParams(max_tokens=max_tokens, temperature=0)),
                      sink(i))

    submit(-1, [1, 5, 6, 7, 8], 4)  # warm up: first steps' lazy initialisations
    while engine.step():
        pass
    del tokens[-1]
    base = engine.load()

    reqs = spec["requests"]
    running, weighted, peak_blocks, nxt = 0, 0.0, 0, 0
    t0 = time.perf_counter()
    t_prev = t0
    while nxt < len(reqs) or engine.load()["running"] + engine.load()["waiting"]:
        now = time.perf_counter() - t0
        while nxt < len(reqs) and reqs[nxt]["at"] <= now:
            submit(nxt, reqs[nxt]["prompt"], reqs[nxt]["max_tokens"])
            nxt += 1
        if not engine.step():  # idle until the next arrival: nothing running, counted as 0
            time.sleep(max(0.0, reqs[nxt]["at"] - (time.perf_counter() - t0)))
            t_prev = time.perf_counter()
            continue
        load = engine.load()
        t = time.perf_counter()
        # A step's sequences, counted after it (finished ones have left): weight by its duration.
        n = load["running"]
        running = max(running, n)
        weighted += n * (t - t_prev)
        t_prev = t
        peak_blocks = max(peak_blocks, load.get("kv_blocks_used", 0))
    wall = time.perf_counter() - t0
    load = engine.load()
    return {"tree": os.path.dirname(os.path.dirname(llama.__file__)), "wall": wall, "peak": running,
            "mean": weighted / wall, "generated": sum(len(v) for v in tokens.values()), "kv_bytes": kv_bytes,
            "peak_blocks": peak_blocks, "kv_blocks": load.get("kv_blocks"), "preemptions": load.get("preemptions"),
            "steps": load["steps"] - base["steps"], "prefill": load["prefill_tokens"] - base["prefill_tokens"],
            "tokens": [tokens[i] for i in range(len(reqs))]}


def run_worker(kind: str, tree: str, spec_path: str) -> dict:
    """This file as a subprocess with `tree` first on its path."""
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, __file__, "--worker", kind, spec_path], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.splitlines()[-1])


def slot_tree(path: str) -> str:
    if not Path(path, "llama").is_dir():
        repo = Path(__file__).resolve().parent.parent
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", path, SLOT_COMMIT], check=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--rate", type=float, default=0.0, help="mean arrivals per second (Poisson); 0: all at once")
    p.add_argument("--slots", type=int, default=8, help="the slot engine's max_batch_size")
    p.add_argument("--slot-len", type=int, default=2048, help="max_seq_len of both engines")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=64, help="the paged engine's max_batch_size (table rows)")
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each engine's process")
    p.add_argument("--slot-tree", default="/tmp/slot-tree", help=f"a worktree of commit {SLOT_COMMIT} (made if absent)")
    p.add_argument("--profile", action="store_true", help="also print where the paged engine's time went (cProfile)")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, spec_path = a.worker
        spec = json.loads(Path(spec_path).read_text())
        if spec.get("profile") and kind == "paged":
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            result = prof.runcall(serve, kind, spec)
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
            print(out.getvalue(), file=sys.stderr)
        else:
            result = serve(kind, spec)
        print(json.dumps(result))
        return

    from llama.checkpoints.make_tiny import make_tiny
    from llama.tokenizers.load import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-kv-"))
    ckpt = make_tiny(tmp / "ckpt", dim=a.dim, n_layers=a.n_layers, n_heads=a.dim // 32, n_kv_heads=a.dim // 64,
                     vocab_size=512, multiple_of=64, seed=0)
    vocab = load_tokenizer(ckpt / "tokenizer.model").n_words
    reqs = workload(a.requests, a.rate, vocab, a.seed)
    spec = {"ckpt": str(ckpt), "requests": reqs, "slots": a.slots, "slot_len": a.slot_len, "block_size": a.block_size,
            "max_batch": a.max_batch, "prefill_chunk": a.prefill_chunk, "threads": a.threads, "profile": a.profile}
    (tmp / "spec.json").write_text(json.dumps(spec))
    arrival = "all at once" if a.rate <= 0 else f"at {a.rate}/s (Poisson)"
    print(f"model dim {a.dim}, {a.n_layers} layers, vocab {vocab}, random weights; {a.requests} requests {arrival}, "
          f"prompts 100-400 tokens, outputs 50-200 (greedy, no end token); prefill chunk {a.prefill_chunk}, "
          f"{a.threads} torch thread(s) per engine", flush=True)
    slot = run_worker("slot", slot_tree(a.slot_tree), str(tmp / "spec.json"))
    here = str(Path(__file__).resolve().parent.parent)
    paged = run_worker("paged", here, str(tmp / "spec.json"))
    # The paged engine held to the slot engine's rows: what paging costs a step at equal batch.
    (tmp / "rows.json").write_text(json.dumps({**spec, "max_batch": a.slots, "profile": False}))
    rows = run_worker("paged", here, str(tmp / "rows.json"))

    def tok_s(r: dict) -> float:
        return r["generated"] / r["wall"]

    print(f"KV memory: {a.slots} slots x {a.slot_len} positions against {paged['kv_blocks']} blocks x {a.block_size}")
    print("| engine | tree | peak running | mean running | tok/s | wall s | tokens | steps | prefill tokens | KV MiB "
          "| peak blocks used | preemptions |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in (("slot", slot), (f"paged, {a.max_batch} rows", paged), (f"paged, {a.slots} rows", rows)):
        blocks = "-" if name == "slot" else f"{r['peak_blocks']}/{r['kv_blocks']}"
        pre = "-" if name == "slot" else r["preemptions"]
        print(f"| {name} | {r['tree']} | {r['peak']} | {r['mean']:.1f} | {tok_s(r):.1f} | {r['wall']:.1f} | "
              f"{r['generated']} | {r['steps']} | {r['prefill']} | {r['kv_bytes'] / 2**20:.1f} | {blocks} | {pre} |")
    print(f"paged / slot: peak running x{paged['peak'] / slot['peak']:.2f}, mean running "
          f"x{paged['mean'] / slot['mean']:.2f}, tok/s x{tok_s(paged) / tok_s(slot):.2f}; "
          f"at {a.slots} rows each, tok/s x{tok_s(rows) / tok_s(slot):.2f}")
    print(f"KV bytes sequences can hold, paged / slot: {paged['kv_bytes'] / slot['kv_bytes']:.4f}")
    for name, r in ((f"paged, {a.max_batch} rows", paged), (f"paged, {a.slots} rows", rows)):
        diff = [i for i, (x, y) in enumerate(zip(slot["tokens"], r["tokens"])) if x != y]
        print(f"greedy tokens, slot against {name}: {len(reqs) - len(diff)}/{len(reqs)} requests identical"
              + (f"; differ: {diff[:10]}" if diff else ""))


if __name__ == "__main__":
    main()
