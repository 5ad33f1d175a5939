"""The serving engine: persistent KV pools and decode slots, chunked prefill, in-flight batching.

One engine serves ``Engine.generate`` (submit all, drain), ``LLM.generate`` / ``LLM.stream``,
``python -m qoq_jax.generate`` and the HTTP server. What it owns, allocated once and reused:

- the KV pools (16-bit or KV4) of ``num_pages`` pages, and the host ``PageAllocator``;
- ``max_slots`` decode slots: the rows of a ``SlotState`` on the device (last token, position,
  sampling parameters, stop ids, done flags) and of the page table;
- a plain-Python ``Scheduler`` (qoq_jax/scheduler.py) that decides each iteration who is
  admitted, which prompt chunks are prefilled, who grows and who is preempted.

Its jitted verbs, each over a few bucketed shapes (compiled once, then reused):

- ``_prefill``: a batch of prompt chunks [Bp, C] at their offsets, attending to the pages
  earlier chunks wrote; for a prompt's final chunk it samples the first token and inserts the
  sequence into its slot (device state, no host round trip);
- ``_decode``: ``decode_steps`` steps over the occupied rows in one ``lax.while_loop``
  (stopping early when every row is done), with per-row sampling and forced tokens (the replay
  of a preempted sequence);
- ``_retire``: mark slots done (cancelled, stopped by a stop string, preempted).

One iteration (``step``): schedule -> dispatch prefill chunks -> dispatch a decode chunk ->
read back the *previous* decode chunk while this one runs (host/device overlap) -> stream the
tokens, finish sequences, free their pages. Every per-row computation is independent of the
rest of the batch (fixed reduction orders in the XLA path, fixed per-row splits in the
kernels), so a request's greedy output is the same alone, in a full batch, or after a
preemption.

The model travels through jit as (graphdef, state): the graphdef is static, the state an
ordinary pytree; the cache and slot state are donated and updated in place.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.paged_attention import default_splits
from qoq_jax import sharding
from qoq_jax.errors import (ContextLengthError, EngineBusyError, EngineMemoryError,  # noqa: F401
                            PromptError, QueueFullError)
from qoq_jax.kv_cache import KV_CACHE_KINDS, SCRATCH_PAGE, PageAllocator, cache_class, make_cache
from qoq_jax.model import Transformer, decode_step, forward
from qoq_jax.sampling import SamplingParams, sample
from qoq_jax.scheduler import (Chunk, NeedsDrain, Scheduler, Sequence as Seq, Status,
                               batch_bucket, chunk_bucket)

FINISH_REASONS = {1: "stop", 2: "length", 3: "error"}


@dataclasses.dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]  # generated tokens, the stop token included when one ended the sequence
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    logprobs: list[dict] | None = None  # per token: {"token", "logprob", "top": [(id, lp)...]}
    error: str | None = None
    preemptions: int = 0  # times the request was preempted (and recomputed)


@dataclasses.dataclass
class TokenEvent:
    """What a request produced since its last event (callbacks and streams get these)."""

    request_id: int
    token_ids: list[int]
    logprobs: list[dict] | None
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits. None picks a default for the backend (CPU / GPU)."""

    kv_cache: str = "16bit"  # "16bit" | "kv4" | "kv4-minmax" (QServe's KV4 quantizer)
    page_size: int = 16
    max_slots: int | None = None  # concurrent sequences (decode rows); CPU 16, GPU 128
    num_pages: int | None = None  # KV-cache pages; default: what kv_memory holds
    kv_memory: int | None = None  # bytes for the KV cache; CPU <= 2 GiB, GPU half the free memory
    prefill_chunk: int | None = None  # tokens per prefill chunk (power of two); CPU 512, GPU 1024
    prefill_budget: int | None = None  # padded prompt tokens per iteration; default one chunk
    decode_steps: int | None = None  # decode steps per dispatch; CPU 8, GPU 16
    max_logprobs: int = 5  # the most alternatives a request may ask for
    max_stop_ids: int = 8  # stop token ids per request
    max_queue: int | None = None  # waiting requests before submit() refuses (None: no limit)
    # iterations in a row that may admit newcomers without a decode chunk for the running ones
    prefill_priority: int = 2

    def __post_init__(self):
        if self.kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_KINDS}, not {self.kv_cache!r}")
        ps = self.page_size
        if isinstance(ps, bool) or not isinstance(ps, int) or ps < 1 or ps & (ps - 1):
            raise ValueError(f"page_size must be a power of two >= 1, got {ps!r}")
        if isinstance(self.prefill_priority, bool) or not isinstance(self.prefill_priority, int) \
                or self.prefill_priority < 0:
            raise ValueError(f"prefill_priority must be an integer >= 0, got "
                             f"{self.prefill_priority!r}")
        for name in ("max_slots", "num_pages", "kv_memory", "prefill_chunk", "prefill_budget",
                     "decode_steps", "max_queue"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError("num_pages must be >= 2 (page 0 is scratch)")


# ----------------------------------------------------------------------------------------------
# compilation accounting (a steady state must not compile; the CLIs report compile time apart)

class _CompileLog:
    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    def __call__(self, event: str, duration: float, **_):
        # Fired for a program compiled and for one loaded from the on-disk compilation cache
        # (the CLIs turn it on): either way a jit cache miss, which a steady state must not have.
        if event == "/jax/core/compile/backend_compile_duration":
            with self._lock:
                self.count += 1
                self.seconds += duration


COMPILES = _CompileLog()
jax.monitoring.register_event_duration_secs_listener(COMPILES)


# ----------------------------------------------------------------------------------------------
# device state and the jitted verbs

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Per-slot decode state on the device, all [max_slots] (stop_ids [max_slots, W])."""

    last_token: jax.Array  # the token to feed next
    position: jax.Array  # its position (where its K/V goes)
    num_generated: jax.Array
    done: jax.Array
    finish: jax.Array  # 0 while running; 1 stop token, 2 length, 3 non-finite logits
    max_new: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    stop_ids: jax.Array  # padded with -1

    @classmethod
    def idle(cls, slots: int, width: int) -> "SlotState":
        z = functools.partial(jnp.zeros, (slots,))
        return cls(last_token=z(jnp.int32), position=z(jnp.int32), num_generated=z(jnp.int32),
                   done=jnp.ones((slots,), bool), finish=z(jnp.int32), max_new=z(jnp.int32),
                   temperature=z(jnp.float32), top_k=z(jnp.int32), top_p=jnp.ones((slots,)),
                   seed=z(jnp.uint32), stop_ids=jnp.full((slots, width), -1, jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowParams:
    """Sampling parameters and limits of the rows of a prefill batch, all [Bp] (stop_ids [Bp, W])."""

    max_new: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    stop_ids: jax.Array


def _pick(logits, temperature, top_k, top_p, seed, index, forced, stop_ids, num_generated,
          max_new, n_top: int, all_greedy: bool):
    """Sample (or take the forced token), then the row's finish code and log-probabilities."""
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    tok = sample(jnp.where(finite[:, None], logits, 0.0), temperature, top_k, top_p, seed,
                 index, all_greedy=all_greedy)
    tok = jnp.where(forced >= 0, forced, tok)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    top_lp, top_id = jax.lax.top_k(logp, n_top) if n_top else (None, None)
    is_stop = jnp.any(tok[:, None] == stop_ids, axis=-1)
    finish = jnp.where(~finite, 3, jnp.where(is_stop, 1, jnp.where(num_generated >= max_new, 2, 0)))
    tok = jnp.where(finite, tok, -1)
    return tok, finish.astype(jnp.int32), chosen, top_id, top_lp


@functools.partial(jax.jit, static_argnames=("graphdef", "n_top", "mesh"),
                   donate_argnames=("cache", "state"))
def _prefill(graphdef, params, cache, state: SlotState, page_table, tokens, start, lengths,
             table_rows, insert_slots, rows: RowParams, forced_first, n_top: int, mesh=None):
    """Prefill a batch of chunks; rows whose chunk ends their prompt get their first token and
    are inserted into state at insert_slots (other rows carry an out-of-range slot: dropped)."""
    model = nnx.merge(graphdef, params)
    table = jnp.where(table_rows[:, None] >= 0, page_table[jnp.maximum(table_rows, 0)],
                      SCRATCH_PAGE)
    logits, cache = forward(model, tokens, start, lengths, cache, table, mesh=mesh)
    one = jnp.ones_like(lengths)
    tok, finish, chosen, top_id, top_lp = _pick(
        logits, rows.temperature, rows.top_k, rows.top_p, rows.seed, 0 * one, forced_first,
        rows.stop_ids, one, rows.max_new, n_top, all_greedy=False)
    at = lambda field, value: field.at[insert_slots].set(value, mode="drop")  # noqa: E731
    state = SlotState(
        last_token=at(state.last_token, tok), position=at(state.position, start + lengths),
        num_generated=at(state.num_generated, one), done=at(state.done, finish > 0),
        finish=at(state.finish, finish), max_new=at(state.max_new, rows.max_new),
        temperature=at(state.temperature, rows.temperature), top_k=at(state.top_k, rows.top_k),
        top_p=at(state.top_p, rows.top_p), seed=at(state.seed, rows.seed),
        stop_ids=at(state.stop_ids, rows.stop_ids))
    return (tok, finish, chosen, top_id, top_lp), state, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "rows", "steps", "all_greedy",
                                             "splits", "n_top", "mesh"),
                   donate_argnames=("cache", "state"))
