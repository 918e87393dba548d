"""Hugging Face-format checkpoints (llama/checkpoints/hf.py): our model on the loaded weights gives
transformers' own logits; two ranks' slices make the whole; config.json of transformers 4 and 5
map alike; each refusal names the file and the key."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llama.checkpoints.errors import CheckpointError
from llama.checkpoints.hf import (
    check_hf_tensors,
    hf_model_args,
    hf_weight_files,
    is_hf_checkpoint,
    load_hf_rank_state,
    read_hf_config,
)
from llama.checkpoints.layout import full_shapes, rank_dim
from llama.checkpoints.load import copy_into
from llama.engine.runner import forward_rows
from llama.model.args import ModelArgs
from llama.model.transformer import Transformer
from tests.hf_tiny import make_tiny_hf

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
PROMPT = [(7 * i + 3) % 128 for i in range(48)]  # longer than LLAMA3's original context of 32

# name -> (make_tiny_hf keywords, a file that format must have written)
CASES = {
    "gqa_sharded_safetensors": ({"max_shard_size": "100KB"}, "model.safetensors.index.json"),
    "mha_one_safetensors": ({"num_key_value_heads": 4}, "model.safetensors"),
    "tied": ({"tie_word_embeddings": True}, "model.safetensors"),
    "llama3_rope": ({"rope_scaling": LLAMA3}, "model.safetensors"),
    "pytorch_bin": ({"safe_serialization": False}, "pytorch_model.bin"),
    "pytorch_bin_sharded": ({"safe_serialization": False, "max_shard_size": "100KB"}, "pytorch_model.bin.index.json"),
}


def _make(tmp_path: Path, case: str) -> Path:
    kwargs, expected_file = CASES[case]
    ckpt = make_tiny_hf(tmp_path / case, seed=len(case), **kwargs)
    assert (ckpt / expected_file).is_file()
    return ckpt


def _rank_state(ckpt: Path, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    config = read_hf_config(ckpt / "config.json")
    return load_hf_rank_state(hf_weight_files(ckpt), config.args, rank, world_size, config.tie_word_embeddings)


def _ours(ckpt: Path, args: ModelArgs | None = None) -> torch.Tensor:
    """Our model's logits (len, vocab) for PROMPT, loaded at model parallel size 1."""
    model = Transformer(args or hf_model_args(ckpt / "config.json"), 64, device="cpu", dtype=torch.float32)
    copy_into(model, _rank_state(ckpt).items())
    with torch.no_grad():
        return forward_rows(model, [PROMPT])


def _theirs(ckpt: Path) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0]


@pytest.mark.parametrize("case", CASES)
def test_our_model_gives_transformers_logits(case, tmp_path, mp1):
    ckpt = _make(tmp_path, case)
    theirs = _theirs(ckpt)
    assert theirs.std() > 0.5  # far from uniform, so a wrong weight shows
    assert (_ours(ckpt) - theirs).abs().max() < 1e-4


def test_llama3_rope_scaling_is_read_and_matters(tmp_path, mp1):
    ckpt = _make(tmp_path, "llama3_rope")
    args = hf_model_args(ckpt / "config.json")
    assert (args.use_scaled_rope, args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
            args.rope_original_context) == (True, 8.0, 1.0, 4.0, 32)
    unscaled = dataclasses.replace(args, use_scaled_rope=False)
    assert (_ours(ckpt, unscaled) - _theirs(ckpt)).abs().max() > 1e-2


