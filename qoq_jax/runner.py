"""The device runner: the engine's compiled programs and the device state they own.

It knows nothing of requests. What it owns, allocated once:

- the KV pools (``kv_cache.PagedKVCache`` or ``PagedKV4Cache``), donated to and returned by
  every program, so they are updated in place;
- ``SlotState``: per decode slot (a row), the token to feed next, its position, how many tokens
  it has made, whether it is done and why, its sampling parameters (``RowParams``), and the
  token history its penalties read (the prompt's tokens as a vocabulary mask, the output's
  token counts; written by ``set_history`` for penalised requests, counts kept by sampling);
- the page table [slots, max_pages] (uploaded by ``set_page_table`` when the host's changes).

Its verbs, each a jitted program over a few bucketed shapes (``Buckets``; ``warmup`` compiles
them all):

- ``step(StepInputs)``: one ragged batch: decode rows (one token each, read from their slot)
  and prompt chunks of several sequences on one flat token axis, through one forward pass.
  Rows whose chunk ends their prompt, and decode rows, sample a token into their slot.
- ``decode(rows, steps)``: up to ``steps`` decode steps of slots [0, rows) in one dispatch
  (a ``lax.while_loop`` that stops early when every row is done).
- ``score(TokenBatch, targets)``: log-probabilities of given next tokens at every position
  (perplexity), through the same cache and kernels.
- ``set_history(slot, prompt_mask, output_counts)``: a penalised request's token history into
  its slot, before the step that starts its decoding.

Outputs are named pytrees (``StepOutput``, ``DecodeOutput``) whose host copies start as soon as
the program is dispatched; ``fetch`` turns them into numpy. Every input goes through
``_put`` (committed to the device, or replicated over the mesh), so jit's cache sees one kind
of argument and compiles each program once.

Every per-row computation is independent of the rest of the batch (fixed reduction orders,
lone rows paired, items cut from each sequence's own start), so a row's tokens are the same
whatever shares its batch.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import threading
import weakref
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.paged_attention import default_splits
from qoq_jax import sharding
from qoq_jax.kv_cache import SCRATCH_PAGE, cache_class, kernel_backend, make_cache
from qoq_jax.layers import int8_runtime
from qoq_jax.model import PREFILL_BLOCK_Q, TokenBatch, Transformer, forward, fuse_projections
from qoq_jax.sampling import bar_tokens, bias_logits, penalize, sample
from qoq_jax.scheduler import MIN_TOKEN_BUCKET, SPEC_MIN_TOKEN_BUCKET, Buckets


class Finish(enum.IntEnum):
    """Why a row stopped, as the device records it."""

    RUNNING = 0
    STOP = 1  # a stop token
    LENGTH = 2  # max_new_tokens reached
    ERROR = 3  # non-finite logits


# ----------------------------------------------------------------------------------------------
# compilation accounting (a steady state must not compile; the CLIs report compile time apart)

class CompileLog:
    """Counts XLA compilations (and loads from the on-disk compilation cache) process-wide."""

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


COMPILES = CompileLog()
jax.monitoring.register_event_duration_secs_listener(COMPILES)


class ExecutableCache:
    """Compiled programs shared by the runners of one process: a runner whose signature (model
    structure, array shapes and placements, static settings: DeviceRunner._signature) equals
    a live runner's runs the executables that one compiled (two engines over one model, or
    over two models of one architecture and size, compile each program once). It holds them
    weakly: a program lives as long as some runner holds it (each XLA:CPU executable keeps
    hundreds of memory mappings of JIT code; a process may have 65,530)."""

    def __init__(self):
        self._items: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            return self._items.get(_HashedKey(key))

    def put(self, key, exe) -> None:
        with self._lock:
            self._items[_HashedKey(key)] = exe

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class _HashedKey:
    """A key hashed once, when made. A weak dictionary removes an entry when its value dies,
    hashing the key again; at interpreter exit that can be after the modules a signature's hash
    needs are torn down (ModelConfig hashes its JSON), which printed "Exception ignored ...
    TypeError" on exit."""

    __slots__ = ("key", "hash")

    def __init__(self, key):
        self.key, self.hash = key, hash(key)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _HashedKey) and self.hash == other.hash and self.key == other.key


SHARED_EXECUTABLES = ExecutableCache()


