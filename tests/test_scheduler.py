"""The scheduler alone (plain Python, no JAX): admission, chunking, page growth, preemption."""

import numpy as np
import pytest

from qoq_jax.kv_cache import PageAllocator
from qoq_jax.sampling import SamplingParams
from qoq_jax.scheduler import Buckets, NeedsDrain, Scheduler, Sequence, Status


def _sched(num_pages=64, page_size=4, slots=4, chunk=16, budget=None, steps=4):
    return Scheduler(PageAllocator(num_pages, page_size), max_slots=slots, prefill_chunk=chunk,
                     max_batch_tokens=budget or max(chunk, slots + 1), decode_steps=steps)


def _seq(i, prompt_len, max_new=8):
    return Sequence(i, list(range(1, prompt_len + 1)), SamplingParams(max_new_tokens=max_new))


class FakeDevice:
    """Plays the engine and the device: carries out a plan, one token per decode step and one
    at the end of each prompt, and reads it all back at once (no work left in flight)."""

    def __init__(self, sched: Scheduler):
        self.sched = sched

    def run(self, plan):
        produced = {}
        for seq in plan.decode:
            room = seq.params.max_new_tokens - len(seq.output)
            produced[seq] = min(plan.steps, room)
        for c in plan.chunks:
            if c.final:
                produced[c.seq] = produced.get(c.seq, 0) + 1
        for seq, n in produced.items():
            self.sched.on_tokens(seq, [7] * n)
            # pages must cover every position the device wrote
            wrote = len(seq.prompt) + len(seq.output) - 1
            have = len(self.sched.allocator.pages(seq.seq_id)) * self.sched.allocator.page_size
            assert have >= min(wrote, seq.max_len)
            if len(seq.output) >= seq.params.max_new_tokens:
                self.sched.finish(seq, "length")


def test_buckets():
    b = Buckets(max_tokens=512, slots=16)
    assert b.step == (16, 32, 64, 128, 256, 512)
    assert b.decode == (2, 4, 8, 16)
    assert [b.step_tokens(n) for n in (1, 16, 17, 33, 65, 100, 512)] == \
        [16, 16, 32, 64, 128, 128, 512]
    assert [b.step_tokens_below(n) for n in (15, 16, 300, 512)] == [0, 16, 256, 512]
    assert Buckets(max_tokens=40, slots=8).step == (16, 32, 40)
    with pytest.raises(ValueError, match="exceed"):
        b.step_tokens(513)
    assert [b.decode_rows(n) for n in (1, 2, 3, 5, 16)] == [2, 2, 4, 8, 16]


def test_a_long_prompt_is_prefilled_in_chunks_of_at_most_prefill_chunk():
    s = _sched(chunk=16, budget=64)
    seq = _seq(0, 40)
    s.add(seq)
    chunks = []
    dev = FakeDevice(s)
    while seq.status != Status.DECODING:
        plan = s.schedule()
        chunks += [(c.start, c.length, c.final) for c in plan.chunks]
        dev.run(plan)
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True)]


def test_decode_rows_ride_along_with_prompt_chunks_under_the_token_budget():
    s = _sched(slots=4, chunk=64, budget=20)
    a = _seq(0, 6, max_new=50)
    s.add(a)
    dev = FakeDevice(s)
    dev.run(s.schedule())  # a's prompt: it decodes from now on
    b = _seq(1, 40)
    s.add(b)
    plan = s.schedule()
    # one ragged step: a's decode row and as much of b's prompt as the budget leaves
    assert plan.ragged and plan.steps == 1
    assert plan.decode == [a] and [(c.seq, c.length) for c in plan.chunks] == [(b, 19)]
    assert plan.num_tokens == 20
    dev.run(plan)
    plan = s.schedule()
    assert plan.decode == [a] and plan.chunks[0].start == 19


def test_the_last_chunk_is_trimmed_to_a_bucket_rather_than_padded_far():
    s = _sched(num_pages=200, slots=4, chunk=512, budget=512)
    s.add(_seq(0, 300))
    plan = s.schedule()
    # 300 tokens would pad to 512 (212 wasted); 256 now and 44 next time waste nothing
    assert [(c.length, c.final) for c in plan.chunks] == [(256, False)]
    FakeDevice(s).run(plan)
    plan = s.schedule()
    # 44 pad to 64: too little to be worth another step
    assert [(c.start, c.length, c.final) for c in plan.chunks] == [(256, 44, True)]
    s2 = _sched(num_pages=200, slots=4, chunk=512, budget=512)
    s2.add(_seq(0, 500))  # 12 tokens of padding: not worth a second step
    assert [c.length for c in s2.schedule().chunks] == [500]


def test_without_prompt_work_decode_rows_run_several_steps():
    s = _sched(steps=4)
    s.add(_seq(0, 5, max_new=30))
    dev = FakeDevice(s)
    dev.run(s.schedule())
    plan = s.schedule()
    assert not plan.ragged and plan.steps == 4 and len(plan.decode) == 1


