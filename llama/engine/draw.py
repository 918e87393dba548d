"""The draw: a step's tokens picked from its logits on the device, with their logprobs and
alternatives, and the one read-back that brings them to the host.

Greedy rows are one argmax for the whole step; a row that samples, or whose request has
penalties, a bias, bans or a grammar, is drawn alone with those applied to its logits only (its
logprobs are the model's own). A pipeline's rows may come with their greedy token already taken
by the last stage (`known`). Nothing here waits for the device: the engine (llama/engine/core.py)
collects the read-back a step later where it overlaps, or a pipeline's depth later.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llama.engine.device_io import Readback, to_device
from llama.engine.request import SamplingParams
from llama.engine.runner import ModelRunner
from llama.engine.sampling import adjust_logits, logprobs_on_device, sample
from llama.engine.sequence import Sequence
from llama.engine.step_plan import StepPlan
from llama.tokenizers.base import Tokenizer


@dataclass
class Launched:
    """A step queued on the device whose results the host has not read yet."""

    due: list[tuple[Sequence, int]] = field(default_factory=list)  # sequences that get a token, their logits rows
    wants: list[int] = field(default_factory=list)  # indices into due that asked for logprobs
    k: int = 0  # alternatives read back per logprobs row
    readback: Readback | None = None  # tokens, then the logprobs of `wants`, flat
    prompt_rows: list[tuple[Sequence, int, int, int]] = field(default_factory=list)  # (seq, row, n, start): echo logprobs
    logits: torch.Tensor | None = None  # kept for prompt_rows only
    scored: list[Sequence] = field(default_factory=list)  # scoring requests whose prompt ended here
    plan: StepPlan | None = None  # the step's plan (a pipeline's: what its logits message holds)
    deferred: bool = False  # a pipeline's: drawn from when read back, every rank at the same point
    stage_logits: torch.Tensor | None = None  # deferred, on the last stage: its own logits (else sent to it)


class Drawer:
    def __init__(self, tokenizer: Tokenizer, runner: ModelRunner):
        self.tokenizer = tokenizer
        self.runner = runner  # the driver's: it keeps the step's tokens for the next plan's decodes

    def draw(self, out: Launched, logits: torch.Tensor, known: torch.Tensor | None = None) -> None:
        """Draw the step's tokens from its logits, on the device, and start their read-back.
        known: per logits row, a token the last stage already took greedily (-1: none)."""
        if out.prompt_rows:
            out.logits = logits
        if not out.due:
            return
        due = out.due
        # Every choice, logprob and alternative stays on the device until one read-back.
        rows = to_device([r for _, r in due], logits.device)
        picked = torch.argmax(logits[rows], dim=-1)  # greedy rows, all at once
        if known is not None:
            picked = torch.where(known[rows] >= 0, known[rows], picked)
        for i, (s, r) in enumerate(due):
            p = s.params
            if p.temperature > 0 or p.adjusts_logits:
                # Penalties, bias and masks on this row only, and only for the draw (logprobs below
                # read the model's own logits); requests without them skip this.
                row_logits = self._adjusted(logits[r], s) if p.adjusts_logits else logits[r]
                picked[i] = sample(row_logits, p.temperature, p.top_p, p.top_k, s.generator, p.min_p)
        self.runner.record_sampled(picked)  # the next plan's decodes read their inputs here
        for i, (s, _) in enumerate(due):
            s.in_flight += 1
            s.last_row = i
        out.wants = [i for i, (s, _) in enumerate(due) if s.params.logprobs is not None]
        parts = [picked.double()]  # float64 holds every token id and float32 logprob exactly
        out.k = max((due[i][0].params.logprobs for i in out.wants), default=0)
        if out.wants:
            want = to_device(out.wants, logits.device)
            chosen_lp, top_lp, top_id = logprobs_on_device(logits[rows[want]], picked[want], out.k)
            parts += [chosen_lp.double(), top_lp.double().flatten(), top_id.double().flatten()]
        out.readback = Readback(torch.cat(parts))  # the step's one read-back, collected by _complete

    def _adjusted(self, row: torch.Tensor, s: Sequence) -> torch.Tensor:
        """One row's logits as the request's penalties, bias and masks leave them for its draw.
        A token still in flight counts toward min_tokens (only their number matters there)."""
        p = s.params
        generated = s.tokens[s.prompt_len :]
        banned = self.end_ids(p) if len(generated) + s.in_flight < p.min_tokens else frozenset()
        if p.bad_words:
            banned = banned | {w[-1] for w in p.bad_words if len(w) <= len(generated) + 1
                               and tuple(generated[len(generated) - len(w) + 1 :]) == w[:-1]}
        mask = None
        if s.grammar is not None:
            mask = s.grammar.allowed()
            if mask.shape[0] != row.shape[0]:  # a model vocabulary padded past the tokenizer's: never those ids
                mask = torch.cat([mask, mask.new_zeros(max(0, row.shape[0] - mask.shape[0]))])[: row.shape[0]]
            if not mask.any():  # it refused a token (s.grammar.failed): only its end token, so the sequence ends
                mask[sorted(self.tokenizer.stop_ids)] = True
        out = adjust_logits(row, generated, p.presence_penalty, p.frequency_penalty, p.logit_bias,
                            seen=s.tokens if p.repetition_penalty != 1 else (),
                            repetition_penalty=p.repetition_penalty, banned=banned, allowed=p.allowed_token_ids,
                            mask=mask)
        # Bans (min_tokens, bad_words) that leave no token the caller allows, or allowed tokens the
        # grammar never takes: the caller's allowed set, then the grammar, win; never a draw from nothing.
        if bool(torch.isinf(out).all()):
            out = adjust_logits(row, [], 0.0, 0.0, (), allowed=p.allowed_token_ids, mask=mask)
        if bool(torch.isinf(out).all()):
            out = adjust_logits(row, [], 0.0, 0.0, (), mask=mask)
        return out

    def end_ids(self, p: SamplingParams) -> frozenset[int] | tuple[int, ...]:
        """The tokens that end a sequence: the tokenizer's end tokens (unless ignore_eos) and the
        request's stop_token_ids."""
        if not p.ignore_eos and not p.stop_token_ids:
            return self.tokenizer.stop_ids
        return frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(self.tokenizer.stop_ids))