# ----------------------------------------------------------------------------------------------
# device state and the programs' inputs and outputs (named pytrees)

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowParams:
    """Sampling parameters and limits of rows, all [R] (stop_ids [R, W] and bias_ids /
    bias_values [R, N], ids padded with -1). Defaults are no-ops (see qoq_jax.sampling)."""

    max_new: jax.Array  # int32
    temperature: jax.Array  # float32; 0 is greedy
    top_k: jax.Array  # int32; 0 is no cut
    top_p: jax.Array  # float32; 1 is no cut
    seed: jax.Array  # uint32
    logprobs: jax.Array  # bool: the row wants log-probabilities
    stop_ids: jax.Array  # int32 [R, W]
    min_p: jax.Array  # float32; 0 is no cut
    min_tokens: jax.Array  # int32; stop ids barred before this many tokens
    penalized: jax.Array  # bool: some penalty below applies (its history is in the slot)
    repetition: jax.Array  # float32; 1 is none
    presence: jax.Array  # float32
    frequency: jax.Array  # float32
    bias_ids: jax.Array  # int32 [R, N]
    bias_values: jax.Array  # float32 [R, N]

    @classmethod
    def empty(cls, rows: int, width: int, bias_width: int = 1) -> "RowParams":
        f = lambda v: np.full((rows,), v, np.float32)  # noqa: E731
        return cls(max_new=np.ones((rows,), np.int32), temperature=f(0.0),
                   top_k=np.zeros((rows,), np.int32), top_p=f(1.0),
                   seed=np.zeros((rows,), np.uint32), logprobs=np.zeros((rows,), bool),
                   stop_ids=np.full((rows, width), -1, np.int32), min_p=f(0.0),
                   min_tokens=np.zeros((rows,), np.int32), penalized=np.zeros((rows,), bool),
                   repetition=f(1.0), presence=f(0.0), frequency=f(0.0),
                   bias_ids=np.full((rows, bias_width), -1, np.int32),
                   bias_values=np.zeros((rows, bias_width), np.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Per-slot decode state on the device, all [slots]."""

    params: RowParams
    last_token: jax.Array  # the token to feed next
    position: jax.Array  # where its K/V goes
    num_generated: jax.Array  # tokens the request has made (the sampling index of the next)
    done: jax.Array  # bool
    finish: jax.Array  # Finish code
    prompt_mask: jax.Array  # bool [slots, vocab]: the prompt's tokens (penalised slots only)
    output_counts: jax.Array  # int32 [slots, vocab]: tokens made, by id

    @classmethod
    def idle(cls, slots: int, width: int, bias_width: int, vocab: int) -> "SlotState":
        z = np.zeros((slots,), np.int32)
        return cls(params=RowParams.empty(slots, width, bias_width), last_token=z, position=z,
                   num_generated=z, done=np.ones((slots,), bool), finish=z,
                   prompt_mask=np.zeros((slots, vocab), bool),
                   output_counts=np.zeros((slots, vocab), np.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One ragged batch as the host describes it: T tokens, S sequence rows (int32 unless said).

    Per token [T]: ``tokens`` (prompt tokens; ignored for decode rows, whose token is their
    slot's last_token) and ``token_seq`` (its row, -1 for padding).
    Per row [S]: ``slot`` (-1: unused row), ``start`` (its first token on the flat axis),
    ``length`` (its tokens), ``pos0`` (position of its first token; decode rows: from the
    slot), ``decode`` (bool: a decode row), ``sample`` (bool: a chunk that ends its prompt
    samples the first token), ``generated0`` (tokens made before this admission: a resumed
    sequence's), ``params`` (RowParams of rows that start decoding here).
    ``retire`` [slots] (bool): slots the host has ended since the last dispatch.

    Speculative engines (``spec_k`` > 0) only: ``num_proposed`` [S] (a decode row's proposed
    tokens, fed after its last token: the row is 1 + num_proposed tokens long), and the flat
    rows of logits the step computes, [L]: ``logit_token`` (the token whose next-token logits
    they are), ``logit_row`` (its row, -1: none) and ``logit_col`` (0 for a row's first token,
    j for its j-th proposal). Zero-sized otherwise.

    Structured output (qoq_jax.structured): ``mask_on`` [S] (bool: the row's next token is
    constrained) and ``allowed`` [S, ceil(vocab / 32)] (the tokens it may take, bit t % 32 of
    word t // 32), applied after the other logit processing.
    """

    tokens: jax.Array
    token_seq: jax.Array
    slot: jax.Array
    start: jax.Array
    length: jax.Array
    pos0: jax.Array
    decode: jax.Array
    sample: jax.Array
    generated0: jax.Array
    params: RowParams
    retire: jax.Array
    num_proposed: jax.Array
    logit_token: jax.Array
    logit_row: jax.Array
    logit_col: jax.Array
    mask_on: jax.Array
    allowed: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _LogitBatch(TokenBatch):
    """A TokenBatch whose logits are taken at given flat tokens ([L] logit_index) instead of
    each sequence's last token: a verification row needs them at each of its positions, and
    the rest of the batch at one token each, so the LM head runs on L rows only."""

    logit_index: jax.Array

    @property
    def last_token(self) -> jax.Array:
        return self.logit_index


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What a step produced per row [S]: token (-1 if none), its Finish code, its
    log-probability and the top alternatives ([S, n]; zeros unless a row asked). A speculative
    engine's steps make up to 1 + spec_k tokens per row: token, logprob [S, 1 + k] and the top
    alternatives [S, 1 + k, n] (-1 / zeros past the row's last token)."""

    token: jax.Array
    finish: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    """What a decode dispatch produced, [rows, steps] (-1: no token that step), and each
    row's Finish code after it ([rows])."""

    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    finish: jax.Array


def fetch(output):
    """Device outputs -> the same pytree of numpy arrays (waits for the program)."""
    return jax.tree.map(np.asarray, output)


def _start_host_copy(output) -> None:
    for leaf in jax.tree.leaves(output):
        leaf.copy_to_host_async()


# ----------------------------------------------------------------------------------------------
# sampling and finishing, per row

def _process(logits, params: RowParams, index, prompt_mask, output_counts, rows, prior=None):
    """The rows' logit processing (qoq_jax.sampling: bias, min_tokens, penalties), each step a
    runtime branch taken only when some row needs it, so one program serves every mix and a
    batch without them pays nothing. prompt_mask / output_counts: the slots' histories,
    gathered at `rows` only inside the penalty branch. prior [R, K] (-1: none): tokens the
    row's history has before this one beyond its slot's counts (a verification row's earlier
    proposals: the history as it would be at that position)."""
    def skip(x):
        return x

    x = jax.lax.cond(jnp.any(params.bias_ids >= 0),
                     lambda x: bias_logits(x, params.bias_ids, params.bias_values), skip, logits)
    barred = index < params.min_tokens
    x = jax.lax.cond(jnp.any(barred), lambda x: bar_tokens(x, params.stop_ids, barred), skip, x)

    def penalties(x):
        counts = output_counts[rows]
        if prior is not None:
            vocab = counts.shape[-1]
            at = jnp.arange(counts.shape[0])[:, None]
            counts = counts.at[at, jnp.where(prior >= 0, prior, vocab)].add(1, mode="drop")
        y = penalize(x, prompt_mask[rows], counts, params.repetition,
                     params.presence, params.frequency)
        return jnp.where(params.penalized[:, None], y, x)

    return jax.lax.cond(jnp.any(params.penalized), penalties, skip, x)


def _allow(logits, mask_on, allowed):
    """Constrained rows (mask_on) keep only the tokens their bitmask allows (a runtime branch:
    a batch without constraints pays nothing, and other rows' logits pass through unchanged)."""
    def mask(x):
        ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
        bit = (jnp.asarray(allowed)[:, ids // 32] >> (ids % 32)) & 1
        return jnp.where(mask_on[:, None] & (bit == 0), -jnp.inf, x)

    return jax.lax.cond(jnp.any(mask_on), mask, lambda x: x, logits)


def _pick(logits, params: RowParams, index, num_generated, n_top: int, history,
          constraint=None):
    """Sample each row (greedy rows take the argmax of the processed logits), then its Finish
    code and log-probabilities (of the model's logits). index: the sampling index of the token
    (its seed's stream position); num_generated: tokens made counting this one; history:
    (prompt_mask, output_counts, rows[, prior]) for the penalties; constraint: (mask_on,
    allowed) of structured-output rows, or None."""
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    clean = jnp.where(finite[:, None], logits, 0.0)
    processed = _process(clean, params, index, *history)
    if constraint is not None:
        processed = _allow(processed, *constraint)
    # the sort that top-k / top-p / min-p need runs only when some row samples (a runtime
    # branch: one program serves greedy and sampled batches; greedy rows take the argmax)
    tok = jax.lax.cond(
        jnp.any(params.temperature > 0),
        lambda x: sample(x, params.temperature, params.top_k, params.top_p, params.seed, index,
                         min_p=params.min_p),
        lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), processed)
    rows = logits.shape[0]

    def logprobs(x):
        logp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
        chosen = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
        if not n_top:
            return chosen, jnp.zeros((rows, 0), jnp.int32), jnp.zeros((rows, 0), jnp.float32)
        top_lp, top_id = jax.lax.top_k(logp, n_top)
        return chosen, top_id.astype(jnp.int32), top_lp

    def none(x):
        return (jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, n_top), jnp.int32),
                jnp.zeros((rows, n_top), jnp.float32))

    chosen, top_id, top_lp = jax.lax.cond(jnp.any(params.logprobs), logprobs, none, logits)
    is_stop = jnp.any(tok[:, None] == params.stop_ids, axis=-1)
    finish = jnp.where(~finite, Finish.ERROR, jnp.where(
        is_stop, Finish.STOP, jnp.where(num_generated >= params.max_new, Finish.LENGTH,
                                        Finish.RUNNING)))
    tok = jnp.where(finite, tok, -1)
    return tok, finish.astype(jnp.int32), chosen, top_id, top_lp


def _replicate(tree, mesh):
    """Under tensor parallelism, the slot state stays replicated: the sharding the programs
    were compiled for (sampling runs on vocabulary-split logits, and the partitioner would
    otherwise be free to split the history arrays [slots, vocab] by vocabulary too)."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, sharding.replicated(mesh))


def _take(tree, index):
    return jax.tree.map(lambda a: a[index], tree)


def _set(tree, index, values):
    """tree[index] = values for every leaf (index out of range: dropped)."""
    return jax.tree.map(lambda a, v: a.at[index].set(v, mode="drop"), tree, values)


# ----------------------------------------------------------------------------------------------
# the programs

@functools.partial(jax.jit, static_argnames=("graphdef", "n_top", "splits", "mesh", "spec_k"),
                   donate_argnames=("cache", "slots"))
def _step(graphdef, params, cache, slots: SlotState, page_table, inputs: StepInputs, *,
          n_top: int, splits: int, mesh=None, spec_k: int = 0):
    """One ragged batch (see StepInputs); returns (StepOutput, slots, cache)."""
    model = nnx.merge(graphdef, params)
    if spec_k:
        out, slots, cache = _spec_step(model, cache, slots, page_table, inputs, n_top=n_top,
                                       splits=splits, mesh=mesh, k=spec_k)
        return out, _replicate(slots, mesh), cache
    n_slots = slots.done.shape[0]
    slots = dataclasses.replace(slots, done=slots.done | inputs.retire)
    slot = inputs.slot
    has = slot >= 0
    sl = jnp.maximum(slot, 0)
    live = has & ~slots.done[sl]  # a decode row whose sequence already ended feeds nothing
    length = jnp.where(inputs.decode, live.astype(jnp.int32), jnp.where(has, inputs.length, 0))
    pos0 = jnp.where(inputs.decode, slots.position[sl], inputs.pos0)
    kv_len = pos0 + length
    # per token: its row, its offset in the row, its token and position
    t = inputs.tokens.shape[0]
    seq = jnp.maximum(inputs.token_seq, 0)
    offset = jnp.arange(t, dtype=jnp.int32) - inputs.start[seq]
    real = (inputs.token_seq >= 0) & (offset < length[seq])
    tokens = jnp.where(inputs.decode[seq], slots.last_token[sl[seq]], inputs.tokens)
    batch = TokenBatch(
        tokens=tokens, positions=pos0[seq] + offset, token_seq=jnp.where(real, seq, -1),
        q_start=inputs.start, q_len=length, kv_len=kv_len,
        page_table=jnp.where(has[:, None], page_table[sl], SCRATCH_PAGE))
    logits, cache = forward(model, batch, cache, block_q=PREFILL_BLOCK_Q, splits=splits,
                            mesh=mesh)
    samples = jnp.where(inputs.decode, live, has & inputs.sample)
    insert = samples & ~inputs.decode
    row_params = jax.tree.map(lambda new, old: jnp.where(
        insert.reshape((-1,) + (1,) * (new.ndim - 1)), new, old), inputs.params,
        _take(slots.params, sl))
    made = jnp.where(insert, inputs.generated0, slots.num_generated[sl])
    tok, finish, chosen, top_id, top_lp = _pick(
        logits, row_params, made, made + 1, n_top,
        (slots.prompt_mask, slots.output_counts, sl), (inputs.mask_on, inputs.allowed))
    tok = jnp.where(samples, tok, -1)
    finish = jnp.where(samples, finish, Finish.RUNNING)
    target = jnp.where(samples, slot, n_slots)  # rows that do not sample write nothing
    vocab = slots.output_counts.shape[1]
    slots = dataclasses.replace(
        slots, output_counts=slots.output_counts.at[target, jnp.where(tok >= 0, tok, vocab)]
        .add(1, mode="drop"))
    slots = dataclasses.replace(
        slots, params=_set(slots.params, target, row_params),
        last_token=slots.last_token.at[target].set(tok, mode="drop"),
        position=slots.position.at[target].set(kv_len, mode="drop"),
        num_generated=slots.num_generated.at[target].set(made + 1, mode="drop"),
        done=slots.done.at[target].set(finish != Finish.RUNNING, mode="drop"),
        finish=slots.finish.at[target].set(finish, mode="drop"))
    return StepOutput(tok, finish, chosen, top_id, top_lp), _replicate(slots, mesh), cache


def _spec_step(model, cache, slots: SlotState, page_table, inputs: StepInputs, *, n_top: int,
               splits: int, mesh, k: int):
    """The ragged step of a speculative engine: a decode row may carry proposals (its last
    token and num_proposed proposed tokens at consecutive positions, one chunk-like row), and
    logits are computed at the flat rows inputs.logit_* name (every position of a verification
    row, the last token of the others). At each position the row samples as it would without
    speculation (the same processing, with the history as it is there, and the same
    (seed, index) key); it keeps those tokens while they equal the proposals, plus the first
    that does not (or the one after the last proposal). K/V written for rejected positions lie
    past the row's new position: overwritten later, never read before."""
    n_slots = slots.done.shape[0]
    slots = dataclasses.replace(slots, done=slots.done | inputs.retire)
    slot = inputs.slot
    has = slot >= 0
    sl = jnp.maximum(slot, 0)
    live = has & ~slots.done[sl]
    n_rows = slot.shape[0]
    nprop = jnp.where(inputs.decode & live, inputs.num_proposed, 0)
    length = jnp.where(inputs.decode, live * (1 + nprop), jnp.where(has, inputs.length, 0))
    pos0 = jnp.where(inputs.decode, slots.position[sl], inputs.pos0)
    kv_len = pos0 + length
    t = inputs.tokens.shape[0]
    seq = jnp.maximum(inputs.token_seq, 0)
    offset = jnp.arange(t, dtype=jnp.int32) - inputs.start[seq]
    real = (inputs.token_seq >= 0) & (offset < length[seq])
    # a decode row's first token is its slot's last token; its proposals follow on the axis
    tokens = jnp.where(inputs.decode[seq] & (offset == 0), slots.last_token[sl[seq]],
                       inputs.tokens)
    batch = _LogitBatch(
        tokens=tokens, positions=pos0[seq] + offset, token_seq=jnp.where(real, seq, -1),
        q_start=inputs.start, q_len=length, kv_len=kv_len,
        page_table=jnp.where(has[:, None], page_table[sl], SCRATCH_PAGE),
        logit_index=inputs.logit_token)
    logits, cache = forward(model, batch, cache, block_q=PREFILL_BLOCK_Q, splits=splits,
                            mesh=mesh)  # [L, V]
    samples = jnp.where(inputs.decode, live, has & inputs.sample)
    insert = samples & ~inputs.decode
    row_params = jax.tree.map(lambda new, old: jnp.where(
        insert.reshape((-1,) + (1,) * (new.ndim - 1)), new, old), inputs.params,
        _take(slots.params, sl))
    made = jnp.where(insert, inputs.generated0, slots.num_generated[sl])
    # proposals per row [S, k] (-1: none), read from the flat axis after the row's first token
    j = jnp.arange(k, dtype=jnp.int32)[None, :]
    prop = jnp.where(j < nprop[:, None],
                     inputs.tokens[jnp.clip(inputs.start[:, None] + 1 + j, 0, t - 1)], -1)
    # every flat logit row samples as its row would at that index
    n_logits = inputs.logit_row.shape[0]
    lr = jnp.maximum(inputs.logit_row, 0)
    col = inputs.logit_col
    index = made[lr] + col
    prior = jnp.where(j < col[:, None], prop[lr], -1)  # the history as it is at that position
    tok_l, fin_l, lp_l, tid_l, tlp_l = _pick(
        logits, _take(row_params, lr), index, index + 1, n_top,
        (slots.prompt_mask, slots.output_counts, sl[lr], prior),
        # constrained rows carry no proposals: their mask is their first logit row's
        (inputs.mask_on[lr] & (col == 0) & (inputs.logit_row >= 0), inputs.allowed[lr]))
    # back to rows [S, 1 + k]
    first = jnp.full((n_rows,), n_logits, jnp.int32).at[
        jnp.where(inputs.logit_row >= 0, inputs.logit_row, n_rows)].min(
        jnp.arange(n_logits, dtype=jnp.int32), mode="drop")
    cols = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    at = jnp.clip(first[:, None] + cols, 0, n_logits - 1)
    tok, fin = tok_l[at], fin_l[at]
    match = (cols[:, :k] < nprop[:, None]) & (tok[:, :k] == prop) & (fin[:, :k] == Finish.RUNNING)
    accepted = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1)  # [S]
    keep = samples[:, None] & (cols <= accepted[:, None])
    tok = jnp.where(keep, tok, -1)
    last = jnp.take_along_axis(tok, accepted[:, None], axis=1)[:, 0]
    finish = jnp.where(samples, jnp.take_along_axis(fin, accepted[:, None], axis=1)[:, 0],
                       Finish.RUNNING)
    target = jnp.where(samples, slot, n_slots)
    vocab = slots.output_counts.shape[1]
    counts = slots.output_counts.at[jnp.broadcast_to(target[:, None], tok.shape),
                                    jnp.where(tok >= 0, tok, vocab)].add(1, mode="drop")
    kept = jnp.where(inputs.decode, pos0 + accepted + 1, kv_len)
    slots = dataclasses.replace(
        slots, output_counts=counts, params=_set(slots.params, target, row_params),
        last_token=slots.last_token.at[target].set(last, mode="drop"),
        position=slots.position.at[target].set(kept, mode="drop"),
        num_generated=slots.num_generated.at[target].set(made + accepted + 1, mode="drop"),
        done=slots.done.at[target].set(finish != Finish.RUNNING, mode="drop"),
        finish=slots.finish.at[target].set(finish, mode="drop"))
    zero = jnp.zeros((), lp_l.dtype)
    out = StepOutput(tok, finish.astype(jnp.int32), jnp.where(keep, lp_l[at], zero),
                     jnp.where(keep[..., None], tid_l[at], 0),
                     jnp.where(keep[..., None], tlp_l[at], zero))
    return out, slots, cache


def _rows_forward(model, st: SlotState, table, cache, *, splits: int, mesh):
    """The forward half of a decode step of rows st ([rows]): each live row feeds its last
    token at its position (its K/V written); returns (logits [rows, V], cache)."""
    rows = st.done.shape[0]
    arange = jnp.arange(rows, dtype=jnp.int32)
    active = ~st.done
    batch = TokenBatch(tokens=st.last_token, positions=st.position,
                       token_seq=jnp.where(active, arange, -1), q_start=arange,
                       q_len=active.astype(jnp.int32), kv_len=st.position + active,
                       page_table=table)
    return forward(model, batch, cache, block_q=1, splits=splits, mesh=mesh)


def _rows_advance(st: SlotState, logits, *, n_top: int, constraint=None):
    """The sampling half: each live row samples from its logits (and its bitmask, constraint:
    (mask_on, allowed) [rows]) and moves on one token; returns (token, logprob, top ids, top
    logprobs, finish) [rows] and the new state."""
    rows = st.done.shape[0]
    arange = jnp.arange(rows, dtype=jnp.int32)
    active = ~st.done
    tok, finish, chosen, top_id, top_lp = _pick(
        logits, st.params, st.num_generated, st.num_generated + 1, n_top,
        (st.prompt_mask, st.output_counts, arange), constraint)
    finish = jnp.where(active, finish, st.finish)
    tok = jnp.where(active, tok, -1)
    vocab = st.output_counts.shape[1]
    st = dataclasses.replace(
        st, output_counts=st.output_counts.at[arange, jnp.where(tok >= 0, tok, vocab)]
        .add(1, mode="drop"))
    st = dataclasses.replace(
        st, last_token=jnp.where(active, tok, st.last_token), position=st.position + active,
        num_generated=st.num_generated + active, done=st.done | (finish != Finish.RUNNING),
        finish=finish)
    return (tok, chosen, top_id, top_lp, finish), st


@functools.partial(jax.jit, static_argnames=("graphdef", "rows", "max_steps", "n_top",
                                             "splits", "mesh"),
                   donate_argnames=("cache", "slots"))
def _decode(graphdef, params, cache, slots: SlotState, page_table, retire, num_steps, *,
            rows: int, max_steps: int, n_top: int, splits: int, mesh=None):
    """Up to num_steps (<= max_steps) decode steps of slots [0, rows)."""
    model = nnx.merge(graphdef, params)
    full = dataclasses.replace(slots, done=slots.done | retire)
    st = _take(full, slice(0, rows))
    table = page_table[:rows]
    out = DecodeOutput(token=jnp.full((rows, max_steps), -1, jnp.int32),
                       logprob=jnp.zeros((rows, max_steps), jnp.float32),
                       top_ids=jnp.zeros((rows, max_steps, n_top), jnp.int32),
                       top_logprobs=jnp.zeros((rows, max_steps, n_top), jnp.float32),
                       finish=st.finish)

    def cond(carry):
        step, _, st, _ = carry
        return (step < num_steps) & ~jnp.all(st.done)

    def body(carry):
        step, cache, st, out = carry
        logits, cache = _rows_forward(model, st, table, cache, splits=splits, mesh=mesh)
        (tok, chosen, top_id, top_lp, finish), st = _rows_advance(st, logits, n_top=n_top)
        out = DecodeOutput(token=out.token.at[:, step].set(tok),
                           logprob=out.logprob.at[:, step].set(chosen),
                           top_ids=out.top_ids.at[:, step].set(top_id),
                           top_logprobs=out.top_logprobs.at[:, step].set(top_lp),
                           finish=finish)
        return step + 1, cache, st, out

    _, cache, st, out = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, st, out))
    slots = jax.tree.map(lambda a, part: a.at[:rows].set(part), full, st)
    return out, _replicate(slots, mesh), cache


