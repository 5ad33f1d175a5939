"""The serving scheduler: every policy decision, made between iterations, in plain Python.

The engine's host loop calls ``schedule()`` once per iteration and carries out the ``Plan`` it
returns; it reports back what the device produced (``on_tokens``) and which sequences ended
(``finish``). Only the scheduler changes a ``Sequence``.

An iteration is one of two kinds:
- a *ragged step* when there is prompt work: every decoding sequence feeds one token (a decode
  row) and prompt chunks of several sequences fill the rest of the iteration's token budget,
  all in one forward pass, so running streams never stall while newcomers prefill;
- a *decode dispatch* otherwise: ``decode_steps`` steps of every decoding sequence at once.

Policies (vLLM v1-style, first come first served):
- a sequence owns a decode slot (a row of the device state) from admission to its end, and
  KV-cache pages that grow as it does: prompt pages chunk by chunk, decode pages as its steps
  are dispatched (never ``prompt + max_new`` up front);
- decode rows come first; then prompts being prefilled continue, oldest first; then waiting
  sequences are admitted in order while a slot, the token budget and free pages allow (with a
  page of headroom per decoding sequence). Admission never preempts. A prompt's chunks take
  what the budget leaves, up to ``prefill_chunk`` tokens: chunking may depend on the load,
  which changes nothing, because a token is computed the same way in any chunk;
- when a decoding sequence needs a page and none is free, the most recently admitted running
  sequence is preempted (possibly the needy one itself): its slot and pages are freed, and it
  goes back to the front of the queue keeping the tokens it produced. Re-admitted, it prefills
  its prompt *and* its output, then samples on from there (recompute preemption): nothing is
  lost, and its greedy tokens are the ones it would have produced.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
import itertools

from qoq_jax.kv_cache import OutOfPagesError, PageAllocator
from qoq_jax.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it. Only the scheduler changes it."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    status: Status = Status.WAITING
    output: list[int] = dataclasses.field(default_factory=list)  # read back; only grows
    slot: int | None = None
    context: list[int] = dataclasses.field(default_factory=list)  # what this admission prefills
    prefilled: int = 0  # tokens of context dispatched for prefill
    steps: int = 0  # decode steps dispatched since the prompt (each writes one token's K/V)
    admitted_order: int = -1  # larger = admitted more recently
    incarnation: int = 0  # bumped at each admission: results of an older one are stale
    num_preemptions: int = 0
    finish_reason: str | None = None

    @property
    def max_len(self) -> int:
        """Tokens whose K/V the sequence may ever store (the last output token is never fed)."""
        return len(self.prompt) + self.params.max_new_tokens - 1

    @property
    def generated0(self) -> int:
        """Tokens made before this admission (kept across a preemption)."""
        return len(self.context) - len(self.prompt)

    @property
    def kv_tokens(self) -> int:
        """Tokens whose K/V are in the cache once the dispatched work has run."""
        if self.status == Status.DECODING:
            return len(self.context) + self.steps
        return self.prefilled


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Prompt tokens context[start:start + length] of a sequence, prefilled this iteration."""

    seq: Sequence
    start: int
    length: int
    final: bool  # it ends the context: the row samples the next token

    @property
    def tokens(self) -> list[int]:
        return self.seq.context[self.start:self.start + self.length]


@dataclasses.dataclass
class Plan:
    """One iteration: decode rows and prompt chunks (a ragged step), or a decode dispatch."""

    decode: list[Sequence] = dataclasses.field(default_factory=list)
    chunks: list[Chunk] = dataclasses.field(default_factory=list)
    steps: int = 0  # decode steps of each decode row: 1 in a ragged step
    admitted: list[Sequence] = dataclasses.field(default_factory=list)
    preempted: list[Sequence] = dataclasses.field(default_factory=list)
    freed_slots: list[int] = dataclasses.field(default_factory=list)  # of the preempted

    @property
    def ragged(self) -> bool:
        return bool(self.chunks)

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.length for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not (self.chunks or self.decode)


