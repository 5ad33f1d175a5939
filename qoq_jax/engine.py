"""The serving engine's host loop: inbox, request lifecycle, read-back, token events.

One engine serves ``Engine.generate`` (submit all, drain), ``LLM.generate`` / ``LLM.stream``,
``python -m qoq_jax.generate``, the HTTP server and ``eval`` (through the runner's verbs). It is
three parts with one owner each:

- the device runner (qoq_jax/runner.py): the compiled programs and the device state they own
  (KV pools, slot state, page table); it knows nothing of requests;
- the scheduler (qoq_jax/scheduler.py): every policy decision (admission, chunking, page growth,
  preemption), as a Plan per iteration; it alone changes a Sequence;
- this loop: takes requests in (any thread), carries out each Plan on the runner, reads results
  back one iteration late (the next iteration is dispatched first, so the host's work overlaps
  the device's), turns them into TokenEvents for the requests' callbacks, and ends requests.

One iteration (``step``): intake -> schedule -> pack the plan into the runner's inputs ->
dispatch (a ragged step of decode rows and prompt chunks, or a decode dispatch of several
steps) -> read back the previous dispatch -> events, finishes, freed pages.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from qoq_jax import sharding
from qoq_jax.errors import (ContextLengthError, EngineBusyError, EngineMemoryError, PromptError,
                            QueueFullError)
from qoq_jax.kv_cache import KV_CACHE_KINDS
from qoq_jax.pages import SCRATCH_PAGE, PageAllocator
from qoq_jax.model import Transformer
from qoq_jax.runner import (COMPILES, DecodeOutput, DeviceRunner, Finish, StepOutput, fetch,
                            stack_params)
from qoq_jax.sampling import SamplingParams
from qoq_jax.scheduler import NeedsDrain, Plan, Scheduler, Sequence as Seq, Status
from qoq_jax.draft import DraftProposer
from qoq_jax.speculative import NgramProposer, SpeculativeStats
from qoq_jax.structured import Constraint, ConstraintError, GrammarCompiler

__all__ = ["COMPILES", "ContextLengthError", "Engine", "EngineBusyError", "EngineConfig",
           "EngineMemoryError", "GenerationResult", "PromptError", "QueueFullError",
           "TokenEvent"]

FINISH_REASONS = {Finish.STOP: "stop", Finish.LENGTH: "length", Finish.ERROR: "error"}
NON_FINITE = ("the model produced non-finite logits (NaN or Inf): its weights or activations "
              "overflowed")


@dataclasses.dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]  # generated tokens, the stop token included when one ended the sequence
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    logprobs: list[dict] | None = None  # per token: {"token", "logprob", "top": [(id, lp)...]}
    error: str | None = None
    preemptions: int = 0  # times the request was preempted (and recomputed)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed again)


@dataclasses.dataclass
class TokenEvent:
    """What a request produced since its last event (callbacks and streams get these)."""

    request_id: int
    token_ids: list[int]
    logprobs: list[dict] | None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens the prefix cache provided (known from the first token)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits. None picks a default for the platform (CPU / GPU)."""

    kv_cache: str = "16bit"  # "16bit" | "kv4" | "kv4-minmax" (QServe's KV4 quantizer)
    page_size: int = 16
    max_slots: int | None = None  # concurrent sequences (decode rows); CPU 16, GPU 128
    num_pages: int | None = None  # KV-cache pages; default: what kv_memory holds
    kv_memory: int | None = None  # bytes for the KV cache; CPU <= 2 GiB, GPU half the free memory
    prefill_chunk: int | None = None  # most prompt tokens of one request per step; CPU 512, GPU 1024
    prefill_budget: int | None = None  # tokens of one ragged step (decode rows + chunks);
    #                                    default max(prefill_chunk, 2 x max_slots); GPU 2048
    decode_steps: int | None = None  # decode steps per dispatch; CPU 8, GPU 16 (at most 16)
    max_logprobs: int = 5  # the most alternatives a request may ask for
    max_stop_ids: int = 8  # stop token ids per request
    max_logit_bias: int = 300  # logit_bias entries per request
    max_queue: int | None = None  # waiting requests before submit() refuses (None: no limit)
    kernels: str | None = None  # "pallas" | "xla"; None: Pallas on a GPU, XLA elsewhere
    prefix_caching: bool = True  # share the K/V pages of identical prompt prefixes
    # speculative decoding (qoq_jax/speculative.py): "ngram" proposes up to
    # num_speculative_tokens tokens per decoding sequence from the longest earlier occurrence
    # (ngram_max down to ngram_min tokens) of its last tokens in its prompt and output; "draft"
    # has a second, smaller model with the same tokenizer propose them (Engine(draft_model=),
    # qoq_jax/draft.py). The output is the same as without (greedy and seeded sampling alike),
    # only faster or not
    speculative: str | None = None
    num_speculative_tokens: int = 7  # 1 + 7 tokens: a lone verification row fills the 8 bucket
    ngram_max: int = 4
    ngram_min: int = 2
    # propose only while at most this many sequences decode (0: any number). None: CPU 2 (a
    # compute-bound CPU gains only where a step's fixed cost dominates: benchmarks/speculative.py
    # measures a loss at 4 and 16), GPU no limit
    speculative_max_batch: int | None = None
    # the draft model's KV cache ("16bit" | "kv4" | "kv4-minmax"); None: the target's.
    # qoq_jax.load takes a quantized draft checkpoint's own (KV4 for QoQ)
    draft_kv_cache: str | None = None

    def __post_init__(self):
        if self.kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_KINDS}, not {self.kv_cache!r}")
        if self.draft_kv_cache not in (None, *KV_CACHE_KINDS):
            raise ValueError(f"draft_kv_cache must be one of {KV_CACHE_KINDS} or None, not "
                             f"{self.draft_kv_cache!r}")
        ps = self.page_size
        if isinstance(ps, bool) or not isinstance(ps, int) or ps < 1 or ps & (ps - 1):
            raise ValueError(f"page_size must be a power of two >= 1, got {ps!r}")
        for name in ("max_slots", "num_pages", "kv_memory", "prefill_chunk", "prefill_budget",
                     "decode_steps", "max_queue", "max_logit_bias"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError("num_pages must be >= 2 (page 0 is scratch)")
        if self.decode_steps is not None and self.decode_steps > DeviceRunner.max_decode_steps:
            raise ValueError(f"decode_steps must be <= {DeviceRunner.max_decode_steps}, got "
                             f"{self.decode_steps}")
        if self.kernels not in (None, "pallas", "xla"):
            raise ValueError(f"kernels must be 'pallas', 'xla' or None, not {self.kernels!r}")
        from qoq_jax.speculative import SPECULATIVE_KINDS

        if self.speculative not in (None, *SPECULATIVE_KINDS):
            raise ValueError(f"speculative must be one of {SPECULATIVE_KINDS} or None, not "
                             f"{self.speculative!r}")
        smb = self.speculative_max_batch
        if smb is not None and (isinstance(smb, bool) or not isinstance(smb, int) or smb < 0):
            raise ValueError(f"speculative_max_batch must be an integer >= 0, got {smb!r}")
        for name in ("num_speculative_tokens", "ngram_max", "ngram_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.num_speculative_tokens > DeviceRunner.max_spec_tokens:
            raise ValueError(f"num_speculative_tokens must be <= "
                             f"{DeviceRunner.max_spec_tokens}, got {self.num_speculative_tokens}")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must be <= ngram_max "
                             f"({self.ngram_max})")


def available_memory() -> int:
    """Bytes a new buffer can take: free device memory on a GPU, available RAM on CPU."""
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    import psutil

    return int(psutil.virtual_memory().available)


# ----------------------------------------------------------------------------------------------
# host-side bookkeeping

@dataclasses.dataclass(eq=False)
class _Request:
    seq: Seq
    callback: Callable[[TokenEvent], None] | None
    logprobs: list[dict] | None
    submitted: float
    first_token_at: float | None = None
    error: str | None = None
    release_on_finish: bool = False
    constraint: Constraint | None = None  # structured output: this request's matcher


@dataclasses.dataclass
class _Dispatched:
    """A dispatched iteration whose results are not read back yet: which sequence (at which
    incarnation) each output row belongs to."""

    output: StepOutput | DecodeOutput
    rows: list[tuple[int, Seq, int]]  # (output row, sequence, its incarnation)
    proposals: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # by output row


class Engine:
    """In-flight batching over persistent slots and pools for one model.

    ``submit`` and ``cancel`` may be called from any thread; ``step`` (and everything that
    drives it: ``generate``, ``stream``, ``run``) from one thread at a time.
    """

    def __init__(self, model: Transformer, config: EngineConfig | None = None, *, mesh=None,
                 draft_model: Transformer | None = None, **overrides):
        cfg = dataclasses.replace(config or EngineConfig(), **overrides)
        self.engine_config = cfg
        self.model_config = self.config = model.config
        self.dtype = model.dtype
        # tensor parallelism (qoq_jax.sharding): weights and KV pools split over the mesh's
        # "tp" axis, everything else replicated; the scheduler and host state are unchanged
        self.tensor_parallel = sharding.tp_size(mesh)
        sharding.check_tensor_parallel(model, self.tensor_parallel)
        self.mesh = mesh if self.tensor_parallel > 1 else None
        gpu = jax.devices()[0].platform == "gpu"
        pick = lambda value, cpu, on_gpu: value if value is not None else (  # noqa: E731
            on_gpu if gpu else cpu)
        m = model.config
        self.kv_cache = cfg.kv_cache
        self.page_size = cfg.page_size
        self.max_slots = pick(cfg.max_slots, 16, 128)
        self.prefill_chunk = pick(cfg.prefill_chunk, 512, 1024)
        self.prefill_budget = pick(cfg.prefill_budget, max(self.prefill_chunk, 2 * self.max_slots),
                                   max(2048, 2 * self.max_slots))
        if self.prefill_budget <= self.max_slots:
            raise ValueError(f"prefill_budget ({self.prefill_budget}) must exceed max_slots "
                             f"({self.max_slots}): a ragged step holds every decode row and "
                             f"some prompt tokens")
        self.decode_steps = pick(cfg.decode_steps, 8, 16)
        self.max_logprobs = cfg.max_logprobs
        self.max_stop_ids = cfg.max_stop_ids
        self.max_logit_bias = cfg.max_logit_bias
        self.max_queue = cfg.max_queue
        self.max_pages_per_seq = -(-m.max_position_embeddings // self.page_size)
        page_bytes = DeviceRunner.bytes_per_page(m, self.kv_cache, self.page_size, self.dtype,
                                                 self.tensor_parallel)
        useful = 1 + self.max_slots * self.max_pages_per_seq  # more pages could never be used
        free = available_memory()
        if cfg.num_pages is not None:
            num_pages = cfg.num_pages
        else:
            budget = cfg.kv_memory or (free // 2 if gpu else min(2 << 30, free // 4))
            num_pages = min(useful, max(2, budget // page_bytes))
        self.num_pages = num_pages
        self.kv_bytes = num_pages * page_bytes
        if self.kv_bytes > free:
            fits = max(0, free // page_bytes)
            raise EngineMemoryError(
                f"a KV cache of {num_pages} pages x {self.page_size} tokens needs "
                f"{self.kv_bytes / 2**30:.2f} GiB, but only {free / 2**30:.2f} GiB is free; "
                f"about {fits} pages ({fits * self.page_size} tokens) would fit: lower "
                f"num_pages / kv_memory")
        self.speculative = cfg.speculative
        self.spec_k = cfg.num_speculative_tokens if cfg.speculative else 0
        self.speculative_max_batch = pick(cfg.speculative_max_batch, 2, 0)
        self.runner = DeviceRunner(
            model, kv_cache=self.kv_cache, num_pages=num_pages, page_size=self.page_size,
            slots=self.max_slots, max_pages_per_seq=self.max_pages_per_seq,
            max_batch_tokens=self.prefill_budget, max_logprobs=self.max_logprobs,
            max_stop_ids=self.max_stop_ids, max_logit_bias=self.max_logit_bias, mesh=self.mesh,
            kernels=cfg.kernels, spec_k=self.spec_k)
        self.draft = self._make_draft(draft_model, free - self.kv_bytes, gpu)
        self.prefix_caching = cfg.prefix_caching
        self.allocator = PageAllocator(num_pages, self.page_size, caching=self.prefix_caching)
        self.scheduler = self._new_scheduler()
        self._table = np.zeros((self.runner.slots, self.max_pages_per_seq), np.int32)
        self._retire = np.zeros((self.runner.slots,), bool)
        self._requests: dict[int, _Request] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: collections.deque[_Dispatched] = collections.deque()
        self._score_jobs: list[tuple[list[int], int, concurrent.futures.Future]] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stepping = threading.Lock()
        self.stats = collections.Counter()
        self.last_stats: dict[str, float] = {}
        self._spec_stats = SpeculativeStats(max(1, self.spec_k))
        # structured output: compiles requests' constraints; set by whoever has the tokenizer
        # (qoq_jax.api.LLM does), since the engine itself sees token ids only
        self.grammar: GrammarCompiler | None = None

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.allocator, max_slots=self.max_slots,
                         max_batch_tokens=self.prefill_budget, prefill_chunk=self.prefill_chunk,
                         decode_steps=self.decode_steps, buckets=self.runner.buckets,
                         cache_salt=f"{self.kv_cache}/{self.page_size}".encode(),
                         proposer=self._proposer(),
                         speculative_max_batch=self.speculative_max_batch)

    def _proposer(self):
        cfg = self.engine_config
        if cfg.speculative is None:
            return None
        if cfg.speculative == "draft":
            return self.draft
        return NgramProposer(cfg.num_speculative_tokens, cfg.ngram_max, cfg.ngram_min)

    def _make_draft(self, draft_model: Transformer | None, free: int,
                    gpu: bool) -> DraftProposer | None:
        """The draft model's proposer (speculative="draft"): its own runner and KV pages, as
        many tokens' worth as the target's pool plus a round's proposals per slot."""
        cfg = self.engine_config
        if cfg.speculative != "draft":
            if draft_model is not None:
                raise ValueError("a draft model is given but speculative is "
                                 f"{cfg.speculative!r}: set speculative='draft' to use it")
            return None
        if draft_model is None:
            raise ValueError("speculative='draft' needs a draft model (Engine(draft_model=...); "
                             "qoq_jax.load(..., draft_model=PATH); --speculative draft:PATH)")
        if self.tensor_parallel > 1:
            raise ValueError("speculative='draft' does not run under tensor parallelism yet: "
                             "use speculative='ngram', or no tensor parallelism")
        d, m = draft_model.config, self.model_config
        if d.vocab_size != m.vocab_size:
            raise ValueError(f"the draft model's vocabulary has {d.vocab_size} tokens, the "
                             f"target's {m.vocab_size}: a draft must share the target's "
                             f"tokenizer")
        kv = cfg.draft_kv_cache or self.kv_cache
        page_bytes = DeviceRunner.bytes_per_page(d, kv, self.page_size, draft_model.dtype)
        per_round = -(-self.spec_k // self.page_size) + 1
        num_pages = min(self.num_pages + self.max_slots * per_round,
                        1 + self.max_slots * (self.max_pages_per_seq + per_round))
        if num_pages * page_bytes > free:
            fits = max(0, free // page_bytes)
            raise EngineMemoryError(
                f"the draft model's KV cache of {num_pages} pages needs "
                f"{num_pages * page_bytes / 2**30:.2f} GiB beside the target's "
                f"{self.kv_bytes / 2**30:.2f} GiB, but only {free / 2**30:.2f} GiB is left "
                f"({fits} pages would fit): lower num_pages / kv_memory")
        return DraftProposer(draft_model, k=self.spec_k, slots=self.max_slots,
                             page_size=self.page_size, num_pages=num_pages,
                             max_context=self.max_context + self.spec_k, kv_cache=kv,
                             max_batch_tokens=self.prefill_budget, kernels=cfg.kernels)

    @property
    def params(self):
        """The model's state as the runner holds it on the device(s)."""
        return self.runner.params

    # ------------------------------------------------------------------------------------------
    # limits and validation

    @property
    def max_context(self) -> int:
        """The longest sequence (prompt + new tokens) one request may have."""
        return min(self.model_config.max_position_embeddings,
                   (self.num_pages - 1) * self.page_size)

    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise PromptError if the engine can never serve this request."""
        if len(prompt) == 0:
            raise PromptError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
        if bad:
            raise PromptError(f"the prompt has token ids outside the vocabulary [0, {vocab}): "
                              f"{bad[:5]}")
        total = len(prompt) + params.max_new_tokens
        ctx = self.model_config.max_position_embeddings
        if total > ctx:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; with max_new_tokens="
                f"{params.max_new_tokens} that exceeds the model's context of {ctx} tokens")
        cap = (self.num_pages - 1) * self.page_size
        if total > cap:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; with max_new_tokens="
                f"{params.max_new_tokens} it needs {total} tokens of KV cache, but the whole "
                f"cache holds {cap} ({self.num_pages - 1} pages of {self.page_size}); lower "
                f"max_new_tokens or give the engine more KV memory")
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise PromptError(f"logprobs={params.logprobs} exceeds the engine's limit of "
                              f"{self.max_logprobs}")
        stop_ids = self._stop_ids(params)
        if len(stop_ids) > self.max_stop_ids:
            raise PromptError(f"at most {self.max_stop_ids} stop token ids per request")
        if len(params.logit_bias) > self.max_logit_bias:
            raise PromptError(f"logit_bias has {len(params.logit_bias)} entries; the engine's "
                              f"limit is {self.max_logit_bias}")
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]),
                          ("stop_token_ids", stop_ids)):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise PromptError(f"{name} has token ids outside the vocabulary [0, {vocab}): "
                                  f"{bad[:5]}")

    def _stop_ids(self, sp: SamplingParams) -> tuple[int, ...]:
        return self.model_config.eos_token_ids if sp.stop_token_ids is None else sp.stop_token_ids

    # ------------------------------------------------------------------------------------------
    # the thread-safe front

    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
               callback: Callable[[TokenEvent], None] | None = None) -> int:
        """Queue a request; returns its id. The callback gets a TokenEvent whenever it produced
        tokens and once when it ends (from the thread that runs step())."""
        self.check_request(prompt, params)
        if self.max_queue is not None and self.num_waiting >= self.max_queue:
            raise QueueFullError(f"{self.num_waiting} requests are waiting already (the limit "
                                 f"is {self.max_queue}); try again later")
        constraint = None
        if params.structured is not None:  # compiled here, in the caller's thread: an
            # invalid schema is the caller's error before any work (ConstraintError)
            if self.grammar is None:
                raise ConstraintError("structured output needs the model's tokenizer: give "
                                      "the engine a GrammarCompiler (qoq_jax.load does)")
            constraint = self.grammar.constraint(params.structured)
        rid = next(self._ids)
        seq = Seq(rid, [int(t) for t in prompt], params)
        req = _Request(seq, callback, [] if params.logprobs is not None else None,
                       time.perf_counter(), constraint=constraint)
        self._requests[rid] = req
        self._inbox.put(("add", req))
        return rid

    def submit_prompt_logprobs(self, prompt: Sequence[int], n_top: int = 0
                               ) -> concurrent.futures.Future:
        """Queue the teacher-forced log-probabilities of a prompt's tokens (and the n_top most
        likely at each; eval.scoring.PromptLogprobs) for the thread that steps the engine, which
        runs them between iterations (thread-safe). Returns a Future of PromptLogprobs."""
        self.check_request(prompt, SamplingParams(max_new_tokens=1))
        if not 0 <= n_top <= self.max_logprobs:
            raise PromptError(f"prompt log-probabilities: n_top must be in [0, "
                              f"{self.max_logprobs}], got {n_top}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("score", [int(t) for t in prompt], n_top, future))
        return future

    def prompt_logprobs(self, prompt: Sequence[int], n_top: int = 0):
        """submit_prompt_logprobs, then step until it is done (or wait, if another thread
        steps the engine)."""
        future = self.submit_prompt_logprobs(prompt, n_top)
        while not future.done():
            try:
                self.step()
            except EngineBusyError:
                break
        return future.result()

    def cancel(self, request_id: int, reason: str = "abort") -> None:
        """End a request early (thread-safe); its slot and pages are freed at the next step."""
        self._inbox.put(("cancel", request_id, reason))

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + self._inbox.qsize()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._pending) or not self._inbox.empty()

    def _intake(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                req = msg[1]
                if req.seq.status == Status.WAITING:
                    self.scheduler.add(req.seq)
                self.stats["requests"] += 1
            elif msg[0] == "score":
                self._score_jobs.append(msg[1:])
            else:
                req = self._requests.get(msg[1])
                if req is not None and req.seq.status != Status.FINISHED:
                    self._end(req, msg[2])

    # ------------------------------------------------------------------------------------------
    # one iteration

    def step(self) -> None:
        """Schedule and dispatch one iteration, and read back the one before it."""
        if not self._stepping.acquire(blocking=False):
            raise EngineBusyError("the engine is already being driven by another thread (a "
                                  "server's engine thread?): submit() to it instead")
        try:
            self._step()
        finally:
            self._stepping.release()

    def _run_score_jobs(self) -> None:
        from qoq_jax.eval.scoring import prompt_logprobs

        jobs, self._score_jobs = self._score_jobs, []
        for ids, n_top, future in jobs:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(prompt_logprobs(self, ids, n_top))
                self.stats["scored_prompts"] += 1
            except Exception as e:  # noqa: BLE001 - the caller's to handle
                future.set_exception(e)

    def _step(self) -> None:
        self._intake()
        if self._score_jobs:
            self._run_score_jobs()
        limit = self.speculative_max_batch
        if self.spec_k and (not limit or self.scheduler.num_decoding <= limit):
            # proposals follow each sequence's last token: read everything back first (the
            # cost of speculation: no host/device overlap; see docs/ARCHITECTURE.md)
            self._drain()
        elif self._lockstep_with_prompts():
            # a constrained row's mask follows its last token, and with prompt chunks the step
            # is one program (the ragged step): everything read back first. Without prompt
            # work it is a decode step in two programs, the masks computed while the forward
            # runs (_dispatch_lockstep)
            self._drain()
        if not self.scheduler.has_work:
            self._drain()
            return
        self.runner.allocate()
        try:
            plan = self.scheduler.schedule(inflight=bool(self._pending))
        except NeedsDrain:  # a preemption must see every token read back
            self._drain()
            plan = self.scheduler.schedule(inflight=False)
        self.stats["preemptions"] += len(plan.preempted)
        self.stats["cached_prompt_tokens"] += plan.cached_tokens
        self._retire[plan.freed_slots] = True
        if not plan.empty:
            self._sync_table()
            self._dispatch(plan)
        elif not self._pending:
            raise RuntimeError(  # a scheduler bug, not a user error: never spin silently
                f"the scheduler planned nothing with {len(self.scheduler.running)} running and "
                f"{len(self.scheduler.waiting)} waiting sequences and nothing in flight")
        # keep one iteration in flight while the host handles the one before it
        while len(self._pending) > (1 if not plan.empty else 0):
            self._process(self._pending.popleft())

    def _lockstep_with_prompts(self) -> bool:
        """A constrained sequence decodes while prompts wait or are being prefilled."""
        running = self.scheduler.running
        return any(s.constrained and s.status == Status.DECODING for s in running) and (
            bool(self.scheduler.waiting) or any(s.status == Status.PREFILLING for s in running))

    def _drain(self) -> None:
        while self._pending:
            self._process(self._pending.popleft())

    def _sync_table(self) -> None:
        """Mirror the allocator into the page table (rows = slots)."""
        table = self._table
        table[:] = SCRATCH_PAGE
        for seq in self.scheduler.running:
            pages = self.allocator.pages(seq.seq_id)
            table[seq.slot, :len(pages)] = pages
        self.runner.set_page_table(table)

    def _take_retired(self) -> np.ndarray:
        retire = self._retire.copy()
        self._retire[:] = False
        return retire

    def _dispatch(self, plan: Plan) -> None:
        if plan.ragged:
            if plan.lockstep:  # masks need every token read back (normally drained already)
                self._drain()
            self._dispatch_ragged(plan)
        elif plan.lockstep:
            self._dispatch_lockstep(plan)
        else:
            rows = self.runner.buckets.decode_rows(self.scheduler.occupied_rows())
            out = self.runner.decode(rows, plan.steps, self._take_retired())
            self.stats["decode_dispatches"] += 1
            self._pending.append(_Dispatched(out, [(s.slot, s, s.incarnation)
                                                   for s in plan.decode]))

    def _dispatch_ragged(self, plan: Plan) -> None:
        t = self.runner.buckets.step_tokens(plan.num_tokens)
        x = self.runner.empty_inputs(t)
        rows, fresh, pos, n_logits, proposals = [], [], 0, 0, {}

        def logit(row, at, col=0):  # speculative steps: logits at these flat tokens only
            nonlocal n_logits
            if self.spec_k:
                x.logit_token[n_logits], x.logit_row[n_logits] = at, row
                x.logit_col[n_logits] = col
                n_logits += 1

        for i, seq in enumerate(plan.decode):  # decode rows first: one token (+ proposals)
            prop = plan.proposals.get(seq.seq_id, [])
            n = 1 + len(prop)
            x.slot[i], x.start[i], x.length[i], x.decode[i] = seq.slot, pos, n, True
            x.token_seq[pos:pos + n] = i
            if prop:
                x.num_proposed[i] = len(prop)
                x.tokens[pos + 1:pos + n] = prop
                proposals[i] = prop
            for j in range(n):
                logit(i, pos + j, j)
            pos += n
            rows.append((i, seq, seq.incarnation))
            self._fill_mask(x.mask_on, x.allowed, i, seq)
        for i, chunk in enumerate(plan.chunks, start=len(plan.decode)):
            seq = chunk.seq
            x.slot[i], x.start[i], x.length[i], x.pos0[i] = seq.slot, pos, chunk.length, chunk.start
            x.tokens[pos:pos + chunk.length] = chunk.tokens
            x.token_seq[pos:pos + chunk.length] = i
            pos += chunk.length
            self.stats["prompt_tokens"] += chunk.length
            if chunk.final:
                logit(i, pos - 1)
                x.sample[i] = True
                x.generated0[i] = seq.generated0
                if seq.params.penalized:
                    self._set_history(seq)
                fresh.append((i, self._row_params(seq.params)))
                rows.append((i, seq, seq.incarnation))
                self._fill_mask(x.mask_on, x.allowed, i, seq)
        if fresh:
            new = stack_params([p for _, p in fresh], self.max_stop_ids, self.max_logit_bias)
            at = [i for i, _ in fresh]
            for field in dataclasses.fields(new):
                getattr(x.params, field.name)[at] = getattr(new, field.name)
        x = dataclasses.replace(x, retire=self._take_retired())
        out = self.runner.step(x)
        self.stats["ragged_steps"] += 1
        self._pending.append(_Dispatched(out, rows, proposals))

    def _dispatch_lockstep(self, plan: Plan) -> None:
        """One decode step of every decode row while a constrained one decodes, in two
        programs: the forward is dispatched first; while it runs the host reads back the
        previous iteration (the constrained rows' last tokens advance their matchers) and
        fills their masks; then the sampling, with the masks."""
        rows = self.runner.buckets.decode_rows(self.scheduler.occupied_rows())
        logits = self.runner.forward_rows(rows, self._retire.copy())
        self._drain()
        mask_on = np.zeros((self.runner.slots,), bool)
        allowed = np.zeros((self.runner.slots, self.runner.mask_words), np.int32)
        for seq in plan.decode:
            self._fill_mask(mask_on, allowed, seq.slot, seq)
        out = self.runner.sample_rows(logits, self._take_retired(), mask_on, allowed)
        self.stats["lockstep_steps"] += 1
        self._pending.append(_Dispatched(out, [(s.slot, s, s.incarnation) for s in plan.decode]))

    def _fill_mask(self, mask_on: np.ndarray, allowed: np.ndarray, row: int, seq: Seq) -> None:
        """A constrained row's allowed next tokens, from its matcher (which has consumed every
        token the sequence made: they are read back first)."""
        req = self._requests.get(seq.seq_id)
        if req is None or req.constraint is None or seq.status == Status.FINISHED:
            return
        start = time.perf_counter()
        req.constraint.fill(allowed[row])
        mask_on[row] = True
        self.stats["masks"] += 1
        self.stats["mask_seconds"] += time.perf_counter() - start

    def _row_params(self, sp: SamplingParams) -> dict:
        return {"max_new": sp.max_new_tokens, "temperature": sp.temperature, "top_k": sp.top_k,
                "top_p": sp.top_p, "seed": sp.seed, "logprobs": sp.logprobs is not None,
                "stop_ids": list(self._stop_ids(sp)), "min_p": sp.min_p,
                "min_tokens": sp.min_tokens, "penalized": sp.penalized,
                "repetition": sp.repetition_penalty, "presence": sp.presence_penalty,
                "frequency": sp.frequency_penalty,
                "bias_ids": [t for t, _ in sp.logit_bias],
                "bias_values": [b for _, b in sp.logit_bias]}

    def _set_history(self, seq: Seq) -> None:
        """A penalised sequence's history into its slot: its prompt's tokens, and the counts of
        the tokens it made before a preemption (all read back: preemption drains)."""
        vocab = self.model_config.vocab_size
        mask = np.zeros((vocab,), bool)
        mask[np.asarray(seq.prompt, np.int64)] = True
        counts = np.bincount(np.asarray(seq.output, np.int64), minlength=vocab).astype(np.int32)
        self.runner.set_history(seq.slot, mask, counts)

    # ------------------------------------------------------------------------------------------
    # results

    def _process(self, dispatched: _Dispatched) -> None:
        out = fetch(dispatched.output)
        now = time.perf_counter()
        ragged = isinstance(out, StepOutput) and out.token.ndim == 1
        for row, seq, incarnation in dispatched.rows:
            if seq.status == Status.FINISHED or seq.incarnation != incarnation:
                continue  # ended (or was preempted) after this was dispatched
            req = self._requests[seq.seq_id]
            if ragged:
                cols = [None] if out.token[row] >= 0 else []
                tok, lp, ids, lps = out.token, out.logprob, out.top_ids, out.top_logprobs
                at = lambda a, j: a[row]  # noqa: E731
            else:
                cols = [j for j in range(out.token.shape[1]) if out.token[row, j] >= 0]
                tok, lp, ids, lps = out.token, out.logprob, out.top_ids, out.top_logprobs
                at = lambda a, j: a[row, j]  # noqa: E731
            new_tokens = [int(at(tok, j)) for j in cols]
            new_lps = []
            if req.logprobs is not None:
                n = seq.params.logprobs
                for j, t in zip(cols, new_tokens):
                    top = [(int(i), float(v)) for i, v in zip(at(ids, j)[:n], at(lps, j)[:n])]
                    new_lps.append({"token": t, "logprob": float(at(lp, j)), "top": top})
            prop = dispatched.proposals.get(row)
            if prop is not None:  # a verification row: how many proposals it kept
                accepted = 0
                while accepted < min(len(prop), len(new_tokens)) and (
                        new_tokens[accepted] == prop[accepted]):
                    accepted += 1
                self._spec_stats.record(len(prop), accepted)
            complete = False
            if new_tokens and req.constraint is not None:
                if not req.constraint.advance(new_tokens):  # cannot happen for masked rows
                    req.error = f"structured output: {req.constraint.error or 'rejected'}"
                complete = req.constraint.finished
            if new_tokens:
                self.scheduler.on_tokens(seq, new_tokens)
                if prop is not None:
                    self.scheduler.on_verified(seq, len(new_tokens) - 1)
                self.stats["generated_tokens"] += len(new_tokens)
                if req.first_token_at is None:
                    req.first_token_at = now
                if req.logprobs is not None:
                    req.logprobs.extend(new_lps)
            code = Finish(int(out.finish[row]))
            if code != Finish.RUNNING:
                if code == Finish.ERROR:
                    req.error = NON_FINITE
                self._end(req, FINISH_REASONS[code], new_tokens, new_lps)
            elif req.error is not None:
                self._end(req, "error", new_tokens, new_lps)
            elif complete:  # the constraint is satisfied and nothing but its end can follow
                self._end(req, "stop", new_tokens, new_lps)
            elif new_tokens and req.callback is not None:
                req.callback(TokenEvent(seq.seq_id, new_tokens,
                                        new_lps if req.logprobs is not None else None,
                                        cached_tokens=seq.cached_tokens))

    def _end(self, req: _Request, reason: str, tokens=(), lps=()) -> None:
        seq = req.seq
        if seq.slot is not None:
            self._retire[seq.slot] = True
        self.scheduler.finish(seq, reason)
        self.stats[f"finished_{reason}"] += 1
        if req.callback is not None:
            req.callback(TokenEvent(seq.seq_id, list(tokens),
                                    list(lps) if req.logprobs is not None else None,
                                    finished=True, finish_reason=reason, error=req.error,
                                    cached_tokens=seq.cached_tokens))
        with self._lock:
            if req.release_on_finish:
                self._requests.pop(seq.seq_id, None)

    def finished(self, request_id: int) -> bool:
        return self._requests[request_id].seq.status == Status.FINISHED

    def result(self, request_id: int) -> GenerationResult:
        req = self._requests[request_id]
        seq = req.seq
        if seq.status != Status.FINISHED:
            raise RuntimeError(f"request {request_id} has not finished")
        return GenerationResult(list(seq.prompt), list(seq.output), seq.finish_reason,
                                req.logprobs, req.error, seq.num_preemptions, seq.cached_tokens)

    def first_token_time(self, request_id: int) -> float | None:
        """perf_counter() time of the request's first token (None before it)."""
        return self._requests[request_id].first_token_at

    def release(self, request_id: int) -> None:
        """Forget a finished request's bookkeeping."""
        self._requests.pop(request_id, None)

    def release_when_done(self, request_id: int) -> None:
        """Forget a request now if it has finished, else as soon as it does (thread-safe)."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.seq.status == Status.FINISHED:
                self._requests.pop(request_id, None)
            else:
                req.release_on_finish = True

    def fail_all(self, message: str) -> None:
        """After an internal error: end every request with `message` and start afresh (the
        device state may be lost, so pools and slots are rebuilt at the next step)."""
        self._intake()
        for req in list(self._requests.values()):
            if req.seq.status != Status.FINISHED:
                req.error = message
                self._end(req, "error")
        jobs, self._score_jobs = self._score_jobs, []
        for _, _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError(message))
        self._pending.clear()
        self.allocator = PageAllocator(self.num_pages, self.page_size, caching=self.prefix_caching)
        if self.draft is not None:
            self.draft.reset()
        self.scheduler = self._new_scheduler()
        self.runner.reset()
        self._retire[:] = False

    # ------------------------------------------------------------------------------------------
    # the simple front doors

    def run(self, until: Callable[[], bool]) -> None:
        """Step until `until()` is true (or nothing is left to do)."""
        while not until() and self.has_work:
            self.step()
        self._drain()

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()
                 ) -> list[GenerationResult]:
        """Submit every prompt, run until all are done; one result per prompt, in order."""
        if not prompts:
            return []
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                self.check_request(p, sp)
            except PromptError as e:
                raise type(e)(f"prompt {i}: {e}") from None
        compiles0, compile_s0 = COMPILES.count, COMPILES.seconds
        t0 = time.perf_counter()
        ids = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        self._intake()
        self.run(lambda: all(self.finished(i) for i in ids))
        elapsed = time.perf_counter() - t0
        results = [self.result(i) for i in ids]
        firsts = [self._requests[i].first_token_at for i in ids]
        for i in ids:
            self.release(i)
        n_new = sum(len(r.tokens) for r in results)
        compile_s = COMPILES.seconds - compile_s0
        self.last_stats = {
            "total_s": elapsed, "new_tokens": n_new,
            "prompt_tokens": sum(len(p) for p in prompts),
            "tokens_per_s": n_new / max(elapsed, 1e-9),
            "compiles": COMPILES.count - compiles0, "compile_s": compile_s,
            "tokens_per_s_excluding_compile": n_new / max(elapsed - compile_s, 1e-9),
            "first_token_s": max((f - t0 for f in firsts if f is not None), default=0.0),
        }
        return results

    def stream(self, prompt: Sequence[int], params: SamplingParams = SamplingParams()
               ) -> Iterator[TokenEvent]:
        """Generate one request, yielding its TokenEvents as they come (drives the engine)."""
        events: collections.deque[TokenEvent] = collections.deque()
        rid = self.submit(prompt, params, callback=events.append)
        self._intake()
        try:
            while True:
                while events:
                    ev = events.popleft()
                    yield ev
                    if ev.finished:
                        return
                if not self.has_work:
                    raise RuntimeError("the engine went idle before the request finished")
                self.step()
        finally:
            req = self._requests.get(rid)
            if req is not None and req.seq.status != Status.FINISHED:
                self.cancel(rid)
                self._intake()
            self.release(rid)

    @property
    def speculative_stats(self) -> dict:
        """Speculative decoding since the engine started: verification rows, tokens proposed
        and accepted (the target sampled the proposed token there), the acceptance rate, and
        all three by position (0: the first proposed token). Zeros without speculation."""
        out = {"kind": self.speculative, "num_speculative_tokens": self.spec_k,
               **self._spec_stats.as_dict()}
        if self.draft is not None:  # the draft model's own work
            out["draft"] = dict(self.draft.stats)
        return out

    @property
    def prefix_cache_stats(self) -> dict[str, float]:
        """Prompt tokens computed and found in the prefix cache since the engine started, the
        hit rate (found / all), and the pages cached now."""
        computed, cached = self.stats["prompt_tokens"], self.stats["cached_prompt_tokens"]
        return {"prompt_tokens": computed, "cached_tokens": cached,
                "hit_rate": cached / max(1, computed + cached),
                "cached_pages": self.allocator.num_cached}

    def clear_prefix_cache(self) -> int:
        """Forget the cached pages no running request holds; returns how many were freed."""
        return self.allocator.clear_cache()

    def warmup(self, structured: bool | None = None) -> int:
        """Compile every program a workload can need (every ragged-step and decode bucket, and
        with `structured` the two halves of a decode step that constrained decoding runs;
        default: if the engine can compile constraints), so that no request waits for a
        compilation; returns how many were compiled. Needs an idle engine."""
        if self.has_work:
            raise RuntimeError("warmup() needs an idle engine")
        if structured is None:
            structured = self.grammar is not None
        n = self.runner.warmup(structured=structured)
        if self.draft is not None:
            n += self.draft.warmup()
        return n

    def program_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes the engine's programs are compiled for (tokens of a ragged step, rows of
        a decode dispatch; a draft model's as draft_step and draft_decode)."""
        shapes = self.runner.shapes()
        if self.draft is not None:
            shapes.update({f"draft_{k}": v for k, v in self.draft.runner.shapes().items()})
        return shapes
