"""The model's linear layers: fairscale's column- and row-parallel layers, whose matmul runs on
oneDNN with prepacked weights on the CPU; and its parallel embedding. Their collectives go
through llama/model/collectives.py (shared memory where the ranks share a CPU machine).

fairscale's layers call F.linear, which on the CPU is MKL's sgemm. On an AMD EPYC (AVX-512)
oneDNN's matmul over a weight reordered once into its blocked layout is 2.5-4x faster in float32
for the peer benchmark's shapes at 1, 16 and 256 rows (less in bfloat16); on an Intel Xeon with
AMX it is 1.1-1.9x faster at 16 rows and more, and MKL's matrix-vector product 7-30% faster at
one row (`bench/step_profile.py --matmuls`). oneDNN's is batch-invariant too: a row's output
does not depend on the rows beside it. vLLM's CPU backend runs its linear layers on oneDNN too.

`pack_for_cpu(model)` reorders every such layer's weight once its checkpoint is loaded (the
engine does it as it starts) and releases the dense copy, so the weights are held once; a
packed layer then computes with the packed weight; under autograd (gradients to its input, never
the weight) with a dense copy made for that call, as oneDNN's op has no backward. A weight
shared with another module (tied embeddings) keeps its dense copy too. Nothing changes on CUDA,
or where oneDNN cannot run the dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel.mappings import copy_to_model_parallel_region
from torch import nn

from llama.model.collectives import gather_last, reduce


def _matmul(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if "packed" not in layer.__dict__:
        return F.linear(x, layer.weight)
    if layer.packed is None:
        raise RuntimeError("this layer's weight was packed side by side with its siblings' (pack_for_cpu): call "
                           "llama.model.linear.columns(owner, x) for all of them, as the model does.")
    return _packed_matmul(layer.packed, x)


def _packed_matmul(packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled():  # oneDNN's op has no backward: the dense weight, for once
        return F.linear(x, packed.to_dense())
    shape = x.shape
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).contiguous(), packed, None, "none", [], "")
    return out.view(*shape[:-1], out.shape[-1])


def columns(owner: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """owner's column-parallel layers named in owner.COLUMNS (attention's q, k, v; the MLP's w1,
    w3), each on x: one matmul over their weights packed side by side where pack_for_cpu fused
    them, its output split (views)."""
    fused = owner.__dict__.get("fused_columns")
    if fused is None:
        return [getattr(owner, name)(x) for name in owner.COLUMNS]
    packed, sizes = fused
    return list(_packed_matmul(packed, copy_to_model_parallel_region(x)).split(sizes, dim=-1))


class ColumnParallelLinear(fs_layers.ColumnParallelLinear):
    """fairscale's layer (weight cut along the output features), its matmul by `_matmul`."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = _matmul(self, copy_to_model_parallel_region(input_))
        return gather_last(out) if self.gather_output else out


class RowParallelLinear(fs_layers.RowParallelLinear):
    """fairscale's layer (weight cut along the input features; its outputs all-reduced)."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        assert self.input_is_parallel and self.bias is None, "the model's row-parallel layers take parallel input"
        return reduce(_matmul(self, input_))


class ParallelEmbedding(fs_layers.ParallelEmbedding):
    """fairscale's embedding (its table cut along the model's width; the slices all-gathered)."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = F.embedding(copy_to_model_parallel_region(input_), self.weight, self.padding_idx, self.max_norm,
                          self.norm_type, self.scale_grad_by_freq, self.sparse)
        return gather_last(out)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN runs this dtype's matmul here."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def pack_for_cpu(model: nn.Module, fuse: bool = True) -> int:
    """Reorder every linear layer's weight into oneDNN's layout, once; returns how many layers it
    packed (0 on CUDA, or for a dtype oneDNN cannot run here). A module's COLUMNS (layers that take
    the same input) are packed side by side into one weight (fuse=False: each on its own, for
    A/Bs). The dense weights are released: each layer's `weight` becomes a meta tensor of its
    shape, so the weights are held once."""
    shared = {p.untyped_storage().data_ptr() for name, p in model.named_parameters()
              if not isinstance(_owner(model, name), (ColumnParallelLinear, RowParallelLinear))}
    n = 0
    for owner in model.modules():  # the fused groups first: their layers' weights go into one
        group = [getattr(owner, name) for name in getattr(owner, "COLUMNS", ())] if fuse else []
        if not group or "fused_columns" in owner.__dict__ or any("packed" in m.__dict__ for m in group):
            continue
        ws = [m.weight for m in group]
        if (not all(can_pack(w.device, w.dtype) for w in ws)
                or any(w.untyped_storage().data_ptr() in shared for w in ws)):
            continue
        with torch.no_grad():
            owner.fused_columns = (torch.ops.mkldnn._reorder_linear_weight(torch.cat([w.detach() for w in ws]), None),
                                   [w.shape[0] for w in ws])
        for m in group:
            m.weight = nn.Parameter(torch.empty_like(m.weight, device="meta"), requires_grad=False)
            m.packed = None  # computed only through the owner's fused matmul (`columns`)
        n += len(group)
    for module in model.modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or "packed" in module.__dict__:
            continue
        w = module.weight
        if not can_pack(w.device, w.dtype):
            continue
        with torch.no_grad():
            module.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
        if w.untyped_storage().data_ptr() not in shared:
            module.weight = nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=False)
        n += 1
    return n


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0]) if "." in name else model