# A decode step in two programs (structured output's lockstep): the forward, then the sampling
# with masks the host computes from the previous token while the forward runs. The forward
# changes no slot state (the K/V it writes are those any later program writes for the same
# token at the same position), so the sampling half may also never come.

@functools.partial(jax.jit, static_argnames=("graphdef", "rows", "splits", "mesh"),
                   donate_argnames=("cache",))
def _forward_rows(graphdef, params, cache, slots: SlotState, page_table, retire, *, rows: int,
                  splits: int, mesh=None):
    """The forward half of one decode step of slots [0, rows); returns (logits, cache)."""
    model = nnx.merge(graphdef, params)
    st = _take(dataclasses.replace(slots, done=slots.done | retire), slice(0, rows))
    return _rows_forward(model, st, page_table[:rows], cache, splits=splits, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("n_top", "mesh"), donate_argnames=("slots",))
def _sample_rows(slots: SlotState, logits, retire, mask_on, allowed, *, n_top: int, mesh=None):
    """The sampling half of one decode step of slots [0, rows) (rows: logits' rows), with the
    bitmasks of constrained rows; returns (DecodeOutput of one step, slots)."""
    rows = logits.shape[0]
    full = dataclasses.replace(slots, done=slots.done | retire)
    st = _take(full, slice(0, rows))
    (tok, chosen, top_id, top_lp, finish), st = _rows_advance(
        st, logits, n_top=n_top, constraint=(mask_on[:rows], allowed[:rows]))
    out = DecodeOutput(token=tok[:, None], logprob=chosen[:, None], top_ids=top_id[:, None],
                       top_logprobs=top_lp[:, None], finish=finish)
    slots = jax.tree.map(lambda a, part: a.at[:rows].set(part), full, st)
    return out, _replicate(slots, mesh)


