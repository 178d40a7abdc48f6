"""The scheduler on plain sequences, without a model: admission, prefill packing, and every state change after a
step (append, stop id, length, context, cancel, timeout, errors), each releasing the slot exactly once."""

from __future__ import annotations

import itertools

import pytest

from model.sampling import SamplingParams
from service.engine import FinishReason, QueueFullError, Sequence
from service.engine.cache_manager import CacheManager
from service.engine.scheduler import MIN_SHARED_PREFIX, Batch, Scheduler, StepStats
from service.engine.sequence import Status

GREEDY = SamplingParams(temperature=0.0)


def make(slots: int = 4, context: int = 64, max_queue: int = 8, prefill_chunk: int = 64) -> Scheduler:
    return Scheduler(CacheManager(slots, context), max_queue=max_queue, prefill_chunk=prefill_chunk)


_first_tokens = itertools.count(1)


def seq(prompt_len: int = 3, max_tokens: int = 5, **kw) -> Sequence:
    """A prompt of its own: no two begin alike (prompts sharing a beginning share its computation)."""
    first = next(_first_tokens) * 1000
    return Sequence(list(range(first, first + prompt_len)), max_tokens, GREEDY, **kw)


def prefill_all(sched: Scheduler, tokens: list[int | None] | None = None, now: float = 1.0) -> list[Sequence]:
    batch = sched.schedule()
    assert batch is not None and batch.is_prefill
    return sched.postprocess(batch, tokens if tokens is not None else [7] * batch.size, now)


def test_prefill_packs_whole_prompts_that_fit_the_chunk_budget_and_cuts_only_the_first():
    sched = make(slots=8, context=2048)
    short = [seq(prompt_len=10, max_tokens=4) for _ in range(3)]
    long = seq(prompt_len=100, max_tokens=4)
    last = seq(prompt_len=5, max_tokens=4)
    for s in [*short, long, last]:
        sched.add(s)
    sched.admit(0.0)
    batch = sched.schedule()
    # No padding between packed prompts: the three short ones; the long one does not fit whole, the last one does
    # (first come, first served among the prompts that fit).
    assert [(it.seq, it.start, it.end) for it in batch.prefill] == [*((s, 0, 10) for s in short), (last, 0, 5)]
    for it in batch.prefill:
        it.seq.num_cached = it.end
    for s in [*short, last]:
        sched.finish(s, FinishReason.CANCELLED, 0.0)  # as if they finished at once
    batch = sched.schedule()
    assert [(it.seq, it.start, it.end) for it in batch.prefill] == [(long, 0, 64)]  # first: cut at the chunk
    long.num_cached = 64
    batch = sched.schedule()
    assert [(it.seq, it.start, it.end) for it in batch.prefill] == [(long, 64, 100)]


def test_postprocess_appends_and_records_progress():
    sched = make()
    a, b = seq(3), seq(4)
    sched.add(a)
    sched.add(b)
    stats = StepStats()
    assert sched.admit(0.5, stats) == [a, b]
    assert stats.queue_waits == [0.5 - a.arrival_time, 0.5 - b.arrival_time]
    batch = sched.schedule()
    appended = sched.postprocess(batch, [11, 12], 2.0, stats)
    assert appended == [a, b] and a.output_ids == [11] and b.output_ids == [12]
    assert (a.num_cached, b.num_cached, stats.prompt_tokens, stats.generation_tokens) == (3, 4, 7, 2)
    assert a.first_token_time == 2.0 and len(stats.ttfts) == 2 and stats.batch_size == 2 and stats.is_prefill
    assert sched.cache.usage().tokens_used == 4 + 5
    # Alternation: the decode step comes next, in slot order.
    batch = sched.schedule()
    assert batch.decode == [a, b]
    stats = StepStats()
    sched.postprocess(batch, [13, 14], 2.5, stats)
    assert a.output_ids == [11, 13] and stats.inter_token == [0.5, 0.5] and not stats.is_prefill


def test_a_chunk_that_does_not_end_its_prompt_appends_nothing():
    sched = make(prefill_chunk=4)
    s = seq(10)
    sched.add(s)
    sched.admit(0.0)
    assert prefill_all(sched, [None]) == []
    assert s.num_cached == 4 and s.output_ids == [] and s.status is Status.RUNNING


