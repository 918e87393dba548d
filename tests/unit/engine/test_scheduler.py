"""Scheduler: the shared prefill budget, chunking, rows, KV blocks taken as positions fill
them, table changes, removal, prefix sharing through the block pool, twins, and preemption."""
from __future__ import annotations

import random

import pytest

from llama.engine.block_pool import BlockPool
from llama.engine.request import GenerationRequest, SamplingParams
from llama.engine.scheduler import Scheduler
from llama.engine.sequence import Sequence
from llama.engine.step_plan import TableRun
from llama.tokenizers.base import Tokenizer
from llama.tokenizers.detokenizer import TextStream
from llama.tokenizers.load import load_tokenizer

GENERATED = 7  # the token every simulated step "samples"
BS = 4  # positions per block in these tests


@pytest.fixture(scope="module")
def tok(tiny_ckpts) -> Tokenizer:
    return load_tokenizer(tiny_ckpts["gqa1"] / "tokenizer.model")


@pytest.fixture
def make(tok):
    """make(name, prompt or its length, **params) -> a Sequence, as Engine.submit builds one. A
    length gives a prompt of its own (BOS, then a token unique to this call): no sharing."""
    made = iter(range(3, 300))

    def _make(name: str, prompt: int | list[int], max_tokens: int = 50, **params) -> Sequence:
        tokens = ([1, next(made)] + [5] * (prompt - 2))[:prompt] if isinstance(prompt, int) else prompt
        request = GenerationRequest(tuple(tokens), SamplingParams(max_tokens=max_tokens, temperature=0, **params))
        return Sequence(name, request, [].append, TextStream(tok, ()), None)

    return _make


def Sched(max_batch_size: int, prefill_chunk: int, max_seq_len: int = 512, blocks: int = 512,
          caching: bool = True) -> Scheduler:
    return Scheduler(max_batch_size, prefill_chunk, max_seq_len, BlockPool(blocks, BS, caching))


def advance(work: list[tuple[Sequence, int]]) -> None:
    """What the engine does after a step's forward: the tokens ran are cached, and every
    sequence whose tokens are now all cached gets a sampled one."""
    for seq, n in work:
        seq.computed += n
        if seq.computed == len(seq.tokens):
            seq.tokens.append(GENERATED)


def step(sched: Scheduler) -> list[tuple[str, int]]:
    """One schedule + advance; the work by request id."""
    work = sched.schedule().work
    advance(work)
    sched.pool.check()
    return [(s.request_id, n) for s, n in work]


# ---------------------------------------------------------------- decodes and the prefill budget


def test_an_empty_scheduler_has_no_work():
    sched = Sched(max_batch_size=2, prefill_chunk=4)
    out = sched.schedule()
    assert out.work == [] and out.table == [] and out.freed == []
    assert sched.free_slots == 2


def test_each_decoding_sequence_advances_one_token_per_step_whatever_the_budget(make):
    sched = Sched(max_batch_size=4, prefill_chunk=3)
    a, b, c = make("a", 1), make("b", 1), make("c", 1)
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == [("a", 1), ("b", 1), ("c", 1)]  # three 1-token prompts use the whole budget
    for _ in range(3):
        before = [s.computed for s in (a, b, c)]
        assert step(sched) == [("a", 1), ("b", 1), ("c", 1)]
        assert [s.computed for s in (a, b, c)] == [x + 1 for x in before]
        assert not any(s.prefilling for s in (a, b, c))


def test_decodes_come_before_prefill_chunks_and_do_not_use_the_budget(make):
    sched = Sched(max_batch_size=4, prefill_chunk=2)
    d = make("d", 2)
    sched.add(d)
    step(sched)  # d prefilled, now decoding
    p = make("p", 9)
    sched.add(p)
    for _ in range(4):  # p's prompt runs 2 tokens a step; d never waits for it
        work = step(sched)
        assert work[0] == ("d", 1)
        assert work[1][0] == "p" and work[1][1] == 2
    assert p.computed == 8 and d.generated == 5


