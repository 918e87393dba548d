"""Make a tiny Llama checkpoint in Meta's layout, for tests and the embedded default.

    python -m llama.checkpoints.make_tiny OUTDIR --shards 2 [--dim 64 --n-layers 2 --n-heads 4 --n-kv-heads 2]

Writes params.json, consolidated.NN.pth (each tensor cut the way Meta's reference of that
version cuts it: Llama 2's embedding by its width, Llama 3's by its vocabulary; bf16 as Meta
ships them) and a byte-fallback sentencepiece tokenizer.model with Meta's ids (unk 0, bos 1,
eos 2, pad -1), trained on a small built-in text; or, with `tokenizer_model`, a copy of that
file (Llama 3's tiktoken file makes a Llama 3-format checkpoint). Weights are random but seeded.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch

from llama.checkpoints.layout import full_shapes, meta_dim, shard_range
from llama.model.args import ModelArgs

# Enough varied text for a byte-fallback BPE of a few hundred pieces.
_TEXT = """\
The capital of France is Paris. Llamas live in the Andes and eat grass.
Ray serve runs replicas across a cluster of machines, and a placement group keeps them together.
Model parallelism splits each weight matrix across ranks; every rank holds one shard.
hello world. Hello, how are you today? I am fine, thank you.
The quick brown fox jumps over the lazy dog. 1 2 3 4 5 6 7 8 9 10.
Tokens stream back to the client one at a time, as server-sent events.
A small model answers quickly; a large model answers well. Les modèles de langue sont utiles.
Question: what is a placement group? Answer: a set of resource bundles reserved together.
"""


def train_tokenizer(out_path: Path, vocab_size: int, text: str = _TEXT) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines() * 4),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    out_path.write_bytes(buf.getvalue())


def random_state(args: ModelArgs, seed: int, qk_std: float = 0.02) -> dict[str, torch.Tensor]:
    """The whole model's weights, seeded: N(0, 0.02) matrices, norms near 1. A larger qk_std
    (wq, wk) sharpens attention, so that positions (rotary embedding) visibly matter."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in full_shapes(args).items():
        if len(shape) == 1:
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            std = 1.0 if key == "tok_embeddings.weight" else qk_std if key.endswith(("wq.weight", "wk.weight")) else 0.02
            state[key] = std * torch.randn(shape, generator=g)
    return state


def save_sharded(state: dict[str, torch.Tensor], args_params: dict, out_dir: Path, shards: int, version: int,
                 dtype: torch.dtype = torch.bfloat16) -> None:
    """Cut a whole state dict into `shards` files plus params.json, as Meta's Llama `version`
    (2 or 3) reference cuts them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(args_params))
    for r in range(shards):
        part = {}
        for key, t in state.items():
            d = meta_dim(key, version)
            if d is not None:
                start, end = shard_range(t.shape[d], r, shards)
                t = t.narrow(d, start, end - start)
            part[key] = t.to(dtype).clone()
        # Meta's files carry the rotary frequencies too; loaders must ignore them.
        hd = args_params["dim"] // args_params["n_heads"]
        theta = args_params.get("rope_theta", 10000.0)
        part["rope.freqs"] = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
        torch.save(part, out_dir / f"consolidated.{r:02d}.pth")


def make_tiny(
    out_dir: str | Path,
    shards: int = 1,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = 2,
    vocab_size: int = 320,
    multiple_of: int = 32,
    ffn_dim_multiplier: float | None = None,
    seed: int = 0,
    explicit_vocab: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_model: str | Path | None = None,
    extra_params: dict | None = None,
    qk_std: float = 0.02,
) -> Path:
    """`extra_params` go into params.json as they are (e.g. Llama 3.1's rope_theta 500000 and
    use_scaled_rope true)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_model is None:
        train_tokenizer(out / "tokenizer.model", vocab_size)
    else:
        (out / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    from llama.tokenizers.load import load_tokenizer

    tok = load_tokenizer(out / "tokenizer.model")
    n_words = tok.n_words
    version = 3 if tok.chat_format == "llama3" else 2  # Meta ships Llama 3 with its tiktoken file
    params: dict = {"dim": dim, "multiple_of": multiple_of, "n_heads": n_heads, "n_layers": n_layers,
                    "norm_eps": 1e-5, "vocab_size": n_words if explicit_vocab else -1, **(extra_params or {})}
    if n_kv_heads is not None:
        params["n_kv_heads"] = n_kv_heads
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    args = ModelArgs.from_params({**params, "vocab_size": n_words})
    args.validate_for(shards)
    save_sharded(random_state(args, seed, qk_std), params, out, shards, version, dtype)
    return out


def add_shape_args(p: argparse.ArgumentParser, **defaults: int) -> None:
    """--dim, --n-layers, --n-heads, --n-kv-heads, --vocab-size with the given defaults: the
    model-shape flags of every command that builds a model (this maker, the benchmarks)."""
    for name, default in defaults.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--shards", type=int, default=1, help="number of consolidated.NN.pth files (model-parallel ranks)")
    add_shape_args(p, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320)
    p.add_argument("--multiple-of", type=int, default=32)
    p.add_argument("--ffn-dim-multiplier", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = make_tiny(a.out_dir, a.shards, a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size,
                    a.multiple_of, a.ffn_dim_multiplier, a.seed)
    print(f"wrote a tiny Llama checkpoint with {a.shards} shard(s) to {out}")


if __name__ == "__main__":
    main()
