"""Reading Hugging Face-format Llama checkpoints: config.json to ModelArgs, and one rank's slices.

Weights come from model*.safetensors or pytorch_model*.bin (one file, or shards with an index),
renamed to Meta's keys and cut the way llama/checkpoints/layout.py says; q_proj and k_proj rows are put back
in Meta's interleaved rotary order. Files are memory-mapped: a rank reads only its own slices.
"""
from __future__ import annotations

import json
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from llama.checkpoints.errors import CheckpointError
from llama.checkpoints.info import CheckpointInfo, check_split, find_tokenizer, fit_tokenizer
from llama.checkpoints.layout import full_shapes, rank_dim, shard_range
from llama.model.args import ModelArgs


def inspect_hf(ckpt_dir: Path, tokenizer_path: str | Path | None, model_parallel_size: int) -> CheckpointInfo:
    """Validate a Hugging Face folder (config.json, weight files, tokenizer.json or tokenizer.model)."""
    config = read_hf_config(ckpt_dir / "config.json")
    args = config.args
    tok_path = find_tokenizer(ckpt_dir, tokenizer_path, ("tokenizer.json", "tokenizer.model"))
    tokenizer_files = fit_tokenizer(args, tok_path, ckpt_dir / "config.json", padded_vocab=True)
    check_split(args, ckpt_dir, model_parallel_size)
    weight_files = hf_weight_files(ckpt_dir)
    itemsize = check_hf_tensors(weight_files, args, config.tie_word_embeddings)
    return CheckpointInfo(ckpt_dir=ckpt_dir, tokenizer_path=tok_path, shard_paths=tuple(sorted(set(weight_files.values()))),
                          args=args, tokenizer_files=tokenizer_files, itemsize=itemsize, layout="hf",
                          tied=config.tie_word_embeddings, weight_map={k: p.name for k, p in weight_files.items()})


# ---------------------------------------------------------------------------------------------
# config.json


@dataclass(frozen=True)
class HFConfig:
    args: ModelArgs
    # lm_head shares the embedding's tensor; the files then hold no lm_head.weight.
    tie_word_embeddings: bool
    dtype: torch.dtype | None  # what config.json says the files hold ("dtype", or 4.x's "torch_dtype")


_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def is_hf_checkpoint(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / "config.json").is_file()


def hf_model_args(config_path: Path) -> ModelArgs:
    return read_hf_config(config_path).args