def _decode(graphdef, params, cache, state: SlotState, page_table, forced, rows: int, steps: int,
            all_greedy: bool, splits: int, n_top: int, mesh=None):
    """Up to `steps` decode steps over slots [0, rows); forced [rows, steps] (-1: sample)."""
    model = nnx.merge(graphdef, params)
    full = state
    st = jax.tree.map(lambda a: a[:rows], state)
    table = page_table[:rows]
    out_tok = jnp.full((rows, steps), -1, jnp.int32)
    out_lp = jnp.zeros((rows, steps), jnp.float32)
    out_top = (jnp.zeros((rows, steps, n_top), jnp.int32),
               jnp.zeros((rows, steps, n_top), jnp.float32))

    def cond(carry):
        step, _, st, *_ = carry
        return (step < steps) & ~jnp.all(st.done)

    def body(carry):
        step, cache, st, out_tok, out_lp, (out_id, out_tlp) = carry
        active = ~st.done
        logits, cache = decode_step(model, st.last_token, st.position, active, cache, table,
                                    splits=splits, mesh=mesh)
        num_generated = st.num_generated + active
        tok, finish, chosen, top_id, top_lp = _pick(
            logits, st.temperature, st.top_k, st.top_p, st.seed, st.num_generated,
            forced[:, step], st.stop_ids, num_generated, st.max_new, n_top, all_greedy)
        finish = jnp.where(active, finish, st.finish)
        tok = jnp.where(active, tok, -1)
        st = dataclasses.replace(
            st, last_token=jnp.where(active, tok, st.last_token), position=st.position + active,
            num_generated=num_generated, done=st.done | (finish > 0), finish=finish)
        out_tok = out_tok.at[:, step].set(tok)
        out_lp = out_lp.at[:, step].set(chosen)
        if n_top:
            out_id, out_tlp = out_id.at[:, step].set(top_id), out_tlp.at[:, step].set(top_lp)
        return step + 1, cache, st, out_tok, out_lp, (out_id, out_tlp)

    _, cache, st, out_tok, out_lp, out_top = jax.lax.while_loop(
        cond, body, (jnp.int32(0), cache, st, out_tok, out_lp, out_top))
    state = jax.tree.map(lambda a, part: a.at[:rows].set(part), full, st)
    return (out_tok, st.finish, out_lp) + out_top, state, cache