@pytest.mark.parametrize(
    ("kw", "tokens", "reason", "n_out"),
    [
        (dict(stop_ids=frozenset({9})), [5, 9], FinishReason.STOP, 2),  # a stop id ends it, and is kept
        (dict(max_tokens=2), [5, 6], FinishReason.LENGTH, 2),  # max_tokens
        (dict(prompt_len=62, max_tokens=50), [5, 6], FinishReason.LENGTH, 2),  # the 64-token context
    ],
    ids=["stop-id", "max-tokens", "context"],
)
def test_postprocess_finishes_and_releases_the_slot(kw, tokens, reason, n_out):
    sched = make(context=64)
    prompt_len = kw.pop("prompt_len", 3)
    s = seq(prompt_len, **{"max_tokens": 10, **kw})
    sched.add(s)
    sched.admit(0.0)
    stats = StepStats()
    prefill_all(sched, tokens[:1])
    batch = sched.schedule()
    sched.postprocess(batch, tokens[1:], 3.0, stats)
    assert s.finished and s.finish_reason is reason and len(s.output_ids) == n_out
    assert s.finished_time == 3.0 and stats.finished == [s]
    assert s.slot == -1 and sched.running == [] and sched.cache.num_free == 4
    assert sched.schedule() is None


def test_finishing_again_only_relabels():
    """A stop string found in the token that also reached max_tokens: the reason becomes STOP, the slot is
    released once."""
    sched = make()
    s = seq(max_tokens=1)
    sched.add(s)
    sched.admit(0.0)
    stats = StepStats()
    sched.postprocess(sched.schedule(), [5], 1.0, stats)
    assert s.finish_reason is FinishReason.LENGTH
    sched.finish(s, FinishReason.STOP, 1.0, stats)
    assert s.finish_reason is FinishReason.STOP and stats.finished == [s] and sched.cache.num_free == 4


def test_expire_ends_cancelled_and_timed_out_sequences_running_or_waiting():
    sched = make(slots=1)
    running, cancelled_waiting, late_waiting, fine = seq(), seq(), seq(timeout=1.0), seq()
    for s in (running, cancelled_waiting, late_waiting, fine):
        sched.add(s)
    sched.admit(0.0)
    running.cancel()
    cancelled_waiting.cancel()
    now = late_waiting.arrival_time + 2.0
    stats = StepStats()
    ended = sched.expire(now, stats)
    assert set(ended) == {running, cancelled_waiting, late_waiting} and set(stats.finished) == set(ended)
    assert running.finish_reason is FinishReason.CANCELLED and late_waiting.finish_reason is FinishReason.TIMEOUT
    assert list(sched.waiting) == [fine] and sched.running == [] and sched.cache.num_free == 1


def test_expire_refuses_waiting_prompts_longer_than_the_context():
    sched = make(slots=1, context=8)
    s = seq(prompt_len=8)
    sched.add(s)
    assert sched.expire(0.0) == [s]
    assert s.finish_reason is FinishReason.ERROR and "exceeds the new context" in s.error


def test_fail_ends_what_is_not_finished_yet():
    sched = make(slots=1)
    a, b = seq(), seq()
    sched.add(a)
    sched.add(b)
    sched.admit(0.0)
    failed = sched.fail(list(sched.running) + list(sched.waiting), "boom", 1.0)
    assert failed == [a, b] and all(s.error == "boom" and s.finish_reason is FinishReason.ERROR for s in failed)
    assert sched.fail([a], "again", 2.0) == [] and a.error == "boom"
    assert not sched.running and not sched.waiting and sched.cache.num_free == 1


def test_queue_limit_counts_only_requests_a_free_slot_will_not_take():
    sched = make(slots=1, max_queue=1)
    sched.add(seq())  # takes the free slot at the next step
    sched.add(seq())  # waits
    with pytest.raises(QueueFullError):
        sched.add(seq())


def test_paused_admission_holds_waiting_sequences():
    sched = make()
    s = seq()
    sched.add(s)
    sched.admit_paused = True
    assert sched.admit(0.0) == [] and not sched.has_work()
    sched.admit_paused = False
    assert sched.admit(0.0) == [s] and sched.has_work()


def test_empty_batch_postprocess_records_nothing():
    sched = make()
    stats = StepStats()
    assert sched.postprocess(Batch(prefill=[], decode=[]), [], 0.0, stats) == []
    assert stats.generation_tokens == 0 and stats.finished == []


