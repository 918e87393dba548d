"""The model at model parallel size 1: loading, the forward pass, resharded logits, the cache."""
from __future__ import annotations

import pytest
import torch

from llama.checkpoint import inspect_checkpoint, load_into
from llama.model import Transformer


def _load(path, mp1) -> Transformer:
    info = inspect_checkpoint(path, max_seq_len=64, max_batch_size=4)
    model = Transformer(info.args, device="cpu", dtype=torch.float32)
    load_into(model, info, 0, 1)
    return model


def test_model_args_from_params(tiny_ckpts):
    info = inspect_checkpoint(tiny_ckpts["gqa2"], max_seq_len=64, max_batch_size=4)
    a = info.args
    assert (a.dim, a.n_heads, a.n_kv_heads, a.vocab_size) == (64, 4, 2, 320)  # -1 resolved from tokenizer
    # int(2*4*64/3)=170, *1.3 -> 221, rounded up to a multiple of 32 -> 224
    assert a.ffn_hidden_dim == 224


def test_forward_shapes_and_dtype(tiny_ckpts, mp1):
    model = _load(tiny_ckpts["gqa1"], mp1)
    tokens = torch.tensor([[1, 5, 9, 30], [1, 7, 7, 7]])
    logits = model(tokens)
    assert logits.shape == (2, 4, 320) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_reshard_2_to_1_gives_native_logits(tiny_ckpts, mp1):
    tokens = torch.tensor([[1, 5, 9, 30, 44, 2, 100]])
    native = _load(tiny_ckpts["gqa1"], mp1)(tokens)
    resharded = _load(tiny_ckpts["gqa2"], mp1)(tokens)
    assert torch.allclose(native, resharded, atol=1e-5, rtol=0)


def test_cached_decode_matches_full_forward(tiny_ckpts, mp1):
    model = _load(tiny_ckpts["gqa1"], mp1)
    tokens = torch.tensor([[1, 5, 9, 30, 44, 2, 100, 17]])
    full = model(tokens)
    cache = model.new_cache(1)
    step = [model(tokens[:, :5], 0, cache)]
    for pos in range(5, 8):
        step.append(model(tokens[:, pos : pos + 1], pos, cache))
    assert torch.allclose(full, torch.cat(step, dim=1), atol=1e-5, rtol=0)


def test_start_pos_without_cache_is_an_error(tiny_ckpts, mp1):
    model = _load(tiny_ckpts["gqa1"], mp1)
    with pytest.raises(ValueError, match="needs a KV cache"):
        model(torch.tensor([[1, 2]]), start_pos=3)


def test_kv_cache_lives_on_the_model_device_and_dtype(tiny_ckpts, mp1):
    info = inspect_checkpoint(tiny_ckpts["gqa1"], max_seq_len=32, max_batch_size=2)
    model = Transformer(info.args, device="cpu", dtype=torch.bfloat16)
    cache = model.new_cache(2)
    assert cache.k[0].dtype == torch.bfloat16 and cache.k[0].device == model.device
    assert cache.k[0].shape == (2, 32, 2, 16)  # rows, positions, local KV heads, head_dim
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
