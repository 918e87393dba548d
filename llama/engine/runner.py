"""ModelRunner: runs one StepPlan through this rank's shard of the model, on its paged KV cache.

Every rank first applies the plan's block-table changes (rows freed, blocks gained), then runs
the plan. The one-token segments (decodes, mostly) run as one static-shaped decode
(llama/engine/decode_step.py: a CUDA graph on CUDA). The longer ones (prefill chunks) are packed
into one sequence of tokens, so the linear layers (and their collectives) run once for all of
them, and attention runs per group of alike segments, each segment against its own cached
positions, gathered through its block table (`pack`). On the CPU, where nothing is captured, a
step with prefill chunks packs its decodes with them: one forward, the weights read once. The
logits come back in the plan's segment order.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from llama.engine.decode_step import DecodeStep
from llama.engine.device_io import to_device
from llama.engine.step_plan import LOGITS_NONE, Segment, StepPlan, TableRun, logit_rows
from llama.model.collectives import broadcast_
from llama.model.kv_cache import KVCache
from llama.model.linear import pack_for_cpu
from llama.model.packed import AttentionGroup, PackedBatch
from llama.model.stage_link import StageLink
from llama.model.transformer import Transformer


def _group(segments: list[tuple[int, int, int, int]], cache: KVCache, device: torch.device) -> AttentionGroup:
    """segments: (packed offset, row, start, length)."""
    L = max(s[3] for s in segments)
    n_blocks = -(-max(s[2] + s[3] for s in segments) // cache.block_size)
    K = n_blocks * cache.block_size
    G = len(segments)
    offs = torch.tensor([s[0] for s in segments], dtype=torch.long)
    starts = torch.tensor([s[2] for s in segments], dtype=torch.long)
    lens = torch.tensor([s[3] for s in segments], dtype=torch.long)
    j = torch.arange(L)
    valid = j[None, :] < lens[:, None]  # (G, L)
    query_index = torch.where(valid, offs[:, None] + j[None, :], 0)
    qpos = starts[:, None] + j[None, :]  # (G, L)
    visible = torch.arange(K)[None, None, :] <= qpos[:, :, None]  # (G, L, K)
    mask = torch.zeros((G, L, K)).masked_fill_(~visible, float("-inf"))
    rows = torch.tensor([s[1] for s in segments], dtype=torch.long)
    return AttentionGroup(
        query_index=to_device(query_index, device),
        valid=to_device(valid, device),
        # Integer indices, not the boolean mask: indexing by a mask on CUDA waits for the device.
        valid_rows=to_device(valid.flatten().nonzero()[:, 0], device),
        valid_targets=to_device(query_index[valid], device),
        tables=to_device(cache.host_table[rows, :n_blocks], device),
        kv_len=K,
        mask=to_device(mask.unsqueeze(1), device),
    )


def pack(plan: StepPlan, cache: KVCache, device: torch.device) -> PackedBatch:
    """The plan's segments as one packed batch, their rows' block tables as the cache holds
    them (the plan's table changes applied)."""
    positions: list[int] = []
    write_index: list[torch.Tensor] = []
    logit_index: list[int] = []
    decodes, prefills = [], []
    off = 0
    for s in plan.segments:
        positions.extend(range(s.start, s.start + s.length))
        write_index.append(cache.write_index(s.slot, s.start, s.length))
        logit_index.extend(range(off + s.length - logit_rows(s), off + s.length))  # its last rows
        (decodes if s.length == 1 else prefills).append((off, s.slot, s.start, s.length))
        off += s.length
    groups = [_group(g, cache, device) for g in (decodes, prefills) if g]
    return PackedBatch(
        tokens=to_device(plan.tokens, device),
        positions=to_device(positions, device),
        write_index=to_device(torch.cat(write_index), device),
        groups=groups,
        logit_index=to_device(logit_index, device),
    )


def fixed_tables(cache: KVCache) -> tuple[TableRun, ...]:
    """Table changes that give each row its own run of blocks for positions 0..max_seq_len-1,
    as a slot cache has: a plan of them lets a bench or test drive a runner by rows alone."""
    w = cache.max_blocks_per_row
    assert cache.num_blocks >= cache.max_rows * w, "the pool is too small for a run of blocks per row"
    return tuple(TableRun(r, 0, tuple(range(1 + r * w, 1 + (r + 1) * w))) for r in range(cache.max_rows))


def forward_rows(model: Transformer, rows: list[list[int]], block_size: int = 16) -> torch.Tensor:
    """Logits (sum of lengths, vocab) at every position of each row, each a whole sequence from
    position 0, in one forward outside the engine (training, scoring, tests); under the
    caller's grad mode, so training can backpropagate through it."""
    cache = model.new_cache(len(rows), max(len(r) for r in rows), block_size=block_size)
    plan = StepPlan.prefill(rows, block_size)
    for run in plan.table:
        cache.assign(run.slot, run.index, list(run.blocks))
    return model(pack(plan, cache, model.device), cache)


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, graphs: bool | None = None, share_sampled: bool = False,
                 link: StageLink | None = None):
        """graphs: capture the decode as CUDA graphs (None: on CUDA devices). share_sampled: this
        rank is one of a driver's gang (cluster/lockstep.py), so the tokens the driver samples
        reach the others over the model-parallel group, on the device, when a plan uses them.
        link: the model is one stage of a pipeline (llama/model/stage_link.py): every step runs
        the packed forward, from the previous stage's hidden states to the next's."""
        self.model = model
        self.cache = cache
        self.link = link
        if link is not None:
            graphs = False  # a stage's step waits on its neighbours: eager, one packed forward
        pack_for_cpu(model)  # oneDNN's layout for the linear layers' weights, on the CPU (llama/model/linear.py)
        # The tokens the last step sampled, row j for the plan's sampled_token(j). The driver's
        # engine writes them (record_sampled); the other ranks receive them.
        self.sampled = torch.zeros(cache.max_rows, dtype=torch.long, device=model.device)
        self.share_sampled = share_sampled
        self.decode = DecodeStep(model, cache, self.sampled, graphs)
        self.active: set[int] = set()  # table rows holding a sequence's blocks, as the plans have said
        self.busy_since: float | None = None  # time.monotonic() when the step now running began
        self.steps = 0  # plans run (idle ones not counted), and the seconds they took: for metrics
        self.step_s = 0.0

    def warm_up(self) -> float:
        """Start-up work before the first step: capture every decode bucket as a CUDA graph
        (nothing on the CPU). Every rank of a gang calls it at the same point, so the
        collectives inside the captures line up. Returns the seconds spent capturing."""
        return self.decode.capture_all() if self.decode.graphs else 0.0

    def record_sampled(self, tokens: torch.Tensor) -> None:
        """Driver: the tokens this step sampled (R,), on the device, for the next plan to use."""
        self.sampled[: tokens.shape[0]].copy_(tokens)

    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run the plan; return the logits it asks for, (R, vocab) float32, in segment order; in a
        pipeline, None where they come later from the last stage (receive_logits)."""
        t0 = time.monotonic()
        try:
            with self.busy():
                return self._execute(plan)
        finally:
            if not plan.idle:
                self.steps += 1
                self.step_s += time.monotonic() - t0

    @contextmanager
    def busy(self):
        """Marks work that waits on the device or a collective: a watchdog (cluster/rank.py) reads
        busy_since from another thread. On a GPU a step's forward only queues work; the engine
        marks its read-back too, where a hung device or collective is waited for."""
        self.busy_since = time.monotonic()
        try:
            yield
        finally:
            self.busy_since = None

    @torch.inference_mode()
    def _execute(self, plan: StepPlan) -> torch.Tensor | None:
        for row in plan.freed:
            self.cache.clear(row)
            self.active.discard(row)
        for run in plan.table:
            self.cache.assign(run.slot, run.index, list(run.blocks))
            self.active.add(run.slot)
        bs = self.cache.block_size
        for s in plan.segments:
            # A plan that runs a row nobody gave blocks would write into another request's.
            assert s.slot in self.active, f"plan runs table row {s.slot}, which holds no sequence"
            assert s.start + s.length <= self.cache.max_seq_len, "plan runs past max_seq_len"
            assert self.cache.host_table[s.slot, (s.start + s.length - 1) // bs] != 0, \
                f"plan runs row {s.slot} to position {s.start + s.length - 1}, past the blocks it was given"
        if not plan.segments:
            return torch.empty((0, self.model.args.vocab_size))
        if self.link is not None:
            return self._stage(plan)
        if plan.takes_sampled and self.share_sampled:
            # The driver's row of the last step's tokens to every rank: queued on the device
            # after that step's sampling, before this step's forward; the host never waits.
            broadcast_(self.sampled)
        if not self.decode.graphs and any(s.length > 1 for s in plan.segments):
            # Eager (the CPU): decodes and prefill chunks in one packed forward, so the weights are
            # read once a step and each linear layer runs once on all the step's rows.
            batch = pack(plan, self.cache, self.model.device)
            t = batch.tokens  # a decode's input may be -1-j: row j of the last step's tokens
            batch.tokens = torch.where(t >= 0, t, self.sampled[(-1 - t).clamp(min=0)])
            return self.model(batch, self.cache)
        singles: list[tuple[Segment, int]] = []  # one-token segments and their tokens
        longer: list[Segment] = []
        longer_tokens: list[int] = []
        off = 0
        for s in plan.segments:
            if s.length == 1:
                singles.append((s, plan.tokens[off]))
            else:
                assert min(plan.tokens[off : off + s.length]) >= 0, "a sampled token in a prefill chunk"
                longer.append(s)
                longer_tokens.extend(plan.tokens[off : off + s.length])
            off += s.length
        one = (self.decode.run([s.slot for s, _ in singles], [s.start for s, _ in singles], [t for _, t in singles])
               if singles else None)
        if not longer and all(s.logits != LOGITS_NONE for s, _ in singles):
            return one  # a step of decodes alone: their rows, in segment order already
        many = (self.model(pack(StepPlan(tuple(longer), tuple(longer_tokens)), self.cache, self.model.device), self.cache)
                if longer else None)
        parts, i, row = [], 0, 0  # back in segment order
        for s in plan.segments:
            if s.length == 1:
                if s.logits != LOGITS_NONE:
                    parts.append(one[i : i + 1])
                i += 1
            else:
                n = logit_rows(s)
                parts.append(many[row : row + n])
                row += n
        return torch.cat(parts) if parts else torch.empty((0, self.model.args.vocab_size), device=self.model.device)

    def _stage(self, plan: StepPlan) -> torch.Tensor | None:
        """One pipeline stage's part of the plan: the tokens (the first stage) or the previous
        stage's hidden states through this stage's layers, on to the next stage. Returns the last
        stage's logits; None where this rank takes them later (receive_logits), once the stages
        after it have run the step; an empty tensor elsewhere."""
        model, link = self.model, self.link
        batch = pack(plan, self.cache, model.device)
        hidden = None
        if model.stage.first:
            if plan.takes_sampled and self.share_sampled:
                broadcast_(self.sampled)  # the driver's tokens to its stage's other ranks
            t = batch.tokens
            batch.tokens = torch.where(t >= 0, t, self.sampled[(-1 - t).clamp(min=0)])
        else:
            hidden = link.receive_hidden(len(plan.tokens), model.args.dim, model.dtype, model.device)
        out = model(batch, self.cache, hidden)
        if model.stage.last:
            link.send_logits(out, plan.token_rows())
            return out
        link.send_hidden(out)
        return None if link.takes_logits else torch.empty((0, model.args.vocab_size), device=model.device)

    def receive_logits(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """In a pipeline, on a rank that samples outside the last stage: a step's logits, in the
        order the steps were run (execute returned None for each), and the greedy tokens of its
        LOGITS_TOKEN rows (llama/model/stage_link.py)."""
        with self.busy():
            rows = sum(logit_rows(s) for s in plan.segments)
            return self.link.receive_logits(rows, plan.token_rows(), self.model.args.vocab_size, self.model.device)
