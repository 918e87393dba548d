"""Scheduler: decodes first, the shared prefill budget, chunking, slots, removal and prompt sharing (SlotCopy)."""
from __future__ import annotations

import pytest

from llama.engine.request import GenerationRequest, SamplingParams
from llama.engine.scheduler import Scheduler
from llama.engine.sequence import Sequence
from llama.engine.step_plan import SlotCopy
from llama.tokenizers.base import Tokenizer
from llama.tokenizers.detokenizer import TextStream
from llama.tokenizers.load import load_tokenizer

GENERATED = 7  # the token every simulated step "samples"


@pytest.fixture(scope="module")
def tok(tiny_ckpts) -> Tokenizer:
    return load_tokenizer(tiny_ckpts["gqa1"] / "tokenizer.model")


@pytest.fixture
def make(tok):
    """make(name, prompt or its length, **params) -> a Sequence, as Engine.submit builds one. A
    length gives a prompt of its own (BOS, then a token unique to this call): no sharing."""
    made = iter(range(3, 300))

    def _make(name: str, prompt: int | list[int], **params) -> Sequence:
        tokens = ([1, next(made)] + [5] * (prompt - 2))[:prompt] if isinstance(prompt, int) else prompt
        request = GenerationRequest(tuple(tokens), SamplingParams(max_tokens=50, temperature=0, **params))
        return Sequence(name, request, [].append, TextStream(tok, ()), None)

    return _make


def advance(work: list[tuple[Sequence, int]]) -> None:
    """What the engine does after a step's forward: the tokens ran are cached, and every
    sequence whose tokens are now all cached gets a sampled one."""
    for seq, n in work:
        seq.computed += n
        if seq.computed == len(seq.tokens):
            seq.tokens.append(GENERATED)


def step(sched: Scheduler) -> tuple[list[tuple[str, int]], list[SlotCopy]]:
    """One schedule + advance; the work by request id."""
    work, copies = sched.schedule()
    advance(work)
    return [(s.request_id, n) for s, n in work], copies


# ---------------------------------------------------------------- decodes and the prefill budget


def test_an_empty_scheduler_has_no_work():
    sched = Scheduler(max_batch_size=2, prefill_chunk=4, max_seq_len=512)
    assert sched.schedule() == ([], [])
    assert sched.free_slots == 2


def test_each_decoding_sequence_advances_one_token_per_step_whatever_the_budget(make):
    sched = Scheduler(max_batch_size=4, prefill_chunk=3, max_seq_len=512)
    a, b, c = make("a", 1), make("b", 1), make("c", 1)
    for s in (a, b, c):
        sched.add(s)
    assert step(sched)[0] == [("a", 1), ("b", 1), ("c", 1)]  # three 1-token prompts use the whole budget
    for _ in range(3):
        before = [s.computed for s in (a, b, c)]
        assert step(sched)[0] == [("a", 1), ("b", 1), ("c", 1)]
        assert [s.computed for s in (a, b, c)] == [x + 1 for x in before]
        assert not any(s.prefilling for s in (a, b, c))


def test_decodes_come_before_prefill_chunks_and_do_not_use_the_budget(make):
    sched = Scheduler(max_batch_size=4, prefill_chunk=2, max_seq_len=512)
    d = make("d", 2)
    sched.add(d)
    step(sched)  # d prefilled, now decoding
    p = make("p", 9)
    sched.add(p)
    for _ in range(4):  # p's prompt runs 2 tokens a step; d never waits for it
        work, _ = step(sched)
        assert work[0] == ("d", 1)
        assert work[1][0] == "p" and work[1][1] == 2
    assert p.computed == 8 and d.generated == 5


def test_decodes_are_listed_first_whatever_the_admission_order(make):
    sched = Scheduler(max_batch_size=4, prefill_chunk=16, max_seq_len=512)
    x, y = make("x", 6), make("y", 3)
    sched.add(x)
    sched.add(y)
    sched.schedule()
    x.computed, y.computed = 2, 3  # as if x's prompt were still being chunked while y decodes
    work, _ = sched.schedule()
    assert [(s.request_id, n) for s, n in work] == [("y", 1), ("x", 4)]


