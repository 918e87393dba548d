"""How Meta's checkpoints cut each tensor across model-parallel ranks (fairscale's split).

ColumnParallelLinear weights split along dim 0, RowParallelLinear and ParallelEmbedding along
dim 1; norms are whole in every shard. Shared by the loader (reshard) and the maker (cut).
"""
from __future__ import annotations

from llama.args import ModelArgs

IGNORED_KEYS = ("rope.freqs",)  # present in Meta's files, not a parameter
_COLUMN = ("wq", "wk", "wv", "w1", "w3", "output")
_ROW = ("wo", "w2")


def split_dim(key: str) -> int | None:
    """The dim along which `key` is cut across ranks, or None when every shard holds it whole."""
    parts = key.split(".")
    name = parts[-2] if parts[-1] == "weight" and len(parts) >= 2 else parts[0]
    if name in _COLUMN:
        return 0
    if name in _ROW or name == "tok_embeddings":
        return 1
    return None


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


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's equal slice of `size`."""
    per = size // world_size
    return rank * per, (rank + 1) * per
