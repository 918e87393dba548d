"""KVCache: the keys and values of every layer for a batch of rows (or slots), on the model's device.

Allocated once (static shapes, so a decode step never allocates); rows are batch indices.
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
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]

    def update(
        self, layer: int, start_pos: int, xk: torch.Tensor, xv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write xk/xv (bsz, seqlen, kv_heads, hd) at start_pos; return the keys/values of
        rows :bsz over positions 0..start_pos+seqlen."""
        bsz, seqlen = xk.shape[:2]
        end = start_pos + seqlen
        if bsz > self.max_batch_size or end > self.max_seq_len:
            raise ValueError(
                f"KV cache holds {self.max_batch_size} rows x {self.max_seq_len} positions; "
                f"asked for {bsz} rows up to position {end}."
            )
        k, v = self.k[layer], self.v[layer]
        k[:bsz, start_pos:end] = xk
        v[:bsz, start_pos:end] = xv
        return k[:bsz, :end], v[:bsz, :end]

    # ---- slots: the continuous engine gives each running sequence one row (llama/runner.py)

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

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Positions 0..length-1 of slot src into slot dst, every layer."""
        for k, v in zip(self.k, self.v):
            k[dst, :length] = k[src, :length]
            v[dst, :length] = v[src, :length]