def test_the_budget_goes_to_continuing_prompts_first_then_to_new_ones_in_arrival_order(make):
    sched = Sched(max_batch_size=4, prefill_chunk=4)
    for name, n in (("a", 6), ("b", 3), ("c", 2)):
        sched.add(make(name, n))
    assert step(sched) == [("a", 4)]  # nothing else is admitted once the budget is spent
    assert [s.request_id for s in sched.waiting] == ["b", "c"]
    assert step(sched) == [("a", 2), ("b", 2)]  # a continues before b starts; b is chunked
    assert step(sched) == [("a", 1), ("b", 1), ("c", 2)]
    assert step(sched) == [("a", 1), ("b", 1), ("c", 1)]
    assert not sched.waiting


def test_a_long_prompt_is_chunked_over_several_steps(make):
    sched = Sched(max_batch_size=2, prefill_chunk=4)
    s = make("s", 10)
    sched.add(s)
    chunks = []
    while s.prefilling:
        work = sched.schedule().work
        assert len(work) == 1 and work[0][0] is s
        assert s.next_input(work[0][1]) == s.tokens[s.computed : s.computed + work[0][1]]
        chunks.append((s.computed, work[0][1]))
        advance(work)
    assert chunks == [(0, 4), (4, 4), (8, 2)]  # (start, length) of each chunk
    assert step(sched) == [("s", 1)]


# ---------------------------------------------------------------- rows


def test_admission_stops_when_rows_run_out_and_resumes_when_remove_frees_one(make):
    sched = Sched(max_batch_size=2, prefill_chunk=64)
    a, b, c = make("a", 3), make("b", 3), make("c", 3)
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == [("a", 3), ("b", 3)]
    assert (a.slot, b.slot, c.slot) == (0, 1, None)
    assert sched.free_slots == 0 and list(sched.waiting) == [c]
    assert step(sched) == [("a", 1), ("b", 1)]  # budget left, but no row
    sched.remove(a)
    assert a.slot is None and a.blocks == [] and sched.free_slots == 1
    out = sched.schedule()
    assert out.freed == [0] and [(s.request_id, n) for s, n in out.work] == [("b", 1), ("c", 3)]
    assert c.slot == 0 and sched.running == [b, c]


def test_the_lowest_free_row_is_taken_first(make):
    sched = Sched(max_batch_size=4, prefill_chunk=64)
    seqs = [make(f"s{i}", 2) for i in range(4)]
    for s in seqs:
        sched.add(s)
    step(sched)
    assert [s.slot for s in seqs] == [0, 1, 2, 3]
    sched.remove(seqs[3])
    sched.remove(seqs[1])
    late = [make("late0", 2), make("late1", 2)]
    for s in late:
        sched.add(s)
    step(sched)
    assert [s.slot for s in late] == [1, 3]


def test_remove_of_a_waiting_sequence_gives_back_nothing_and_it_never_runs(make):
    sched = Sched(max_batch_size=1, prefill_chunk=8)
    a, b, c = make("a", 2), make("b", 2), make("c", 2)
    for s in (a, b, c):
        sched.add(s)
    step(sched)
    sched.remove(b)
    assert list(sched.waiting) == [c] and sched.free_slots == 0 and sched.take_freed() == []
    sched.remove(a)
    assert step(sched) == [("c", 2)]


# ---------------------------------------------------------------- blocks and tables


def test_blocks_are_taken_as_positions_fill_them_and_sent_as_changes(make):
    sched = Sched(max_batch_size=2, prefill_chunk=6, blocks=8)
    a = make("a", 9, max_tokens=20)
    sched.add(a)
    out = sched.schedule()  # positions 0..5: two blocks
    assert out.table == [TableRun(0, 0, tuple(a.blocks))] and len(a.blocks) == 2
    advance(out.work)
    out = sched.schedule()  # 6..8: a third
    assert out.table == [TableRun(0, 2, (a.blocks[2],))] and sched.pool.used == 3
    advance(out.work)
    sent = []
    for _ in range(6):  # decodes at positions 9..14: a block at 12 only
        out = sched.schedule()
        sent += out.table
        advance(out.work)
    assert sent == [TableRun(0, 3, (a.blocks[3],))] and len(a.blocks) == 4
    sched.remove(a)
    assert sched.pool.used == 0 and sched.pool.available == 8
    sched.pool.check()