@functools.partial(jax.jit, donate_argnames=("state",))
def _retire(state: SlotState, mask) -> SlotState:
    return dataclasses.replace(state, done=state.done | mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"), donate_argnames=("cache",))
def _score(graphdef, params, cache, page_table, tokens, start, lengths, targets, mesh=None):
    """Log-probability of targets [B, C] (-1: none) after each token of a chunk [B, C]."""
    model = nnx.merge(graphdef, params)
    logits, cache = forward(model, tokens, start, lengths, cache, page_table, all_logits=True,
                            mesh=mesh)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets >= 0, picked, 0.0), cache


# ----------------------------------------------------------------------------------------------
# host-side bookkeeping of a request

@dataclasses.dataclass(eq=False)
class _Request:
    seq: Seq
    callback: Callable[[TokenEvent], None] | None
    logprobs: list[dict] | None
    submitted: float
    first_token_at: float | None = None
    error: str | None = None
    release_on_finish: bool = False


@dataclasses.dataclass
class _Pending:
    """A dispatched computation whose results are not read back yet."""

    kind: str  # "prefill" | "decode"
    rows: list[tuple[int, Seq, int]]  # (row in the outputs, sequence, its incarnation)
    outputs: tuple
    steps: int = 0


def _put(x, where=None):
    """Host -> device, committed to the default device (or replicated over the engine's mesh:
    `where`). Every input of the engine's programs goes through here: jit's cache tells
    committed arrays (its own outputs) from uncommitted ones and would compile each program
    twice; and jnp.asarray would compile a small program for every new shape."""
    return jax.device_put(x, jax.devices()[0] if where is None else where)