def moved_after_a_swap(sched: Scheduler, n: int, prompt_len: int = 6) -> list[Sequence]:
    """`n` running sequences with one output token each, then moved to a new model (their KV to recompute)."""
    moved = [seq(prompt_len=prompt_len, max_tokens=50) for _ in range(n)]
    for s in moved:
        sched.add(s)
    sched.admit(0.0)
    while any(not s.output_ids for s in moved):
        prefill_all(sched)
    for s in moved:  # a model swap: prompt + output so far must be prefilled again
        s.recompute()
        sched.cache.set_tokens(s.slot, 0)
    return moved


def test_new_prompts_are_prefilled_before_the_recompute_of_moved_sequences_and_apart_from_it():
    sched = make(prefill_chunk=16)
    moved = moved_after_a_swap(sched, 2)
    newcomer = seq(prompt_len=3)
    sched.add(newcomer)
    sched.admit(2.0)
    batch = sched.schedule()
    # The newcomer's prompt alone: a step that also recomputed the moved sequences would delay its first token.
    assert [(it.seq, it.start, it.end) for it in batch.prefill] == [(newcomer, 0, 3)]
    sched.postprocess(batch, [7], 2.0)
    batch = sched.schedule()
    assert batch.decode == [newcomer]  # a running stream between two prefill steps, as for any prompt
    sched.postprocess(batch, [7], 2.0)
    batch = sched.schedule()
    assert [(it.seq, it.start, it.end) for it in batch.prefill] == [(moved[0], 0, 7), (moved[1], 0, 7)]


def test_the_recompute_goes_in_chunks_of_recompute_chunk_tokens_between_decode_steps_and_new_prompts():
    """No step of a recompute computes more than `recompute_chunk` tokens, the moved sequences that are done decode
    between its chunks, and a request that arrives meanwhile is prefilled at the next step (not after the
    recompute): the reload adds at most one short step to its first token."""
    sched = Scheduler(CacheManager(8, 256), max_queue=8, prefill_chunk=128, recompute_chunk=8)
    moved = moved_after_a_swap(sched, 4, prompt_len=10)
    kinds, t = [], 2.0
    newcomers: list[Sequence] = []
    while any(not s.prefilled for s in moved):
        if len(kinds) in (3, 8):  # requests arriving in the middle of the recompute
            newcomers.append(seq(prompt_len=20))
            sched.add(newcomers[-1])
            sched.admit(t)
        batch = sched.schedule()
        assert batch is not None
        if batch.is_prefill and batch.prefill[0].seq in newcomers:
            kinds.append("prompt")
            assert [it.seq for it in batch.prefill] == [newcomers[-1]]  # alone, the whole 20-token prompt
        elif batch.is_prefill:
            kinds.append("recompute")
            assert sum(it.end - it.start for it in batch.prefill) <= 8
        else:
            kinds.append("decode")
            assert all(s.prefilled for s in batch.decode)
        sched.postprocess(batch, [7] * batch.size, t)
        t += 0.01
    # 4 x 11 tokens in chunks of 8: six chunks, a decode step between two once the first moved sequence is done,
    # and each newcomer's prompt at the step it arrived in (after a recompute chunk it needs no decode step first).
    assert kinds == [
        *["recompute", "recompute", "decode", "prompt", "decode", "recompute", "decode"],
        *["recompute", "prompt", "decode", "recompute", "decode", "recompute"],
    ]
    assert [n.first_token_time for n in newcomers] == pytest.approx([2.03, 2.08])


def test_a_steady_stream_of_new_prompts_does_not_starve_the_recompute():
    sched = Scheduler(CacheManager(16, 256), max_queue=16, prefill_chunk=64, recompute_chunk=8)
    moved = moved_after_a_swap(sched, 1, prompt_len=20)
    recomputed_steps = 0
    for i in range(12):  # a new request before every step
        sched.add(seq(prompt_len=4, max_tokens=100))
        sched.admit(float(i))
        batch = sched.schedule()
        assert batch is not None
        recomputed_steps += any(it.seq is moved[0] for it in batch.prefill)
        sched.postprocess(batch, [7] * batch.size, float(i))
    assert moved[0].prefilled and recomputed_steps == 3  # 21 tokens in chunks of 8, between the new prompts


