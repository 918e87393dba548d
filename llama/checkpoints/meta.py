"""Meta's layout (params.json, consolidated.NN.pth; Llama 2 and 3.x): validate the files, then
cut one rank's slices from them, resharding.

A checkpoint cut for N ranks loads on M ranks: for each tensor, a rank takes the rows/columns
of its slice from whichever files overlap it. Which dim Meta's files cut each tensor along is
read from their shapes (Llama 2's and Llama 3's embeddings are cut differently:
llama/checkpoints/layout.py), so the files and the ranks may hold different cuts. Files are
memory-mapped, so a rank reads only the bytes of its own slices, never the whole model.
"""
from __future__ import annotations

from collections.abc import Container
from pathlib import Path

import torch

from llama.checkpoints.errors import CheckpointError
from llama.checkpoints.info import CheckpointInfo, check_split, find_tokenizer, fit_tokenizer
from llama.checkpoints.layout import IGNORED_KEYS, LayoutError, cut_shape, file_dims, full_shapes, rank_dim, shard_range
from llama.model.args import ModelArgs


def inspect_meta(ckpt_dir: Path, tokenizer_path: str | Path | None, model_parallel_size: int) -> CheckpointInfo:
    """Validate a folder of Meta's layout (params.json, consolidated.NN.pth, tokenizer.model)."""
    params_path = ckpt_dir / "params.json"
    tok_path = find_tokenizer(ckpt_dir, tokenizer_path, ("tokenizer.model",))
    shards = tuple(sorted(ckpt_dir.glob("consolidated.*.pth")))
    if not shards:
        raise CheckpointError(f"no consolidated.*.pth files in {ckpt_dir}: is this a Meta-format checkpoint?")
    names = [p.name for p in shards]
    expected_names = [f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if names != expected_names:
        raise CheckpointError(f"shard files in {ckpt_dir} are {names}; expected {expected_names}.")
    try:
        args = ModelArgs.from_json(params_path)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{params_path}: {e}") from None
    _refuse_quantized(ckpt_dir)
    tokenizer_files = fit_tokenizer(args, tok_path, params_path, padded_vocab=False)
    check_split(args, ckpt_dir, model_parallel_size)
    itemsize, dims = _check_shapes(args, shards)
    return CheckpointInfo(ckpt_dir=ckpt_dir, tokenizer_path=tok_path, shard_paths=shards, args=args,
                          tokenizer_files=tokenizer_files, itemsize=itemsize, file_dims=dims)


def _open(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a PyTorch state dict ({type(e).__name__}: {e}).") from None


_SERVE_BF16 = ("this server serves Meta's bf16 (or fp16/fp32) weights; use the checkpoint's bf16 release "
               "(e.g. Llama-3.1-405B, not Llama-3.1-405B-FP8).")


def _refuse_quantized(ckpt_dir: Path) -> None:
    """Meta's FP8 releases (Llama 3.1 405B-FP8) put per-rank weight scales beside the files."""
    scales = sorted(p.name for p in ckpt_dir.glob("fp8_scales_*.pt"))
    if scales:
        raise CheckpointError(f"{ckpt_dir} holds FP8 weight scales ({', '.join(scales[:3])}): it is a quantized "
                              f"checkpoint, whose weights carry scales; {_SERVE_BF16}")


def _check_shapes(args: ModelArgs, shards: tuple[Path, ...]) -> tuple[int, dict[str, int]]:
    """Check every shard against params.json and find the dim the files cut each tensor along
    (the same in every file); return the files' bytes per value and those dims."""
    n = len(shards)
    expected = full_shapes(args)
    dims: dict[str, int] | None = None
    for path in shards:
        sd = _open(path)
        missing = sorted(set(expected) - set(sd))
        if missing:
            raise CheckpointError(f"{path} lacks {len(missing)} tensors the params.json implies, e.g. {missing[:3]}.")
        unknown = sorted(set(sd) - set(expected) - set(IGNORED_KEYS))
        if any(k.endswith((".scales", ".zeros", "_scale")) for k in unknown):
            raise CheckpointError(f"{path} has quantization tensors, e.g. "
                                  f"{[k for k in unknown if k.endswith(('.scales', '.zeros', '_scale'))][:3]}: {_SERVE_BF16}")
        if unknown:
            raise CheckpointError(
                f"{path} has tensors a Llama model does not have, e.g. {unknown[:3]}: is it a "
                f"Hugging Face checkpoint? Its folder holds config.json beside the weights; point ckpt_dir there."
            )
        odd = {k: str(sd[k].dtype) for k in expected if not sd[k].dtype.is_floating_point or sd[k].element_size() < 2}
        if odd:
            key, dtype = next(iter(odd.items()))
            raise CheckpointError(f"{path}: {key} is {dtype} ({len(odd)} tensor(s) like it): a quantized checkpoint; "
                                  f"{_SERVE_BF16}")
        shapes = {key: tuple(sd[key].shape) for key in expected}
        try:
            found = file_dims(expected, shapes, n)
        except LayoutError as e:
            raise CheckpointError(f"{path}: {e} Does params.json belong to these files?") from None
        if dims is None:
            dims = found
        elif found != dims:  # one file cut like Llama 2's, another like Llama 3's
            key = next(k for k in expected if found.get(k) != dims.get(k))
            raise CheckpointError(
                f"{path}: {key} has shape {list(shapes[key])}, but {shards[0].name} holds it as "
                f"{list(cut_shape(expected[key], dims.get(key), n))}: the files are cut differently. Use the files "
                f"of one download."
            )
    return sd["tok_embeddings.weight"].element_size(), dims or {}


def load_meta_rank_state(info: CheckpointInfo, rank: int, world_size: int,
                         keys: Container[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors rank `rank` of `world_size` needs (of `keys` only, where given: a pipeline
    stage's), cut from Meta's N files (whichever cut they hold: info.file_dims)."""
    n = len(info.shard_paths)
    sources = [_open(p) for p in info.shard_paths]  # mmap: opening reads no tensor data
    out: dict[str, torch.Tensor] = {}
    for key, full in full_shapes(info.args).items():
        if keys is not None and key not in keys:
            continue
        d = rank_dim(key)  # how this rank holds it
        if d is None:
            out[key] = sources[0][key]
            continue
        start, end = shard_range(full[d], rank, world_size)
        src_d = info.file_dims.get(key)  # how the files hold it
        if src_d is None:  # one file: the whole tensor
            pieces = [sources[0][key].narrow(d, start, end - start)]
        elif src_d != d:  # cut across the other dim (Llama 3's embedding): each file holds part of our slice
            pieces = [src[key].narrow(d, start, end - start) for src in sources]
        else:
            per_src = full[d] // n
            pieces = []
            for j in range(start // per_src, (end - 1) // per_src + 1):
                lo, hi = max(start, j * per_src), min(end, (j + 1) * per_src)
                pieces.append(sources[j][key].narrow(d, lo - j * per_src, hi - lo))
        out[key] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=src_d)
    return out
