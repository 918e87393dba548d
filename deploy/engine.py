"""Engine: what the HTTP layer needs from whatever generates tokens.

The Serve deployment passes a RankGroup (cluster/); unit tests pass a fake. Keeping the HTTP
layer behind this small interface is what lets it be tested without Ray.
"""
from __future__ import annotations

from typing import Protocol

from llama.request import GenerationOutput, GenerationRequest


class Engine(Protocol):
    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """Run the requests (any number; the engine batches them) and return one output each,
        in order. Raises ValueError for a request the model cannot serve."""
        ...

    async def cluster_info(self) -> dict:
        """The gang as JSON-able data: world_size, backend, device, dtype, ranks[...]."""
        ...

    async def check_health(self) -> None:
        """Raise if any rank is dead or hung."""
        ...