def read_hf_config(config_path: Path) -> HFConfig:
    """Map a Hugging Face Llama config.json (written by transformers 4.x or 5.x) to ModelArgs;
    raise CheckpointError for anything our model would compute differently."""
    config_path = Path(config_path)
    config = _read_json(config_path)

    def refuse(key: str, expected: str) -> CheckpointError:
        return CheckpointError(
            f"{config_path}: {key} is {config.get(key)!r}, expected {expected}. This server runs Meta's Llama "
            f"architecture only, so it cannot serve this model: use a Llama checkpoint."
        )

    def required(key: str) -> int:
        if config.get(key) is None:
            raise CheckpointError(f"{config_path} lacks {key!r}, which every Llama config.json has: is this the "
                                  f"config.json of a Hugging Face Llama checkpoint? Download it again.")
        return config[key]

    if config.get("model_type") != "llama":
        raise refuse("model_type", "'llama'")
    if (config.get("architectures") or ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        raise refuse("architectures", "['LlamaForCausalLM']")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key, False):
            raise refuse(key, "false (Llama's projections have no bias)")
    if config.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "'silu'")
    dim, n_heads = required("hidden_size"), required("num_attention_heads")
    if config.get("head_dim") not in (None, dim // n_heads):
        raise refuse("head_dim", f"hidden_size // num_attention_heads = {dim // n_heads}")
    args = ModelArgs(
        dim=dim,
        n_layers=required("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=required("vocab_size"),
        norm_eps=config.get("rms_norm_eps", 1e-6),  # transformers' default, not Meta's 1e-5
        ffn_hidden_size=required("intermediate_size"),
        max_position_embeddings=config.get("max_position_embeddings"),
        **_rope_args(config, config_path),
    )
    dtype_name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    return HFConfig(args=args, tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                    dtype=dtype if isinstance(dtype, torch.dtype) else None)


def _rope_args(config: dict, config_path: Path) -> dict:
    """ModelArgs' rope fields. transformers 4.x writes rope_theta beside rope_scaling (None or a
    dict with "rope_type", or older "type"); 5.x writes one rope_parameters dict holding rope_theta
    too. Where both appear, rope_scaling wins, as in transformers 5's own reading."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    out: dict = {"rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"{config_path}: partial_rotary_factor is {partial!r}, expected 1.0: our rotary "
                              f"embedding turns every dimension of a head, as Llama's does. Use a Llama checkpoint.")
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        raise CheckpointError(
            f"{config_path}: {rope_key} has rope type {rope_type!r}; this server implements only 'default' and "
            f"'llama3' (Llama 3.1's) rotary scaling. Use a checkpoint with one of those."
        )
    rope = {"original_max_position_embeddings": config.get("max_position_embeddings"), **rope}
    missing = [k for k in _LLAMA3_ROPE_KEYS if rope.get(k) is None]
    if missing:
        raise CheckpointError(f"{config_path}: {rope_key} of rope type 'llama3' lacks {missing}; Llama 3.1's "
                              f"config.json gives all of {list(_LLAMA3_ROPE_KEYS)}. Download it again.")
    return {**out, "use_scaled_rope": True, "rope_scaling_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_context": int(rope["original_max_position_embeddings"])}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a Hugging Face checkpoint directory holds config.json beside "
                              f"its weight files. Download it again.") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): download it again.") from None


# ---------------------------------------------------------------------------------------------
# Weight files

# In transformers' order of preference: one file, else shards listed by an index.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")


def hf_weight_files(ckpt_dir: Path) -> dict[str, Path]:
    """Every tensor's name in the checkpoint -> the file holding it. Reads only the index or the
    files' headers; raises CheckpointError when a file is missing."""
    ckpt_dir = Path(ckpt_dir)
    for name in _WEIGHT_FILES:
        path = ckpt_dir / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return dict.fromkeys(_WeightFile(path).names(), path)
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path} has no \"weight_map\" of tensor name -> file name: download it again.")
        files = {key: ckpt_dir / file for key, file in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{path} names {len(missing)} weight file(s) missing from {ckpt_dir}: {missing[:4]}. "
                                  f"The download is incomplete: fetch those files into {ckpt_dir}.")
        return files
    raise CheckpointError(f"{ckpt_dir} holds no Hugging Face weight files: expected one of {list(_WEIGHT_FILES)} "
                          f"(an index with the shards it names). Download the weights into it.")


class _WeightFile:
    """One weight file opened for slicing: safetensors through safe_open, .bin through
    torch.load(mmap=True). Both map the file; no tensor's bytes are read until sliced."""

    def __init__(self, path: Path):
        self.path = path
        try:
            if path.suffix == ".safetensors":
                self._st, self._sd = safe_open(str(path), framework="pt"), None
            else:
                self._st, self._sd = None, torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}): download it again.") from None

    def names(self) -> list[str]:
        return list(self._sd) if self._sd is not None else list(self._st.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._sd[name].shape) if self._sd is not None else tuple(self._st.get_slice(name).get_shape())

    def whole(self, name: str) -> torch.Tensor:
        return self._sd[name] if self._sd is not None else self._st.get_slice(name)[:]

    def narrow(self, name: str, dim: int, start: int, end: int) -> torch.Tensor:
        """[start, end) of tensor `name` along `dim`; only those bytes are read."""
        if self._sd is not None:
            return self._sd[name].narrow(dim, start, end - start)
        return self._st.get_slice(name)[(slice(None),) * dim + (slice(start, end),)]


# ---------------------------------------------------------------------------------------------
# Names and slices