@functools.partial(jax.jit, donate_argnames=("slots",))
def _set_history(slots: SlotState, slot, prompt_mask, output_counts) -> SlotState:
    return dataclasses.replace(slots, prompt_mask=slots.prompt_mask.at[slot].set(prompt_mask),
                               output_counts=slots.output_counts.at[slot].set(output_counts))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreOutput:
    """Per token [T]: the target's log-probability (0 where none), and the n most likely next
    tokens with theirs ([T, n])."""

    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "n_top", "mesh"),
                   donate_argnames=("cache",))
def _score(graphdef, params, cache, batch: TokenBatch, targets, *, n_top: int = 0, mesh=None):
    """Log-probability of targets [T] (-1: none) after each token of a ragged batch."""
    model = nnx.merge(graphdef, params)
    logits, cache = forward(model, batch, cache, block_q=PREFILL_BLOCK_Q, all_logits=True,
                            mesh=mesh)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    top_lp, top_id = jax.lax.top_k(logp, n_top)
    return ScoreOutput(jnp.where(targets >= 0, picked, 0.0), top_id.astype(jnp.int32),
                       top_lp), cache


# ----------------------------------------------------------------------------------------------
# the runner

def _put(x, where=None):
    """Host -> device, committed to the default device (or replicated over the engine's mesh:
    `where`). Every input of the programs goes through here: jit's cache tells committed arrays
    (its own outputs) from uncommitted ones and would compile each program twice; and
    jnp.asarray would compile a small program for every new shape."""
    return jax.device_put(x, jax.devices()[0] if where is None else where)