def test_pages_grow_with_the_sequence_not_up_front():
    s = _sched(page_size=4, steps=4)
    seq = _seq(0, 6, max_new=100)
    s.add(seq)
    plan = s.schedule()
    assert len(s.allocator.pages(0)) == 2  # the prompt's 6 tokens, not 106
    FakeDevice(s).run(plan)
    plan = s.schedule()  # a decode dispatch of 4 steps writes positions 6..9
    assert plan.steps == 4 and len(s.allocator.pages(0)) == 3


def test_admission_respects_the_token_budget_and_slots():
    s = _sched(slots=3, chunk=16, budget=24)
    for i in range(5):
        s.add(_seq(i, 10))
    plan = s.schedule()
    # 24 tokens: two prompts whole, 4 tokens of the third; then no slot is left
    assert [(c.seq.seq_id, c.start, c.length) for c in plan.chunks] == [(0, 0, 10), (1, 0, 10),
                                                                        (2, 0, 4)]
    assert [q.seq_id for q in s.waiting] == [3, 4] and s.free_slots == 0
    FakeDevice(s).run(plan)
    plan = s.schedule()
    assert [q.seq_id for q in plan.decode] == [0, 1]
    assert [(c.seq.seq_id, c.start, c.length) for c in plan.chunks] == [(2, 4, 6)]


def test_preemption_takes_the_youngest_and_it_resumes_from_its_output():
    s = _sched(num_pages=9, page_size=4, slots=4, steps=4, chunk=16)  # 8 usable pages
    a, b = _seq(0, 8, max_new=20), _seq(1, 8, max_new=20)  # 7 pages each at most
    s.add(a)
    s.add(b)
    dev = FakeDevice(s)
    preempted = []
    for _ in range(8):
        plan = s.schedule()
        preempted += plan.preempted
        dev.run(plan)
    assert preempted and preempted[0] is b  # the younger one
    assert b.num_preemptions >= 1 and b.output  # kept its tokens
    assert a.status in (Status.DECODING, Status.FINISHED)
    # re-admitted, b prefills its prompt and the tokens it had made
    while b.status == Status.WAITING:
        dev.run(s.schedule())
    assert b.context[:8] == b.prompt and len(b.context) > 8
    assert b.generated0 == len(b.context) - 8


def test_preemption_while_work_is_in_flight_asks_for_a_drain():
    s = _sched(num_pages=5, page_size=4, slots=2, steps=4, budget=32)
    a, b = _seq(0, 4, max_new=12), _seq(1, 4, max_new=12)
    s.add(a)
    s.add(b)
    FakeDevice(s).run(s.schedule())
    with pytest.raises(NeedsDrain):
        for _ in range(4):
            s.schedule(inflight=True)  # pretend nothing is ever read back


def test_random_workloads_finish_every_request_without_overcommitting():
    rng = np.random.default_rng(0)
    for trial in range(30):
        slots = int(rng.integers(1, 6))
        s = _sched(num_pages=int(rng.integers(12, 40)), page_size=4, slots=slots,
                   chunk=int(rng.choice([8, 16])),
                   budget=int(rng.choice([slots + 1, 16, 32, 64])) if slots < 16 else 64,
                   steps=int(rng.integers(1, 6)))
        cap = (s.allocator.num_pages - 1) * 4
        seqs = []
        for i in range(int(rng.integers(1, 12))):
            p = int(rng.integers(1, 40))
            seqs.append(_seq(i, p, max_new=int(rng.integers(1, max(2, min(30, cap - p + 1))))))
        seqs = [q for q in seqs if len(q.prompt) + q.params.max_new_tokens <= cap]
        for q in seqs:
            s.add(q)
        dev = FakeDevice(s)
        for _ in range(3000):
            if not s.has_work:
                break
            plan = s.schedule()
            assert not plan.empty, f"trial {trial}: an empty plan with work left"
            assert plan.num_tokens <= s.max_batch_tokens
            dev.run(plan)
            assert s.allocator.num_used <= s.allocator.num_pages - 1
            assert len({q.slot for q in s.running}) == len(s.running)
        assert not s.has_work, f"trial {trial} did not finish"
        assert all(q.status == Status.FINISHED and len(q.output) == q.params.max_new_tokens
                   for q in seqs)
        assert s.allocator.num_used == 0


def test_finish_removes_a_waiting_sequence():
    s = _sched()
    q = _seq(0, 5)
    s.add(q)
    s.finish(q, "abort")
    assert not s.has_work and q.finish_reason == "abort"


def test_a_budget_that_cannot_hold_every_decode_row_is_refused():
    with pytest.raises(ValueError, match="must exceed the number of slots"):
        Scheduler(PageAllocator(16, 4), max_slots=8, max_batch_tokens=8, prefill_chunk=8,
                  decode_steps=2)