def test_a_table_too_long_for_one_plan_is_sent_over_several_and_the_sequence_waits_for_it(make):
    sched = Sched(max_batch_size=2, prefill_chunk=8, max_seq_len=4096, blocks=600)
    sched.table_budget = 5  # as a plan would hold with a tiny capacity
    prompt = [1] + list(range(10, 10 + 40))  # 41 tokens: 10 full blocks
    first = make("first", prompt)
    sched.add(first)
    while first.prefilling:
        step(sched)
    sched.remove(first)  # its 10 full blocks stay cached
    again = make("again", prompt)
    sched.add(again)
    runs = []
    for _ in range(3):
        out = sched.schedule()
        runs.append(out.table)
        assert out.work == [] or runs[-1][-1].index + len(runs[-1][-1].blocks) == len(again.blocks)
        advance(out.work)
    assert [sum(len(r.blocks) for r in t) for t in runs[:2]] == [5, 5]  # the budget, then the rest
    assert again.cached_tokens == 40 and again.computed == 41 and not again.prefilling


# ---------------------------------------------------------------- the prefix cache


def test_a_prompt_whose_blocks_are_cached_runs_only_the_rest(make):
    sched = Sched(max_batch_size=3, prefill_chunk=16)
    prompt = [1] + list(range(20, 33))  # 14 tokens: 3 full blocks
    a = make("a", prompt)
    sched.add(a)
    step(sched)
    step(sched)  # a decoding: its full blocks are offered to the cache
    b = make("b", prompt + [99])  # the same prompt, one token longer
    sched.add(b)
    work = sched.schedule().work
    assert [(s.request_id, n) for s, n in work] == [("a", 1), ("b", 3)]  # 15 tokens, 12 cached
    assert b.computed == 12 and b.cached_tokens == 12 and b.blocks[:3] == a.blocks[:3]
    assert sched.hit_tokens == 12 and sched.query_tokens == 14 + 15


def test_at_least_the_last_prompt_token_runs_even_when_every_block_is_cached(make):
    sched = Sched(max_batch_size=3, prefill_chunk=16)
    prompt = [1] + list(range(20, 27))  # 8 tokens: exactly 2 blocks
    a = make("a", prompt)
    sched.add(a)
    step(sched)
    step(sched)
    b = make("b", prompt)
    sched.add(b)
    work = sched.schedule().work
    assert ("b", 4) in [(s.request_id, n) for s, n in work]  # block 2 recomputed: its logits are needed
    assert b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1]


def test_a_different_prompt_shares_only_the_blocks_before_it_differs(make):
    sched = Sched(max_batch_size=2, prefill_chunk=16)
    a = make("a", [1, 5, 9, 30, 2, 2, 2, 2, 4, 4])
    sched.add(a)
    step(sched)
    step(sched)
    b = make("b", [1, 5, 9, 30, 2, 2, 2, 3, 4, 4])
    sched.add(b)
    sched.schedule()
    assert b.cached_tokens == 4 and b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1]


def test_cached_blocks_outlive_their_request_and_are_evicted_least_recent_first(make):
    sched = Sched(max_batch_size=2, prefill_chunk=20, blocks=6)
    old, new = [1] + list(range(40, 48)), [1] + list(range(60, 68))  # 9 tokens: 2 full blocks each
    for name, prompt in (("old", old), ("new", new)):
        s = make(name, prompt, max_tokens=1)
        sched.add(s)
        step(sched)
        sched.remove(s)
    assert sched.pool.cached == 4 and sched.pool.used == 0
    big = make("big", 17, max_tokens=1)  # 5 blocks: the 2 free, then old's (least recent), then 1 of new's
    sched.add(big)
    step(sched)
    assert sched.pool.evicted == 3
    sched.remove(big)
    again = make("again", new + [5])
    sched.add(again)
    sched.schedule()
    assert again.cached_tokens == 4  # new's first block survived; its tail block went first


def test_with_prefix_caching_off_nothing_stays_cached_but_running_twins_still_share(make):
    sched = Sched(max_batch_size=3, prefill_chunk=16, caching=False)
    prompt = [1] + list(range(20, 29))
    a = make("a", prompt)
    sched.add(a)
    step(sched)
    step(sched)
    twin = make("twin", prompt)
    sched.add(twin)
    sched.schedule()
    assert twin.cached_tokens == 8
    sched.remove(a)
    sched.remove(twin)
    assert sched.pool.cached == 0 and sched.pool.available == 512
    late = make("late", prompt)
    sched.add(late)
    sched.schedule()
    assert late.cached_tokens == 0


