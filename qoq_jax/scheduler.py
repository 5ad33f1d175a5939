"""The serving scheduler: queues, admission, chunked prefill, page growth and preemption.

Plain Python (no JAX), so every policy is testable on its own. The engine calls ``schedule()``
once per iteration and gets a ``StepPlan``: which prompt chunks to prefill (under a per-step
token budget), which sequences decode the next chunk of steps, and who was preempted or
admitted. Between iterations the engine reports what the device produced (``on_generated``)
and which sequences ended (``finish``).

Policies (vLLM-style, first come first served):
- a sequence owns a decode slot (a row of the device state) from admission to its end, and
  KV-cache pages that grow as it does: prompt pages chunk by chunk, decode pages a lookahead
  at a time (never ``prompt + max_new`` up front);
- a long prompt is prefilled in chunks of ``prefill_chunk`` tokens; chunk boundaries depend on
  the prompt alone (multiples of the chunk size), never on the load, so a request is computed
  the same way however busy the engine is;
- admission takes waiting sequences in order while a slot, the token budget and free pages
  allow; it never preempts anyone;
- when a running sequence needs a page and none is free, the most recently admitted running
  sequence is preempted (possibly the needy one itself): its slot and pages are freed, and it
  goes back to the front of the queue keeping the tokens it produced, which are replayed when
  it is admitted again (recompute preemption). Nothing is ever lost.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import itertools
from collections.abc import Sequence as Seq

from qoq_jax.kv_cache import OutOfPagesError, PageAllocator
from qoq_jax.sampling import SamplingParams

MIN_CHUNK_BUCKET = 16


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it. Output tokens are host-side and only ever grow."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    status: Status = Status.WAITING
    output: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    prefilled: int = 0  # prompt tokens whose K/V are in the cache
    device_len: int = 0  # output tokens the current admission has produced on the device
    inflight_steps: int = 0  # decode steps dispatched but not read back yet
    admitted_order: int = -1  # larger = admitted more recently
    incarnation: int = 0  # bumped at each admission: results of an older one are stale
    num_preemptions: int = 0
    finish_reason: str | None = None

    @property
    def max_len(self) -> int:
        """Tokens whose K/V the sequence may ever store (the last output token is never fed)."""
        return len(self.prompt) + self.params.max_new_tokens - 1

    @property
    def replaying(self) -> bool:
        return self.device_len < len(self.output)


@dataclasses.dataclass(frozen=True)
class Chunk:
    seq: Sequence
    start: int
    length: int

    @property
    def final(self) -> bool:
        return self.start + self.length == len(self.seq.prompt)


@dataclasses.dataclass
class StepPlan:
    prefill: list[Chunk] = dataclasses.field(default_factory=list)
    decode: list[Sequence] = dataclasses.field(default_factory=list)
    admitted: list[Sequence] = dataclasses.field(default_factory=list)
    preempted: list[Sequence] = dataclasses.field(default_factory=list)
    freed_slots: list[int] = dataclasses.field(default_factory=list)  # of the preempted

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode)


def ladder(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times them)
    that is >= n: the bucket sizes of compiled shapes, at most a third of padding."""
    b = 1
    while True:
        if b >= n:
            return b
        if b >= 2 and b + b // 2 >= n:
            return b + b // 2
        b *= 2


