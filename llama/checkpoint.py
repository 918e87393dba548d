"""Reading checkpoints: validate first, then load one rank's slices, resharding. Two layouts:
Meta's (params.json, consolidated.NN.pth; Llama 2 and 3.x), read here, and Hugging Face's
(config.json, *.safetensors or *.bin), read by llama/hf_checkpoint.py under Meta's names. Which
one a directory holds, and which tokenizer, is recognised from its files.

A checkpoint cut for N ranks loads on M ranks: for each tensor, a rank takes the rows/columns
of its slice from whichever source shards overlap it. Which dim Meta's files cut each tensor
along is read from their shapes (Llama 2's and Llama 3's embeddings are cut differently:
llama/layout.py), so the files and the ranks may hold different cuts. Files are memory-mapped,
so a rank reads only the bytes of its own slices, never the whole model.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama.args import ModelArgs
from llama.load_progress import LoadProgress
from llama.layout import IGNORED_KEYS, LayoutError, cut_shape, file_dims, full_shapes, rank_dim, shard_range
from llama.tokenizer import Tokenizer, load_tokenizer, read_tokenizer_files

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """The checkpoint on disk is missing something or does not match its params.json."""


@dataclass(frozen=True)
class CheckpointInfo:
    ckpt_dir: Path
    tokenizer_path: Path
    shard_paths: tuple[Path, ...]  # consolidated.00.pth, 01, ... in order; or a Hugging Face folder's weight files
    args: ModelArgs  # vocab_size resolved from the tokenizer
    # The tokenizer's files (hundreds of KB to a few MB: llama.tokenizer.read_tokenizer_files), so
    # ranks and replicas on machines without the checkpoint still have it.
    tokenizer_files: dict[str, bytes] = field(repr=False, default_factory=dict)
    itemsize: int = 4  # bytes per value in the weight files (2 for Meta's bfloat16 releases)
    layout: str = "meta"  # "meta" | "hf"
    tied: bool = False  # Hugging Face's tie_word_embeddings: the output layer is the embedding
    # Hugging Face: each tensor's weight file (name within ckpt_dir), so a machine reading the
    # slices needs only the weight files, not the index.
    weight_map: dict[str, str] = field(repr=False, default_factory=dict)
    # Meta's layout: each tensor the files cut and the dim they cut it along, read from their
    # shapes (tok_embeddings: 1 in Llama 2's files, 0 in Llama 3's). Empty for one file.
    file_dims: dict[str, int] = field(repr=False, default_factory=dict)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path, self.tokenizer_files or None)


def inspect_checkpoint(
    ckpt_dir: str | Path, tokenizer_path: str | Path | None = None, model_parallel_size: int = 1
) -> CheckpointInfo:
    """Validate a checkpoint directory before anything is allocated; raise CheckpointError.
    Done once per start (where configuration enters); the result is passed to every rank."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist (ckpt_dir).")
    params_path = ckpt_dir / "params.json"
    if not params_path.is_file() and (ckpt_dir / "config.json").is_file():
        return _inspect_hf(ckpt_dir, tokenizer_path, model_parallel_size)
    if not params_path.is_file():
        raise CheckpointError(
            f"{params_path} is missing: a checkpoint directory holds params.json and consolidated.NN.pth files "
            f"(Meta's layout; for Llama 3 from Hugging Face, its original/ folder) or config.json and "
            f"*.safetensors (Hugging Face's)."
        )
    tok_path = _tokenizer_path(ckpt_dir, tokenizer_path, ("tokenizer.model",))
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
    tokenizer_files = _fit_tokenizer(args, tok_path, params_path, padded_vocab=False)
    _check_split(args, ckpt_dir, model_parallel_size)
    itemsize, dims = _check_shapes(args, shards)
    return CheckpointInfo(ckpt_dir=ckpt_dir, tokenizer_path=tok_path, shard_paths=shards, args=args,
                          tokenizer_files=tokenizer_files, itemsize=itemsize, file_dims=dims)


def _inspect_hf(ckpt_dir: Path, tokenizer_path: str | Path | None, model_parallel_size: int) -> CheckpointInfo:
    from llama.hf_checkpoint import check_hf_tensors, hf_weight_files, read_hf_config

    config = read_hf_config(ckpt_dir / "config.json")
    args = config.args
    tok_path = _tokenizer_path(ckpt_dir, tokenizer_path, ("tokenizer.json", "tokenizer.model"))
    tokenizer_files = _fit_tokenizer(args, tok_path, ckpt_dir / "config.json", padded_vocab=True)
    _check_split(args, ckpt_dir, model_parallel_size)
    weight_files = hf_weight_files(ckpt_dir)
    itemsize = check_hf_tensors(weight_files, args, config.tie_word_embeddings)
    return CheckpointInfo(ckpt_dir=ckpt_dir, tokenizer_path=tok_path, shard_paths=tuple(sorted(set(weight_files.values()))),
                          args=args, tokenizer_files=tokenizer_files, itemsize=itemsize, layout="hf",
                          tied=config.tie_word_embeddings, weight_map={k: p.name for k, p in weight_files.items()})


