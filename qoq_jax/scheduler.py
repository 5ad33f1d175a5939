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
- prefix caching (when the allocator caches, qoq_jax/pages.py): a sequence admitted finds the
  longest run of its leading full pages that earlier sequences computed and shares them, then
  prefills only the rest; the pages each chunk fills are registered when it is dispatched. A
  sequence whose next page another sequence computes in this very step waits one step and
  shares it (several samples of one prompt compute it once). Exact, because a token's K/V are
  computed the same way whatever the batch and the chunking;
- structured output: a constrained sequence's next token needs a mask computed on the host
  from its last one, so while one decodes, iterations are single steps of every decode row
  (lockstep: no multi-step decode dispatch, no proposals for it);
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

from qoq_jax.pages import OutOfPagesError, PageAllocator, page_hashes
from qoq_jax.sampling import SamplingParams
from qoq_jax.speculative import ProposalRequest


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
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # of context's full pages
    prefilled: int = 0  # tokens of context dispatched for prefill (or found in the prefix cache)
    cached_tokens: int = 0  # prompt tokens the first admission found in the prefix cache
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
    def constrained(self) -> bool:
        """Structured output: each token needs a mask computed from the one before."""
        return self.params.structured is not None

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
    cached_tokens: int = 0  # context tokens the admissions found in the prefix cache
    proposals: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # by seq_id
    # a decode row is constrained (structured output): one step, whose constrained rows'
    # masks the host computes from the token before (a decode step in two programs, the masks
    # computed while the forward runs; or a ragged step, with prompt chunks, after every
    # token is read back)
    lockstep: bool = False

    @property
    def ragged(self) -> bool:
        """A ragged step: prompt chunks, or decode rows with proposals to verify."""
        return bool(self.chunks or self.proposals)

    @property
    def num_tokens(self) -> int:
        return (len(self.decode) + sum(len(p) for p in self.proposals.values())
                + sum(c.length for c in self.chunks))

    @property
    def empty(self) -> bool:
        return not (self.chunks or self.decode)


