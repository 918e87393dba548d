"""Pipeline stages: which run of the model's layers a stage holds, and under what names.

A gang of PP x TP ranks cuts the model into PP stages of contiguous layers (an even split by
default, or given counts); stage s's TP ranks hold its layers, cut as today. The first stage
also holds the token embedding, the last the final norm and the output layer. Inside a stage the
layers are numbered from 0 (its module list and its KV cache hold only its own); a checkpoint
names them by their place in the whole model, and `local_name` maps one to the other.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    index: int  # 0 .. count-1
    count: int  # the pipeline's stages
    layers: range  # the model's layer ids this stage holds, in order

    @staticmethod
    def whole(n_layers: int) -> "Stage":
        """The one stage of a model that is not cut into a pipeline."""
        return Stage(0, 1, range(n_layers))

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    def local_name(self, key: str) -> str | None:
        """This stage's name for a parameter the whole model calls `key` (Meta's names:
        layers.7.attention.wq.weight), or None where the stage does not hold it."""
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            i = int(i)
            return f"layers.{i - self.layers.start}.{rest}" if i in self.layers else None
        if key.startswith("tok_embeddings."):
            return key if self.first else None
        return key if self.last else None  # norm, output


def split_layers(n_layers: int, stages: int, counts: list[int] | tuple[int, ...] | None = None) -> list[range]:
    """Each stage's run of layers: `counts` layers each where given, else as even as can be (the
    earlier stages take one more where the layers do not divide). Raises ValueError, saying what
    to change, where the split cannot be made."""
    if stages < 1:
        raise ValueError(f"pipeline_parallel_size must be at least 1, got {stages}.")
    if counts is None:
        if stages > n_layers:
            raise ValueError(f"pipeline_parallel_size {stages} is more than the model's {n_layers} layers: "
                             f"every stage needs at least one; use at most {n_layers} stages.")
        base, extra = divmod(n_layers, stages)
        counts = [base + (s < extra) for s in range(stages)]
    counts = list(counts)
    if len(counts) != stages or any(type(c) is not int or c < 1 for c in counts) or sum(counts) != n_layers:
        raise ValueError(f"pipeline_layers must give {stages} counts of at least 1 layer each, summing to the "
                         f"model's {n_layers} layers; got {counts}.")
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out
