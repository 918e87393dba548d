"""KVCache: every layer's keys and values as a pool of fixed-size blocks, and the block tables
that say which blocks hold each running sequence's positions, on the model's device.

Block b holds block_size consecutive positions of one sequence (or of a prefix several share).
Row r of the block table belongs to the sequence in table row ("slot") r: position p of it is
at offset p % block_size of block table[r, p // block_size]. Block 0 is the null block: it
pads every table and takes the writes of rows a static-shaped decode runs without a sequence
(llama/engine/decode_step.py); it is never given to a sequence and never read unmasked. Which
block goes where is the driver's decision (llama/engine/block_pool.py); every rank applies the
same changes from the step plan, so the pools of all ranks hold the same positions in the same
blocks. Allocated once, zeroed (a masked key is still multiplied by zero, and 0 * NaN is NaN):
a step never allocates.
"""
from __future__ import annotations

import torch

NULL_BLOCK = 0


class KVCache:
    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        max_rows: int,
        max_blocks_per_row: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        """num_blocks usable blocks (ids 1..num_blocks; 0 is the null block); max_rows table rows
        (sequences running at once) of max_blocks_per_row entries."""
        shape = (num_blocks + 1, block_size, n_kv_heads, head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_rows = max_rows
        self.max_blocks_per_row = max_blocks_per_row
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        # The host's copy decides write offsets and prefill gathers without asking the device;
        # the device's is what a captured decode reads (the same tensor on the CPU).
        self.host_table = torch.zeros((max_rows, max_blocks_per_row), dtype=torch.long)
        self.table = self.host_table if device.type == "cpu" else self.host_table.to(device)
        # On the CPU a gather fills one buffer per tensor, reused by every layer and step (each
        # layer's attention is done with its keys before the next gathers): a fresh one each
        # time costs more in page faults than the copy itself. CUDA's caching allocator (and a
        # captured graph's static memory) make that unnecessary there.
        self._reuse = device.type == "cpu"
        self._bufs: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def max_seq_len(self) -> int:
        return self.max_blocks_per_row * self.block_size

    @staticmethod
    def block_nbytes(n_layers: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one block takes on one rank (keys and values of every layer)."""
        return 2 * n_layers * block_size * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    # ------------------------------------------------------------------ tables
    def assign(self, row: int, index: int, blocks: list[int]) -> None:
        """Entries index.. of the row's table become `blocks` (a sequence's new blocks)."""
        end = index + len(blocks)
        if not (0 <= row < self.max_rows and 0 <= index and end <= self.max_blocks_per_row):
            raise AssertionError(f"table entries {index}..{end} of row {row} are outside the table "
                                 f"({self.max_rows} rows of {self.max_blocks_per_row})")
        if min(blocks) < 1 or max(blocks) > self.num_blocks:
            raise AssertionError(f"block ids {blocks} are outside the pool (1..{self.num_blocks})")
        values = torch.tensor(blocks, dtype=torch.long)
        self.host_table[row, index:end] = values
        if self.table is not self.host_table:
            self.table[row, index:end].copy_(values.pin_memory(), non_blocking=True)

    def clear(self, row: int) -> None:
        """The row's sequence left: every entry back to the null block."""
        self.host_table[row].zero_()
        if self.table is not self.host_table:
            self.table[row].zero_()

    def write_index(self, row: int, start: int, length: int) -> torch.Tensor:
        """Flat pool offsets (length,) of the row's positions start..start+length-1 (host)."""
        pos = torch.arange(start, start + length)
        return self.host_table[row, pos // self.block_size] * self.block_size + pos % self.block_size

    # ------------------------------------------------------------------ keys and values
    def write(self, layer: int, index: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> None:
        """Keys/values xk, xv (T, kv_heads, hd) at flat pool offsets index (T,)."""
        self.k[layer].view(-1, *xk.shape[1:])[index] = xk
        self.v[layer].view(-1, *xv.shape[1:])[index] = xv

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (G, n*block_size, kv_heads, hd) of the blocks tables (G, n) name, in order:
        each row's positions 0..n*block_size-1 (a copy)."""
        G, n = tables.shape
        flat = tables.reshape(-1)
        if self._reuse and not torch.is_grad_enabled():  # (training backpropagates through the gather)
            if self._bufs is None or self._bufs[0].shape[0] < flat.numel():
                shape = (flat.numel(), *self.k[layer].shape[1:])
                self._bufs = (torch.empty(shape, dtype=self.k[layer].dtype), torch.empty(shape, dtype=self.v[layer].dtype))
            kb, vb = self._bufs
            k = torch.index_select(self.k[layer], 0, flat, out=kb[: flat.numel()])
            v = torch.index_select(self.v[layer], 0, flat, out=vb[: flat.numel()])
        else:
            k, v = self.k[layer][flat], self.v[layer][flat]  # (G*n, bs, kv, hd)
        return k.view(G, n * self.block_size, *k.shape[2:]), v.view(G, n * self.block_size, *v.shape[2:])