def chunk_bucket(length: int, prefill_chunk: int) -> int:
    """Padded length of a prefill chunk: 16 x a ladder step, capped at the chunk size."""
    return min(MIN_CHUNK_BUCKET * ladder(-(-length // MIN_CHUNK_BUCKET)), prefill_chunk)


def batch_bucket(n: int) -> int:
    return ladder(n)


class NeedsDrain(Exception):
    """A preemption is needed while device work is in flight: read it back first."""


class Scheduler:
    def __init__(self, allocator: PageAllocator, *, max_slots: int, prefill_chunk: int,
                 prefill_budget: int, decode_steps: int, max_prefill_batch: int | None = None):
        if prefill_chunk < MIN_CHUNK_BUCKET or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two >= {MIN_CHUNK_BUCKET}, "
                             f"got {prefill_chunk}")
        if prefill_budget < prefill_chunk:
            raise ValueError(f"the prefill token budget ({prefill_budget}) must hold at least "
                             f"one chunk ({prefill_chunk})")
        self.allocator = allocator
        self.max_slots = max_slots
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self.decode_steps = decode_steps
        self.max_prefill_batch = max_prefill_batch or max_slots
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order
        self._free_slots = list(range(max_slots))  # a heap: lowest slot first keeps rows dense
        self._admissions = itertools.count()

    # ------------------------------------------------------------------------------------------
    # queue management

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (any state): free its slot and pages."""
        if seq.status == Status.FINISHED:
            return
        if seq.status == Status.WAITING:
            self.waiting.remove(seq)
        else:
            self._release(seq)
            self.running.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def _release(self, seq: Sequence) -> None:
        if seq.seq_id in self.allocator.owners:
            self.allocator.free(seq.seq_id)
        heapq.heappush(self._free_slots, seq.slot)
        seq.slot = None
        seq.inflight_steps = 0

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        plan.freed_slots.append(seq.slot)
        self._release(seq)
        self.running.remove(seq)
        seq.status = Status.WAITING
        seq.prefilled = 0
        seq.device_len = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
        if seq in plan.decode:
            plan.decode.remove(seq)

    def _ensure(self, seq: Sequence, tokens: int, plan: StepPlan, inflight: bool) -> bool:
        """Give `seq` pages for `tokens` tokens, preempting the youngest running sequences when
        the pool is dry. False if `seq` itself was preempted."""
        while True:
            try:
                self.allocator.ensure(seq.seq_id, tokens)
                return True
            except OutOfPagesError:
                if inflight:
                    raise NeedsDrain from None
                victim = max(self.running, key=lambda s: s.admitted_order)
                self._preempt(victim, plan)
                if victim is seq:
                    return False

    # ------------------------------------------------------------------------------------------
    # one iteration

    def schedule(self, *, inflight: bool = False) -> StepPlan:
        """Plan the next iteration. `inflight`: decode steps are dispatched but unread, so the
        host's view of positions is behind; a needed preemption raises NeedsDrain instead."""
        plan = StepPlan()
        # 1. decoding sequences grow by the lookahead of the steps in flight plus the next chunk
        for seq in [s for s in self.running if s.status == Status.DECODING]:
            if seq.status != Status.DECODING:  # preempted by an older sequence's growth
                continue
            if self._ensure(seq, self._decode_tokens(seq), plan, inflight):
                plan.decode.append(seq)
        # 2. prompts being prefilled continue, oldest first, then 3. admissions, all under the
        # token budget of one padded prefill batch
        for seq in [s for s in self.running if s.status == Status.PREFILLING]:
            if seq.status != Status.PREFILLING:
                continue
            chunk = self._next_chunk(seq)
            if not self._fits(plan.prefill, chunk):
                break
            if self._ensure(seq, self._chunk_tokens(chunk), plan, inflight):
                plan.prefill.append(chunk)
        while self.waiting and self._free_slots:
            seq = self.waiting[0]
            chunk = self._next_chunk(seq)
            if not self._fits(plan.prefill, chunk):
                break
            # admission never preempts: it needs the pages free now, with a page of headroom
            # for each decoding sequence so that admitting does not force a preemption next
            need = self.allocator.pages_for(self._chunk_tokens(chunk))
            if need + len(plan.decode) > self.allocator.num_free:
                break
            self.waiting.popleft()
            seq.status = Status.PREFILLING
            seq.slot = heapq.heappop(self._free_slots)
            seq.admitted_order = next(self._admissions)
            seq.incarnation += 1
            self.running.append(seq)
            self.allocator.ensure(seq.seq_id, self._chunk_tokens(chunk))
            plan.admitted.append(seq)
            plan.prefill.append(chunk)
        # final chunks turn their sequences into decoders this very iteration
        for chunk in plan.prefill:
            if chunk.final:
                plan.decode.append(chunk.seq)
        return plan

    def _next_chunk(self, seq: Sequence) -> Chunk:
        start = seq.prefilled
        return Chunk(seq, start, min(self.prefill_chunk, len(seq.prompt) - start))

    def _chunk_tokens(self, chunk: Chunk) -> int:
        """KV positions the chunk writes, plus the first decode chunk's lookahead if final."""
        end = chunk.start + chunk.length
        if chunk.final:
            end = min(chunk.seq.max_len, end + self.decode_steps)
        return max(end, chunk.start + chunk.length)

    def _decode_tokens(self, seq: Sequence) -> int:
        fed = len(seq.prompt) + seq.device_len - 1  # position of the token fed next
        return min(seq.max_len, fed + seq.inflight_steps + self.decode_steps)

    def _fits(self, chunks: Seq[Chunk], chunk: Chunk) -> bool:
        """Does `chunk` fit in this iteration's prefill batch (padded tokens <= budget)?"""
        lengths = [c.length for c in chunks] + [chunk.length]
        if len(lengths) > min(self.max_prefill_batch, self.max_slots):
            return False
        cost = batch_bucket(len(lengths)) * chunk_bucket(max(lengths), self.prefill_chunk)
        return cost <= self.prefill_budget or not chunks

    # ------------------------------------------------------------------------------------------
    # what the device did

    def on_prefilled(self, chunk: Chunk) -> None:
        seq = chunk.seq
        seq.prefilled = chunk.start + chunk.length
        if chunk.final:
            seq.status = Status.DECODING
            seq.device_len = 1  # the first token comes out of the final chunk

    def on_dispatched(self, seqs: Seq[Sequence], steps: int) -> None:
        for seq in seqs:
            seq.inflight_steps += steps

    def on_read_back(self, seq: Sequence, steps: int, produced: int) -> None:
        """`steps` dispatched decode steps of `seq` were read back; it produced `produced`."""
        seq.inflight_steps = max(0, seq.inflight_steps - steps)
        seq.device_len += produced

    def occupied_rows(self) -> int:
        """1 + the highest slot in use (the decode batch covers rows [0, this))."""
        return 1 + max((s.slot for s in self.running), default=-1)