def admitted_burst(sched: Scheduler, n: int, max_tokens: int = 50) -> list[Sequence]:
    """`n` 10-token prompts arriving together, admitted at t=0."""
    burst = [seq(prompt_len=10, max_tokens=max_tokens) for _ in range(n)]
    for s in burst:
        sched.add(s)
    sched.admit(0.0)
    return burst


def test_a_burst_of_prompts_is_prefilled_a_group_at_a_time_and_a_long_prompt_alone_still_in_whole_chunks():
    sched = Scheduler(CacheManager(8, 256), max_queue=8, prefill_chunk=64, prefill_group=25)
    sched.mixed = True  # groups are for a runner whose steps cost little beyond their tokens
    burst = admitted_burst(sched, 5)
    batch = sched.schedule()
    # Two whole prompts (a third would make 30 tokens): the first two answer after 20 tokens of work, not after 50.
    assert [(it.seq, it.start, it.end) for it in batch.prefill] == [(s, 0, 10) for s in burst[:2]]
    sched.postprocess(batch, [7, 7], 0.1)
    assert sched.schedule().decode == burst[:2]  # no `now`: the running streams are decoded with the next group

    torch_path = Scheduler(CacheManager(8, 256), max_queue=8, prefill_chunk=64, prefill_group=25)
    for s in [seq(prompt_len=10) for _ in range(5)]:
        torch_path.add(s)
    torch_path.admit(0.0)
    assert len(torch_path.schedule().prefill) == 5  # not mixed: the whole burst in one step

    alone = Scheduler(CacheManager(2, 256), max_queue=2, prefill_chunk=64, prefill_group=16)
    alone.mixed = True
    long = seq(prompt_len=100)
    alone.add(long)
    alone.admit(0.0)
    assert [(it.start, it.end) for it in alone.schedule().prefill] == [(0, 64)]  # the group only limits the others

    with pytest.raises(ValueError, match="prefill_group"):
        Scheduler(CacheManager(2, 64), max_queue=2, prefill_chunk=64, prefill_group=0)


def test_mixed_steps_decode_every_ready_sequence_with_the_next_prompt_group():
    sched = Scheduler(CacheManager(8, 256), max_queue=8, prefill_chunk=64, prefill_group=20)
    sched.mixed = True
    burst = admitted_burst(sched, 5, max_tokens=3)
    steps = []
    t = 0.0
    while sched.has_work():
        batch = sched.schedule()
        assert batch is not None
        steps.append(([(it.seq, it.end) for it in batch.prefill], list(batch.decode)))
        # One token per row, prefill items first: 100 + row for a prompt's first token, 200 + row after it.
        tokens = [100 + i if it.completes_prompt else None for i, it in enumerate(batch.prefill)]
        tokens += [200 + i for i in range(len(batch.decode))]
        stats = StepStats()
        sched.postprocess(batch, tokens, t, stats)
        assert stats.batch_size == len(tokens)
        t += 1.0
    a, b, c, d, e = burst
    assert steps == [
        ([(a, 10), (b, 10)], []),
        ([(c, 10), (d, 10)], [a, b]),
        ([(e, 10)], [a, b, c, d]),  # a and b end here (3 tokens)
        ([], [c, d, e]),
        ([], [e]),
    ]
    assert [s.output_ids for s in burst] == [
        [100, 200, 200],
        [101, 201, 201],
        [100, 202, 200],
        [101, 203, 201],
        [100, 202, 200],
    ]
    assert [s.first_token_time for s in burst] == [0.0, 0.0, 1.0, 1.0, 2.0]
    assert all(s.finish_reason is FinishReason.LENGTH for s in burst)
    with pytest.raises(ValueError, match="tokens for a batch of"):
        sched.postprocess(Batch(prefill=[], decode=[a]), [], t)


