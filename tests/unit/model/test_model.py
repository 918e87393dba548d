"""The model at model parallel size 1: loading, the one forward over packed segments, resharded
logits, and incremental decoding through the cache equal to one whole forward."""
from __future__ import annotations

import pytest
import torch

from llama.checkpoints.load import inspect_checkpoint, load_into
from llama.engine.runner import forward_rows, pack
from llama.engine.step_plan import LOGITS_LAST, Segment, StepPlan
from llama.model.transformer import Transformer

MAX_SEQ_LEN = 64


def _load(path, mp1) -> Transformer:
    info = inspect_checkpoint(path)
    model = Transformer(info.args, MAX_SEQ_LEN, device="cpu", dtype=torch.float32)
    load_into(model, info, 0, 1)
    return model


def _whole(model: Transformer, rows: list[list[int]]) -> torch.Tensor:
    """Logits (rows, len, vocab) of equal-length rows, each a whole prompt in a fresh cache."""
    logits = forward_rows(model, rows)
    return logits.view(len(rows), len(rows[0]), -1)


def test_model_args_from_params(tiny_ckpts):
    a = inspect_checkpoint(tiny_ckpts["gqa2"]).args
    assert (a.dim, a.n_heads, a.n_kv_heads, a.vocab_size) == (64, 4, 2, 320)  # -1 resolved from tokenizer
    # int(2*4*64/3)=170, *1.3 -> 221, rounded up to a multiple of 32 -> 224
    assert a.ffn_hidden_dim == 224


def test_forward_shapes_and_dtype(tiny_ckpts, mp1):
    logits = _whole(_load(tiny_ckpts["gqa1"], mp1), [[1, 5, 9, 30], [1, 7, 7, 7]])
    assert logits.shape == (2, 4, 320) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_rows_do_not_see_each_other(tiny_ckpts, mp1):
    model = _load(tiny_ckpts["gqa1"], mp1)
    together = _whole(model, [[1, 5, 9, 30], [1, 7, 7, 7]])
    alone = _whole(model, [[1, 7, 7, 7]])
    assert torch.allclose(together[1], alone[0], atol=1e-5, rtol=0)


def test_reshard_2_to_1_gives_native_logits(tiny_ckpts, mp1):
    rows = [[1, 5, 9, 30, 44, 2, 100]]
    native = _whole(_load(tiny_ckpts["gqa1"], mp1), rows)
    resharded = _whole(_load(tiny_ckpts["gqa2"], mp1), rows)
    assert torch.allclose(native, resharded, atol=1e-5, rtol=0)


def test_chunked_prefill_and_cached_decode_match_one_whole_forward(tiny_ckpts, mp1):
    model = _load(tiny_ckpts["gqa1"], mp1)
    tokens = [1, 5, 9, 30, 44, 2, 100, 17]
    full = _whole(model, [tokens])[0]  # (8, vocab)
    cache = model.new_cache(3, MAX_SEQ_LEN, num_blocks=6, block_size=2)  # in table row 2, not row 0
    cache.assign(2, 0, [5, 1, 6, 3])  # blocks anywhere in the pool, in any order
    steps = [(0, 3), (3, 2), (5, 1), (6, 1), (7, 1)]  # two prefill chunks, then three decodes
    got = []
    for start, n in steps:
        plan = StepPlan((Segment(2, start, n, LOGITS_LAST),), tuple(tokens[start : start + n]))
        got.append(model(pack(plan, cache, model.device), cache)[0])
    want = full[[s + n - 1 for s, n in steps]]
    assert torch.allclose(torch.stack(got), want, atol=1e-5, rtol=0)


def test_a_cache_longer_than_the_model_was_built_for_is_refused(tiny_ckpts, mp1):
    model = _load(tiny_ckpts["gqa1"], mp1)
    with pytest.raises(ValueError, match="larger max_seq_len"):
        model.new_cache(1, MAX_SEQ_LEN + 1)


def test_kv_cache_lives_on_the_model_device_and_dtype(tiny_ckpts, mp1):
    info = inspect_checkpoint(tiny_ckpts["gqa1"])
    model = Transformer(info.args, 32, device="cpu", dtype=torch.bfloat16)
    cache = model.new_cache(2, 32)
    assert cache.k[0].dtype == torch.bfloat16 and cache.k[0].device == model.device
    # 2 rows of 32 positions in blocks of 16, and the null block; positions, local KV heads, head_dim
    assert cache.k[0].shape == (5, 16, 2, 16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