@pytest.mark.parametrize("case", ["gqa_sharded_safetensors", "tied", "pytorch_bin"])
def test_two_ranks_slices_make_the_whole(case, tmp_path):
    ckpt = _make(tmp_path, case)
    whole = _rank_state(ckpt)
    ranks = [_rank_state(ckpt, r, 2) for r in range(2)]
    assert list(whole) == list(full_shapes(hf_model_args(ckpt / "config.json")))
    for key, t in whole.items():
        d = rank_dim(key)
        assert all(r[key].is_contiguous() for r in ranks)
        joined = ranks[0][key] if d is None else torch.cat([r[key] for r in ranks], dim=d)
        assert torch.equal(joined, t), key
        if d is not None:
            assert ranks[0][key].shape[d] == t.shape[d] // 2


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_file_dtype_and_bytes_per_value(safe_serialization, tmp_path):
    ckpt = make_tiny_hf(tmp_path / "c", dtype=torch.bfloat16, safe_serialization=safe_serialization)
    config = read_hf_config(ckpt / "config.json")
    assert config.dtype == torch.bfloat16 and not config.tie_word_embeddings
    assert check_hf_tensors(hf_weight_files(ckpt), config.args, False) == 2
    assert _rank_state(ckpt)["layers.1.attention.wq.weight"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# config.json

_BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 128,
         "rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 256, "tie_word_embeddings": True}
_V4_LLAMA3 = {**_BASE, "torch_dtype": "bfloat16", "rope_theta": 500000.0,
              "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 32}}
_V5_LLAMA3 = {**_BASE, "dtype": "bfloat16", "rope_parameters": {"rope_theta": 500000.0, **LLAMA3}}
_V4_DEFAULT = {**_BASE, "torch_dtype": "bfloat16", "rope_theta": 500000.0, "rope_scaling": None}
_V5_DEFAULT = {**_BASE, "dtype": "bfloat16", "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def _edit_config(ckpt: Path, **changes) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    _write(ckpt, {**config, **changes})


@pytest.mark.parametrize("v4, v5, scaled", [(_V4_LLAMA3, _V5_LLAMA3, True), (_V4_DEFAULT, _V5_DEFAULT, False)])
def test_transformers_4_and_5_configs_map_alike(v4, v5, scaled, tmp_path):
    from_v4 = read_hf_config(_write(tmp_path, v4))
    # transformers 5 reading the 4.x config and writing it again: the third form of the same model
    resaved = LlamaConfig.from_dict(v4).to_dict()
    assert "rope_parameters" in resaved and "rope_scaling" not in resaved
    assert read_hf_config(_write(tmp_path, resaved)) == read_hf_config(_write(tmp_path, v5)) == from_v4
    want = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, norm_eps=1e-5,
                     rope_theta=500000.0, ffn_hidden_size=96, use_scaled_rope=scaled,
                     max_position_embeddings=v4["max_position_embeddings"],
                     **({"rope_original_context": 32} if scaled else {}))
    assert (from_v4.args, from_v4.tie_word_embeddings, from_v4.dtype) == (want, True, torch.bfloat16)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "mistral"}, r"config.json: model_type is 'mistral', expected 'llama'"),
    ({"architectures": ["MistralForCausalLM"]}, r"config.json: architectures is \['MistralForCausalLM'\]"),
    ({"attention_bias": True}, r"config.json: attention_bias is True, expected false"),
    ({"mlp_bias": True}, r"config.json: mlp_bias is True, expected false"),
    ({"hidden_act": "gelu"}, r"config.json: hidden_act is 'gelu', expected 'silu'"),
    ({"head_dim": 32}, r"config.json: head_dim is 32, expected .* = 16"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"config.json: rope_parameters has rope type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"config.json: rope_scaling has rope type 'linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     r"config.json: rope_parameters of rope type 'llama3' lacks \['low_freq_factor', 'high_freq_factor'\]"),
    ({"partial_rotary_factor": 0.5}, r"config.json: partial_rotary_factor is 0.5, expected 1.0"),
    ({"intermediate_size": None}, r"config.json lacks 'intermediate_size'"),
])
def test_config_refusals_name_the_file_and_key(change, match, tmp_path):
    with pytest.raises(CheckpointError, match=match):
        read_hf_config(_write(tmp_path, {**_V5_DEFAULT, **change}))


def test_a_missing_config_is_refused(tmp_path):
    assert not is_hf_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"config.json is missing"):
        read_hf_config(tmp_path / "config.json")


# ---------------------------------------------------------------------------------------------
# Weight files and tensors


@pytest.mark.parametrize("case, gone", [("gqa_sharded_safetensors", "model-00002-of-00004.safetensors"),
                                        ("pytorch_bin_sharded", "pytorch_model-00003-of-00004.bin")])
def test_a_shard_named_by_the_index_but_missing(case, gone, tmp_path):
    ckpt = _make(tmp_path, case)
    (ckpt / gone).unlink()
    with pytest.raises(CheckpointError, match=rf"index.json names 1 weight file\(s\) missing from .*\['{gone}'\]"):
        hf_weight_files(ckpt)


def test_a_directory_without_weights(tmp_path):
    ckpt = _make(tmp_path, "tied")
    (ckpt / "model.safetensors").unlink()
    assert is_hf_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"holds no Hugging Face weight files: expected one of \['model.safetensors'"):
        hf_weight_files(ckpt)


def test_extra_tensors_transformers_ignores_are_ignored(tmp_path):
    """A tied checkpoint that also saved lm_head.weight (transformers ties it to the embedding
    anyway) and rotary_emb.inv_freq buffers (older transformers saved them) loads as without."""
    ckpt = _make(tmp_path, "tied")
    want = _rank_state(ckpt)
    state = load_file(ckpt / "model.safetensors")
    state["lm_head.weight"] = torch.zeros_like(state["model.embed_tokens.weight"])
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, ckpt / "model.safetensors")
    got = _rank_state(ckpt)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("check", [True, False])  # the header-only check and the load itself
@pytest.mark.parametrize("case, change, match", [
    ("gqa_sharded_safetensors", {"intermediate_size": 128},
     r"model-0000\d-of-00004.safetensors: model.layers.0.mlp.gate_proj.weight \(layers.0.feed_forward.w1.weight\) "
     r"has shape \[96, 64\], expected \[128, 64\]"),
    ("pytorch_bin", {"num_hidden_layers": 1}, r"pytorch_model.bin has tensors a Llama model does not have, e.g. \['model.layers.1."),
    ("tied", {"tie_word_embeddings": False}, r"model.safetensors'\] lack 1 tensor.*\['lm_head.weight'\]. config.json says "
                                             r"tie_word_embeddings is false"),
])
def test_tensors_that_do_not_match_the_config(check, case, change, match, tmp_path):
    ckpt = _make(tmp_path, case)
    _edit_config(ckpt, **change)
    config = read_hf_config(ckpt / "config.json")
    with pytest.raises(CheckpointError, match=match):
        if check:
            check_hf_tensors(hf_weight_files(ckpt), config.args, config.tie_word_embeddings)
        else:
            _rank_state(ckpt)
