"""PackedBatch: a step's segments as the model takes them, packed into one sequence of tokens,
with the attention groups that say which rows attend together and to which cached positions
(their block tables).
The engine's runner builds it (llama/engine/runner.py: pack); the model only reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionGroup:
    """Segments that attend together: rows padded to the longest segment (length L) and to the
    longest cached span, in whole blocks (K = n * block_size)."""

    query_index: torch.Tensor  # (G, L) packed index of each row's queries; padding repeats index 0
    valid: torch.Tensor  # (G, L) bool: False on padding
    valid_rows: torch.Tensor  # (N,) the valid (g, l) as flat indices g*L + l, found on the host
    valid_targets: torch.Tensor  # (N,) their packed indices: where each row's output goes
    tables: torch.Tensor  # (G, n) each row's first n blocks (null past its own): its keys, in order
    kv_len: int  # K: keys gathered per row
    mask: torch.Tensor  # (G, 1, L, K) additive: 0 where key position <= query position, else -inf


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # (T,) input tokens of every segment, packed
    positions: torch.Tensor  # (T,) the position of each
    write_index: torch.Tensor  # (T,) the flat offset in the block pool where each one's key and value go
    groups: list[AttentionGroup]
    logit_index: torch.Tensor  # (R,) packed indices whose logits the plan asks for