def test_the_budget_goes_to_continuing_prompts_first_then_to_new_ones_in_arrival_order(make):
    sched = Scheduler(max_batch_size=4, prefill_chunk=4, max_seq_len=512)
    for name, n in (("a", 6), ("b", 3), ("c", 2)):
        sched.add(make(name, n))
    assert step(sched)[0] == [("a", 4)]  # nothing else is admitted once the budget is spent
    assert [s.request_id for s in sched.waiting] == ["b", "c"]
    assert step(sched)[0] == [("a", 2), ("b", 2)]  # a continues before b starts; b is chunked
    assert step(sched)[0] == [("a", 1), ("b", 1), ("c", 2)]
    assert step(sched)[0] == [("a", 1), ("b", 1), ("c", 1)]
    assert not sched.waiting


def test_a_long_prompt_is_chunked_over_several_steps(make):
    sched = Scheduler(max_batch_size=2, prefill_chunk=4, max_seq_len=512)
    s = make("s", 10)
    sched.add(s)
    chunks = []
    while s.prefilling:
        work, _ = sched.schedule()
        assert len(work) == 1 and work[0][0] is s
        assert s.next_input(work[0][1]) == s.tokens[s.computed : s.computed + work[0][1]]
        chunks.append((s.computed, work[0][1]))
        advance(work)
    assert chunks == [(0, 4), (4, 4), (8, 2)]  # (start, length) of each chunk
    assert step(sched)[0] == [("s", 1)]


# ---------------------------------------------------------------- slots


def test_admission_stops_when_slots_run_out_and_resumes_when_remove_frees_one(make):
    sched = Scheduler(max_batch_size=2, prefill_chunk=64, max_seq_len=512)
    a, b, c = make("a", 3), make("b", 3), make("c", 3)
    for s in (a, b, c):
        sched.add(s)
    assert step(sched)[0] == [("a", 3), ("b", 3)]
    assert (a.slot, b.slot, c.slot) == (0, 1, None)
    assert sched.free_slots == 0 and list(sched.waiting) == [c]
    assert step(sched)[0] == [("a", 1), ("b", 1)]  # budget left, but no slot
    assert sched.remove(a) == 0 and a.slot is None
    assert sched.free_slots == 1
    assert step(sched)[0] == [("b", 1), ("c", 3)]
    assert c.slot == 0 and sched.running == [b, c]


def test_the_lowest_free_slot_is_taken_first(make):
    sched = Scheduler(max_batch_size=4, prefill_chunk=64, max_seq_len=512)
    seqs = [make(f"s{i}", 2) for i in range(4)]
    for s in seqs:
        sched.add(s)
    step(sched)
    assert [s.slot for s in seqs] == [0, 1, 2, 3]
    assert sched.remove(seqs[3]) == 3
    assert sched.remove(seqs[1]) == 1
    late = [make("late0", 2), make("late1", 2)]
    for s in late:
        sched.add(s)
    step(sched)
    assert [s.slot for s in late] == [1, 3]


def test_remove_of_a_waiting_sequence_gives_back_no_slot_and_it_never_runs(make):
    sched = Scheduler(max_batch_size=1, prefill_chunk=8, max_seq_len=512)
    a, b, c = make("a", 2), make("b", 2), make("c", 2)
    for s in (a, b, c):
        sched.add(s)
    step(sched)
    assert sched.remove(b) is None
    assert list(sched.waiting) == [c] and sched.free_slots == 0
    sched.remove(a)
    assert step(sched)[0] == [("c", 2)]


# ---------------------------------------------------------------- prompt sharing


def test_a_prompt_already_in_a_decoding_slot_is_copied_and_runs_one_token(make):
    sched = Scheduler(max_batch_size=3, prefill_chunk=8, max_seq_len=512)
    a = make("a", [1, 5, 9, 30])
    sched.add(a)
    step(sched)
    step(sched)  # a has generated tokens past its prompt: still a donor
    b = make("b", [1, 5, 9, 30])
    sched.add(b)
    work, copies = sched.schedule()
    assert copies == [SlotCopy(a.slot, b.slot, 3)]  # positions 0..2; b runs its last prompt token itself
    assert [(s.request_id, n) for s, n in work] == [("a", 1), ("b", 1)]
    assert b.computed == 3 and b.next_input(1) == [30]
    advance(work)
    assert not b.prefilling and b.generated == 1


