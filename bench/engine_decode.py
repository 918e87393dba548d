"""Decode speed through the engine against the memory-bandwidth limit and an eager loop with
the reference's algorithm, on one device, in one run.

    PYTHONPATH=. python bench/engine_decode.py --shape 7b          # on a GPU: bf16, about 3 minutes
    PYTHONPATH=. python bench/engine_decode.py --shape tiny --device cpu   # one thread, in CPU time

Imports only llama/ (no Ray). Builds a model of a named shape with random weights directly on
the device, measures the device's copy bandwidth, then for each batch size runs the same
random prompts (PROMPT_LEN tokens, --new-tokens greedy tokens each, no end token) two ways:
- engine: llama/engine/core.py's Engine, stepped in this thread (no other ranks): continuous
  batching, its packed forward and its sampling, as the server runs it;
- reference: Meta's generate loop (REFERENCE.md): a static batch, a (batch, positions) cache
  per layer, the whole prompt in one forward, then one forward per token over every row, with
  Meta's attention (repeat_kv, matmul, float32 softmax); eager, on the same weights.
Both must give the same greedy tokens (checked). The table, printed last, gives per batch size
the decode step (ms, steady state: every row decoding) and tokens/s, the share of the
bandwidth limit (weight bytes / copy bandwidth: a step reads every weight once), the same step
without overlap (each step read back before the next is planned: on the CPU the only mode),
time to first token at batch 1 for each --ttft-prompts length, and the start-up: building the
engine, of which capturing the decode's CUDA graphs (llama/engine/decode_step.py).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from llama.distributed import (
    choose_backend,
    init_model_parallel,
    init_single_process_group,
    resolve_device,
    resolve_dtype,
)
from llama.engine.config import EngineConfig
from llama.engine.core import Engine
from llama.engine.request import GenerationRequest, SamplingParams, StreamDelta
from llama.model.args import ModelArgs
from llama.model.linear import columns
from llama.model.transformer import Transformer, apply_rotary_emb
from llama.tokenizers.base import Tokenizer

PROMPT_LEN = 128
# Llama shapes: Llama 3.2 1B, Llama 2 7B and 13B, and 8 of Llama 2 70B's 80 layers (its layers
# as they are, so a step reads what one of 10 pipeline stages would).
SHAPES: dict[str, dict] = {
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64),
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
               ffn_dim_multiplier=1.5, rope_theta=500000.0),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, multiple_of=256),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, vocab_size=32000, multiple_of=256),
    "70b-slice": dict(dim=8192, n_layers=8, n_heads=64, n_kv_heads=8, vocab_size=32000, multiple_of=4096,
                      ffn_dim_multiplier=1.3),
}


class NumberTokenizer(Tokenizer):
    """Token i is the text " i": random weights generate any id, and the engine detokenizes
    every token it makes. No id ends a sequence, so each request runs to max_tokens."""

    kind = "bytelevel"

    def __init__(self, n_words: int) -> None:
        self.path = Path("<numbers>")
        self.n_words, self.bos_id, self.eos_id = n_words, 1, 2

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        return [int(w) for w in s.split() if w.isdigit()]

    def decode(self, t: list[int]) -> str:
        return "".join(f" {i}" for i in t)

    def token_bytes(self, token_id: int) -> bytes:
        return f" {token_id}".encode()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t0)


# ---- the engine ------------------------------------------------------------------------------

# The steps' clock: wall time on a GPU; on the CPU this process's CPU time (one thread), since
# wall time on a shared machine swings by 30% and more between runs.
clock = time.perf_counter


class EngineRun(NamedTuple):
    tokens: list[list[int]]  # each prompt's generated tokens
    steady: list[float]  # the duration of every steady-state step (all rows decoding)
    first_token_s: float  # from the first submit to the first row's first token


def new_engine(model: Transformer, max_batch_size: int, max_seq_len: int, prefill_chunk: int) -> tuple[Engine, float]:
    """An engine as a server builds one (its CUDA graphs captured), and the seconds that took."""
    t0 = time.perf_counter()
    # A pool of max_batch_size whole sequences, as the slot cache held: the same memory at every batch.
    blocks = max_batch_size * -(-max_seq_len // 16)
    engine = Engine(model, NumberTokenizer(model.args.vocab_size),
                    EngineConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len, prefill_chunk=prefill_chunk),
                    num_blocks=blocks)
    sync(model.device)
    return engine, time.perf_counter() - t0


def engine_run(engine: Engine, prompts: list[list[int]], new_tokens: int, overlap: bool | None = None) -> EngineRun:
    """The prompts through an idle engine, greedy, stepped on this thread. overlap: plan each
    step while the one before runs (None: the engine's own choice, on CUDA)."""
    if overlap is not None:
        engine.overlap = overlap  # between runs only: nothing is in flight while it is idle
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    first: list[float] = []

    def sink(i: int) -> Callable[[StreamDelta | BaseException], None]:
        def put(d: StreamDelta | BaseException) -> None:
            if isinstance(d, BaseException):
                raise d
            if d.token_ids and not first:
                first.append(clock())
            out[i] += d.token_ids
        return put

    t0 = clock()
    for i, p in enumerate(prompts):
        rid = f"{id(out)}-{i}"
        engine.submit(rid, GenerationRequest(tuple(p), SamplingParams(max_tokens=new_tokens, temperature=0)), sink(i))
    steady: list[float] = []
    while True:
        before = (engine.stats.decode_tokens, engine.stats.prefill_tokens)
        s0 = clock()
        if not engine.step():
            break
        step_s = clock() - s0
        if (engine.stats.decode_tokens - before[0], engine.stats.prefill_tokens - before[1]) == (len(prompts), 0):
            steady.append(step_s)
    return EngineRun([out[i] for i in range(len(prompts))], steady, first[0] - t0)


# ---- the reference's algorithm ---------------------------------------------------------------


class ReferenceLoop:
    """Meta's generate, greedy, on `model`'s weights: static (batch, positions) caches, the
    reference's attention, every position's logits, one host check of the end per step."""

    def __init__(self, model: Transformer, batch: int, max_seq_len: int) -> None:
        self.model = model
        a = model.layers[0].attention
        shape = (batch, max_seq_len, a.n_local_kv_heads, a.head_dim)
        self.cache_k = [torch.zeros(shape, device=model.device, dtype=model.dtype) for _ in model.layers]
        self.cache_v = [torch.zeros(shape, device=model.device, dtype=model.dtype) for _ in model.layers]

    def _attention(self, i: int, x: torch.Tensor, start: int, freqs: torch.Tensor, mask: torch.Tensor | None):
        a = self.model.layers[i].attention
        bsz, L, _ = x.shape
        xq, xk, xv = columns(a, x)  # the model's q, k, v projections (one matmul where packed together)
        xq = xq.view(bsz, L, a.n_local_heads, a.head_dim)
        xk = xk.view(bsz, L, a.n_local_kv_heads, a.head_dim)
        xv = xv.view(bsz, L, a.n_local_kv_heads, a.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs)
        self.cache_k[i][:bsz, start : start + L] = xk
        self.cache_v[i][:bsz, start : start + L] = xv
        keys = self.cache_k[i][:bsz, : start + L].repeat_interleave(a.n_rep, dim=2).transpose(1, 2)
        values = self.cache_v[i][:bsz, : start + L].repeat_interleave(a.n_rep, dim=2).transpose(1, 2)
        scores = torch.matmul(xq.transpose(1, 2), keys.transpose(2, 3)) / math.sqrt(a.head_dim)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        return a.wo(torch.matmul(scores, values).transpose(1, 2).contiguous().view(bsz, L, -1))

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        m = self.model
        L = tokens.shape[1]
        h = m.tok_embeddings(tokens)
        freqs = m.freqs_cis[start : start + L]
        mask = None
        if L > 1:
            mask = torch.full((L, L), float("-inf"), device=tokens.device).triu(1)
            mask = torch.hstack([torch.zeros((L, start), device=tokens.device), mask]).type_as(h)
        for i, layer in enumerate(m.layers):
            h = h + self._attention(i, layer.attention_norm(h), start, freqs, mask)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return m.output(m.norm(h)).float()

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[float], float]:
        """Equal-length prompts: each one's tokens, each decode step's duration, time to first token."""
        device = self.model.device
        plen = len(prompts[0])
        tokens = torch.tensor(prompts, device=device)
        out, steps = [], []
        t0 = clock()
        prev = 0
        first_s = 0.0
        for cur in range(plen, plen + new_tokens):
            s0 = clock()
            logits = self.forward(tokens[:, prev:cur] if prev else tokens, prev)
            nxt = torch.argmax(logits[:, -1], dim=-1)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done = bool((nxt == -1).all())  # the reference's end-of-sequence check: a host sync per step
            if prev:
                steps.append(clock() - s0)
            else:
                first_s = clock() - t0
            prev = cur
            if done:
                break
        out = tokens[:, plen:].tolist()
        return out, steps, first_s


