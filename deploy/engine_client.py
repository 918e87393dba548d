"""EngineClient: all the HTTP layer asks of whatever generates tokens (vLLM's name for it).

Not llama/engine/core.py's Engine, which batches requests inside the driver: the Serve deployment
passes its RankGroup (cluster/), which reaches that engine through Ray; unit tests pass a
fake. This small interface is what lets the HTTP layer be tested without Ray.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from cluster.admission import Admission
from llama.engine.request import GenerationRequest, StreamDelta


class EngineClient(Protocol):
    async def admit(self, n: int) -> Admission:
        """Places for the n choices of one HTTP request, all or none (cluster/admission.py): raises
        cluster.errors.OverloadedError when the replica holds too many to fit them now, ValueError
        when it never could, DrainingError once the replica is shutting down, a ClusterError if
        the gang cannot serve. The caller releases them
        when the request ends, however it ends."""
        ...

    def stream(self, request: GenerationRequest, admission: Admission | None = None) -> AsyncIterator[StreamDelta]:
        """Run one request (a choice, in the places `admission` holds) and yield its deltas as
        the engine makes them; the last one has a finish_reason ("stop", "length", "timeout" or
        "abort").

        Raises ValueError before the first delta for a request the model cannot serve, a
        cluster.errors.ClusterError if the gang fails (before or during the stream), and
        DrainingError when the replica's drain ends the request (not started yet, or still
        running when the grace period is spent). Closing the
        iterator early (`aclose()`, or the consuming task being cancelled) cancels the request:
        the engine frees its slot at the next step."""
        ...

    async def cluster_info(self) -> dict:
        """The gang as JSON-able data: ready, start (its stages), world_size, backend, device,
        dtype, ranks[...] (each with its load progress), and the engine's state (slots in use,
        requests waiting). While starting, only ready, healthy and start."""
        ...

    async def check_health(self) -> None:
        """Ready to serve, or raise: cluster.errors.GangStartingError while the gang is still
        starting (its .progress says where), another ClusterError if a rank is dead or hung."""
        ...
