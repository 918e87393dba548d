"""RankActor: one model-parallel rank in its own process (a Ray actor).

Each actor joins the gang's process group (nccl on CUDA, gloo on CPU), initialises fairscale's
model parallelism and loads its own slices of the checkpoint. Then rank 0 runs the engine (the
driver: scheduler, sampling, step plans) and every other rank follows the driver's plans, each
on a thread of its own, so the actor's event loop stays free: `deltas` streams tokens back, and
control calls (ping, info, load, abort) answer while a step computes.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

from cluster.compute_thread import ComputeThread
from cluster.config import GangConfig
from cluster.lockstep import PlanChannel, follow
from cluster.metrics import RankSampler
from cluster.network import collective_env
from cluster.outbox import Batch, Outbox
from cluster.weights import slices_from
from llama.checkpoints.load import copy_into, load_into, missing_files, rank_nbytes
from llama.checkpoints.load_progress import LoadProgress
from llama.distributed import choose_backend, free_port, init_model_parallel, resolve_device, resolve_dtype
from llama.engine.core import Engine, engine_blocks
from llama.engine.request import GenerationRequest, SamplingParams
from llama.engine.runner import ModelRunner
from llama.engine.step_plan import StepPlan
from llama.model.collectives import shared_memory_group, use_shared_memory
from llama.model.stage_link import StageLink
from llama.model.stages import Stage
from llama.model.transformer import Transformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    node_id: str
    node_ip: str
    pid: int
    device: str
    gpu_ids: tuple[str, ...]


@dataclass(frozen=True)
class RankState:
    """What a rank reports once set up."""

    backend: str
    device: str
    dtype: str
    load: dict  # llama.checkpoints.load_progress.LoadProgress.as_dict(): bytes, rate, seconds
    weights_from: str  # "local files", or the object store from a machine that has them
    threads: int = 1  # the threads its step computes with (parallel.threads_per_rank)
    collectives: str = ""  # how the model's collectives travel: nccl, gloo, or shared memory
    stage: int = 0  # its pipeline stage
    tp_rank: int = 0  # its rank within the stage (tensor parallel)
    layers: tuple[int, int] = (0, 0)  # the model's layers it holds: [first, last)


class RankActor:
    def __init__(self, config: GangConfig, rank: int):
        self.config = config
        self.rank = rank
        self.world_size = config.parallel.world_size  # pipeline stages x tensor-parallel ranks
        self.tp_size = config.parallel.model_parallel_size
        self.tp_rank = rank % self.tp_size
        stages = config.parallel.stage_layers(config.checkpoint.args.n_layers)
        self.stage = Stage(rank // self.tp_size, len(stages), stages[rank // self.tp_size])
        self.pool_layers = max(map(len, stages))  # every rank's KV pool is sized for the largest stage
        self.model: Transformer | None = None
        self.engine: Engine | None = None  # rank 0 only
        self.runner: ModelRunner | None = None  # the other ranks: run the driver's plans
        self.weights_from = "local files"  # or the object store, from a machine that has them
        self.device: torch.device | None = None  # set when joining the group
        self.progress: LoadProgress | None = None  # set when loading begins
        self.sampler: RankSampler | None = None  # exports metrics once the loop runs
        self.channel: PlanChannel | None = None
        self.threads = torch.get_num_threads()  # OMP_NUM_THREADS, from parallel.threads_per_rank (cluster/placement.py)
        self.collectives = ""  # set when joining the group
        self._stop = threading.Event()
        self._compute = ComputeThread(f"rank{rank}-compute")  # every torch call of this rank runs here
        self._loop: concurrent.futures.Future | None = None  # the loop, running on _compute
        self._loop_error: BaseException | None = None
        self._outboxes: dict[str, Outbox] = {}  # the driver's, by stream id
        self._delta_messages = self._deltas_sent = 0
        logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s")

    # ------------------------------------------------------------------ control
    @ray.method(concurrency_group="control")
    async def info(self) -> RankInfo:
        ctx = ray.get_runtime_context()
        device = str(self.model.device) if self.model is not None else "unloaded"
        return RankInfo(self.rank, ctx.get_node_id(), ray.util.get_node_ip_address(), os.getpid(), device,
                        tuple(str(g) for g in ray.get_gpu_ids()))

    @ray.method(concurrency_group="control")
    async def ping(self) -> int:
        """Raises when this rank's loop has ended (a failed step, a lost driver)."""
        if self._loop_error is not None:
            raise RuntimeError(f"rank {self.rank}'s loop failed: {self._loop_error!r}")
        if self._loop is not None and self._loop.done() and not self._stop.is_set():
            raise RuntimeError(f"rank {self.rank}'s loop has ended")
        runner = self.engine.runner if self.engine is not None else self.runner
        since = runner.busy_since if runner is not None else None
        limit = self.config.parallel.call_timeout_s
        if since is not None and time.monotonic() - since > limit:  # the watchdog: a step that never ends
            raise RuntimeError(f"rank {self.rank}'s step has run for {time.monotonic() - since:.0f}s, past "
                               f"call_timeout_s {limit:g}s: a collective or the device is hung; the gang must be "
                               f"replaced")
        return self.rank

    @ray.method(concurrency_group="control")
    async def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's node IP and a free port on it, where every rank meets."""
        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    @ray.method(concurrency_group="control")
    async def load(self) -> dict:
        """The driver's slots, queue and step counters (rank 0), plus its plan-broadcast cost."""
        out = self.engine.load() if self.engine is not None else {}
        if self.engine is not None:  # the tokens' way back (cluster/outbox.py)
            out.update(delta_streams=len(self._outboxes), delta_messages=self._delta_messages, deltas_sent=self._deltas_sent)
        if self.channel is not None:
            out.update(plans_sent=self.channel.sent, plan_send_s=self.channel.send_s)
        if (group := shared_memory_group()) is not None:  # calls that went through gloo: past a slot
            out.update(shared_memory_calls=group.calls, shared_memory_fallbacks=group.fallbacks)
        return out

    @ray.method(concurrency_group="control")
    async def abort(self, request_id: str) -> None:
        if self.engine is not None:
            self.engine.abort(request_id)

    @ray.method(concurrency_group="control")
    async def load_progress(self) -> dict | None:
        """This rank's load progress (bytes of its slices read, rate, time left); None before."""
        return None if self.progress is None else self.progress.as_dict()

    # ------------------------------------------------------------------ start, in stages (cluster/start.py)
    async def join(self, master_addr: str, master_port: int) -> tuple[str, str]:
        """Stage rendezvous: join the gang's process group at rank 0's address, bound to this
        node's interface. Returns (backend, device)."""
        return await self._compute.run(self._join, master_addr, master_port)

    def _join(self, master_addr: str, master_port: int) -> tuple[str, str]:
        par, eng = self.config.parallel, self.config.engine
        device = resolve_device(par.device)
        if device.type == "cuda":
            device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this rank's GPU
            torch.cuda.set_device(device)
        self.device = device
        backend = choose_backend(device, par.backend)
        bind = collective_env(ray.util.get_node_ip_address(), os.environ)
        os.environ.update(bind)  # read by gloo and NCCL when the groups below are made
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            world_size=self.world_size,
            rank=self.rank,
            # the rendezvous, and any collective after it: past call_timeout_s a step is hung
            timeout=timedelta(seconds=max(par.rendezvous_timeout_s, par.call_timeout_s)),
        )
        init_model_parallel(self.tp_size, par.pipeline_parallel_size)
        self.collectives, one_machine = self._choose_collectives(backend)
        if self.world_size > 1:
            capacity = StepPlan.capacity(eng.max_batch_size, eng.prefill_chunk, eng.block_size)
            self.channel = PlanChannel(capacity, timeout_s=par.call_timeout_s, shared_memory=one_machine,
                                       stage=self.stage, rank=self.rank, tp_size=self.tp_size)
        log.info("joined the %s group of %d at %s:%d over %s; the model's collectives through %s", backend,
                 self.world_size, master_addr, master_port,
                 bind.get("GLOO_SOCKET_IFNAME") or os.environ.get("GLOO_SOCKET_IFNAME") or "the default interface",
                 self.collectives)
        return backend, str(device)

    def _choose_collectives(self, backend: str) -> tuple[str, bool]:
        """How the model's collectives go: shared memory where every rank of this one's stage is
        on this machine's CPU (parallel.shared_memory), else the group's backend; and whether the
        whole gang is on this machine's CPU (the plans then go through shared memory too, except in
        a pipeline, where they travel down the pipe: cluster/lockstep.py).
        Collective: every rank of a stage takes the same way."""
        if self.device.type != "cpu" or self.world_size == 1 or not self.config.parallel.shared_memory:
            return backend, False
        nodes: list = [None] * self.world_size
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        first = self.stage.index * self.tp_size
        if self.tp_size == 1 or len(set(nodes[first:first + self.tp_size])) > 1:
            return backend, len(set(nodes)) == 1
        args, eng = self.config.checkpoint.args, self.config.engine
        # A step's hidden states (decodes and a prefill chunk) or its decode rows' logit slices;
        # a larger tensor (prompt logprobs of a whole chunk) goes through gloo.
        rows = eng.max_batch_size + eng.prefill_chunk
        slot = max(rows * args.dim, eng.max_batch_size * -(-args.vocab_size // self.tp_size)) * 4
        if not use_shared_memory(slot, self.config.parallel.call_timeout_s):
            log.warning("no shared-memory collectives here (not x86-64, or no room for a file of %d bytes a slot in "
                        "/dev/shm or the temporary directory); the model's collectives go through %s", slot, backend)
            return backend, False
        return "shared memory", len(set(nodes)) == 1

    async def first_collective(self) -> float:
        """Stage collective: one all-reduce and one broadcast across the gang, checked; returns
        the seconds they took."""
        return await self._compute.run(self._first_collective)

    def _first_collective(self) -> float:
        t0 = time.perf_counter()
        x = torch.ones(1024, device=self.device)
        dist.all_reduce(x)
        y = torch.full((1024,), float(self.rank), device=self.device)
        dist.broadcast(y, src=0)
        if x[0].item() != self.world_size or y.abs().sum().item() != 0:
            raise RuntimeError(f"rank {self.rank}: the first all-reduce/broadcast gave wrong values "
                               f"({x[0].item()}, {y[0].item()}): the collectives are broken")
        return time.perf_counter() - t0

    @ray.method(concurrency_group="control")
    async def has_checkpoint(self) -> bool:
        """Whether this rank's machine has every weight file (else it needs a holder's)."""
        return not missing_files(self.config.checkpoint)

    async def load_weights(self, holder: str | None) -> RankState:
        """Stage weights: build the model and copy this rank's slices into it, from local files
        or, on a machine without them, from `holder`, a node that has them (found once for the
        gang); log the progress as it goes."""
        work = asyncio.ensure_future(self._compute.run(self._load_weights, holder))
        while not work.done():
            await asyncio.wait([work], timeout=5.0)
            if not work.done() and self.progress is not None:
                log.info("loading: %s", self.progress.describe())
        return work.result()

    def _load_weights(self, holder: str | None) -> RankState:
        par, eng, ckpt = self.config.parallel, self.config.engine, self.config.checkpoint
        dtype = resolve_dtype(par.dtype, self.device)
        pipeline = self.stage.count > 1
        model = Transformer(ckpt.args, eng.max_seq_len, device=self.device, dtype=dtype,
                            stage=self.stage if pipeline else None)
        # The tensors of this rank's slice of its stage: tensor-parallel rank tp_rank of tp_size.
        self.progress = LoadProgress(rank_nbytes(ckpt, self.tp_rank, self.tp_size, self.stage if pipeline else None))
        if missing_files(ckpt):  # this machine has no copy: the slices come from one that has
            if holder is None:
                raise RuntimeError(f"rank {self.rank}: this machine lacks the checkpoint's files and no holder was "
                                   f"named; RankGroup.start names one when any rank lacks them")
            self.weights_from = f"object store from node {holder[:12]}"
            copy_into(model, slices_from(holder, ckpt, self.tp_rank, self.tp_size, self.stage if pipeline else None),
                      self.progress)
        else:
            load_into(model, ckpt, self.tp_rank, self.tp_size, self.progress)
        self.progress.finish()
        num_blocks = engine_blocks(model, eng, self.pool_layers)  # the same on every stage
        if self.device.type == "cuda" and eng.kv_cache_memory_gb is None:
            # Sized by each GPU's free memory: all take the smallest, so every table fits every
            # pool (at the point where the decode's graph captures line the ranks up anyway).
            blocks = torch.tensor([num_blocks], dtype=torch.long, device=self.device)
            dist.all_reduce(blocks, op=dist.ReduceOp.MIN)
            num_blocks = int(blocks.item())
        # In a pipeline, hidden states go stage to stage and the last stage's logits to the driver.
        link = StageLink(self.stage, self.rank, self.tp_size, logits_to=(0,)) if pipeline else None
        if self.rank == 0:
            publish = self.channel.publish if self.channel is not None else None
            self.engine = Engine(model, ckpt.tokenizer(), eng, publish=publish, num_blocks=num_blocks, link=link,
                                 flush=self._flush_outboxes)
        else:
            cache = model.new_cache(eng.max_batch_size, eng.max_seq_len, num_blocks, eng.block_size)
            self.runner = ModelRunner(model, cache, share_sampled=True, link=link)
            self.runner.warm_up()  # as the driver's Engine does, at the same point: captures line up
        self.model = model
        log.info("loaded from %s on %s (%s): %s", self.weights_from, self.device, dtype, self.progress.describe())
        return RankState(backend=dist.get_backend(), device=str(self.device), dtype=str(dtype).removeprefix("torch."),
                         load=self.progress.as_dict(), weights_from=self.weights_from,
                         threads=self.threads, collectives=self.collectives, stage=self.stage.index,
                         tp_rank=self.tp_rank, layers=(self.stage.layers.start, self.stage.layers.stop))

    async def start_loop(self) -> None:
        """Stage ready: the driver's engine loop, or a follower's, on a thread of its own; and
        the sampler that exports this rank's metrics (cluster/metrics.py)."""
        self._loop = self._compute.submit(self._run_loop)
        if self.engine is not None:
            read = self._read_driver
        else:
            read = lambda: {"steps": self.runner.steps, "step_s": self.runner.step_s}  # noqa: E731
        self.sampler = RankSampler(self.config.checkpoint.ckpt_dir.name, self.rank, read).start()

    def _read_driver(self) -> dict:
        out = self.engine.load()
        out.update(steps=self.engine.runner.steps, step_s=self.engine.runner.step_s)  # as on the other ranks
        return out

    async def warm_up(self) -> None:
        """Stage ready, on the driver: one greedy one-token request through the whole gang."""
        request = GenerationRequest((self.config.checkpoint.args.vocab_size - 1,), SamplingParams(max_tokens=1, temperature=0))
        box = self._outbox("warm-up")
        try:
            await self.submit("warm-up", "warm-up", request)
            while box.live:
                for _, item in await box.take() or ():
                    if isinstance(item, BaseException):
                        raise item
        finally:
            await self.close_stream("warm-up")

    def _run_loop(self) -> None:
        try:
            if self.engine is not None:
                self.engine.run(self._stop)
            else:
                follow(self.runner, self.channel)
        except BaseException as e:  # noqa: BLE001 - kept for ping, which makes the gang unhealthy
            self._loop_error = e
            log.exception("rank %d loop failed", self.rank)

    # ------------------------------------------------------------------ requests (rank 0)
    # A caller (a RankGroup, on one event loop) opens one stream, `deltas`, and submits its
    # requests under that stream's id: each step's deltas of all of them come as one message
    # (cluster/outbox.py), not one Ray stream per request.
    def _outbox(self, stream_id: str) -> Outbox:
        if self.engine is None:
            raise RuntimeError(f"rank {self.rank} is not the driver; send requests to rank 0.")
        box = self._outboxes.get(stream_id)
        if box is None:
            box = self._outboxes[stream_id] = Outbox(asyncio.get_running_loop())
        return box

    def _flush_outboxes(self) -> None:  # the engine thread, after each step
        for box in list(self._outboxes.values()):  # copied: the event loop adds and removes boxes
            box.flush()

    async def deltas(self, stream_id: str) -> AsyncIterator[Batch]:
        """The deltas of every request submitted under stream_id, as lists of (request id, delta
        or the error that ended it), each list what the engine made since the last. Ends when
        close_stream does. Cancelled (its caller's task was), it leaves the requests running:
        calling it again with the same id reads on."""
        box = self._outbox(stream_id)
        while (items := await box.take()) is not None:
            self._delta_messages += 1
            self._deltas_sent += len(items)
            yield items

    async def submit(self, stream_id: str, request_id: str, request: GenerationRequest) -> None:
        """Queue one request; its deltas come on stream_id's `deltas`, the last with a
        finish_reason. Raises ValueError at once for a request the model cannot serve."""
        box = self._outbox(stream_id)
        sink = box.sink(request_id)
        try:
            self.engine.submit(request_id, request, sink)
        except BaseException:
            box.forget(request_id)
            raise

    async def close_stream(self, stream_id: str) -> None:
        """The caller is done with stream_id: its requests still running are aborted, and its
        `deltas` ends."""
        box = self._outboxes.pop(stream_id, None)
        if box is not None:
            for request_id in box.live:
                self.engine.abort(request_id)
            box.close()

    async def shutdown(self) -> None:
        self._stop.set()
        if self.sampler is not None:
            self.sampler.stop()
        if self._loop is not None:
            await asyncio.to_thread(concurrent.futures.wait, [self._loop], 10)
        if dist.is_initialized():
            dist.destroy_process_group()
