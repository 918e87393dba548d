"""Checkpoint validation (each error names the file and the fix) and resharding N -> M."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llama.checkpoints.errors import CheckpointError
from llama.checkpoints.load import inspect_checkpoint, load_rank_state
from tests.conftest import rank_slice


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_params_json(tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts["gqa1"], tmp_path / "c")
    (d / "params.json").unlink()
    with pytest.raises(CheckpointError, match=r"params.json is missing"):
        inspect_checkpoint(d)


def test_missing_tokenizer(tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts["gqa1"], tmp_path / "c")
    (d / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer .*tokenizer.model is missing.*tokenizer_path"):
        inspect_checkpoint(d)


def test_no_shards(tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts["gqa1"], tmp_path / "c")
    (d / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match=r"no consolidated.\*.pth files"):
        inspect_checkpoint(d)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nope")


def test_shapes_that_do_not_match_params(tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts["gqa2"], tmp_path / "c")
    params = json.loads((d / "params.json").read_text())
    params["n_layers"] = 2
    params["multiple_of"] = 64  # changes the FFN hidden size
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: .*feed_forward.w1.weight has shape .* expected"):
        inspect_checkpoint(d)


def test_vocab_that_does_not_match_tokenizer(tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts["gqa1"], tmp_path / "c")
    params = json.loads((d / "params.json").read_text())
    params["vocab_size"] = 32000
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"vocab_size 32000 but tokenizer .* has 320 pieces"):
        inspect_checkpoint(d)


def test_hugging_face_keys_are_named(tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts["gqa1"], tmp_path / "c")
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    sd["model.embed_tokens.weight"] = sd["tok_embeddings.weight"]
    torch.save(sd, d / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="Hugging Face"):
        inspect_checkpoint(d)


def test_missing_tensor(tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts["gqa1"], tmp_path / "c")
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    del sd["layers.1.attention.wk.weight"]
    torch.save(sd, d / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth lacks 1 tensors"):
        inspect_checkpoint(d)


def test_corrupt_shard(tiny_ckpts, tmp_path):
    d = _copy(tiny_ckpts["gqa1"], tmp_path / "c")
    (d / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read .*consolidated.00.pth"):
        inspect_checkpoint(d)


def test_split_the_heads_do_not_allow(tiny_ckpts):
    # 4 query heads, 2 KV heads: 4 ranks would need half a KV head each.
    with pytest.raises(CheckpointError, match=r"cannot be split into 4 model-parallel ranks.*n_kv_heads"):
        inspect_checkpoint(tiny_ckpts["gqa2"], model_parallel_size=4)


def test_rope_freqs_is_ignored(tiny_ckpts):
    state = load_rank_state(inspect_checkpoint(tiny_ckpts["gqa2"]), 0, 1)
    assert "rope.freqs" not in state


@pytest.mark.parametrize(
    "src,dst,m",
    [("gqa2", "gqa1", 1), ("gqa1", "gqa2", 2), ("mha1", "mha4", 4), ("mha4", "mha4", 2), ("mha4", "mha1", 1)],
)
def test_reshard_gives_the_native_slices(tiny_ckpts, src, dst, m):
    """Rank r of M cut from N files holds exactly what the native M-way cut of the same weights holds."""
    src_info = inspect_checkpoint(tiny_ckpts[src], model_parallel_size=m)
    native = {p.name: torch.load(p, weights_only=True) for p in inspect_checkpoint(tiny_ckpts[dst]).shard_paths}
    n_native = len(native)
    for r in range(m):
        got = load_rank_state(src_info, r, m)
        if n_native == m:
            want = native[f"consolidated.{r:02d}.pth"]
            for k, t in got.items():
                assert torch.equal(t, want[k]), (k, r)
        else:  # compare against the whole model when no native M-way files exist
            whole = load_rank_state(inspect_checkpoint(tiny_ckpts[dst]), 0, 1)
            for k, t in got.items():
                assert torch.equal(t, rank_slice(whole, k, r, m)), (k, r)


def test_rank_reads_only_its_slice_views(tiny_ckpts):
    """When one source shard covers a rank's slice, the tensor is a view of the mmapped file,
    not a copy of the whole tensor."""
    info = inspect_checkpoint(tiny_ckpts["mha4"], model_parallel_size=4)
    state = load_rank_state(info, 2, 4)
    wq = state["layers.0.attention.wq.weight"]
    assert wq.shape[0] == info.args.n_heads * info.args.head_dim // 4


def test_copy_into_takes_slices_one_at_a_time_and_checks_every_parameter_comes_once(tiny_ckpts, mp1):
    from llama.checkpoints.load import copy_into, missing_files
    from llama.model.transformer import Transformer

    info = inspect_checkpoint(tiny_ckpts["gqa1"])
    assert missing_files(info) == []
    model = Transformer(info.args, 32)
    items = list(load_rank_state(info, 0, 1).items())
    assert copy_into(model, iter(items)) == sum(t.numel() * t.element_size() for _, t in items)
    with pytest.raises(CheckpointError, match="lacks parameters"):
        copy_into(model, iter(items[1:]))
    with pytest.raises(CheckpointError, match="has already"):
        copy_into(model, iter(items + items[:1]))
    with pytest.raises(CheckpointError, match="does not fit"):
        copy_into(model, iter([(items[0][0], items[0][1][:1])]))


def test_the_tokenizer_travels_with_the_checkpoint_info(tiny_ckpts, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpts["gqa1"], copy)
    info = inspect_checkpoint(copy)
    (copy / "tokenizer.model").unlink()  # a machine without the file still has the tokenizer
    assert info.tokenizer().encode("hello", bos=True, eos=False)[0] == 1
