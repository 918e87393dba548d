"""KVCache: every layer's keys and values for a fixed number of slots, on the model's device.

A slot is one running sequence's row of positions 0..max_seq_len-1. Allocated once (static
shapes: a step never allocates); the runner writes each packed token at its (slot, position)
and reads a slot's first positions back, so a block table can later replace the slot rows
without touching the model. One more row past the slots, `scratch`, takes the writes of rows a
static-shaped decode step runs without a sequence in them (llama/engine/decode_step.py).
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        max_batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        shape = (max_batch_size + 1, max_seq_len, n_kv_heads, head_dim)
        self.max_batch_size = max_batch_size  # slots
        self.scratch = max_batch_size  # the row past them: written, never read as a sequence's
        self.max_seq_len = max_seq_len
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> None:
        """Packed keys/values xk, xv (T, kv_heads, hd) of tokens at (slots[i], positions[i])."""
        self.k[layer][slots, positions] = xk
        self.v[layer][slots, positions] = xv

    def gather(
        self, layer: int, slots: torch.Tensor, length: int, slot_range: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (len(slots), length, kv_heads, hd) of positions 0..length-1 of the slots:
        a view when they are the consecutive slot_range, else a copy."""
        if slot_range is not None:
            a, b = slot_range
            return self.k[layer][a:b, :length], self.v[layer][a:b, :length]
        return self.k[layer][slots, :length], self.v[layer][slots, :length]

    def rows(self, layer: int, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (n, length, kv_heads, hd) of slots 0..n-1, positions 0..length-1: a view."""
        return self.k[layer][:n, :length], self.v[layer][:n, :length]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Positions 0..length-1 of slot src into slot dst, every layer."""
        for k, v in zip(self.k, self.v):
            k[dst, :length] = k[src, :length]
            v[dst, :length] = v[src, :length]
