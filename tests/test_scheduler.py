"""The scheduler alone (plain Python, no JAX): admission, chunking, page growth, preemption."""

import numpy as np
import pytest

from qoq_jax.kv_cache import PageAllocator
from qoq_jax.sampling import SamplingParams
from qoq_jax.scheduler import NeedsDrain, Scheduler, Sequence, Status, chunk_bucket, ladder


def _sched(num_pages=64, page_size=4, slots=4, chunk=16, budget=None, steps=4):
    return Scheduler(PageAllocator(num_pages, page_size), max_slots=slots, prefill_chunk=chunk,
                     prefill_budget=budget or chunk, decode_steps=steps)


def _seq(i, prompt_len, max_new=8):
    return Sequence(i, list(range(1, prompt_len + 1)), SamplingParams(max_new_tokens=max_new))


class FakeDevice:
    """Plays the engine: runs a plan's chunks and decode steps, producing a token per step."""

    def __init__(self, sched: Scheduler):
        self.sched = sched

    def run(self, plan):
        for c in plan.prefill:
            self.sched.on_prefilled(c)
            if c.final and not c.seq.output:
                c.seq.output.append(0)
        for seq in plan.decode:
            if seq.status != Status.DECODING:
                continue
            self.sched.on_dispatched([seq], self.sched.decode_steps)
            room = seq.params.max_new_tokens - seq.device_len
            made = min(self.sched.decode_steps, room)
            new = max(0, seq.device_len + made - len(seq.output))
            seq.output.extend([7] * new)
            self.sched.on_read_back(seq, self.sched.decode_steps, made)
            # pages must cover every position the device wrote
            wrote = len(seq.prompt) + seq.device_len - 1
            assert len(self.sched.allocator.pages(seq.seq_id)) * \
                self.sched.allocator.page_size >= wrote
            if seq.device_len >= seq.params.max_new_tokens:
                self.sched.finish(seq, "length")


def test_buckets():
    assert [ladder(n) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    assert [chunk_bucket(n, 64) for n in (1, 16, 17, 33, 49, 64)] == [16, 16, 32, 48, 64, 64]
    assert chunk_bucket(300, 256) == 256


def test_a_long_prompt_is_split_into_fixed_chunks():
    s = _sched(chunk=16)
    seq = _seq(0, 40)
    s.add(seq)
    chunks = []
    dev = FakeDevice(s)
    while seq.status != Status.DECODING:
        plan = s.schedule()
        chunks += [(c.start, c.length) for c in plan.prefill]
        dev.run(plan)
    assert chunks == [(0, 16), (16, 16), (32, 8)]


def test_pages_grow_with_the_sequence_not_up_front():
    s = _sched(page_size=4, steps=4)
    seq = _seq(0, 6, max_new=100)
    s.add(seq)
    plan = s.schedule()
    # prompt (6) + the first decode chunk's lookahead (4) = 10 tokens = 3 pages, not 106 / 4
    assert len(s.allocator.pages(0)) == 3
    FakeDevice(s).run(plan)
    s.schedule()
    assert len(s.allocator.pages(0)) <= 5


def test_admission_respects_the_token_budget_and_slots():
    s = _sched(slots=3, chunk=16, budget=32)
    for i in range(5):
        s.add(_seq(i, 10))
    plan = s.schedule()
    # three 10-token prompts would cost 3 x 16 = 48 padded tokens > 32: two fit
    assert [c.seq.seq_id for c in plan.prefill] == [0, 1]
    FakeDevice(s).run(plan)
    plan = s.schedule()
    assert [c.seq.seq_id for c in plan.prefill] == [2]  # one slot left
    assert [q.seq_id for q in s.waiting] == [3, 4]


def test_preemption_takes_the_youngest_and_requeues_it_first():
    s = _sched(num_pages=9, page_size=4, slots=4, steps=4)  # 8 usable pages
    a, b = _seq(0, 8, max_new=30), _seq(1, 8, max_new=30)
    s.add(a)
    s.add(b)
    dev = FakeDevice(s)
    preempted = []
    for _ in range(6):
        plan = s.schedule()
        preempted += plan.preempted
        dev.run(plan)
    assert preempted and preempted[0] is b  # the younger one
    assert b.num_preemptions >= 1 and b.output  # kept its tokens for the replay
    assert a.status in (Status.DECODING, Status.FINISHED)


def test_preemption_while_work_is_in_flight_asks_for_a_drain():
    s = _sched(num_pages=5, page_size=4, slots=2, steps=4, budget=32)
    a, b = _seq(0, 4, max_new=12), _seq(1, 4, max_new=12)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    FakeDevice(s).run(plan)
    s.on_dispatched([a, b], 4)  # pretend a chunk is in flight
    with pytest.raises(NeedsDrain):
        s.schedule(inflight=True)


def test_random_workloads_finish_every_request_without_overcommitting():
    rng = np.random.default_rng(0)
    for trial in range(30):
        s = _sched(num_pages=int(rng.integers(12, 40)), page_size=4,
                   slots=int(rng.integers(1, 6)), chunk=16, budget=int(rng.choice([16, 32, 64])),
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
        for _ in range(2000):
            if not s.has_work:
                break
            dev.run(s.schedule())
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