# ---- the run ---------------------------------------------------------------------------------


def build(shape: str, device: torch.device, dtype: torch.dtype, max_seq_len: int) -> Transformer:
    args = ModelArgs(**SHAPES[shape])
    model = Transformer(args, max_seq_len, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.02, generator=g)
        for layer in model.layers:  # norms at 1, as trained ones are about
            layer.attention_norm.weight.fill_(1)
            layer.ffn_norm.weight.fill_(1)
        model.norm.weight.fill_(1)
    return model


def run(a: argparse.Namespace) -> list[str]:
    global clock
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    if device.type == "cpu":
        clock = time.process_time
    if not torch.distributed.is_initialized():
        init_single_process_group(choose_backend(device))
        init_model_parallel(1)
    max_seq_len = max(PROMPT_LEN + a.new_tokens, *(p + 1 for p in a.ttft_prompts))
    t0 = time.perf_counter()
    model = build(a.shape, device, dtype, max_seq_len)
    sync(device)
    build_s = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(device, min(1 << 30, 4 * weight_bytes))
    limit_s = weight_bytes / (bw / 2)  # a step reads each weight once: half a copy's traffic
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{card}, {dtype}, shape {a.shape}: {weight_bytes / 1e9:.3f} GB of weights (built in {build_s:.1f} s), copy "
          f"bandwidth {bw / 1e12:.3f} TB/s (read+write): the bandwidth limit is {limit_s * 1e3:.3f} ms per step",
          flush=True)

    g = torch.Generator().manual_seed(1)

    def prompts(n: int, length: int) -> list[list[int]]:
        return torch.randint(3, model.args.vocab_size, (n, length), generator=g).tolist()

    # Start-up: the engine a server would build for the batch runs, its graphs captured.
    engine, startup_s = new_engine(model, max(a.batches), PROMPT_LEN + a.new_tokens, max(a.batches) * PROMPT_LEN)
    graphs, capture_s = len(engine.runner.decode._captured), engine.capture_s
    overlapping = engine.overlap
    engine_run(engine, prompts(1, 8), 2)  # first steps: lazy initialisations outside the graphs
    rows = []
    for bsz in a.batches:
        ps = prompts(bsz, PROMPT_LEN)
        e = engine_run(engine, ps, a.new_tokens, overlap=overlapping)
        plain = engine_run(engine, ps, a.new_tokens, overlap=False) if overlapping else e
        ref = ReferenceLoop(model, bsz, PROMPT_LEN + a.new_tokens)
        r_tokens, r_steps, _ = ref.generate(ps, a.new_tokens)
        del ref
        same = sum(x == y == z for x, y, z in zip(e.tokens, plain.tokens, r_tokens))
        rows.append((bsz, statistics.median(e.steady), statistics.median(plain.steady), statistics.median(r_steps), same))
        print(f"batch {bsz}: engine {rows[-1][1] * 1e3:.2f} ms/step ({rows[-1][2] * 1e3:.2f} without overlap), "
              f"reference {rows[-1][3] * 1e3:.2f} ms/step; {same} of {bsz} rows' greedy tokens equal", flush=True)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ttft = []
    longest = max(a.ttft_prompts)
    engine, ttft_startup_s = new_engine(model, 1, longest + 1, longest)
    for plen in a.ttft_prompts:
        p = prompts(1, plen)
        engine_run(engine, p, 1)  # warm for this length
        e = engine_run(engine, p, 1).first_token_s
        r = ReferenceLoop(model, 1, plen + 1).generate(p, 1)[2]
        ttft.append((plen, e, r))
    ttft_graphs = len(engine.runner.decode._captured)
    del engine

    timed = "wall time" if device.type == "cuda" else "CPU time of one thread"
    table = [f"decode through the engine vs an eager loop with the reference's algorithm; {card}, {dtype}, shape "
             f"{a.shape}, prompt {PROMPT_LEN}, {a.new_tokens} new tokens, greedy, {timed}; bandwidth limit "
             f"{limit_s * 1e3:.3f} ms/step ({weight_bytes / 1e9:.2f} GB at {bw / 2e12:.2f} TB/s read)",
             "| batch | engine ms/step | engine tok/s | engine % of limit | without overlap ms/step "
             "| reference ms/step | reference tok/s | reference % of limit | engine speed-up | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for bsz, e, plain, r, same in rows:
        table.append(f"| {bsz} | {e * 1e3:.2f} | {bsz / e:,.1f} | {100 * limit_s / e:.1f}% | {plain * 1e3:.2f} | "
                     f"{r * 1e3:.2f} | {bsz / r:,.1f} | {100 * limit_s / r:.1f}% | {r / e:.2f}x | {same}/{bsz} |")
    for plen, e, r in ttft:
        table.append(f"time to first token, batch 1, {plen}-token prompt: engine {e * 1e3:.1f} ms, reference "
                     f"{r * 1e3:.1f} ms")
    table.append(f"start-up: the batch runs' engine (max_batch_size {max(a.batches)}, max_seq_len "
                 f"{PROMPT_LEN + a.new_tokens}) built in {startup_s:.2f} s, of which {capture_s:.2f} s capturing "
                 f"{graphs} decode graphs; the first-token runs' (1, {longest + 1}) in {ttft_startup_s:.2f} s, "
                 f"{ttft_graphs} graphs (none on the CPU, where the same code runs eagerly); overlap "
                 f"{'on' if overlapping else 'off (the CPU default)'}")
    return table


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 64])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--ttft-prompts", type=int, nargs="+", default=[128, 2048])
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    if resolve_device(a.device).type == "cpu":
        torch.set_num_threads(1)  # CPU time of one thread: comparable between the two loops and across runs
    print("\n".join(run(a)))


if __name__ == "__main__":
    main()