def test_a_twin_of_a_prompt_still_prefilling_waits_in_its_place_then_shares(make):
    sched = Sched(max_batch_size=4, prefill_chunk=8)
    prompt = [1, 8, 9, 10, 11, 12]
    a, twin, c, d = make("a", prompt), make("twin", prompt), make("c", 2), make("d", 2)
    for s in (a, twin, c, d):
        sched.add(s)
    assert step(sched) == [("a", 6), ("c", 2)]  # twin deferred, not prefilled; d: budget spent
    assert twin.slot is None and [s.request_id for s in sched.waiting] == ["twin", "d"]  # twin kept its place
    assert step(sched) == [("a", 1), ("c", 1), ("twin", 2), ("d", 2)]  # a's first block is cached now
    assert twin.cached_tokens == 4 and twin.blocks[0] == a.blocks[0]


@pytest.mark.parametrize("donor_echo", [False, True])
def test_a_sequence_that_needs_its_prompt_logprobs_never_shares(make, donor_echo):
    sched = Sched(max_batch_size=3, prefill_chunk=16)
    prompt = [1, 8, 9, 10, 11, 12]
    a = make("a", prompt, **({"logprobs": 1, "echo": True} if donor_echo else {}))
    sched.add(a)
    step(sched)
    echo = make("echo", prompt, logprobs=1, echo=True)
    sched.add(echo)
    work = sched.schedule().work
    assert [(s.request_id, n) for s, n in work] == [("a", 1), ("echo", 6)] and echo.cached_tokens == 0


def test_logprobs_without_echo_still_share(make):
    sched = Sched(max_batch_size=2, prefill_chunk=16)
    prompt = [1, 8, 9, 10, 11, 12]
    sched.add(make("a", prompt))
    step(sched)
    b = make("b", prompt, logprobs=2)
    sched.add(b)
    sched.schedule()
    assert b.cached_tokens == 4


# ---------------------------------------------------------------- preemption


def test_the_newest_running_sequence_is_preempted_when_a_decode_needs_a_block(make):
    sched = Sched(max_batch_size=3, prefill_chunk=16, blocks=4)
    a, b = make("a", 4, max_tokens=8), make("b", 4, max_tokens=8)  # 1 block each, a second at position 4
    sched.add(a)
    sched.add(b)
    step(sched)
    a_blocks = list(a.blocks)
    assert step(sched) == [("a", 1), ("b", 1)]  # positions 4: a block each, 4 used
    for _ in range(3):
        step(sched)  # positions 5..7
    out = sched.schedule()  # position 8: a takes a third block; none left, so b (the newer) gives way
    assert [(s.request_id, n) for s, n in out.work] == [("a", 1)]
    assert b.slot is None and list(sched.waiting) == [b] and b.computed == 0 and b.preemptions == 1
    assert out.freed == [1] and sched.preemptions == 1 and a.blocks[0] == a_blocks[0]
    advance(out.work)
    sched.remove(a)
    # a's third block was b's second (a sequence's tail is evicted before its head): b comes
    # back from its first block and recomputes positions 4..8, its generated tokens among them.
    out = sched.schedule()
    assert [(s.request_id, n) for s, n in out.work] == [("b", 5)] and b.computed == 4 and b.target == 9
    assert b.cached_tokens == 0  # what its client is told: its first admission's


def test_a_sequence_that_is_the_only_one_left_preempts_itself_and_waits(make):
    sched = Sched(max_batch_size=2, prefill_chunk=16, blocks=2)
    a = make("a", 8, max_tokens=1)  # exactly the pool
    sched.add(a)
    assert step(sched) == [("a", 8)]
    b = make("b", 3, max_tokens=1)
    sched.add(b)
    assert step(sched) == []  # no room for b yet; a's token is its last
    sched.remove(a)
    assert step(sched) == [("b", 3)]