def test_a_donor_needs_only_all_but_the_last_prompt_token_cached(make):
    sched = Scheduler(max_batch_size=2, prefill_chunk=4, max_seq_len=512)
    a = make("a", [1, 2, 3, 4, 5])
    sched.add(a)
    step(sched)  # a: 4 of 5 prompt tokens cached
    b = make("b", [1, 2, 3, 4, 5])
    sched.add(b)
    work, copies = sched.schedule()
    assert copies == [SlotCopy(a.slot, b.slot, 4)]
    assert [(s.request_id, n) for s, n in work] == [("a", 1), ("b", 1)]


def test_a_different_prompt_of_the_same_length_is_not_copied(make):
    sched = Scheduler(max_batch_size=2, prefill_chunk=8, max_seq_len=512)
    sched.add(make("a", [1, 5, 9, 30]))
    step(sched)
    sched.add(make("b", [1, 5, 9, 31]))
    work, copies = sched.schedule()
    assert copies == [] and [(s.request_id, n) for s, n in work] == [("a", 1), ("b", 4)]


def test_a_twin_of_a_prompt_still_prefilling_waits_in_its_place_then_copies(make):
    sched = Scheduler(max_batch_size=3, prefill_chunk=8, max_seq_len=512)
    a, twin, c, d, e = make("a", [1, 8, 9]), make("twin", [1, 8, 9]), make("c", 2), make("d", 2), make("e", 2)
    for s in (a, twin, c, d, e):
        sched.add(s)
    work, copies = step(sched)
    assert work == [("a", 3), ("c", 2), ("d", 2)] and copies == []  # twin deferred, not prefilled; e: no slot
    assert twin.slot is None and twin.computed == 0
    assert [s.request_id for s in sched.waiting] == ["twin", "e"]  # the twin kept its place, ahead of e
    sched.remove(c)
    work, copies = step(sched)
    assert copies == [SlotCopy(a.slot, 1, 2)] and twin.slot == 1
    assert work == [("a", 1), ("d", 1), ("twin", 1)]
    assert [s.request_id for s in sched.waiting] == ["e"]


def test_a_deferred_twin_does_not_hold_up_the_queue_behind_it(make):
    sched = Scheduler(max_batch_size=4, prefill_chunk=4, max_seq_len=512)
    prompt = [1, 8, 9, 10, 11, 12]
    a, twin, other = make("a", prompt), make("twin", prompt), make("other", 2)
    for s in (a, twin, other):
        sched.add(s)
    assert step(sched)[0] == [("a", 4)]  # budget spent: nothing more is looked at
    work, copies = step(sched)
    assert work == [("a", 2), ("other", 2)] and copies == []  # a still prefilling: twin waits
    assert list(sched.waiting) == [twin]
    work, copies = step(sched)
    assert copies == [SlotCopy(a.slot, twin.slot, 5)] and ("twin", 1) in work


@pytest.mark.parametrize("donor_echo", [False, True])
def test_a_sequence_that_needs_its_prompt_logprobs_never_shares(make, donor_echo):
    sched = Scheduler(max_batch_size=3, prefill_chunk=8, max_seq_len=512)
    a = make("a", [1, 8, 9, 10], **({"logprobs": 1, "echo": True} if donor_echo else {}))
    sched.add(a)
    step(sched)
    echo = make("echo", [1, 8, 9, 10], logprobs=1, echo=True)
    assert not echo.can_share_prompt
    sched.add(echo)
    work, copies = sched.schedule()
    assert copies == [] and [(s.request_id, n) for s, n in work] == [("a", 1), ("echo", 4)]


def test_an_echo_twin_of_a_prompt_still_prefilling_is_not_deferred(make):
    sched = Scheduler(max_batch_size=3, prefill_chunk=8, max_seq_len=512)
    sched.add(make("a", [1, 8, 9]))
    sched.add(make("echo", [1, 8, 9], logprobs=0, echo=True))
    work, copies = sched.schedule()
    assert copies == [] and [(s.request_id, n) for s, n in work] == [("a", 3), ("echo", 3)]


def test_logprobs_without_echo_still_share(make):
    sched = Scheduler(max_batch_size=2, prefill_chunk=8, max_seq_len=512)
    a = make("a", [1, 8, 9, 10])
    sched.add(a)
    step(sched)
    b = make("b", [1, 8, 9, 10], logprobs=2)
    sched.add(b)
    _, copies = sched.schedule()
    assert copies == [SlotCopy(a.slot, b.slot, 3)]