MIN_TOKEN_BUCKET = 16
SPEC_MIN_TOKEN_BUCKET = 8  # speculative engines: a lone verification row pads to 8, not 16


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
    min_tokens: int = MIN_TOKEN_BUCKET  # the smallest step bucket

    @property
    def step(self) -> tuple[int, ...]:
        out, b = [], self.min_tokens
        while b < self.max_tokens:
            out.append(b)
            b *= 2
        return tuple(out) + (max(self.max_tokens, self.min_tokens),)

    @property
    def decode(self) -> tuple[int, ...]:
        return tuple(sorted({self.decode_rows(n) for n in range(1, self.slots + 1)}))

    def step_tokens(self, n: int) -> int:
        """Padded token count of a ragged step of n tokens (the bucket above)."""
        if n > max(self.max_tokens, self.min_tokens):
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
                 prefill_chunk: int, decode_steps: int, buckets: Buckets | None = None,
                 cache_salt: bytes = b"", proposer=None, speculative_max_batch: int = 0):
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
        self.cache_salt = cache_salt  # what else decides a page's K/V (the cache kind, ...)
        # speculative decoding: proposes tokens for a decoding sequence (qoq_jax.speculative)
        self.proposer = proposer
        self.speculative_max_batch = speculative_max_batch  # propose only up to this many rows
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

    @property
    def num_decoding(self) -> int:
        return sum(s.status == Status.DECODING for s in self.running)

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

    def on_verified(self, seq: Sequence, accepted: int) -> None:
        """A verification row of `seq` kept `accepted` of its proposals (their K/V stay; the
        rejected positions' are past its new end): its position moves on by them, and pages
        holding only rejected positions are freed."""
        if seq.status != Status.DECODING:
            return
        seq.steps += accepted
        self.allocator.trim(seq.seq_id, seq.kv_tokens)

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
        # 1b. speculation: proposals for decoding sequences, verified in a ragged step (they
        # need every token read back: the proposals follow the sequence's last token)
        if self.proposer is not None and not inflight and (
                not self.speculative_max_batch or len(plan.decode) <= self.speculative_max_batch):
            self._propose(plan)
        # 2. prompt chunks in the rest of the token budget: continuing prompts, then admissions
        budget = self.max_batch_tokens - plan.num_tokens
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
        pending = {h for c in plan.chunks for h in self._completed_hashes(c)}
        while self.waiting and self._free_slots and budget > 0:
            seq = self.waiting[0]
            if not seq.context:
                seq.context = seq.prompt + seq.output
                if self.allocator.caching:
                    seq.hashes = page_hashes(seq.context, self.allocator.page_size,
                                             self.cache_salt)
            # the prefix cache: the longest run of cached leading pages, never the page of the
            # last context token (the sequence computes that one: it samples from it)
            usable = seq.hashes[:(len(seq.context) - 1) // self.allocator.page_size]
            hits = self.allocator.lookup(usable)
            if len(hits) < len(usable) and usable[len(hits)] in pending:
                break  # its next page is being computed in this step: share it next time
            self.allocator.share(seq.seq_id, hits)
            seq.prefilled = len(hits) * self.allocator.page_size
            # admission never preempts, and leaves each decoder a page of headroom
            room = (self.allocator.num_free - len(plan.decode)) * self.allocator.page_size
            if room <= 0:
                self.allocator.free(seq.seq_id)
                seq.prefilled = 0
                break
            chunk = self._next_chunk(seq, min(budget, room))
            if seq.incarnation == 0:
                seq.cached_tokens = seq.prefilled
            plan.cached_tokens += seq.prefilled
            pending.update(self._completed_hashes(chunk))
            self.waiting.popleft()
            seq.status = Status.PREFILLING
            seq.slot = heapq.heappop(self._free_slots)
            seq.admitted_order = next(self._admissions)
            seq.incarnation += 1
            self.running.append(seq)
            self.allocator.ensure(seq.seq_id, chunk.start + chunk.length)
            plan.admitted.append(seq)
            plan.chunks.append(chunk)
            budget -= chunk.length
        # 3. no prompt work: a decode dispatch of several steps (pages for all of them), or of
        # one step if a decode row is constrained: its next mask needs its last token
        plan.lockstep = bool(plan.decode) and any(s.constrained for s in plan.decode)
        if plan.ragged:
            plan.steps = 1
            self._fit(plan)
        elif plan.decode:
            plan.steps = 1 if plan.lockstep else self.decode_steps
            for seq in list(plan.decode):
                if seq.status == Status.DECODING:
                    self._grow(seq, plan.steps, plan, inflight)
            plan.decode = [s for s in plan.decode if s.status == Status.DECODING]
        self._commit(plan)
        return plan

    def _propose(self, plan: Plan) -> None:
        """Proposals for plan.decode's sequences: at most what is left of each one's budget
        (a sequence near max_new_tokens proposes fewer), of the step's token budget (half of
        it, so prompts still progress), and of the pages it can get without preempting. The
        proposer answers every sequence's request at once (a draft model batches them)."""
        room = self.max_batch_tokens // 2 - len(plan.decode)
        asks = []
        for seq in plan.decode:
            if seq.constrained:  # a proposal would need the mask after each proposed token
                continue
            left = seq.params.max_new_tokens - len(seq.output) - 1
            k = min(self.proposer.k, left, room)
            if k <= 0:
                continue
            asks.append(ProposalRequest(seq.seq_id, seq.slot, seq.prompt + seq.output, k))
            room -= k
        if not asks:
            return
        by_id = {s.seq_id: s for s in plan.decode}
        for ask, proposal in zip(asks, self.proposer.propose_many(asks)):
            seq = by_id[ask.seq_id]
            proposal = list(proposal)[:ask.k]
            if not proposal:
                continue
            owned = len(self.allocator.pages(seq.seq_id)) * self.allocator.page_size
            try:  # pages for the proposals too, if they can be had without preempting
                self.allocator.ensure(seq.seq_id, seq.kv_tokens + 1 + len(proposal))
            except OutOfPagesError:
                proposal = proposal[:max(0, owned - seq.kv_tokens - 1)]
            if proposal:
                plan.proposals[seq.seq_id] = proposal

    # Padding a ragged step costs compute for nothing, but a step's time is mostly reading the
    # weights until it holds a few hundred tokens: trimming is worth a later step only when
    # this many padding tokens or more would be saved.
    MIN_PADDING_SAVED = 64

    def _fit(self, plan: Plan) -> None:
        """Trim the last chunk to the bucket below when that defers fewer prompt tokens than
        padding up to the bucket above would waste (the deferred ones run next iteration)."""
        if not plan.chunks:
            return
        n = plan.num_tokens
        up, down = self.buckets.step_tokens(n), self.buckets.step_tokens_below(n)
        last = plan.chunks[-1]
        cut = n - down
        if up - n >= max(cut + 1, self.MIN_PADDING_SAVED) and cut < last.length:
            plan.chunks[-1] = Chunk(last.seq, last.start, last.length - cut, False)

    def _completed_pages(self, chunk: Chunk) -> range:
        """Indices of the context's full pages this chunk completes."""
        ps = self.allocator.page_size
        end = min((chunk.start + chunk.length) // ps, len(chunk.seq.hashes))
        return range(chunk.start // ps, max(end, chunk.start // ps))

    def _completed_hashes(self, chunk: Chunk) -> list[bytes]:
        return [chunk.seq.hashes[i] for i in self._completed_pages(chunk)]

    def _commit(self, plan: Plan) -> None:
        for seq in plan.decode:
            seq.steps += plan.steps
        for chunk in plan.chunks:
            seq = chunk.seq
            # pages this chunk fills can be shared from the next iteration on: every later
            # program is ordered after this one by the cache they both use
            for i in self._completed_pages(chunk):
                self.allocator.register(seq.seq_id, i, seq.hashes[i])
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
        if self.proposer is not None:  # a draft model frees its pages for it too
            self.proposer.release(seq.seq_id)
        heapq.heappush(self._free_slots, seq.slot)
        seq.slot = None

    def _preempt(self, seq: Sequence, plan: Plan) -> None:
        plan.freed_slots.append(seq.slot)
        self._release(seq)
        self.running.remove(seq)
        seq.status = Status.WAITING
        seq.context, seq.hashes = [], []  # prompt + output, taken at re-admission
        seq.prefilled = seq.steps = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
        if seq in plan.decode:
            plan.decode.remove(seq)
        plan.proposals.pop(seq.seq_id, None)
        plan.chunks = [c for c in plan.chunks if c.seq is not seq]