def test_preemption_under_a_random_load_keeps_the_pools_counts_and_finishes_everyone(make):
    rng = random.Random(0)
    sched = Sched(max_batch_size=6, prefill_chunk=12, max_seq_len=64, blocks=14)
    seqs = [make(f"s{i}", rng.randint(2, 20), max_tokens=rng.randint(1, 30)) for i in range(30)]
    for s in seqs:
        sched.add(s)
    done = 0
    for _ in range(2000):
        work = sched.schedule().work
        advance(work)
        sched.pool.check()
        for s in list(sched.running):
            if s.generated >= s.params.max_tokens:
                sched.remove(s)
                done += 1
        if done == len(seqs):
            break
    assert done == len(seqs) and sched.preemptions > 0
    assert sched.pool.used == 0 and sched.pool.available == 14


# ---------------------------------------------------------------- a pipeline's steps in flight


def launch(sched: Scheduler) -> list[tuple[Sequence, int]]:
    """A pipeline's launch (llama/engine/core.py): the tokens run are cached, and a sequence whose
    tokens are all cached awaits its sampled token until its step is read back (land)."""
    work = sched.schedule().work
    for seq, n in work:
        seq.computed += n
        seq.awaiting += seq.computed == len(seq.tokens)
    sched.pool.check()
    return work


def land(work: list[tuple[Sequence, int]]) -> None:
    for seq, _ in work:
        if seq.awaiting:
            seq.awaiting -= 1
            seq.tokens.append(GENERATED)


def ids(work: list[tuple[Sequence, int]]) -> list[tuple[str, int]]:
    return [(s.request_id, n) for s, n in work]


def test_a_pipeline_of_two_runs_half_the_sequences_a_step_and_each_again_once_its_token_is_back(make):
    sched = Scheduler(8, 64, 512, BlockPool(512, BS), depth=2)
    seqs = [make(f"s{i}", 3) for i in range(5)]
    for s in seqs:
        sched.add(s)
    first = launch(sched)  # 3 of the 5 (its share, rounded up); the other 2 wait for the next step
    assert ids(first) == [("s0", 3), ("s1", 3), ("s2", 3)] and len(sched.waiting) == 2
    second = launch(sched)
    assert ids(second) == [("s3", 3), ("s4", 3)]
    assert ids(launch(sched)) == []  # every sequence awaits a token: nothing runs until a step lands
    land(first)
    third = launch(sched)  # the first step's sequences decode while the second step is still out
    assert ids(third) == [("s0", 1), ("s1", 1), ("s2", 1)]
    land(second)
    assert ids(launch(sched)) == [("s3", 1), ("s4", 1)]
    # depth 1 (no pipeline): every sequence, every step, as before
    plain = Scheduler(8, 64, 512, BlockPool(512, BS))
    for i in range(5):
        plain.add(make(f"p{i}", 3))
    assert len(plain.schedule().work) == 5


def test_a_prompts_next_chunk_runs_while_its_last_is_still_in_the_pipe(make):
    sched = Scheduler(4, 4, 512, BlockPool(512, BS), depth=2)
    p = make("p", 10)
    sched.add(p)
    chunks = [launch(sched) for _ in range(3)]  # 4 + 4 + 2: no token awaited until the last chunk
    assert [ids(w) for w in chunks] == [[("p", 4)], [("p", 4)], [("p", 2)]] and p.awaiting == 1
    assert ids(launch(sched)) == []
    land(chunks[2])
    assert ids(launch(sched)) == [("p", 1)]


def test_a_pipeline_under_a_random_load_preempts_sequences_in_flight_and_finishes_everyone(make):
    rng = random.Random(1)
    sched = Scheduler(6, 12, 64, BlockPool(14, BS), depth=3)
    seqs = [make(f"s{i}", rng.randint(2, 20), max_tokens=rng.randint(1, 30)) for i in range(30)]
    for s in seqs:
        sched.add(s)
    pipe: list[list[tuple[Sequence, int]]] = []
    done = 0
    for _ in range(3000):
        pipe.append(launch(sched))
        if len(pipe) == 3 or not pipe[-1]:
            land(pipe.pop(0))
        for s in list(sched.running):
            if s.generated >= s.params.max_tokens and not s.awaiting:
                sched.remove(s)
                done += 1
        if done == len(seqs):
            break
    assert done == len(seqs) and sched.preemptions > 0
    assert all(s.generated == s.params.max_tokens for s in seqs)
    assert sched.pool.used == 0 and sched.pool.available == 14
