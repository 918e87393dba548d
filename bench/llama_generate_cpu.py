"""CPU time per generated token of `Llama.generate` (the reference API), for one or more trees,
and of Meta's algorithm on the same checkpoint.

    python bench/llama_generate_cpu.py [--trees . /tmp/old] [--rounds 2] [--reference]

Compares the reference API across versions of this project: give it a worktree of an older
commit (`git worktree add /tmp/old <commit>`) beside this one. With --reference, each round
also times Meta's generate loop (bench/engine_decode.py's ReferenceLoop: a static batch, the
whole prompt in one forward, one forward per token over every row, repeat_kv + matmul + float32
softmax, eager) on the first tree's model, and checks it gives Llama.generate's greedy tokens.
Each side is measured in a subprocess of its own (its `llama` package first on sys.path),
rounds interleaved, one torch thread, process CPU time (wall clock on a shared machine swings
too much), greedy, the best of 3 calls per round, prefill included. Model: random weights, dim
512, 8 layers, 8 heads over 4 KV heads, vocab 512; prompts of 31 tokens, 64 new tokens.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# argv: the tree, the checkpoint, and "engine" (Llama.generate) or "reference" (Meta's loop on
# the same model, from the tree's bench/engine_decode.py).
_CHILD = r"""
import importlib.util, json, random, sys, time
tree, ckpt, side = sys.argv[1:4]
sys.path.insert(0, tree)
import torch
torch.set_num_threads(1)
from llama import Llama
g = Llama.build(ckpt, ckpt + "/tokenizer.model", max_seq_len=256, max_batch_size=8, model_parallel_size=1)
if side == "reference":
    spec = importlib.util.spec_from_file_location("engine_decode", tree + "/bench/engine_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    eos = g.tokenizer.eos_id

    def generate(prompts, n):  # -> the tokens, and how many the loop made (it runs every row to n)
        tokens = bench.ReferenceLoop(g.model, len(prompts), 256).generate(prompts, n)[0]
        return [t[: t.index(eos)] if eos in t else t for t in tokens], len(prompts) * n  # cut as the reference cuts
else:
    def generate(prompts, n):
        tokens = g.generate(prompts, n, temperature=0)[0]
        return tokens, sum(len(t) for t in tokens)
rng = random.Random(0)
out = {}
for bsz in (1, 8):
    prompts = [[1] + [rng.randrange(3, 500) for _ in range(30)] for _ in range(bsz)]
    generate(prompts, 8)  # warm-up
    per_token = []
    for _ in range(3):
        t0 = time.process_time()
        tokens, made = generate(prompts, 64)
        per_token.append((time.process_time() - t0) / made)
    out[bsz] = min(per_token) * 1e3
    out[f"tokens{bsz}"] = tokens
print(json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", nargs="+", default=["."])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reference", action="store_true", help="also time Meta's algorithm on the same checkpoint")
    a = p.parse_args()
    trees = [str(Path(t).resolve()) for t in a.trees]
    ckpt = tempfile.mkdtemp(prefix="bench-generate-")
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {trees[0]!r}); import torch; "
                    f"from llama.checkpoints.make_tiny import make_tiny; make_tiny({ckpt!r}, dim=512, n_layers=8, n_heads=8, "
                    f"n_kv_heads=4, vocab_size=512, multiple_of=64, dtype=torch.float32)"], check=True)
    sides = [(t, t, "engine") for t in trees]
    if a.reference:
        sides.append(("Meta's algorithm", trees[0], "reference"))
    results: dict[str, list[dict]] = {name: [] for name, _, _ in sides}
    for _ in range(a.rounds):
        for name, tree, side in sides:
            r = subprocess.run([sys.executable, "-c", _CHILD, tree, ckpt, side], check=True, capture_output=True,
                               text=True)
            results[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
    print("ms of CPU time per generated token, best of 3 calls per round:")
    for name, rounds in results.items():
        cells = "   ".join(f"batch {b}: " + " / ".join(f"{r[b]:.2f}" for r in rounds) for b in ("1", "8"))
        print(f"  {name}: {cells}")
    first = results[trees[0]][0]
    for name, rounds in results.items():
        same = all(r[f"tokens{b}"] == first[f"tokens{b}"] for r in rounds for b in ("1", "8"))
        print(f"  {name}: {'the same' if same else 'DIFFERENT'} greedy tokens as {trees[0]}")


if __name__ == "__main__":
    main()