@pytest.mark.parametrize("mixed", [False, True])
def test_new_prompts_go_first_until_a_running_stream_has_waited_max_decode_stall(mixed):
    sched = Scheduler(CacheManager(8, 256), max_queue=8, prefill_chunk=10, prefill_group=10, max_decode_stall=1.0)
    sched.mixed = mixed
    first = seq(prompt_len=10, max_tokens=50)
    sched.add(first)
    sched.admit(0.0)
    sched.postprocess(sched.schedule(0.0), [7], now=0.0)  # its first token at t=0
    later = [seq(prompt_len=10, max_tokens=50) for _ in range(3)]
    for s in later:
        sched.add(s)
    sched.admit(0.1)
    kinds = []
    for now in (0.1, 0.5, 1.0, 1.1):
        batch = sched.schedule(now)
        names = {id(s): name for name, s in [("first", first), *((f"later{i}", s) for i, s in enumerate(later))]}
        kinds.append(([names[id(it.seq)] for it in batch.prefill], [names[id(s)] for s in batch.decode]))
        sched.postprocess(batch, [7] * batch.size, now)
    # Two prompt steps in a row while `first` has waited less than a second; then it is decoded, in the prompt
    # step (mixed) or in a step of its own before the last prompt.
    if mixed:
        assert kinds == [
            (["later0"], []),
            (["later1"], []),
            (["later2"], ["first", "later0", "later1"]),
            ([], ["first", "later0", "later1", "later2"]),
        ]
    else:
        assert kinds == [(["later0"], []), (["later1"], []), ([], ["first", "later0", "later1"]), (["later2"], [])]
    with pytest.raises(ValueError, match="max_decode_stall"):
        Scheduler(CacheManager(2, 64), max_queue=2, prefill_chunk=64, max_decode_stall=-1.0)


def test_a_large_burst_is_prefilled_in_groups_of_about_an_eighth_of_its_tokens():
    sched = Scheduler(CacheManager(64, 256), max_queue=64, prefill_chunk=512, prefill_group=16, max_decode_stall=10)
    sched.mixed = True
    burst = admitted_burst(sched, 64)
    sizes, decoded = [], []
    while any(not s.prefilled for s in burst):
        batch = sched.schedule(0.0)
        assert batch is not None
        sizes.append(len(batch.prefill))
        decoded.append(len(batch.decode))
        sched.postprocess(batch, [7] * batch.size, 0.0)
    # 640 tokens waiting: 8 prompts (80 tokens, not prefill_group's 16), then groups shrinking with what is left,
    # down to one 10-token prompt (two would pass 16).
    assert sizes[:4] == [8, 7, 6, 5] and sum(sizes) == 64 and sizes == sorted(sizes, reverse=True), sizes
    assert sizes[-1] == 1 and len(sizes) < 32  # not 64 steps of one prompt
    # The prompts go first while at least as many wait as streams are ready (the first 32), then share the steps.
    first_mixed = next(i for i, d in enumerate(decoded) if d)
    assert sum(sizes[:first_mixed]) >= 32 and decoded[first_mixed] == sum(sizes[:first_mixed]), (sizes, decoded)


@pytest.mark.parametrize("mixed", [False, True])
def test_a_prompt_arriving_while_more_streams_run_does_not_hold_them_back(mixed):
    sched = Scheduler(CacheManager(8, 256), max_queue=8, prefill_chunk=64, prefill_group=64, max_decode_stall=1.0)
    sched.mixed = mixed
    running = admitted_burst(sched, 3)
    sched.postprocess(sched.schedule(0.0), [7, 7, 7], now=0.0)
    sched.postprocess(sched.schedule(0.05), [7, 7, 7], now=0.05)  # a decode step
    newcomer = seq(prompt_len=10, max_tokens=50)
    sched.add(newcomer)
    sched.admit(0.1)
    batch = sched.schedule(0.1)  # one prompt, three streams: a steady arrival, not a burst
    assert [it.seq for it in batch.prefill] == [newcomer]
    assert batch.decode == (running if mixed else [])
    sched.postprocess(batch, [7] * batch.size, 0.1)
    assert sched.schedule(0.2).decode == [*running, newcomer]  # not mixed: decoded at the very next step


def next_prefill(sched: Scheduler, now: float) -> Batch:
    """The next step with prompt chunks, after the decode steps before it."""
    while not (batch := sched.schedule(now)).prefill:
        sched.postprocess(batch, [7] * batch.size, now)
    return batch