def _default(value, cpu, gpu):
    if value is not None:
        return value
    return gpu if jax.default_backend() == "gpu" else cpu


def available_memory() -> int:
    """Bytes a new buffer can take: free device memory on a GPU, available RAM on CPU."""
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    import psutil

    return int(psutil.virtual_memory().available)


class Engine:
    """In-flight batching over persistent slots and pools for one model.

    ``submit`` and ``cancel`` may be called from any thread; ``step`` (and everything that
    drives it: ``generate``, ``stream``, ``run``) from one thread at a time.
    """

    def __init__(self, model: Transformer, config: EngineConfig | None = None, *, mesh=None,
                 **overrides):
        cfg = dataclasses.replace(config or EngineConfig(), **overrides)
        self.engine_config = cfg
        self.model_config = self.config = model.config
        self.dtype = model.dtype
        # tensor parallelism (qoq_jax.sharding): weights and KV pools split over the mesh's
        # "tp" axis, everything else replicated; the scheduler and host state are unchanged
        self.tensor_parallel = sharding.tp_size(mesh)
        sharding.check_tensor_parallel(model, self.tensor_parallel)
        self.mesh = mesh if self.tensor_parallel > 1 else None
        self._where = None if self.mesh is None else sharding.replicated(self.mesh)
        self.graphdef, params = nnx.split(model)
        self.params = (self._put(params) if self.mesh is None
                       else sharding.shard_state(params, self.mesh))
        self.kv_cache = cfg.kv_cache
        self.page_size = cfg.page_size
        m = model.config
        self.max_slots = _default(cfg.max_slots, 16, 128)
        self.prefill_chunk = _default(cfg.prefill_chunk, 512, 1024)
        self.prefill_budget = cfg.prefill_budget or self.prefill_chunk
        self.decode_steps = _default(cfg.decode_steps, 8, 16)
        self.prefill_priority = cfg.prefill_priority
        self.max_logprobs = cfg.max_logprobs
        self.max_stop_ids = cfg.max_stop_ids
        self.max_queue = cfg.max_queue
        self.max_pages_per_seq = -(-m.max_position_embeddings // self.page_size)
        # per device: each holds num_kv_heads / tensor_parallel heads of every page
        per_token = cache_class(self.kv_cache).bytes_per_token(
            m.num_layers, m.num_kv_heads // self.tensor_parallel, m.head_dim, self.dtype)
        page_bytes = per_token * self.page_size
        useful = 1 + self.max_slots * self.max_pages_per_seq  # more pages could never be used
        free = available_memory()
        if cfg.num_pages is not None:
            num_pages = cfg.num_pages
        else:
            budget = cfg.kv_memory or _default(None, min(2 << 30, free // 4), free // 2)
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
        self.splits = default_splits(self.max_pages_per_seq, self.max_slots,
                                     m.num_kv_heads // self.tensor_parallel)
        self.allocator = PageAllocator(num_pages, self.page_size)
        self.scheduler = self._new_scheduler()
        self._cache = None  # allocated at first use (a notebook may load and never generate)
        self._state = None
        # device rows: >= 2 even for one slot (see _decode_rows)
        self._rows = max(2, self.max_slots)
        self._table = np.zeros((self._rows, self.max_pages_per_seq), np.int32)
        self._table_dev = None
        self._retire_mask = np.zeros((self._rows,), bool)
        self._prefill_only_run = 0
        self._requests: dict[int, _Request] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stepping = threading.Lock()
        self.stats = collections.Counter()
        self.last_stats: dict[str, float] = {}

    def _put(self, x):
        return _put(x, self._where)

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.allocator, max_slots=self.max_slots,
                         prefill_chunk=self.prefill_chunk, prefill_budget=self.prefill_budget,
                         decode_steps=self.decode_steps)

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
        if len(self._stop_ids(params)) > self.max_stop_ids:
            raise PromptError(f"at most {self.max_stop_ids} stop token ids per request")

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
        rid = next(self._ids)
        seq = Seq(rid, [int(t) for t in prompt], params)
        req = _Request(seq, callback, [] if params.logprobs is not None else None,
                       time.perf_counter())
        self._requests[rid] = req
        self._inbox.put(("add", req))
        return rid

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
            else:
                req = self._requests.get(msg[1])
                if req is not None and req.seq.status != Status.FINISHED:
                    self._end(req, msg[2])

    # ------------------------------------------------------------------------------------------
    # one iteration

    def _ensure_device_state(self) -> None:
        if self._cache is None:
            m = self.model_config
            # Committed to the device, like every input of the engine's programs (see _put)
            make = functools.partial(make_cache, self.kv_cache, m.num_layers, self.num_pages,
                                     self.page_size, m.num_kv_heads, m.head_dim, self.dtype)
            if self.mesh is None:
                self._cache = self._put(make())
            else:  # created in place, each device its KV heads
                self._cache = jax.jit(make, out_shardings=sharding.cache_sharding(
                    self.mesh, jax.eval_shape(make)))()
            self._state = self._put(SlotState.idle(self._rows, self.max_stop_ids))

    def step(self) -> None:
        """Admit, prefill, decode one chunk, and read back the previous one."""
        if not self._stepping.acquire(blocking=False):
            raise EngineBusyError("the engine is already being driven by another thread (a "
                                  "server's engine thread?): submit() to it instead")
        try:
            self._step()
        finally:
            self._stepping.release()

    def _step(self) -> None:
        self._intake()
        if not self.scheduler.has_work:
            self._drain()
            return
        self._ensure_device_state()
        if self.scheduler.waiting and self.scheduler.free_slots and self._pending:
            # newcomers can be admitted: read back first, so that they see the pages the last
            # chunk freed and their prefill is not queued behind another decode chunk (time to
            # first token over one chunk of overlap)
            self._drain()
        try:
            plan = self.scheduler.schedule(inflight=bool(self._pending))
        except NeedsDrain:
            self._drain()
            plan = self.scheduler.schedule(inflight=False)
        self.stats["preemptions"] += len(plan.preempted)
        self._retire_mask[plan.freed_slots] = True
        self._sync_table()
        if plan.prefill:
            self._dispatch_prefill(plan.prefill)
        # Prefill first while a burst of newcomers is being admitted (lower time to first
        # token), but never more than prefill_priority iterations in a row: running streams
        # must not stall for long.
        burst = (plan.admitted and self.scheduler.waiting and self.scheduler.free_slots
                 and self._prefill_only_run < self.prefill_priority)
        decode = plan.decode and not burst
        self._prefill_only_run = self._prefill_only_run + 1 if burst else 0
        if decode:
            self._dispatch_decode(plan.decode)
        # keep one decode chunk in flight while the host handles the one before it
        while len(self._pending) > (1 if decode else 0):
            self._process(self._pending.popleft())

    def _drain(self) -> None:
        while self._pending:
            self._process(self._pending.popleft())

    def _sync_table(self) -> None:
        """Mirror the allocator into the page table (rows = slots); upload it if it changed,
        and apply pending retirements, before anything is dispatched."""
        table = np.full_like(self._table, SCRATCH_PAGE)
        for seq in self.scheduler.running:
            pages = self.allocator.pages(seq.seq_id)
            table[seq.slot, :len(pages)] = pages
        if self._table_dev is None or not np.array_equal(table, self._table):
            self._table = table
            self._table_dev = self._put(table)
        if self._retire_mask.any():
            self._state = _retire(self._state, self._put(self._retire_mask))
            self._retire_mask[:] = False

    def _dispatch_prefill(self, chunks: list[Chunk]) -> None:
        n = len(chunks)
        bp = batch_bucket(n)
        cb = chunk_bucket(max(c.length for c in chunks), self.prefill_chunk)
        tokens = np.zeros((bp, cb), np.int32)
        start = np.zeros((bp,), np.int32)
        lengths = np.zeros((bp,), np.int32)
        table_rows = np.full((bp,), -1, np.int32)
        insert = np.full((bp,), self._rows, np.int32)  # out of range: dropped
        forced = np.full((bp,), -1, np.int32)
        max_new = np.ones((bp,), np.int32)
        temp = np.zeros((bp,), np.float32)
        top_k = np.zeros((bp,), np.int32)
        top_p = np.ones((bp,), np.float32)
        seed = np.zeros((bp,), np.uint32)
        stops = np.full((bp, self.max_stop_ids), -1, np.int32)
        rows = []
        for i, c in enumerate(chunks):
            seq, sp = c.seq, c.seq.params
            tokens[i, :c.length] = seq.prompt[c.start:c.start + c.length]
            start[i], lengths[i], table_rows[i] = c.start, c.length, seq.slot
            if c.final:
                insert[i] = seq.slot
                forced[i] = seq.output[0] if seq.output else -1
                max_new[i], temp[i], top_k[i], top_p[i], seed[i] = (
                    sp.max_new_tokens, sp.temperature, sp.top_k, sp.top_p, sp.seed)
                ids = self._stop_ids(sp)
                stops[i, :len(ids)] = ids
                rows.append((i, seq, seq.incarnation))
            self.scheduler.on_prefilled(c)
            self.stats["prompt_tokens"] += c.length
        self.stats["prefill_batches"] += 1
        params = RowParams(self._put(max_new), self._put(temp), self._put(top_k),
                           self._put(top_p), self._put(seed), self._put(stops))
        outputs, self._state, self._cache = _prefill(
            self.graphdef, self.params, self._cache, self._state, self._table_dev,
            self._put(tokens), self._put(start), self._put(lengths), self._put(table_rows),
            self._put(insert), params, self._put(forced), n_top=self.max_logprobs,
            mesh=self.mesh)
        if rows:
            self._pending.append(_Pending("prefill", rows, outputs))

    def _decode_rows(self, occupied: int) -> int:
        """Rows of a decode dispatch: the occupied slots, bucketed, and at least 2 (a
        single-row scatter into the pools becomes a dynamic-update-slice for which XLA:CPU
        copies whole pools)."""
        return min(self._rows, max(2, batch_bucket(occupied)))

    def _dispatch_decode(self, seqs: list[Seq]) -> None:
        rows = self._decode_rows(self.scheduler.occupied_rows())
        steps = self.decode_steps
        forced = np.full((rows, steps), -1, np.int32)
        for seq in seqs:
            first = seq.device_len + seq.inflight_steps  # output index of this chunk's 1st token
            replay = seq.output[first:first + steps]
            forced[seq.slot, :len(replay)] = replay
        all_greedy = all(s.params.greedy for s in self.scheduler.running if s.slot < rows)
        outputs, self._state, self._cache = _decode(
            self.graphdef, self.params, self._cache, self._state, self._table_dev,
            self._put(forced), rows=rows, steps=steps, all_greedy=all_greedy,
            splits=self.splits, n_top=self.max_logprobs, mesh=self.mesh)
        self.scheduler.on_dispatched(seqs, steps)
        self.stats["decode_chunks"] += 1
        self._pending.append(_Pending("decode", [(s.slot, s, s.incarnation) for s in seqs],
                                      outputs, steps))

    # ------------------------------------------------------------------------------------------
    # results

    def _process(self, pending: _Pending) -> None:
        outs = [None if o is None else np.asarray(o) for o in pending.outputs]
        tok, finish, chosen = outs[0], outs[1], outs[2]
        top_id, top_lp = outs[3], outs[4]
        now = time.perf_counter()
        for row, seq, incarnation in pending.rows:
            if seq.status == Status.FINISHED or seq.incarnation != incarnation:
                continue  # ended (or was preempted) after this was dispatched
            req = self._requests[seq.seq_id]
            if pending.kind == "prefill":
                toks = [int(tok[row])]
                lps = [(float(chosen[row]), top_id[row] if top_id is not None else None,
                        top_lp[row] if top_lp is not None else None)]
                first = 0
            else:
                valid = [j for j in range(pending.steps) if tok[row, j] >= 0]
                toks = [int(tok[row, j]) for j in valid]
                lps = [(float(chosen[row, j]), top_id[row, j] if top_id is not None else None,
                        top_lp[row, j] if top_lp is not None else None) for j in valid]
                first = seq.device_len
                self.scheduler.on_read_back(seq, pending.steps, len(toks))
            new_tokens, new_lps = [], []
            for j, (t, lp) in enumerate(zip(toks, lps)):
                if t < 0:
                    continue
                if first + j < len(seq.output):
                    continue  # a replayed token, streamed before the preemption
                seq.output.append(t)
                new_tokens.append(t)
                if req.logprobs is not None:
                    new_lps.append(self._logprob_entry(t, lp, seq.params.logprobs))
            if new_tokens:
                self.stats["generated_tokens"] += len(new_tokens)
                if req.first_token_at is None:
                    req.first_token_at = now
                if req.logprobs is not None:
                    req.logprobs.extend(new_lps)
            code = int(finish[row])
            if code:
                if code == 3:
                    req.error = ("the model produced non-finite logits (NaN or Inf): its weights "
                                 "or activations overflowed")
                self._end(req, FINISH_REASONS[code], new_tokens, new_lps)
            elif new_tokens and req.callback is not None:
                req.callback(TokenEvent(seq.seq_id, new_tokens,
                                        new_lps if req.logprobs is not None else None))

    @staticmethod
    def _logprob_entry(token: int, lp, n: int | None) -> dict:
        chosen, ids, lps = lp
        top = [] if not n or ids is None else [(int(i), float(v)) for i, v in zip(ids[:n], lps[:n])]
        return {"token": token, "logprob": chosen, "top": top}

    def _end(self, req: _Request, reason: str, tokens=(), lps=()) -> None:
        seq = req.seq
        if seq.slot is not None:
            self._retire_mask[seq.slot] = True
        self.scheduler.finish(seq, reason)
        self.stats[f"finished_{reason}"] += 1
        if req.callback is not None:
            req.callback(TokenEvent(seq.seq_id, list(tokens),
                                    list(lps) if req.logprobs is not None else None,
                                    finished=True, finish_reason=reason, error=req.error))
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
                                req.logprobs, req.error, seq.num_preemptions)

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
        self._pending.clear()
        self.allocator = PageAllocator(self.num_pages, self.page_size)
        self.scheduler = self._new_scheduler()
        self._cache = self._state = self._table_dev = None
        self._retire_mask[:] = False

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
                raise PromptError(f"prompt {i}: {e}") from None
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

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """Every (batch, chunk length) a prefill dispatch can have."""
        lengths = sorted({chunk_bucket(n, self.prefill_chunk)
                          for n in range(1, self.prefill_chunk + 1)})
        batches = sorted({batch_bucket(n) for n in range(1, self.max_slots + 1)})
        return [(bp, cb) for cb in lengths for bp in batches
                if bp * cb <= self.prefill_budget or bp == 1]

    def decode_shapes(self) -> list[int]:
        """Every row count a decode dispatch can have."""
        return sorted({self._decode_rows(n) for n in range(1, self.max_slots + 1)})

    def warmup(self) -> int:
        """Compile every program a workload can need (all prefill and decode buckets), so that
        no request waits for a compilation; returns how many were compiled. Needs an idle
        engine: the programs run on idle rows and the scratch page only."""
        if self.has_work:
            raise RuntimeError("warmup() needs an idle engine")
        self._ensure_device_state()
        self._sync_table()
        before = COMPILES.count
        w = self.max_stop_ids
        for bp, cb in self.prefill_shapes():
            zi = np.zeros((bp,), np.int32)
            put = self._put
            rows = RowParams(put(np.ones((bp,), np.int32)), put(np.zeros((bp,), np.float32)),
                             put(zi), put(np.ones((bp,), np.float32)),
                             put(np.zeros((bp,), np.uint32)), put(np.full((bp, w), -1, np.int32)))
            _, self._state, self._cache = _prefill(
                self.graphdef, self.params, self._cache, self._state, self._table_dev,
                put(np.zeros((bp, cb), np.int32)), put(zi), put(zi),
                put(np.full((bp,), -1, np.int32)), put(np.full((bp,), self._rows, np.int32)),
                rows, put(np.full((bp,), -1, np.int32)), n_top=self.max_logprobs, mesh=self.mesh)
        for rows in self.decode_shapes():
            for greedy in (True, False):
                _, self._state, self._cache = _decode(
                    self.graphdef, self.params, self._cache, self._state, self._table_dev,
                    self._put(np.full((rows, self.decode_steps), -1, np.int32)), rows=rows,
                    steps=self.decode_steps, all_greedy=greedy, splits=self.splits,
                    n_top=self.max_logprobs, mesh=self.mesh)
        self._state = _retire(self._state, self._put(np.zeros((self._rows,), bool)))
        jax.block_until_ready(self._cache)
        return COMPILES.count - before

    # ------------------------------------------------------------------------------------------
    # scoring (perplexity): teacher-forced log-probabilities through the same cache and kernels

    def score(self, windows: np.ndarray, *, progress: Callable[[int], None] | None = None
              ) -> np.ndarray:
        """Log-probability of each next token of each window [N, T] -> [N, T - 1] (float32).

        Windows run through the engine's pools in chunks of prefill_chunk tokens, attending to
        K/V as the cache stores them (KV4: quantized), exactly as generation does. The engine
        must be idle (no running requests)."""
        windows = np.asarray(windows, np.int32)
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise ValueError(f"windows must be [N, T] with T >= 2, got shape {windows.shape}")
        if self.has_work:
            raise RuntimeError("score() needs an idle engine (requests are running)")
        n, t = windows.shape
        if t > self.max_context:
            raise ValueError(f"windows of {t} tokens exceed the engine's context of "
                             f"{self.max_context}")
        self._ensure_device_state()
        per_window = self.allocator.pages_for(t)
        # all-position logits of a chunk are [batch, chunk, vocab] floats: keep them ~256 MB
        logits_rows = (1 << 28) // (4 * self.prefill_chunk * self.model_config.vocab_size)
        batch = max(1, min(self.max_slots, (self.num_pages - 1) // per_window, n, logits_rows))
        out = np.zeros((n, t - 1), np.float32)
        for lo in range(0, n, batch):
            rows = windows[lo:lo + batch]
            b = len(rows)
            bp = batch_bucket(b)
            owners = [-1 - i for i in range(b)]
            try:
                table = np.zeros((bp, self.max_pages_per_seq), np.int32)
                for i, owner in enumerate(owners):
                    pages = self.allocator.ensure(owner, t)
                    table[i, :len(pages)] = pages
                table_dev = self._put(table)
                for c0 in range(0, t, self.prefill_chunk):
                    c = min(self.prefill_chunk, t - c0)
                    cb = chunk_bucket(c, self.prefill_chunk)
                    tokens = np.zeros((bp, cb), np.int32)
                    targets = np.full((bp, cb), -1, np.int32)
                    tokens[:b, :c] = rows[:, c0:c0 + c]
                    nxt = rows[:, c0 + 1:c0 + c + 1]
                    targets[:b, :nxt.shape[1]] = nxt
                    lengths = np.zeros((bp,), np.int32)
                    lengths[:b] = c
                    lp, self._cache = _score(self.graphdef, self.params, self._cache, table_dev,
                                             self._put(tokens),
                                             self._put(np.full((bp,), c0, np.int32)),
                                             self._put(lengths), self._put(targets),
                                             mesh=self.mesh)
                    out[lo:lo + b, c0:c0 + nxt.shape[1]] = np.asarray(lp)[:b, :nxt.shape[1]]
            finally:
                for owner in owners:
                    if owner in self.allocator.owners:
                        self.allocator.free(owner)
            if progress is not None:
                progress(b)
        return out
