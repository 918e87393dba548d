"""Tiny Hugging Face-format Llama checkpoints, written by transformers itself, for tests.

Weights and config.json only (tokenizer files are another maker's business). Weights are seeded
and scaled so that attention and the logits are far from uniform: a loader that gets the rotary
permutation or a slice wrong changes the logits by much more than float32 noise.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM


def make_tiny_hf(
    out: Path,
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 96,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_shard_size: str | None = None,  # e.g. "100KB" to force several files and an index
    safe_serialization: bool = True,  # False: pytorch_model.bin files (transformers 5 writes only safetensors)
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a seeded LlamaForCausalLM with save_pretrained into `out`; return `out`."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, tie_word_embeddings=tie_word_embeddings, rope_theta=rope_theta,
        rope_scaling=rope_scaling, max_position_embeddings=256, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # transformers' own init (std 0.02) gives near-uniform attention and logits
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)  # (out, in): unit-size outputs
    model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if not safe_serialization:
        _to_pytorch_bin(out)
    return out


def _to_pytorch_bin(out: Path) -> None:
    """Rewrite save_pretrained's safetensors files as the pytorch_model*.bin files (and index)
    that transformers 4 wrote with safe_serialization=False, keeping the same split."""
    def bin_name(name: str) -> str:  # model-00001-of-00004.safetensors -> pytorch_model-00001-of-00004.bin
        return "pytorch_" + name.removesuffix(".safetensors") + ".bin"

    for path in sorted(out.glob("model*.safetensors")):
        torch.save(load_file(path), out / bin_name(path.name))
        path.unlink()
    index_path = out / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {k: bin_name(v) for k, v in index["weight_map"].items()}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
        index_path.unlink()
