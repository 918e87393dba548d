"""Engine: serves many requests at once with iteration-level (continuous) batching.

The driver's engine owns the scheduler and the sampling. Each step it builds a StepPlan,
hands it to `publish` (which sends it to the other model-parallel ranks; None when there are
none), runs the plan on its own shard, samples the sequences that need a token and sends each
its delta; a request that only scores its prompt (max_tokens 0) ends once its prompt has run.
Requests, cancellations and deadlines enter between steps, so every rank sees them at the same
step boundary. `submit` and `abort` may be called from any thread; `step` and
`run` belong to the engine's own thread.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from llama.detokenizer import TextStream
from llama.model import Transformer
from llama.request import EndToken, FinishReason, GenerationRequest
from llama.runner import ModelRunner
from llama.sampling import adjust_logits, logprobs_of, logprobs_on_device, sample
from llama.scheduler import Scheduler
from llama.sequence import Sequence, Sink
from llama.step_plan import LOGITS_ALL, LOGITS_LAST, LOGITS_NONE, Segment, StepPlan
from llama.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineFailedError(RuntimeError):
    """A step failed (a collective broke, a rank died): the engine stops and must be replaced."""


@dataclass(frozen=True)
class EngineConfig:
    """How one model is served: the only home of these settings and their defaults. Filled from
    deploy/config.yaml's `engine:` section (or Llama.build's arguments) and passed down whole."""

    max_batch_size: int = 8  # sequences decoding at once: the KV cache's slots
    max_seq_len: int = 256  # prompt and generation together, per sequence
    prefill_chunk: int = 64  # prompt tokens run per step at most, over all prefilling sequences
    request_timeout_s: float | None = None  # a request still running this long after arrival ends ("timeout")
    seed: int = 1  # seeds the RNG that draws a seed for each sampled request that brings none
    heartbeat_s: float = 1.0  # an idle driver still sends a plan this often, so followers' waits never time out
    # Requests a replica holds beyond its max_batch_size running ones; more are refused at once
    # (HTTP 429 with Retry-After) rather than left to wait for their deadline.
    max_waiting: int = 64

    def __post_init__(self) -> None:
        least = {"max_batch_size": 1, "max_seq_len": 2, "prefill_chunk": 1, "max_waiting": 0}
        bad = [f"{k} must be an integer >= {n}, got {getattr(self, k)!r}" for k, n in least.items()
               if type(getattr(self, k)) is not int or getattr(self, k) < n]  # bool is no count
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            bad.append(f"request_timeout_s must be > 0 seconds (or null for no limit), got {self.request_timeout_s}")
        if not self.heartbeat_s > 0:
            bad.append(f"heartbeat_s must be > 0 seconds, got {self.heartbeat_s}")
        if bad:
            raise ValueError("engine settings: " + "; ".join(bad) + ".")


def check_request(request: GenerationRequest, max_seq_len: int, vocab_size: int) -> None:
    """Raise ValueError for a request this model cannot run, before it enters the engine (on the
    driver, so no rank ever sees it)."""
    tokens = request.prompt_tokens
    if not tokens:
        raise ValueError("the prompt is empty: send at least one token.")
    if len(tokens) >= max_seq_len:
        raise ValueError(f"the prompt is {len(tokens)} tokens; this model serves at most max_seq_len {max_seq_len} "
                         f"tokens, prompt and generation together. Shorten the prompt.")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}.")
    bad = [t for t, _ in request.params.logit_bias if not t < vocab_size]  # SamplingParams checked >= 0
    if bad:
        raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}.")


@dataclass
class EngineStats:
    steps: int = 0
    decode_tokens: int = 0  # decode inputs run (one per decoding sequence per step)
    prefill_tokens: int = 0
    shared_prefill_tokens: int = 0  # prompt tokens copied from another slot instead of run
    generated_tokens: int = 0
    finished: int = 0
    aborted: int = 0  # of which: cancelled by their callers
    timed_out: int = 0  # of which: past their deadline
    step_s: float = 0.0  # wall time inside steps that ran a forward
    publish_s: float = 0.0  # of which: sending the plan to the other ranks
    forward_s: float = 0.0  # of which: this rank's forward
    sample_s: float = 0.0  # of which: sampling, logprobs, detokenising, emitting


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        config: EngineConfig,
        publish: Callable[[StepPlan], None] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.publish = publish
        self.runner = ModelRunner(model, model.new_cache(config.max_batch_size, config.max_seq_len))
        self.scheduler = Scheduler(config.max_batch_size, config.prefill_chunk)
        self.stats = EngineStats()
        self.failure: BaseException | None = None
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()  # guards the inbox, shared with submitting threads
        self._new: list[Sequence] = []
        self._aborts: set[str] = set()
        self._wake = threading.Event()
        self._by_id: dict[str, Sequence] = {}  # engine thread only
        self._freed: list[int] = []  # slots given back since the last plan

    # ------------------------------------------------------------------ any thread
    def submit(self, request_id: str, request: GenerationRequest, sink: Sink) -> None:
        """Queue a request; its deltas go to `sink` from the engine thread. Raises ValueError
        for a request the model cannot serve (nothing is queued then)."""
        check_request(request, self.config.max_seq_len, self.model.args.vocab_size)
        if request.timeout_s is None and self.config.request_timeout_s is not None:
            request = replace(request, timeout_s=self.config.request_timeout_s)
        p = request.params
        gen = None
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else self._rng.randrange(2**63)
            gen = torch.Generator(device=self.model.device).manual_seed(seed)
        seq = Sequence(request_id, request, sink, TextStream(self.tokenizer, p.stop), gen)
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
        """Slots and queue, for health pages and tests (read without the engine's lock: approximate)."""
        return {"slots": self.config.max_batch_size, "free_slots": self.scheduler.free_slots,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                **asdict(self.stats)}

    # ------------------------------------------------------------------ engine thread
    def run(self, stop: threading.Event) -> None:
        """Step until `stop` is set, then tell the other ranks to leave their loops too."""
        try:
            while not stop.is_set():
                if self.step():
                    continue
                if not self._wake.wait(self.config.heartbeat_s) and self.publish is not None:
                    self._send(StepPlan((), (), tuple(self._take_freed())))
                self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - any failure ends the engine; the streams are told
            self._fail(e)
            raise
        finally:
            if self.failure is None and self.publish is not None:
                self._send(StepPlan((), (), stop=True))

    def step(self) -> bool:
        """One iteration. Returns False when there was nothing to run."""
        self._intake()
        work, copies = self.scheduler.schedule()
        if not work:
            return False
        t0 = time.perf_counter()
        segments, tokens = [], []
        for seq, n in work:
            if seq.prefilling:
                done = seq.computed + n == seq.prompt_len
                want_all = seq.prompt_logprobs is not None
                mode = LOGITS_ALL if want_all else (LOGITS_LAST if done else LOGITS_NONE)
            else:
                mode = LOGITS_LAST
            segments.append(Segment(seq.slot, seq.computed, n, mode))
            tokens.extend(seq.next_input(n))
        plan = StepPlan(tuple(segments), tuple(tokens), tuple(self._take_freed()), copies=tuple(copies))
        self._send(plan)
        t1 = time.perf_counter()
        logits = self.runner.execute(plan)  # (R, vocab)
        t2 = time.perf_counter()
        self._sample(work, plan, logits)
        t3 = time.perf_counter()
        s = self.stats
        s.steps += 1
        s.shared_prefill_tokens += sum(c.length for c in copies)
        s.step_s += t3 - t0
        s.publish_s += t1 - t0
        s.forward_s += t2 - t1
        s.sample_s += t3 - t2
        return True

    def _send(self, plan: StepPlan) -> None:
        if self.publish is not None:
            self.publish(plan)

    def _take_freed(self) -> list[int]:
        freed, self._freed = self._freed, []
        return freed

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
        del self._by_id[seq.request_id]
        slot = self.scheduler.remove(seq)
        if slot is not None:
            self._freed.append(slot)
        self.stats.finished += 1
        self.stats.aborted += reason == "abort"
        self.stats.timed_out += reason == "timeout"

    def _sample(self, work: list[tuple[Sequence, int]], plan: StepPlan, logits: torch.Tensor) -> None:
        row = 0
        due: list[tuple[Sequence, int]] = []  # sequences that get a token now, and their logits row
        for (seq, n), seg in zip(work, plan.segments):
            if seg.length == 1 and not seq.prefilling:
                self.stats.decode_tokens += 1
            else:
                self.stats.prefill_tokens += n
            if seg.logits == LOGITS_ALL:
                self._prompt_logprobs(seq, logits[row : row + n], seg.start)
                row += n
            elif seg.logits == LOGITS_LAST:
                row += 1
            seq.computed += n
            if seg.logits != LOGITS_NONE and not seq.prefilling:
                if seq.params.max_tokens == 0:
                    self._finish(seq, "length")  # scoring: its prompt's logprobs are all it asked for
                else:
                    due.append((seq, row - 1))
        if not due:
            return
        # Every choice, logprob and alternative stays on the device until one read-back at the end.
        rows = torch.tensor([r for _, r in due], device=logits.device)
        picked = torch.argmax(logits[rows], dim=-1)  # greedy rows, all at once
        for i, (s, r) in enumerate(due):
            p = s.params
            if p.temperature > 0 or p.adjusts_logits:
                # Penalties and bias on this row only, and only for the draw (logprobs below read
                # the model's own logits); requests without them skip this.
                row_logits = (adjust_logits(logits[r], s.tokens[s.prompt_len :], p.presence_penalty,
                                            p.frequency_penalty, p.logit_bias) if p.adjusts_logits else logits[r])
                picked[i] = sample(row_logits, p.temperature, p.top_p, p.top_k, s.generator)
        wants = [i for i, (s, _) in enumerate(due) if s.params.logprobs is not None]
        parts = [picked.double()]  # float64 holds every token id and float32 logprob exactly
        k = max((due[i][0].params.logprobs for i in wants), default=0)
        if wants:
            want = torch.tensor(wants, device=logits.device)
            chosen_lp, top_lp, top_id = logprobs_on_device(logits[rows[want]], picked[want], k)
            parts += [chosen_lp.double(), top_lp.double().flatten(), top_id.double().flatten()]
        flat = torch.cat(parts).tolist()  # the step's one read-back
        n, w = len(due), len(wants)
        chosen = [int(t) for t in flat[:n]]
        lps: dict[int, tuple[float, list]] = {}
        for j, i in enumerate(wants):
            asked = due[i][0].params.logprobs
            lp_row = flat[n + w + j * k : n + w + j * k + asked]
            id_row = flat[n + w + w * k + j * k : n + w + w * k + j * k + asked]
            lps[i] = (flat[n + j], [(int(t), lp) for t, lp in zip(id_row, lp_row)])
        for i, ((seq, _), tok) in enumerate(zip(due, chosen)):
            lp, top = ([lps[i][0]], [lps[i][1]]) if i in lps else (None, None)
            if tok in self.tokenizer.stop_ids:  # an end token (EOS, Llama 3's <|eot_id|>): not in the output
                end = EndToken(tok, lp[0], top[0]) if lp is not None and top is not None else EndToken(tok)
                self._finish(seq, "stop", end_token=end)
                continue
            seq.tokens.append(tok)
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
        token (the last row of the prompt predicts the first generated one: sampled instead)."""
        targets = seq.tokens[start + 1 : min(start + 1 + rows.shape[0], seq.prompt_len)]
        if not targets:
            return
        k = seq.params.logprobs or 0
        lp, top = logprobs_of(rows[: len(targets)], torch.tensor(targets, device=rows.device), k)
        seq.prompt_logprobs.extend(lp)
        seq.prompt_top.extend(top)

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            self.failure = e
            new, self._new = self._new, []
        err = EngineFailedError(f"the engine failed: {type(e).__name__}: {e}")
        log.error("engine failed: %r", e)
        for seq in list(self._by_id.values()) + new:
            seq.deliver(err)
        self._by_id.clear()