@pytest.mark.parametrize("mixed", [False, True])
def test_prompts_sharing_a_beginning_compute_it_once(mixed):
    sched = make(slots=8, context=256)
    sched.mixed = mixed
    system = list(range(500, 512))  # 12 tokens, a system prompt
    a = Sequence([*system, 1, 2], 8, GREEDY)
    b = Sequence([*system, 3, 4, 5], 8, GREEDY)
    twin = Sequence([*system, 1, 2], 8, GREEDY)  # the same request again
    other = seq(prompt_len=10, max_tokens=8)
    for s in (a, b, twin, other):
        sched.add(s)
    sched.admit(0.0)
    batch = sched.schedule(0.0)
    # b and twin wait for the positions a computes in this step, instead of computing them too.
    assert [(it.seq, it.start, it.end, it.prefix_slot) for it in batch.prefill] == [
        (a, 0, 14, None),
        (other, 0, 10, None),
    ]
    stats = StepStats()
    sched.postprocess(batch, [7] * batch.size, 0.1, stats)
    assert (stats.prompt_tokens, stats.prefix_hit_tokens) == (24, 0)
    batch = next_prefill(sched, 0.1)
    # Copied from a's slot: the shared positions (all but the last prompt token for the twin, whose own logits
    # give its first token); computed: the rest.
    assert [(it.seq, it.start, it.end, it.prefix_slot) for it in batch.prefill] == [
        (b, 12, 15, a.slot),
        (twin, 13, 14, a.slot),
    ]
    stats = StepStats()
    sched.postprocess(batch, [7] * batch.size, 0.2, stats)
    assert (stats.prompt_tokens, stats.prefix_hit_tokens) == (4, 25)
    assert b.num_cached == 15 and twin.num_cached == 14 and twin.output_ids == [7]

    # A running sequence's answer counts too: a prompt that continues a's conversation copies a's prompt and
    # every answer token but the last (sampled, never fed to the model), without waiting.
    follow = Sequence([*a.prompt_ids, *a.output_ids, 6], 4, GREEDY)
    sched.add(follow)
    sched.admit(0.3)
    batch = next_prefill(sched, 0.3)
    written = a.total_len - 1  # a may have decoded meanwhile: then its last answer token is written too
    assert written >= 15
    shared = min(written, follow.num_prompt - 1)
    assert [(it.seq, it.start, it.end, it.prefix_slot) for it in batch.prefill] == [(follow, shared, 17, a.slot)]


def test_a_short_shared_beginning_or_a_scored_prompt_is_computed_in_full():
    sched = make(slots=8, context=256)
    common = list(range(500, 507))  # 7 tokens: fewer than MIN_SHARED_PREFIX
    a, b = Sequence([*common, 1, 2], 4, GREEDY), Sequence([*common, 3], 4, GREEDY)
    long_a = Sequence(list(range(600, 620)), 4, GREEDY)
    scored = Sequence(list(range(600, 620)), 4, GREEDY, prompt_logprobs=1)  # echo: needs every position's logits
    for s in (a, b, long_a, scored):
        sched.add(s)
    sched.admit(0.0)
    batch = sched.schedule(0.0)
    assert [(it.seq, it.start, it.prefix_slot) for it in batch.prefill] == [
        (a, 0, None),
        (b, 0, None),
        (long_a, 0, None),
        (scored, 0, None),
    ]
    assert MIN_SHARED_PREFIX == len(common) + 1


@pytest.mark.parametrize("mixed", [False, True])
def test_prompts_waiting_for_one_that_ended_at_its_first_token_copy_from_the_slot_it_left(mixed):
    # A shared system prompt and one token each (a classifier's load, or a stop id sampled first): the request the
    # others waited for is gone after its step, and the slot it freed still holds the shared positions.
    sched = make(slots=8, context=256)
    sched.mixed = mixed
    system = list(range(100, 124))
    burst = [Sequence([*system, i, i + 1], 1, GREEDY) for i in range(6)]
    for s in burst:
        sched.add(s)
    sched.admit(0.0)
    first = sched.schedule(0.0)
    assert [it.seq for it in first.prefill] == burst[:1]
    lead_slot = burst[0].slot
    sched.postprocess(first, [7], 0.1)
    assert burst[0].finished and lead_slot in sched.cache.held
    second = sched.schedule(0.1)
    assert [(it.seq, it.start, it.end, it.prefix_slot) for it in second.prefill] == [
        (s, 24, 26, lead_slot) for s in burst[1:]
    ]
    stats = StepStats()
    sched.postprocess(second, [7] * second.size, 0.2, stats)
    assert all(s.finished for s in burst) and (stats.prompt_tokens, stats.prefix_hit_tokens) == (10, 5 * 24)
