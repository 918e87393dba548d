"""The linear layers' CPU matmul (llama/model/linear.py): oneDNN over weights packed once (q, k,
v side by side, and the MLP's w1, w3) gives the dense layers' logits and greedy tokens, holds
each weight once, is batch-invariant, and still passes gradients to its input."""
from __future__ import annotations

import pytest
import torch

from llama.checkpoints.load import inspect_checkpoint, load_into
from llama.engine.runner import forward_rows
from llama.model.linear import ColumnParallelLinear, RowParallelLinear, can_pack, pack_for_cpu
from llama.model.transformer import Transformer

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32), reason="oneDNN unavailable")

ROWS = [[1, 5, 9, 30, 2, 77], [1, 7, 7, 7, 250, 3]]


def _load(path, dtype=torch.float32) -> Transformer:
    info = inspect_checkpoint(path)
    model = Transformer(info.args, 64, device="cpu", dtype=dtype)
    load_into(model, info, 0, 1)
    return model


def _linears(model):
    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def test_packed_layers_give_the_dense_layers_logits_and_tokens(tiny_ckpts, mp1):
    model = _load(tiny_ckpts["gqa2"])
    with torch.inference_mode():
        dense = forward_rows(model, ROWS)
    n = len(_linears(model))
    assert pack_for_cpu(model) == n == 7 * model.args.n_layers + 1
    with torch.inference_mode():
        packed = forward_rows(model, ROWS)
    assert torch.allclose(packed, dense, atol=1e-5, rtol=0)
    assert torch.equal(packed.argmax(-1), dense.argmax(-1))
    # each weight held once: the dense copies are gone (meta tensors of the same shape); q, k, v
    # and the MLP's w1, w3 in one packed weight each, side by side
    assert all(m.weight.is_meta for m in _linears(model))
    layer = model.layers[0]
    for owner in (layer.attention, layer.feed_forward):
        packed, sizes = owner.fused_columns
        assert sizes == [getattr(owner, n).weight.shape[0] for n in owner.COLUMNS]
        assert packed.shape == (sum(sizes), model.args.dim)
    assert model.output.packed.shape == model.output.weight.shape
    with pytest.raises(RuntimeError, match=r"columns\(owner, x\)"):  # a fused layer alone: loud, never garbage
        layer.attention.wq(torch.randn(1, model.args.dim))
    assert pack_for_cpu(model) == 0  # packing again is a no-op


def test_fused_columns_give_each_layers_own_output(tiny_ckpts, mp1):
    from llama.model.linear import columns

    attention = _load(tiny_ckpts["gqa2"]).layers[0].attention
    x = torch.randn(5, attention.wq.in_features, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        apart = columns(attention, x)
        pack_for_cpu(attention)
        together = columns(attention, x)
    assert [t.shape for t in together] == [a.shape for a in apart]
    assert all(torch.allclose(t, a, atol=1e-5, rtol=0) for t, a in zip(together, apart))
    x.requires_grad_(True)  # under autograd too
    assert all(torch.allclose(t, a, atol=1e-5, rtol=0) for t, a in zip(columns(attention, x), apart))


def test_a_packed_row_does_not_depend_on_the_rows_beside_it(tiny_ckpts, mp1):
    layer = _linears(_load(tiny_ckpts["gqa2"]))[0]
    pack_for_cpu(layer)
    x = torch.randn(64, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        alone = layer(x[:1])
        for m in (2, 7, 16, 64):
            assert torch.equal(layer(x[:m])[:1], alone), m


def test_gradients_reach_the_input_of_a_packed_layer(tiny_ckpts, mp1):
    layer = _linears(_load(tiny_ckpts["gqa2"]))[0]
    w = layer.weight.detach().clone()
    pack_for_cpu(layer)
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(3, -1), atol=1e-5)


def test_a_weight_shared_with_the_embedding_keeps_its_dense_copy(tiny_ckpts, mp1):
    model = _load(tiny_ckpts["gqa2"])
    model.output.weight = model.tok_embeddings.weight  # tied, as some Hugging Face folders are
    with torch.inference_mode():
        dense = forward_rows(model, ROWS)
    pack_for_cpu(model)
    assert not model.tok_embeddings.weight.is_meta and model.output.weight is model.tok_embeddings.weight
    with torch.inference_mode():
        assert torch.allclose(forward_rows(model, ROWS), dense, atol=1e-5, rtol=0)


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="no bfloat16 matmul in oneDNN here")
def test_bfloat16_layers_pack_too(tiny_ckpts, mp1):
    model = _load(tiny_ckpts["gqa2"], torch.bfloat16)
    with torch.inference_mode():
        dense = forward_rows(model, ROWS)
        assert pack_for_cpu(model) == len(_linears(model))
        packed = forward_rows(model, ROWS)
    assert (packed.argmax(-1) == dense.argmax(-1)).float().mean() > 0.9
    assert torch.allclose(packed, dense, atol=0.1, rtol=0)