_LAYER_NAMES = {  # Meta's module under layers.{i} -> Hugging Face's under model.layers.{i}
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_ROTARY = ("attention.wq.weight", "attention.wk.weight")  # rows permuted for rotate_half
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older transformers saved; not parameters


def check_hf_tensors(weight_files: dict[str, Path], args: ModelArgs, tied: bool) -> int:
    """Check that the files hold exactly the model's tensors, each of the shape config.json
    implies (headers only); return the files' bytes per value."""
    itemsize = 0
    for key, f, name, _ in _checked_sources(weight_files, args, tied):
        if key == "tok_embeddings.weight":
            itemsize = f.narrow(name, 0, 0, 1).element_size()
    return itemsize


def load_hf_rank_state(weight_files: dict[str, Path], args: ModelArgs, rank: int, world_size: int,
                       tied: bool, keys: Container[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors rank `rank` of `world_size` needs (of `keys` only, where given: a pipeline
    stage's), under Meta's names, each cut to the rank's slice (args must be valid for
    world_size: ModelArgs.validate_for). Reads only those slices."""
    out: dict[str, torch.Tensor] = {}
    for key, f, name, full in _checked_sources(weight_files, args, tied):
        if keys is not None and key not in keys:
            continue
        d = rank_dim(key)
        t = f.whole(name) if d is None else f.narrow(name, d, *shard_range(full[d], rank, world_size))
        if key.endswith(_ROTARY):  # the rank's rows are whole heads: undo the permutation per head
            t = _unpermute_rotary(t, args.head_dim)
        out[key] = t.contiguous()
    return out


def _unpermute_rotary(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Undo transformers' convert_llama_weights_to_hf permute of q_proj/k_proj rows (whole heads).
    Hugging Face's rotate_half turns dims (j, j + hd/2) of a head together, Meta's (2j, 2j+1): HF
    row c*hd/2 + j of a head is Meta's row 2j + c."""
    rows, cols = w.shape
    # (heads, 2, hd/2, cols) -> (heads, hd/2, 2, cols)
    return w.view(rows // head_dim, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_name(key: str, tied: bool) -> str:
    """Hugging Face's name for Meta's parameter `key`; tied, the output layer is the embedding."""
    if tied and key == "output.weight":
        key = "tok_embeddings.weight"
    module = key.removesuffix(".weight")
    if module.startswith("layers."):
        _, i, rest = module.split(".", 2)
        return f"model.layers.{i}.{_LAYER_NAMES[rest]}.weight"
    return _TOP_NAMES[module] + ".weight"


def _checked_sources(weight_files: dict[str, Path], args: ModelArgs,
                     tied: bool) -> Iterator[tuple[str, _WeightFile, str, tuple[int, ...]]]:
    """(Meta's key, the open file, Hugging Face's name, the whole shape) for every parameter, in
    full_shapes order, each file opened once. Raises CheckpointError when the files lack a tensor,
    hold one a Llama model does not have, or one's shape is not what config.json implies."""
    shapes = full_shapes(args)
    names = {key: _hf_name(key, tied) for key in shapes}
    missing = sorted(set(names.values()) - set(weight_files))
    if missing:
        where = sorted({str(p) for p in weight_files.values()})
        hint = ("config.json says tie_word_embeddings is false: if the output layer shares the embedding, it "
                "should say true; else" if missing == ["lm_head.weight"] else "Either")
        raise CheckpointError(f"the weight files {where[:3]} lack {len(missing)} tensor(s) that config.json implies, "
                              f"e.g. {missing[:3]}. {hint} the download is incomplete or config.json belongs to "
                              f"another model.")
    ignored = {"lm_head.weight"} if tied else set()  # some tied checkpoints save a copy; transformers ignores it
    extra = set(weight_files) - set(names.values()) - ignored
    unknown = sorted(n for n in extra if not n.endswith(_IGNORED_SUFFIXES))
    if unknown:
        raise CheckpointError(f"{weight_files[unknown[0]]} has tensors a Llama model does not have, e.g. {unknown[:3]}: "
                              f"does config.json (model_type 'llama') belong to these weights?")
    files: dict[Path, _WeightFile] = {}
    for key, name in names.items():
        path = weight_files[name]
        if path not in files:
            files[path] = _WeightFile(path)
        shape = files[path].shape(name)
        if shape != shapes[key]:
            raise CheckpointError(f"{path}: {name} ({key}) has shape {list(shape)}, expected {list(shapes[key])} "
                                  f"from config.json. Does config.json belong to these weights?")
        yield key, files[path], name, shape