class DeviceRunner:
    """The compiled verbs over one model's device state (see the module docstring).

    kernels: "pallas" | "xla" | None (None: decided by the platform, once: the Pallas kernels
    on a GPU, the XLA references elsewhere).
    """

    def __init__(self, model: Transformer, *, kv_cache: str, num_pages: int, page_size: int,
                 slots: int, max_pages_per_seq: int, max_batch_tokens: int, max_logprobs: int,
                 max_stop_ids: int, max_logit_bias: int = 1, mesh=None,
                 kernels: str | None = None, spec_k: int = 0,
                 min_step_tokens: int | None = None):
        self.model_config = model.config
        self.dtype = model.dtype
        self.mesh = mesh if sharding.tp_size(mesh) > 1 else None
        self._where = None if self.mesh is None else sharding.replicated(self.mesh)
        # the runtime layout, decided once: fused q/k/v and gate/up projections, and the CPU
        # route's INT8 weights
        self.graphdef, params = nnx.split(
            fuse_projections(int8_runtime(model), sharding.tp_size(mesh)))
        self.params = (self._put(params) if self.mesh is None
                       else sharding.shard_state(params, self.mesh))
        self.kv_cache = kv_cache
        self.kernels = kernels or kernel_backend(jax.devices()[0].platform)
        self.num_pages, self.page_size = num_pages, page_size
        self.slots = max(2, slots)  # device rows: >= 2 even for one slot (a lone row is paired)
        self.max_pages_per_seq = max_pages_per_seq
        self.max_logprobs = max_logprobs
        self.max_stop_ids = max_stop_ids
        self.max_logit_bias = max(1, max_logit_bias)
        self.vocab = model.config.vocab_size
        self.mask_words = -(-self.vocab // 32)  # a structured-output row's bitmask
        # speculative steps (spec_k proposed tokens per decode row at most): a smaller first
        # step bucket, so a lone sequence's verification row pads little
        self.spec_k = spec_k
        # (min_step_tokens: a draft model's steps feed one or two tokens per sequence)
        if min_step_tokens is None:
            min_step_tokens = SPEC_MIN_TOKEN_BUCKET if spec_k else MIN_TOKEN_BUCKET
        self.buckets = Buckets(max_tokens=max_batch_tokens, slots=self.slots,
                               min_tokens=min_step_tokens)
        tp = sharding.tp_size(self.mesh)
        self.splits = default_splits(max_pages_per_seq, slots,
                                     model.config.num_kv_heads // tp)
        self.cache = None  # allocated at first use (a notebook may load and never generate)
        self.state: SlotState | None = None
        self._table = np.zeros((self.slots, max_pages_per_seq), np.int32)
        self._table_dev = None
        self._executables: dict[tuple[str, int], object] = {}
        self._sig = None  # _signature(), once the device state exists
        # XLA's default pipelines. (LLVM's cheaper pipeline on CPU, xla_backend_optimization_level
        # 1 with xla_llvm_disable_expensive_passes, compiled ~25% faster, but XLA:CPU crashed
        # compiling or serializing these programs with it, late in long processes: CI, three
        # times; docs/PERFORMANCE.md)
        self._compile_options: dict = {}

    def _put(self, x):
        return _put(x, self._where)

    # ------------------------------------------------------------------------------------------
    # device state

    @staticmethod
    def bytes_per_page(model_config, kv_cache: str, page_size: int, dtype, tp: int = 1) -> int:
        """KV-cache bytes of one page on each device (each holds num_kv_heads / tp heads)."""
        m = model_config
        return page_size * cache_class(kv_cache).bytes_per_token(
            m.num_layers, m.num_kv_heads // tp, m.head_dim, dtype)

    @property
    def allocated(self) -> bool:
        return self.cache is not None

    def allocate(self) -> None:
        """Create the pools, slot state and page table on the device (idempotent)."""
        if self.cache is not None:
            return
        m = self.model_config
        make = functools.partial(make_cache, self.kv_cache, m.num_layers, self.num_pages,
                                 self.page_size, m.num_kv_heads, m.head_dim, self.dtype,
                                 backend=self.kernels)
        if self.mesh is None:
            self.cache = self._put(make())
        else:  # created in place, each device its KV heads
            self.cache = jax.jit(make, out_shardings=sharding.cache_sharding(
                self.mesh, jax.eval_shape(make)))()
        self.state = self._put(SlotState.idle(self.slots, self.max_stop_ids,
                                              self.max_logit_bias, self.vocab))
        self._table[:] = SCRATCH_PAGE
        self._table_dev = self._put(self._table)

    def reset(self) -> None:
        """Drop the device state (after an internal error); allocate() makes it afresh."""
        self.cache = self.state = self._table_dev = None

    def set_page_table(self, table: np.ndarray) -> None:
        """The pages of every slot [slots, max_pages] (scratch where unused); uploaded only
        when it changed."""
        if self._table_dev is None or not np.array_equal(table, self._table):
            self._table = np.array(table, np.int32)
            self._table_dev = self._put(self._table)

    # ------------------------------------------------------------------------------------------
    # verbs

    def step(self, inputs: StepInputs) -> StepOutput:
        """Dispatch one ragged batch (host arrays, padded to a step bucket); returns its outputs
        (device arrays, copying to the host)."""
        args = (self.params, self.cache, self.state, self._table_dev,
                jax.tree.map(self._put, inputs))
        exe = self._executable(("step", inputs.tokens.shape[0]), lambda: self._lower_step(args))
        out, self.state, self.cache = exe(*args)
        _start_host_copy(out)
        return out

    def set_history(self, slot: int, prompt_mask: np.ndarray, output_counts: np.ndarray) -> None:
        """A penalised request's token history ([vocab] bool and int32) into `slot`; dispatched
        before the step that starts its decoding (ordered by the donated slot state)."""
        self.state = _set_history(self.state, self._put(np.int32(slot)),
                                  self._put(prompt_mask), self._put(output_counts))

    def decode(self, rows: int, steps: int, retire: np.ndarray) -> DecodeOutput:
        """Dispatch up to `steps` decode steps of slots [0, rows) (rows: a decode bucket)."""
        max_steps = self.max_decode_steps
        if not 1 <= steps <= max_steps:
            raise ValueError(f"steps must be in [1, {max_steps}], got {steps}")
        args = (self.params, self.cache, self.state, self._table_dev, self._put(retire),
                self._put(np.int32(steps)))
        exe = self._executable(("decode", rows), lambda: self._lower_decode(rows, args))
        out, self.state, self.cache = exe(*args)
        _start_host_copy(out)
        return out

    def forward_rows(self, rows: int, retire: np.ndarray):
        """Dispatch the forward half of one decode step of slots [0, rows) (a decode bucket);
        returns its logits (device array) for sample_rows."""
        args = (self.params, self.cache, self.state, self._table_dev, self._put(retire))
        exe = self._executable(("forward", rows), lambda: self._lower_forward(rows, args))
        logits, self.cache = exe(*args)
        return logits

    def sample_rows(self, logits, retire: np.ndarray, mask_on: np.ndarray,
                    allowed: np.ndarray) -> DecodeOutput:
        """Dispatch the sampling half of the step forward_rows began (nothing may run between
        them but the host's work): constrained rows (mask_on [slots]) take only the tokens
        their bitmask (allowed [slots, words]) allows."""
        args = (self.state, logits, self._put(retire), self._put(mask_on), self._put(allowed))
        rows = logits.shape[0]
        exe = self._executable(("sample", rows), lambda: _sample_rows.lower(
            *args, n_top=self.max_logprobs, mesh=self.mesh))
        out, self.state = exe(*args)
        _start_host_copy(out)
        return out

    # The compilation manager: one executable per program and bucket, compiled ahead of time
    # (warmup compiles them all, two at a time, without running them) and called directly.

    def _executable(self, key, lower):
        exe = self._executables.get(key)
        if exe is None:
            exe = self._shared(key)
            if exe is None:
                exe = self._keep(key, lower().compile(compiler_options=self._compile_options))
            self._executables[key] = exe
        return exe

    def _shared(self, key):
        """An executable another runner of the same signature compiled (None if none)."""
        return SHARED_EXECUTABLES.get((key, self._signature()))

    def _keep(self, key, exe):
        """A program this runner compiled: its own, and shared with runners of its signature."""
        self._executables[key] = exe
        SHARED_EXECUTABLES.put((key, self._signature()), exe)
        return exe

    def _signature(self):
        """What decides this runner's programs besides the program and bucket: the model's
        structure, the shapes, dtypes and placements of its weights, pools, slot state and page
        table, and the static settings (computed once, after allocate)."""
        if self._sig is None:
            def arrays(tree):
                return (jax.tree.structure(tree), tuple(
                    (x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree)))

            self._sig = (self.graphdef, arrays(self.params), arrays(self.cache),
                         arrays(self.state), self._table.shape, self.max_logprobs,
                         self.max_stop_ids, self.max_logit_bias, self.mask_words, self.splits,
                         self.mesh, self.spec_k, self.buckets,
                         tuple(sorted(self._compile_options.items())))
        return self._sig

    def _lower_step(self, args):
        return _step.lower(self.graphdef, *args, n_top=self.max_logprobs, splits=self.splits,
                           mesh=self.mesh, spec_k=self.spec_k)

    def _lower_forward(self, rows, args):
        return _forward_rows.lower(self.graphdef, *args, rows=rows, splits=self.splits,
                                   mesh=self.mesh)

    def _lower_decode(self, rows, args):
        return _decode.lower(self.graphdef, *args, rows=rows, max_steps=self.max_decode_steps,
                             n_top=self.max_logprobs, splits=self.splits, mesh=self.mesh)

    max_decode_steps = 16  # the decode program's output width (a dispatch may run fewer)
    max_spec_tokens = 15  # the most proposals a speculative step verifies per row

    def score(self, batch: TokenBatch, targets: np.ndarray, n_top: int = 0) -> ScoreOutput:
        """Log-probabilities of targets [T] after each token of `batch` (host arrays), and the
        n_top most likely next tokens at each."""
        out, self.cache = _score(self.graphdef, self.params, self.cache,
                                 jax.tree.map(self._put, batch), self._put(targets),
                                 n_top=n_top, mesh=self.mesh)
        return out

    # ------------------------------------------------------------------------------------------
    # host-side construction of the inputs

    def empty_inputs(self, num_tokens: int) -> StepInputs:
        """StepInputs of a bucket's shape with no work (numpy, to be filled)."""
        s, w = self.slots, self.max_stop_ids
        zi = functools.partial(np.zeros, (s,), np.int32)
        n_logits = self.logit_rows(num_tokens)
        return StepInputs(
            num_proposed=zi(), logit_token=np.zeros((n_logits,), np.int32),
            logit_row=np.full((n_logits,), -1, np.int32),
            logit_col=np.zeros((n_logits,), np.int32),
            tokens=np.zeros((num_tokens,), np.int32), token_seq=np.full((num_tokens,), -1, np.int32),
            slot=np.full((s,), -1, np.int32), start=zi(), length=zi(), pos0=zi(),
            decode=np.zeros((s,), bool), sample=np.zeros((s,), bool), generated0=zi(),
            params=RowParams.empty(s, w, self.max_logit_bias),
            retire=np.zeros((self.slots,), bool), mask_on=np.zeros((s,), bool),
            allowed=np.zeros((s, self.mask_words), np.int32))

    def logit_rows(self, num_tokens: int) -> int:
        """Rows of logits a speculative step of a bucket computes (0 without speculation: one
        per sequence row): at most one per token, and 1 + spec_k per slot."""
        return min(num_tokens, self.slots * (1 + self.spec_k)) if self.spec_k else 0

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {"step": self.buckets.step, "decode": self.buckets.decode}

    def warmup(self, structured: bool = False) -> int:
        """Compile every program a workload can need (every step and decode bucket; with
        `structured`, the two halves of a decode step that structured output's lockstep runs)
        ahead of time, two at a time, without running any; returns how many were compiled."""
        import concurrent.futures

        self.allocate()
        before = COMPILES.count
        for kind in ("step", "decode", "forward", "sample"):
            for n in (self.buckets.step if kind == "step" else self.buckets.decode):
                exe = self._shared((kind, n))
                if exe is not None:
                    self._executables.setdefault((kind, n), exe)
        todo = []
        for t in self.buckets.step:
            if ("step", t) not in self._executables:
                args = (self.params, self.cache, self.state, self._table_dev,
                        jax.tree.map(self._put, self.empty_inputs(t)))
                todo.append((("step", t), self._lower_step(args)))
        retire = self._put(np.zeros((self.slots,), bool))
        for rows in self.buckets.decode:
            if ("decode", rows) not in self._executables:
                args = (self.params, self.cache, self.state, self._table_dev, retire,
                        self._put(np.int32(1)))
                todo.append((("decode", rows), self._lower_decode(rows, args)))
            if structured and ("forward", rows) not in self._executables:
                args = (self.params, self.cache, self.state, self._table_dev, retire)
                todo.append((("forward", rows), self._lower_forward(rows, args)))
        compile_ = lambda kl: kl[1].compile(compiler_options=self._compile_options)  # noqa: E731
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # XLA compiles off the GIL
            for key, exe in zip([k for k, _ in todo], pool.map(compile_, todo)):
                self._keep(key, exe)
            # the sampling halves take the forward halves' logits (their type and placement)
            todo = []
            for rows in self.buckets.decode if structured else ():
                if ("sample", rows) not in self._executables:
                    logits = self._executables[("forward", rows)].out_info[0]
                    args = (self.state, logits, retire,
                            self._put(np.zeros((self.slots,), bool)),
                            self._put(np.zeros((self.slots, self.mask_words), np.int32)))
                    todo.append((("sample", rows), _sample_rows.lower(
                        *args, n_top=self.max_logprobs, mesh=self.mesh)))
            for key, exe in zip([k for k, _ in todo], pool.map(compile_, todo)):
                self._keep(key, exe)
        return COMPILES.count - before

    # ------------------------------------------------------------------------------------------
    # introspection (tests, docs): each program as a function of its arrays

    def step_program(self, num_tokens: int):
        """(fn, args): the ragged-step program of a bucket as a function of its array
        arguments (params, cache, slots, page table, inputs), and those arguments. For
        lowering (for another platform, under an abstract mesh) and memory analysis."""
        self.allocate()

        def fn(params, cache, slots, table, inputs):
            return _step(self.graphdef, params, cache, slots, table, inputs,
                         n_top=self.max_logprobs, splits=self.splits, mesh=self.mesh,
                         spec_k=self.spec_k)

        return fn, (self.params, self.cache, self.state, self._table_dev,
                    jax.tree.map(self._put, self.empty_inputs(num_tokens)))

    def decode_program(self, rows: int):
        """(fn, args): the decode program of a row bucket (see step_program)."""
        self.allocate()

        def fn(params, cache, slots, table, retire, num_steps):
            return _decode(self.graphdef, params, cache, slots, table, retire, num_steps,
                           rows=rows, max_steps=self.max_decode_steps, n_top=self.max_logprobs,
                           splits=self.splits, mesh=self.mesh)

        return fn, (self.params, self.cache, self.state, self._table_dev,
                    self._put(np.zeros((self.slots,), bool)), self._put(np.int32(1)))

    def compiled_memory(self) -> dict[str, object]:
        """memory_analysis() of every program as the runner compiles it (donation included),
        by name ("step/64", "decode/8", ...)."""
        self.warmup()
        return {f"{kind}/{n}": exe.memory_analysis()
                for (kind, n), exe in sorted(self._executables.items())}

    @property
    def compiled_programs(self) -> list[str]:
        """The programs compiled so far, by name ("step/64", "decode/8", ...)."""
        return [f"{kind}/{n}" for kind, n in sorted(self._executables)]


def stack_params(rows: Sequence[dict], width: int, bias_width: int = 1) -> RowParams:
    """RowParams [len(rows)] from per-row dicts (host side; the loop's helper); the [R, N]
    fields take lists."""
    out = RowParams.empty(len(rows), width, bias_width)
    for i, r in enumerate(rows):
        for name, value in r.items():
            field = getattr(out, name)
            if field.ndim == 2:
                field[i, :len(value)] = value
            else:
                field[i] = value
    return out
