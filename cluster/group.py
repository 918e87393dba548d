"""RankGroup: a gang of N rank actors that acts as one model.

Creates the actors on their placement-group bundles and has them meet at rank 0's address.
Each request is one Ray call to rank 0 (the driver), whose engine batches it with the others
continuously; the tokens of all of them come back on one stream (cluster/deltas.py). The other
ranks follow the driver's step plans. Any rank failure makes the whole gang unhealthy: it is
replaced, never repaired in place.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, replace

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

from cluster.admission import Admission, Places
from cluster.config import GangConfig
from cluster.deltas import DeltaReader
from cluster.errors import DrainingError, GangStartError, PlacementError, RankFailedError
from cluster.metrics import RequestMetrics
from cluster.placement import acquire, plan_bundles, rank_bundles, rank_options, settle_device
from cluster.rank import RankActor, RankInfo, RankState
from cluster.start import STAGE_FIXES, StartProgress, stage_deadlines
from cluster.weights import find_holder
from llama.engine.request import GenerationOutput, GenerationRequest, StreamDelta, collect

log = logging.getLogger(__name__)

_RemoteRank = ray.remote(concurrency_groups={"control": 4})(RankActor)


def _send_abort(driver, request_id: str) -> None:
    """Ask the driver to abort request_id, from an empty context. A call made in the context of a
    request that Serve is cancelling (its client left) is that request's child, and Ray's recursive
    cancellation can cancel it before the driver runs it: the abort is lost and the request runs
    to its end (Ray does the same for its own calls on cancellation: ray-project/ray#52476)."""
    contextvars.Context().run(driver.abort.remote, request_id)


class RankGroup:
    def __init__(self, config: GangConfig, actors: list, states: list[RankState], infos: list[RankInfo],
                 placement: PlacementGroup, owns_placement: bool, progress: StartProgress):
        self.config = config
        self.actors = actors
        self.states = states
        self.infos = infos
        self.placement = placement
        self._owns_placement = owns_placement
        self.progress = progress  # how the start went, stage by stage
        # Requests streaming through this replica, running or waiting in the engine, and its bound.
        self.places = Places(config.engine.max_batch_size, config.engine.max_waiting)
        self._failed: str | None = None
        # Each request in the engine (its id) and whether it has started (a delta came back): what
        # a drain ends. draining is the replica's shutdown, once Serve has begun it.
        self._live: dict[str, bool] = {}
        # Requests whose submit call is on its way to the driver (its ref): an abort must follow it
        # there, since one that overtakes it (the driver's control calls run beside its submits) is lost.
        self._submitting: dict[str, ray.ObjectRef] = {}
        self.draining: str | None = None
        self._deltas: DeltaReader | None = None  # the driver's stream of deltas, on the serving loop

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, config: GangConfig, placement: PlacementGroup | None = None, first_bundle: int = 0,
              progress: StartProgress | None = None) -> "RankGroup":
        """Start the gang, stage by stage (cluster/start.py), each stage within its own deadline,
        recording where it is in `progress`. With `placement` (a Serve replica's group), ranks
        take bundles first_bundle.. of it; without, a group for just the ranks is reserved."""
        t0 = time.perf_counter()
        config = replace(config, parallel=settle_device(config.parallel))  # a Serve app settled it already
        par = config.parallel
        progress = progress or StartProgress(stage_deadlines(par))
        owns = placement is None
        actors: list = []
        try:
            deadline = progress.enter("placement")
            if owns:
                placement = acquire(plan_bundles(par), par.placement_strategy, deadline, par.autoscaling)
                first_bundle = 0
            deadline = progress.enter("actors")
            bundles = rank_bundles(par, first_bundle)
            actors = [_RemoteRank.options(**rank_options(par, placement, b, bundles)).remote(config, r)
                      for r, b in enumerate(bundles)]
            _within(progress, [a.ping.remote() for a in actors])
            progress.enter("rendezvous")
            addr, port = _within(progress, [actors[0].rendezvous_address.remote()])[0]
            backend, device = _within(progress, [a.join.remote(addr, port) for a in actors])[0]
            progress.enter("collective")
            collective_s = max(_within(progress, [a.first_collective.remote() for a in actors]))
            progress.enter("weights")

            def poll_loads() -> None:
                progress.ranks = ray.get([a.load_progress.remote() for a in actors], timeout=10)

            # Ranks whose machine lacks the files get their slices from one holder, found once.
            lacking = not all(_within(progress, [a.has_checkpoint.remote() for a in actors]))
            holder = find_holder(config.checkpoint) if lacking else None
            states = _within(progress, [a.load_weights.remote(holder) for a in actors], watch=poll_loads)
            progress.ranks = [s.load for s in states]
            progress.enter("ready")
            _within(progress, [a.start_loop.remote() for a in actors])
            _within(progress, [actors[0].warm_up.remote()])
            infos = _within(progress, [a.info.remote() for a in actors])
        except BaseException as e:
            for a in actors:
                ray.kill(a)
            if owns and placement is not None:
                remove_placement_group(placement)
            error = _start_error(e, progress)
            progress.fail(error)
            raise error from e
        progress.done()
        log.info("gang of %d ranks (%s, %s) up in %.2fs; first all-reduce+broadcast %.1f ms; %s", len(actors),
                 backend, device, time.perf_counter() - t0, 1e3 * collective_s,
                 ", ".join(f"{s['stage']} {s['seconds']:.2f}s" for s in progress.as_dict()["finished_stages"]))
        return cls(config, actors, states, infos, placement, owns, progress)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already dead: nothing to do
                pass
        self.actors = []
        if self._owns_placement:
            remove_placement_group(self.placement)

    # ------------------------------------------------------------------ generation
    def _check_usable(self) -> None:
        if self._failed:
            raise RankFailedError(f"this gang failed earlier ({self._failed}) and must be replaced.")

    def admit(self, n: int) -> Admission:
        """Places for one HTTP request's n choices, all or none (cluster/admission.py): raises
        OverloadedError at once when the replica already holds too many to fit them, and
        DrainingError once the replica is draining."""
        self._check_usable()
        if self.draining is not None:
            raise DrainingError(f"this replica is shutting down ({self.draining}) and takes no new requests; retry, "
                                f"and another replica (or this one's replacement) will serve it.")
        return self.places.admit(n)

    # ------------------------------------------------------------------ drain (deploy/drain.py decides when)
    def drain(self, why: str) -> int:
        """Serve has begun to stop this replica (`why`): refuse new requests, and end those the
        engine has not started, so that their clients retry elsewhere now rather than wait on a
        replica that is going away; started ones run on. Returns how many were ended."""
        self.draining = why
        return self._abort([rid for rid, started in self._live.items() if not started])

    def cut(self) -> int:
        """The drain's grace period is spent: end every request still running, so that its client
        gets a 503 (or, streaming, an error event) rather than a connection cut when Serve kills
        the replica. Returns how many were ended."""
        return self._abort(list(self._live))

    def _abort(self, request_ids: list[str]) -> int:
        if self.actors:  # none once shut down
            driver = self.actors[0]
            for rid in request_ids:
                submitting = self._submitting.get(rid)
                if submitting is None:
                    _send_abort(driver, rid)
                else:  # sent once the driver has the request
                    submitting.future().add_done_callback(lambda _, rid=rid: _send_abort(driver, rid))
        return len(request_ids)

    async def stream(self, request: GenerationRequest, admission: Admission | None = None
                     ) -> AsyncIterator[StreamDelta]:
        """One request through the driver: one Ray call, its tokens streamed back. Closing the
        iterator early aborts the request (its slot is freed at the driver's next step). Without
        an `admission` (the caller's, for all of an HTTP request's choices, released by the
        caller) it takes one place itself, and raises OverloadedError when none is free."""
        self._check_usable()
        own = self.admit(1) if admission is None else None
        inner = self._stream(request)
        metrics = RequestMetrics(self.config.checkpoint.ckpt_dir.name)
        reason = "abort"  # unless it finishes or fails: the caller went away
        started = False
        try:
            async for delta in inner:
                metrics.queued(delta.queue_s)
                metrics.tokens_arrived(len(delta.token_ids))
                if delta.finish_reason == "abort" and self.draining is not None:
                    raise DrainingError(self._drain_message(started))
                if delta.finish_reason is not None:
                    reason = delta.finish_reason
                started = True
                yield delta
        except DrainingError:
            raise  # counted as the abort it was (reason stays "abort")
        except ValueError:  # the caller's mistake, refused before the request entered the engine
            reason = ""
            raise
        except BaseException as e:
            reason = "error" if isinstance(e, Exception) else reason
            raise
        finally:
            if own is not None:
                own.release()
            await inner.aclose()  # now, not when collected: closing early aborts the request
            if reason:
                metrics.finish(reason)

    def _drain_message(self, started: bool) -> str:
        if started:
            return (f"this replica is shutting down ({self.draining}), and its grace period ended before your "
                    f"request finished; retry it, and another replica (or this one's replacement) will serve it.")
        return (f"this replica is shutting down ({self.draining}) and had not started your request; retry, and "
                f"another replica (or this one's replacement) will serve it.")

    def _reader(self) -> DeltaReader:
        """The running loop's stream of deltas from the driver (cluster/deltas.py), opened once."""
        if self._deltas is None or not self._deltas.usable():
            self._deltas = DeltaReader(self.actors[0])
        return self._deltas

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        request_id = uuid.uuid4().hex
        driver = self.actors[0]
        reader = self._reader()
        queue = reader.open(request_id)
        self._live[request_id] = False
        finished = False
        try:
            try:
                self._submitting[request_id] = submitted = driver.submit.remote(reader.id, request_id, request)
                await submitted
                del self._submitting[request_id]  # the driver has it: an abort now goes at once
            except Exception as e:
                finished = True  # refused, or the driver is gone: nothing to abort
                raise self._classify(e) from e
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise self._classify(item) from item
                self._live[request_id] = True
                finished = item.finish_reason is not None
                yield item
        finally:
            reader.close(request_id)
            del self._live[request_id]
            if not finished:
                self._abort([request_id])
            self._submitting.pop(request_id, None)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """Every request's output, in order, run concurrently in the engine: `stream`, collected,
        for synchronous callers (scripts, tests, benchmarks). From an event loop, use `stream`."""

        async def one(r: GenerationRequest) -> GenerationOutput:
            return collect(list(r.prompt_tokens), [d async for d in self.stream(r)])

        async def run_all() -> list[GenerationOutput]:
            tasks = [asyncio.ensure_future(one(r)) for r in requests]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for t in tasks:
                    t.cancel()  # on a failure, the other requests are aborted too

        return asyncio.run(run_all())

    def _classify(self, e: BaseException) -> BaseException:
        """A ValueError raised on the driver is the caller's mistake (raised before the request
        entered the engine, so the gang is fine); a cancelled call is the caller leaving (Serve
        cancels a request's Ray calls when its HTTP client disconnects, and that can reach us
        before the asyncio cancellation does); anything else breaks the gang."""
        if isinstance(e, ray.exceptions.TaskCancelledError):
            return asyncio.CancelledError(f"the request's call to the driver was cancelled: {e}")
        cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
        if isinstance(cause, ValueError):
            return cause
        self._failed = f"{type(cause).__name__}: {cause}"
        return RankFailedError(f"the gang failed during generation: {self._failed}")

    # ------------------------------------------------------------------ health and info
    async def check_health(self, timeout_s: float = 30.0) -> None:
        self._check_usable()
        try:
            await asyncio.wait_for(asyncio.gather(*[a.ping.remote() for a in self.actors]), timeout=timeout_s)
        except Exception as e:
            self._failed = f"health check: {type(e).__name__}: {e}"
            raise RankFailedError(f"a rank did not answer its health check: {e!r}") from e

    async def cluster_info(self) -> dict:
        s = self.states[0]
        try:
            engine = await asyncio.wait_for(self.actors[0].load.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001 - the page still shows the ranks
            engine = {"error": f"{type(e).__name__}: {e}"}
        return {
            "engine": engine,
            "world_size": len(self.infos),
            "pipeline_parallel_size": self.config.parallel.pipeline_parallel_size,
            "model_parallel_size": self.config.parallel.model_parallel_size,
            "backend": s.backend,
            "collectives": s.collectives,  # the model's: the backend's, or shared memory (one CPU machine)
            "device": s.device,
            "dtype": s.dtype,
            "healthy": self._failed is None,
            "replica_node_ip": ray.util.get_node_ip_address(),  # where this gang's owner (a Serve replica) runs
            "placement_group_id": self.placement.id.hex(),
            "start": self.progress.as_dict(),
            "ranks": [
                {**asdict(i), "gpu_ids": list(i.gpu_ids), "load": st.load, "weights_from": st.weights_from,
                 "threads": st.threads, "stage": st.stage, "tp_rank": st.tp_rank, "layers": list(st.layers)}
                for i, st in zip(self.infos, self.states)
            ],
        }


def _within(progress: StartProgress, refs: list, watch=None) -> list:
    """The results of `refs`, all due before the current stage's deadline; `watch` is called
    about once a second while they are not (to poll progress). Raises the stage's timeout."""
    pending = list(refs)
    while pending:
        left = progress.left_s()
        if left <= 0:
            raise progress.timed_out()
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, 1.0))
        if watch is not None and pending:
            try:
                watch()
            except Exception:  # noqa: BLE001 - progress is for show; the stage's own result decides
                pass
    return ray.get(refs)  # raises a rank's own error, if one failed


def _start_error(e: BaseException, progress: StartProgress) -> BaseException:
    """What a failed start raises: a caller's configuration mistake as itself (a ValueError,
    e.g. a checkpoint no machine has), a stage past its deadline as is, anything else as a
    GangStartError naming the stage and its fix."""
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, ValueError):
        return e.cause
    if isinstance(e, (GangStartError, ValueError, PlacementError)):
        return e
    stage = progress.as_dict()["stage"]
    cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
    return GangStartError(f"a rank failed in start stage {stage!r}: {type(cause).__name__}: {cause}. "
                          f"{STAGE_FIXES[stage][0].upper()}{STAGE_FIXES[stage][1:]}.")