def _tokenizer_path(ckpt_dir: Path, given: str | Path | None, names: tuple[str, ...]) -> Path:
    """The tokenizer file: the one given, else the first of `names` in ckpt_dir."""
    if given:
        path = Path(given)
    else:
        path = next((ckpt_dir / n for n in names if (ckpt_dir / n).is_file()), ckpt_dir / names[0])
    if not path.is_file():
        raise CheckpointError(
            f"tokenizer {path} is missing: pass tokenizer_path pointing at the {' or '.join(names)} that came with "
            f"the checkpoint."
        )
    return path


def _fit_tokenizer(args: ModelArgs, tok_path: Path, config_path: Path, padded_vocab: bool) -> dict[str, bytes]:
    """Read the tokenizer's files and check its ids fit the model's vocabulary (resolving -1);
    Hugging Face models may pad the embedding beyond the tokenizer (padded_vocab)."""
    try:
        tokenizer_files = read_tokenizer_files(tok_path)
        n_words = load_tokenizer(tok_path, tokenizer_files).n_words
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if args.vocab_size == -1:
        args.vocab_size = n_words
    elif args.vocab_size != n_words and not (padded_vocab and args.vocab_size > n_words):
        raise CheckpointError(
            f"{config_path} says vocab_size {args.vocab_size} but tokenizer {tok_path} has {n_words} "
            f"pieces: use the tokenizer that came with this checkpoint."
        )
    return tokenizer_files


def _check_split(args: ModelArgs, ckpt_dir: Path, model_parallel_size: int) -> None:
    try:
        args.validate_for(model_parallel_size)
    except ValueError as e:
        raise CheckpointError(f"{ckpt_dir}: {e}") from None


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


def load_rank_state(info: CheckpointInfo, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """The tensors rank `rank` of `world_size` needs, cut from the N source shards.

    Returned tensors are views into the memory-mapped files where one source shard covers the
    slice (no copy), else a concatenation of just the overlapping pieces."""
    if info.layout == "hf":
        from llama.hf_checkpoint import load_hf_rank_state

        files = {key: info.ckpt_dir / name for key, name in info.weight_map.items()}
        return load_hf_rank_state(files, info.args, rank, world_size, info.tied)
    n = len(info.shard_paths)
    sources = [_open(p) for p in info.shard_paths]  # mmap: opening reads no tensor data
    out: dict[str, torch.Tensor] = {}
    for key, full in full_shapes(info.args).items():
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


def rank_nbytes(info: CheckpointInfo, rank: int, world_size: int) -> int:
    """The bytes of rank's slices in the files, known before any is read (for LoadProgress)."""
    total = 0
    for key, full in full_shapes(info.args).items():  # a cut tensor: an equal 1/world_size of it
        total += math.prod(full) // (world_size if rank_dim(key) is not None else 1)
    return total * info.itemsize


def missing_files(info: CheckpointInfo) -> list[Path]:
    """The checkpoint's weight files that this machine does not have (at the inspected paths)."""
    return [p for p in info.shard_paths if not p.is_file()]


def copy_into(model: torch.nn.Module, slices: Iterable[tuple[str, torch.Tensor]],
              progress: LoadProgress | None = None) -> int:
    """Copy (name, tensor) slices into `model`'s parameters (any device/dtype), one at a time, so
    only one slice need be in memory; every parameter must come exactly once. Returns the bytes,
    also counted into `progress` as each slice lands."""
    params = dict(model.named_parameters())
    seen: set[str] = set()
    nbytes = 0
    with torch.no_grad():
        for key, src in slices:
            p = params.get(key)
            if p is None or key in seen:
                raise CheckpointError(f"the checkpoint gave {key!r}, which the model {'has already' if p is not None else 'does not have'}.")
            if tuple(src.shape) != tuple(p.shape):
                raise CheckpointError(f"{key}: slice shape {list(src.shape)} does not fit parameter {list(p.shape)}.")
            p.copy_(src)
            seen.add(key)
            nbytes += src.numel() * src.element_size()
            if progress is not None:
                progress.add(src.numel() * src.element_size())
    if seen != set(params):
        raise CheckpointError(f"the checkpoint lacks parameters the model has, e.g. {sorted(set(params) - seen)[:3]}.")
    return nbytes


def load_into(model: torch.nn.Module, info: CheckpointInfo, rank: int, world_size: int,
              progress: LoadProgress | None = None) -> None:
    """Copy rank's slices, read from this machine's files, into `model`'s parameters."""
    t0 = time.perf_counter()
    nbytes = copy_into(model, load_rank_state(info, rank, world_size).items(), progress)
    log.info("rank %d/%d: loaded %.1f MB from %d shard(s) in %.2fs", rank, world_size, nbytes / 1e6,
             len(info.shard_paths), time.perf_counter() - t0)