MIN_TOKEN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Every shape the engine's programs take, so that an engine compiles a handful of
    programs and its warm-up knows them all.

    step: token counts of a ragged step: powers of two from 16 up to ``max_tokens`` (and
    ``max_tokens`` itself). The scheduler trims an iteration's last chunk to the bucket below
    rather than pad far up to the bucket above (see ``Scheduler._fit``), so the ladder can be
    coarse. decode: row counts of a decode dispatch: powers of two from 2 (a lone row is
    paired) up to ``slots``.
    """

    max_tokens: int
    slots: int

    @property
    def step(self) -> tuple[int, ...]:
        out, b = [], MIN_TOKEN_BUCKET
        while b < self.max_tokens:
            out.append(b)
            b *= 2
        return tuple(out) + (max(self.max_tokens, MIN_TOKEN_BUCKET),)

    @property
    def decode(self) -> tuple[int, ...]:
        return tuple(sorted({self.decode_rows(n) for n in range(1, self.slots + 1)}))

    def step_tokens(self, n: int) -> int:
        """Padded token count of a ragged step of n tokens (the bucket above)."""
        if n > max(self.max_tokens, MIN_TOKEN_BUCKET):
            raise ValueError(f"{n} tokens exceed the batch limit of {self.max_tokens}")
        return next(b for b in self.step if b >= n)

    def step_tokens_below(self, n: int) -> int:
        """The largest bucket <= n (0 if none)."""
        return max((b for b in self.step if b <= n), default=0)

    def decode_rows(self, occupied: int) -> int:
        """Rows of a decode dispatch over slots [0, occupied): a power of two, at least 2."""
        return min(max(2, self.slots), max(2, 1 << max(0, (occupied - 1).bit_length())))


class NeedsDrain(Exception):
    """A preemption is needed while device work is in flight: read it back first."""


class Scheduler:
    """Queues and policies over one PageAllocator (see the module docstring).

    max_batch_tokens: tokens of one ragged step (decode rows + chunks); prefill_chunk: the most
    prompt tokens of one sequence per step; decode_steps: steps of a decode dispatch.
    """

    def __init__(self, allocator: PageAllocator, *, max_slots: int, max_batch_tokens: int,
                 prefill_chunk: int, decode_steps: int, buckets: Buckets | None = None):
        if max_batch_tokens < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_tokens and prefill_chunk must be >= 1")
        if max_batch_tokens <= max_slots:
            raise ValueError(f"the batch token budget ({max_batch_tokens}) must exceed the "
                             f"number of slots ({max_slots}), or prompts could never run "
                             f"beside a full set of decode rows")
        self.allocator = allocator
        self.max_slots = max_slots
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self.decode_steps = decode_steps
        self.buckets = buckets or Buckets(max_tokens=max_batch_tokens, slots=max_slots)
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

    def occupied_rows(self) -> int:
        """1 + the highest slot in use (a decode dispatch covers rows [0, this))."""
        return 1 + max((s.slot for s in self.running), default=-1)

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

    def on_tokens(self, seq: Sequence, tokens: list[int]) -> None:
        """The device produced these tokens for `seq` (read back, in order)."""
        seq.output.extend(tokens)

    # ------------------------------------------------------------------------------------------
    # one iteration

    def schedule(self, *, inflight: bool = False) -> Plan:
        """Plan (and commit to) the next iteration. `inflight`: work is dispatched but not read
        back, so the host's output lags; a needed preemption raises NeedsDrain instead."""
        plan = Plan()
        # 1. every decoding sequence feeds one more token (its page, preempting if need be)
        for seq in [s for s in self.running if s.status == Status.DECODING]:
            if seq.status == Status.DECODING and self._grow(seq, 1, plan, inflight):
                plan.decode.append(seq)
        # 2. prompt chunks in the rest of the token budget: continuing prompts, then admissions
        budget = self.max_batch_tokens - len(plan.decode)
        for seq in [s for s in self.running if s.status == Status.PREFILLING]:
            if budget <= 0:
                break
            if seq.status != Status.PREFILLING:  # preempted by an older sequence's growth
                continue
            chunk = self._next_chunk(seq, budget)
            # a prompt waits for pages rather than preempting itself (decoders free them)
            if self._ensure(seq, chunk.start + chunk.length, plan, inflight, yield_self=True):
                plan.chunks.append(chunk)
                budget -= chunk.length
        while self.waiting and self._free_slots and budget > 0:
            seq = self.waiting[0]
            if not seq.context:
                seq.context = seq.prompt + seq.output
            # admission never preempts, and leaves each decoder a page of headroom
            room = (self.allocator.num_free - len(plan.decode)) * self.allocator.page_size
            if room <= 0:
                break
            chunk = self._next_chunk(seq, min(budget, room))
            self.waiting.popleft()
            seq.status = Status.PREFILLING
            seq.slot = heapq.heappop(self._free_slots)
            seq.admitted_order = next(self._admissions)
            seq.incarnation += 1
            self.running.append(seq)
            self.allocator.ensure(seq.seq_id, chunk.length)
            plan.admitted.append(seq)
            plan.chunks.append(chunk)
            budget -= chunk.length
        # 3. no prompt work: a decode dispatch of several steps (pages for all of them)
        if plan.chunks:
            plan.steps = 1
            self._fit(plan)
        elif plan.decode:
            plan.steps = self.decode_steps
            for seq in list(plan.decode):
                if seq.status == Status.DECODING:
                    self._grow(seq, self.decode_steps, plan, inflight)
            plan.decode = [s for s in plan.decode if s.status == Status.DECODING]
        self._commit(plan)
        return plan

    # Padding a ragged step costs compute for nothing, but a step's time is mostly reading the
    # weights until it holds a few hundred tokens: trimming is worth a later step only when
    # this many padding tokens or more would be saved.
    MIN_PADDING_SAVED = 64

    def _fit(self, plan: Plan) -> None:
        """Trim the last chunk to the bucket below when that defers fewer prompt tokens than
        padding up to the bucket above would waste (the deferred ones run next iteration)."""
        n = plan.num_tokens
        up, down = self.buckets.step_tokens(n), self.buckets.step_tokens_below(n)
        last = plan.chunks[-1]
        cut = n - down
        if up - n >= max(cut + 1, self.MIN_PADDING_SAVED) and cut < last.length:
            plan.chunks[-1] = Chunk(last.seq, last.start, last.length - cut, False)

    def _commit(self, plan: Plan) -> None:
        for seq in plan.decode:
            seq.steps += plan.steps
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.prefilled = chunk.start + chunk.length
            if chunk.final:
                seq.status = Status.DECODING
                seq.steps = 0

    def _next_chunk(self, seq: Sequence, budget: int) -> Chunk:
        start = seq.prefilled
        length = min(len(seq.context) - start, budget, self.prefill_chunk)
        return Chunk(seq, start, length, start + length == len(seq.context))

    def _grow(self, seq: Sequence, steps: int, plan: Plan, inflight: bool) -> bool:
        """Pages for `steps` more decode steps of `seq` (never past its last position)."""
        return self._ensure(seq, min(seq.max_len, seq.kv_tokens + steps), plan, inflight)

    def _ensure(self, seq: Sequence, tokens: int, plan: Plan, inflight: bool,
                yield_self: bool = False) -> bool:
        """Give `seq` pages for `tokens` tokens, preempting the youngest running sequences when
        the pool is dry. False if `seq` itself was preempted, or (yield_self) if it is the
        youngest and would have to be: it then keeps what it has and waits."""
        while True:
            try:
                self.allocator.ensure(seq.seq_id, tokens)
                return True
            except OutOfPagesError:
                victim = max(self.running, key=lambda s: s.admitted_order)
                if yield_self and victim is seq:
                    return False
                if inflight:
                    raise NeedsDrain from None
                self._preempt(victim, plan)
                if victim is seq:
                    return False

    def _release(self, seq: Sequence) -> None:
        if seq.seq_id in self.allocator.owners:
            self.allocator.free(seq.seq_id)
        heapq.heappush(self._free_slots, seq.slot)
        seq.slot = None

    def _preempt(self, seq: Sequence, plan: Plan) -> None:
        plan.freed_slots.append(seq.slot)
        self._release(seq)
        self.running.remove(seq)
        seq.status = Status.WAITING
        seq.context = []  # prompt + output, taken at re-admission
        seq.prefilled = seq.steps = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
        if seq in plan.decode:
            plan.decode.remove(seq)
        plan.chunks = [c for c in plan.chunks if c.seq is not seq]
