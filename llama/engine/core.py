"""Engine: serves many requests at once with iteration-level (continuous) batching.

The driver's engine owns the scheduler and the sampling. Each step it builds a StepPlan,
hands it to `publish` (which sends it to the other model-parallel ranks; None when there are
none), runs the plan on its own shard and samples the sequences that need a token, all on the
device, then reads the tokens back in one copy and sends each sequence its delta; a request
that only scores its prompt (max_tokens 0) ends once its prompt has run.

With overlap (`async_scheduling`, on CUDA by default) step N is read back only after step N+1
has been planned, sent and queued: the host's planning, the plan's broadcast and step N's
detokenising and emitting run while the device computes. Step N+1's decodes then take their
inputs from step N's tokens on the device (`sampled_token`; at MP>1 the driver's copy reaches
the other ranks by a broadcast queued on the device). The scheduler plans no step past a
sequence's max_tokens or max_seq_len; one that ends on a stop token or stop string is known a
step late, and the row it ran in that step is dropped. A request with presence or frequency
penalties needs its last token on the host for its next draw, so a step in flight is read back
first while one is running.
In a pipeline of P stages (a `link`: this rank holds the first stage and samples from the
logits the last one sends back) the driver keeps up to P steps in flight, each with sequences of
its own: it plans and runs its stage of step N+1 while the later stages run step N, and reads a
step's logits, samples and emits only once P steps are out (or nothing else can run). A
sequence waiting for its token (`awaiting`) is not planned again until it has it; a prompt's
next chunk may be, since it needs no token. The scheduler gives each step at most its share of
the sequences (llama/engine/scheduler.py), so that P steps find work. Every stage runs the
steps in the driver's order, so a row or block freed and given out again in a later plan is
never touched by an earlier step still running on a later stage.
Requests, cancellations and deadlines enter between steps, so every rank sees them at the same
step boundary. `submit` and `abort` may be called from any thread; `step` and
`run` belong to the engine's own thread.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from llama.engine.block_pool import BlockPool
from llama.engine.config import EngineConfig, check_request
from llama.engine.device_io import to_device
from llama.engine.draw import Drawer, Launched
from llama.engine.grammar import GrammarCompiler
from llama.engine.kv_memory import free_device_bytes, pool_blocks
from llama.engine.request import EndToken, FinishReason, GenerationRequest
from llama.engine.runner import ModelRunner
from llama.engine.sampling import logprobs_of
from llama.engine.scheduler import Scheduler
from llama.engine.sequence import Sequence, Sink
from llama.engine.step_plan import (LOGITS_ALL, LOGITS_LAST, LOGITS_NONE, LOGITS_TOKEN, Segment, StepPlan, TableRun,
                                     logit_rows, sampled_token)
from llama.model.stage_link import StageLink
from llama.model.transformer import Transformer
from llama.tokenizers.base import Tokenizer
from llama.tokenizers.detokenizer import TextStream

log = logging.getLogger(__name__)


def engine_blocks(model: Transformer, config: EngineConfig, layers: int | None = None) -> int:
    """The KV pool this rank's shard can hold (llama/engine/kv_memory.py), in blocks; in a
    pipeline, of `layers` layers (its largest stage's, the same on every rank)."""
    element = torch.empty((), dtype=model.dtype).element_size()
    mp = model.args.n_kv_heads // model.layers[0].attention.n_local_kv_heads
    blocks = pool_blocks(config, model.args, mp, element, model.device.type, free_device_bytes(model.device),
                         layers or len(model.layers))
    if not blocks:
        raise ValueError(f"the KV cache has room for no block of {config.block_size} positions on {model.device}: "
                         f"set engine.kv_cache_memory_gb, or free memory for it.")
    return blocks


class EngineFailedError(RuntimeError):
    """A step failed (a collective broke, a rank died): the engine stops and must be replaced."""


@dataclass
class EngineStats:
    steps: int = 0
    overlapped: int = 0  # steps launched while an earlier one was not yet read back (overlap, pipeline)
    decode_tokens: int = 0  # decode inputs run (one per decoding sequence per step)
    prefill_tokens: int = 0  # prompt tokens run (those found in the prefix cache are not)
    generated_tokens: int = 0
    finished: int = 0
    aborted: int = 0  # of which: cancelled by their callers
    timed_out: int = 0  # of which: past their deadline
    step_s: float = 0.0  # wall time inside steps that ran a forward
    publish_s: float = 0.0  # of which: sending the plan to the other ranks
    forward_s: float = 0.0  # of which: this rank's forward and the sampling (on a GPU: queuing them)
    sample_s: float = 0.0  # of which: reading a step's tokens back, detokenising, emitting


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        config: EngineConfig,
        publish: Callable[[StepPlan], None] | None = None,
        num_blocks: int | None = None,
        link: StageLink | None = None,
        flush: Callable[[], None] | None = None,
    ):
        """num_blocks: the KV pool's size, agreed by a gang's ranks (cluster/rank.py); None:
        this rank's own (llama/engine/kv_memory.py), as a single-process engine has. link: the
        model is one stage of a pipeline, and this rank takes the last stage's logits through it.
        flush: called by `run` on the engine thread once each step's deltas are all in their
        sinks, so that a caller who batches them sends a step's as one message (cluster/outbox.py)."""
        if num_blocks is None:
            num_blocks = engine_blocks(model, config)
        config = config.for_model(model.args, num_blocks * config.block_size)
        self.model = model
        self.tokenizer = tokenizer
        self._grammars = GrammarCompiler(tokenizer)  # structured outputs: each grammar compiled once
        self.config = config
        self.publish = publish
        self.flush = flush or (lambda: None)
        self.runner = ModelRunner(model, model.new_cache(config.max_batch_size, config.max_seq_len, num_blocks,
                                                         config.block_size), share_sampled=publish is not None,
                                  link=link)
        self._drawer = Drawer(tokenizer, self.runner)
        self.capture_s = self.runner.warm_up()  # CUDA graphs, at the same point on every rank
        # Steps in flight: one per pipeline stage; else with overlap (on CUDA by default) two.
        self.depth = link.stage.count if link is not None else 1
        self.overlap = self.depth == 1 and (model.device.type == "cuda" if config.async_scheduling is None
                                            else config.async_scheduling)
        self.pool = BlockPool(num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(config.max_batch_size, config.prefill_chunk, config.max_seq_len, self.pool,
                                   self.depth)
        self.stats = EngineStats()
        self.failure: BaseException | None = None
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()  # guards the inbox, shared with submitting threads
        self._new: list[Sequence] = []
        self._aborts: set[str] = set()
        self._wake = threading.Event()
        self._by_id: dict[str, Sequence] = {}  # engine thread only
        self._launched: deque[Launched] = deque()  # steps launched and not yet read back, oldest first

    # ------------------------------------------------------------------ any thread
    def submit(self, request_id: str, request: GenerationRequest, sink: Sink) -> None:
        """Queue a request; its deltas go to `sink` from the engine thread. Raises ValueError
        for a request the model cannot serve (nothing is queued then)."""
        check_request(request, self.config.max_seq_len, self.model.args.vocab_size, self.config.block_size,
                      self.pool.num_blocks)
        if request.timeout_s is None and self.config.request_timeout_s is not None:
            request = replace(request, timeout_s=self.config.request_timeout_s)
        p = request.params
        gen = None
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else self._rng.randrange(2**63)
            gen = torch.Generator(device=self.model.device).manual_seed(seed)
        seq = Sequence(request_id, request, sink, TextStream(self.tokenizer, p.stop, p.min_tokens, p.include_stop_str_in_output,
                                                              p.skip_special_tokens), gen)
        if p.grammar is not None:  # compiled here, on the caller's thread, once per grammar; ValueError if refused
            seq.grammar = self._grammars.matcher(p.grammar)
        with self._lock:
            if self.failure is not None:
                raise EngineFailedError(f"the engine failed earlier ({self.failure!r}) and must be replaced.")
            self._new.append(seq)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Cancel a request; it ends (finish_reason "abort") at the next step boundary."""
        with self._lock:
            self._aborts.add(request_id)
        self._wake.set()

    def load(self) -> dict:
        """Rows, blocks and queue, for health pages, metrics and tests (read without the
        engine's lock: approximate)."""
        sched, pool = self.scheduler, self.pool
        return {"slots": self.config.max_batch_size, "free_slots": sched.free_slots,
                "running": len(sched.running), "waiting": len(sched.waiting),
                "kv_blocks": pool.num_blocks, "kv_blocks_used": pool.used, "kv_blocks_cached": pool.cached,
                "kv_blocks_free": pool.available - pool.cached,
                "block_size": pool.block_size, "prefix_cache_hit_tokens": sched.hit_tokens,
                "prefix_cache_query_tokens": sched.query_tokens, "preemptions": sched.preemptions,
                **asdict(self.stats)}

    # ------------------------------------------------------------------ engine thread
    def run(self, stop: threading.Event) -> None:
        """Step until `stop` is set, then tell the other ranks to leave their loops too."""
        try:
            while not stop.is_set():
                ran = self.step()
                self.flush()  # the step's deltas, and those of requests it ended between steps
                if ran:
                    continue
                if not self._wake.wait(self.config.heartbeat_s) and self.publish is not None:
                    self._send(StepPlan((), (), tuple(self.scheduler.take_freed())))
                self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - any failure ends the engine; the streams are told
            self._fail(e)
            raise
        finally:
            self.flush()  # _fail's errors
            if self.failure is None and self.publish is not None:
                self._send(StepPlan((), (), stop=True))

    def step(self) -> bool:
        """One iteration: plan, send and launch a step, then read back the oldest step in flight
        once as many are out as may be (one per pipeline stage; with overlap, two; else this
        one). Returns False when there was nothing to run or read."""
        self._intake()
        if self._launched and self._needs_history():
            self._complete(self._launched.popleft())  # a penalty counts the token in flight: read it first
        scheduled = self.scheduler.schedule()
        work = scheduled.work
        if not work and not scheduled.table:
            if not self._launched:
                return False
            self._complete(self._launched.popleft())  # its tokens let its sequences run again
            return True
        t0 = time.perf_counter()
        plan = self._plan(work, scheduled.table, scheduled.freed)
        self._send(plan)
        t1 = time.perf_counter()
        self.stats.overlapped += bool(self._launched)
        self._launched.append(self._launch(work, plan))
        t2 = time.perf_counter()
        # With overlap the step before this one is read back while this one computes.
        keep = self.depth - 1 if self.depth > 1 else int(self.overlap)
        while len(self._launched) > keep:
            self._complete(self._launched.popleft())
        t3 = time.perf_counter()
        s = self.stats
        s.steps += 1
        s.step_s += t3 - t0
        s.publish_s += t1 - t0
        s.forward_s += t2 - t1
        s.sample_s += t3 - t2
        return True

    def _plan(self, work: list[tuple[Sequence, int]], table: list[TableRun], freed: list[int]) -> StepPlan:
        """The step's plan; each sequence's tokens are counted as cached from here on. A decode
        whose input was sampled by the step still in flight takes it on the device."""
        segments, tokens = [], []
        for seq, n in work:
            if seq.prefilling:
                done = seq.computed + n == seq.target
                mode = LOGITS_ALL if seq.wants_prompt_logits else (LOGITS_LAST if done else LOGITS_NONE)
                self.stats.prefill_tokens += n
            else:
                mode = LOGITS_LAST
                self.stats.decode_tokens += 1
            p = seq.params
            if mode == LOGITS_LAST and self.depth > 1 and p.temperature == 0 and not p.adjusts_logits \
                    and p.logprobs is None:
                mode = LOGITS_TOKEN  # in a pipeline the last stage sends back its token, not its row
            segments.append(Segment(seq.slot, seq.computed, n, mode))
            if seq.in_flight:
                tokens.append(sampled_token(seq.last_row))
            else:
                tokens.extend(seq.next_input(n))
            seq.computed += n
        return StepPlan(tuple(segments), tuple(tokens), tuple(freed), table=tuple(table))

    def _needs_history(self) -> bool:
        """Whether a running sequence with a token in flight counts its generated tokens in its
        draw (presence, frequency or repetition penalty): its next draw needs that token on the host."""
        return any(s.in_flight and s.params.counts_history for s in self.scheduler.running)

    def _send(self, plan: StepPlan) -> None:
        if self.publish is not None:
            self.publish(plan)

    def _intake(self) -> None:
        with self._lock:
            new, self._new = self._new, []
            aborts, self._aborts = self._aborts, set()
        for seq in new:
            if seq.request_id in self._by_id:
                seq.deliver(ValueError(f"request id {seq.request_id!r} is already running; ids must be unique."))
                continue
            self._by_id[seq.request_id] = seq
            self.scheduler.add(seq)
            if seq.params.max_tokens == 0 and seq.prompt_logprobs is None:
                self._finish(seq, "length")  # echo of nothing but the prompt's text: nothing to run
        now = time.monotonic()
        for seq in list(self._by_id.values()):
            if seq.request_id in aborts or seq.abort_requested:
                self._finish(seq, "abort")
            elif seq.deadline is not None and now >= seq.deadline:
                self._finish(seq, "timeout")

    def _finish(self, seq: Sequence, reason: FinishReason, token_ids: list[int] | None = None, text: str = "",
                logprobs: list[float] | None = None, top: list | None = None, end_token: EndToken | None = None) -> None:
        seq.emit(token_ids or [], text + seq.text.flush(), reason, logprobs, top, end_token)
        seq.finished = True
        del self._by_id[seq.request_id]
        self.scheduler.remove(seq)
        self.stats.finished += 1
        self.stats.aborted += reason == "abort"
        self.stats.timed_out += reason == "timeout"

    def _launch(self, work: list[tuple[Sequence, int]], plan: StepPlan) -> Launched:
        """Run the plan and draw the step's tokens, on the device; start their read-back. Nothing
        here waits for the device. In a pipeline the draw waits for the last stage's logits
        (_complete)."""
        logits = self.runner.execute(plan)  # (R, vocab); None: they come later from the last stage
        out = Launched()
        row = 0
        for (seq, n), seg in zip(work, plan.segments):
            if seg.logits == LOGITS_ALL:
                out.prompt_rows.append((seq, row, n, seg.start))
            row += logit_rows(seg)
            if seg.logits != LOGITS_NONE and not seq.prefilling:
                if seq.params.max_tokens == 0:
                    out.scored.append(seq)  # scoring: its prompt's logprobs are all it asked for
                else:
                    out.due.append((seq, row - 1))
        out.plan = plan
        if self.depth > 1:  # under torchrun the last stage's ranks defer too: every rank plans alike
            out.deferred, out.stage_logits = True, logits
            for seq, _ in out.due:
                seq.awaiting += 1  # not planned again until this step's token is drawn and read
            return out
        self._drawer.draw(out, logits)
        return out

    def _complete(self, step: Launched) -> None:
        """A launched step's results on the host: prompt logprobs, then each sampled token, its
        stop and length checks, and its delta. A sequence that ended meanwhile (a stop found in
        the step before, an abort, a deadline) drops its row. A pipeline's step draws here, from
        the logits the last stage sent back."""
        if step.deferred:
            for seq, _ in step.due:
                seq.awaiting -= 1
            if step.stage_logits is not None:  # the last stage's own (under torchrun)
                self._drawer.draw(step, step.stage_logits)
            else:
                self._drawer.draw(step, *self.runner.receive_logits(step.plan))
        for seq, row, n, start in step.prompt_rows:
            if not seq.finished:
                self._prompt_logprobs(seq, step.logits[row : row + n], start)
        for seq in step.scored:
            if not seq.finished:
                self._finish(seq, "length")
        if step.readback is None:
            return
        with self.runner.busy():  # waits for the step on a GPU: the watchdog's to see
            flat = step.readback.tolist()
        due, wants, k = step.due, step.wants, step.k
        n, w = len(due), len(wants)
        chosen = [int(t) for t in flat[:n]]
        lps: dict[int, tuple[float, list]] = {}
        for j, i in enumerate(wants):
            asked = due[i][0].params.logprobs
            lp_row = flat[n + w + j * k : n + w + j * k + asked]
            id_row = flat[n + w + w * k + j * k : n + w + w * k + j * k + asked]
            lps[i] = (flat[n + j], [(int(t), lp) for t, lp in zip(id_row, lp_row)])
        for i, ((seq, _), tok) in enumerate(zip(due, chosen)):
            seq.in_flight -= 1
            if seq.finished:
                continue
            lp, top = ([lps[i][0]], [lps[i][1]]) if i in lps else (None, None)
            # An end token (EOS, <|eot_id|>, stop_token_ids) is not in the output. A grammar's end tokens (the
            # tokenizer's; it allows them only once it is complete) end its sequence even with ignore_eos.
            if tok in self._drawer.end_ids(seq.params) or (seq.grammar is not None and tok in self.tokenizer.stop_ids):
                end = EndToken(tok, lp[0], top[0]) if lp is not None and top is not None else EndToken(tok)
                self._finish(seq, "stop", end_token=end)
                continue
            seq.tokens.append(tok)
            if seq.grammar is not None:
                seq.grammar.take(tok)
            self.stats.generated_tokens += 1
            text = seq.text.push(tok)
            if seq.text.stopped:
                self._finish(seq, "stop", [tok], text, lp, top)
            elif seq.generated >= seq.params.max_tokens or len(seq.tokens) >= self.config.max_seq_len:
                self._finish(seq, "length", [tok], text, lp, top)
            else:
                seq.emit([tok], text, None, lp, top)

    def _prompt_logprobs(self, seq: Sequence, rows: torch.Tensor, start: int) -> None:
        """rows (n, vocab): logits at positions start..start+n-1; each predicts the next prompt
        token (the last row of the prompt predicts the first generated one: sampled instead).
        Positions already known (run again after a preemption) are skipped."""
        first = len(seq.prompt_logprobs) - 1 - start  # the row predicting the first unknown token
        targets = seq.tokens[start + 1 + first : min(start + 1 + rows.shape[0], seq.prompt_len)]
        if not targets:
            return
        k = seq.params.logprobs or 0
        lp, top = logprobs_of(rows[first : first + len(targets)], to_device(targets, rows.device), k)
        seq.prompt_logprobs.extend(lp)
        seq.prompt_top.extend(top)

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            self.failure = e
            new, self._new = self._new, []
        self._launched.clear()
        err = EngineFailedError(f"the engine failed: {type(e).__name__}: {e}")
        log.error("engine failed: %r", e)
        for seq in list(self._by_id.values()) + new:
            seq.deliver(err)
        self._by_id.clear()
