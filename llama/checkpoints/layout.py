"""How Meta's checkpoints cut each tensor across model-parallel ranks (fairscale's split), and
which cut a checkpoint's files hold.

Both of Meta's formats cut ColumnParallelLinear weights (wq wk wv w1 w3 output) along dim 0 and
RowParallelLinear weights (wo w2) along dim 1; norms are whole in every file. They differ in the
embedding: Llama 2's ParallelEmbedding cuts tok_embeddings along dim 1 (the model's width),
Llama 3's VocabParallelEmbedding along dim 0 (the vocabulary). `rank_dim` is the cut this
project's ranks hold (Llama 2's, whatever the files hold); `meta_dim` is the cut Meta writes for
each version; `file_dims` finds, from the files' shapes, the dim each tensor was cut along.
Shared by the loader (reshard) and the maker (cut).
"""
from __future__ import annotations

from llama.model.args import ModelArgs

IGNORED_KEYS = ("rope.freqs",)  # present in Meta's files, not a parameter
_COLUMN = ("wq", "wk", "wv", "w1", "w3", "output")
_ROW = ("wo", "w2")
LLAMA_VERSIONS = (2, 3)
# Which fairscale layer each version's reference builds the embedding with, for messages.
_EMBEDDING = {2: "ParallelEmbedding", 3: "VocabParallelEmbedding"}


def _name(key: str) -> str:
    parts = key.split(".")
    return parts[-2] if parts[-1] == "weight" and len(parts) >= 2 else parts[0]


def meta_dim(key: str, version: int) -> int | None:
    """The dim along which Meta's Llama `version` reference cuts `key` across ranks, or None
    when every shard holds it whole."""
    name = _name(key)
    if name in _COLUMN:
        return 0
    if name in _ROW:
        return 1
    if name == "tok_embeddings":
        return 1 if version == 2 else 0
    return None


def rank_dim(key: str) -> int | None:
    """The dim along which this project's ranks hold `key` (llama/model/transformer.py: Llama 2's cut, a
    ParallelEmbedding, for every checkpoint), or None when every rank holds it whole."""
    return meta_dim(key, 2)


def full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter of the whole (unsplit) model and its shape."""
    d, hd, hidden, v = args.dim, args.head_dim, args.ffn_hidden_dim, args.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (v, d), "norm.weight": (d,), "output.weight": (v, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (args.n_heads * hd, d)
        shapes[p + "attention.wk.weight"] = (args.n_kv_heads * hd, d)
        shapes[p + "attention.wv.weight"] = (args.n_kv_heads * hd, d)
        shapes[p + "attention.wo.weight"] = (d, args.n_heads * hd)
        shapes[p + "feed_forward.w1.weight"] = (hidden, d)
        shapes[p + "feed_forward.w2.weight"] = (d, hidden)
        shapes[p + "feed_forward.w3.weight"] = (hidden, d)
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
    return shapes


def cut_shape(full: tuple[int, ...], dim: int | None, n: int) -> tuple[int, ...]:
    """One of n equal shards of a tensor of shape `full` cut along `dim` (None: whole)."""
    return full if dim is None else tuple(s // n if i == dim else s for i, s in enumerate(full))


class LayoutError(ValueError):
    """A file's tensor is cut in a way neither of Meta's formats cuts it."""


def file_dim(key: str, full: tuple[int, ...], shape: tuple[int, ...], n: int) -> int | None:
    """The dim along which `key` (whole shape `full`) was cut into n files, from one file's
    `shape`: whichever of Meta's Llama 2 and Llama 3 cuts it fits. Raises LayoutError naming the
    shape found and both expected ones when it fits neither."""
    dims = {v: meta_dim(key, v) for v in LLAMA_VERSIONS}
    fits = [d for d in dims.values() if cut_shape(full, d, n) == shape]
    if fits:
        return fits[0]  # where both fit (one file, or the same cut) either dim gives the same slices
    expected = {v: list(cut_shape(full, d, n)) for v, d in dims.items()}
    if expected[2] == expected[3]:
        want = f"{expected[2]} (Meta's Llama 2 and Llama 3 files cut it alike)"
    else:
        want = " or ".join(f"{expected[v]} (Llama {v}'s {_EMBEDDING[v]}, cut along dim {dims[v]})" for v in LLAMA_VERSIONS)
    raise LayoutError(f"{key} has shape {list(shape)}, expected {want} for the model in params.json cut into "
                      f"{n} file(s).")


def file_dims(full: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], n: int) -> dict[str, int]:
    """Each tensor that the n files cut, and the dim they cut it along, from one file's `shapes`."""
    dims = {key: file_dim(key, want, shapes[key], n) for key, want in full.items()}
    return {key: d for key, d in dims.items() if d is not None and n > 1}


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's equal slice of `size`."""
    per = size // world_size
    return rank * per, (rank + 1) * per
