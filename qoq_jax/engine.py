"""The generation engine: jitted prefill and a jitted multi-step decode loop over a paged cache.

Flow of one ``Engine.generate`` call (a static batch; in-flight batching builds on the same
pieces: the page allocator, per-row sampling state and the chunked decode loop):

1. Prompts are right-padded into a [B, T] batch; B and T are rounded up to buckets (powers of
   two) so a handful of compiled shapes serve every request.
2. Each sequence gets its KV-cache pages from the ``PageAllocator``; the page table goes in as
   an int32 array.
3. ``_prefill_and_sample`` writes the prompts' K/V, and samples each sequence's first token.
4. ``_decode_chunk`` runs up to ``decode_chunk`` decode steps in one ``lax.while_loop``,
   stopping early once every sequence has finished (stop token or max_new_tokens), and returns
   the tokens it made; the host loop calls it until all sequences are done.

The model travels through jit as (graphdef, state): the graphdef is static, the state (weights)
an ordinary pytree, so no Python object-graph traversal happens per call. The cache is donated.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qoq_jax.kv_cache import KV_CACHE_KINDS, PageAllocator, make_cache
from qoq_jax.model import Transformer, decode_step, prefill
from qoq_jax.sampling import SamplingParams, sample


class PromptError(ValueError):
    """A prompt is empty, or too long for the model's context."""


@dataclasses.dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]  # generated tokens, the stop token included when one ended the sequence
    finish_reason: str  # "stop" | "length"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Per-row state of the decode loop (all [B])."""

    last_token: jax.Array  # the token to feed next
    position: jax.Array  # its position (where its K/V goes)
    num_generated: jax.Array
    done: jax.Array
    max_new: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    stop_ids: jax.Array  # [B, S], padded with -1


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[:, None] == stop_ids, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "all_greedy"), donate_argnames=("cache",))
def _prefill_and_sample(graphdef, params, tokens, lengths, cache, page_table, st: DecodeState,
                        all_greedy: bool):
    model = nnx.merge(graphdef, params)
    logits, cache = prefill(model, tokens, lengths, cache, page_table)
    first = sample(logits, st.temperature, st.top_k, st.top_p, st.seed,
                   jnp.zeros_like(lengths), all_greedy=all_greedy)
    real = st.max_new > 0  # rows that pad the batch have max_new 0
    num_generated = real.astype(jnp.int32)
    done = ~real | _is_stop(first, st.stop_ids) | (num_generated >= st.max_new)
    st = dataclasses.replace(st, last_token=first, position=lengths, num_generated=num_generated,
                             done=done)
    return jnp.where(real, first, -1), st, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "num_steps", "all_greedy"),
                   donate_argnames=("cache",))
def _decode_chunk(graphdef, params, cache, page_table, st: DecodeState, num_steps: int,
                  all_greedy: bool):
    model = nnx.merge(graphdef, params)
    batch = st.last_token.shape[0]
    out = jnp.full((batch, num_steps), -1, jnp.int32)

    def cond(carry):
        step, _, st, _ = carry
        return (step < num_steps) & ~jnp.all(st.done)

    def body(carry):
        step, cache, st, out = carry
        active = ~st.done
        logits, cache = decode_step(model, st.last_token, st.position, active, cache, page_table)
        nxt = sample(logits, st.temperature, st.top_k, st.top_p, st.seed, st.num_generated,
                     all_greedy=all_greedy)
        nxt = jnp.where(active, nxt, -1)
        num_generated = st.num_generated + active
        done = st.done | (active & (_is_stop(nxt, st.stop_ids) | (num_generated >= st.max_new)))
        st = dataclasses.replace(
            st, last_token=jnp.where(active, nxt, st.last_token),
            position=st.position + active, num_generated=num_generated, done=done)
        return step + 1, cache, st, out.at[:, step].set(nxt)

    _, cache, st, out = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, st, out))
    return out, st, cache


class Engine:
    """Batched generation for one model. Not thread-safe; the server serialises calls."""

    def __init__(self, model: Transformer, *, kv_cache: str = "16bit", page_size: int = 16,
                 decode_chunk: int = 16, min_prompt_bucket: int = 16):
        if kv_cache not in KV_CACHE_KINDS:
            raise ValueError(f"kv_cache must be one of {KV_CACHE_KINDS}, not {kv_cache!r}")
        self.kv_cache = kv_cache
        self.config = model.config
        self.dtype = model.dtype
        self.graphdef, self.params = nnx.split(model)
        self.page_size = page_size
        self.decode_chunk = decode_chunk
        self.min_prompt_bucket = min_prompt_bucket
        self.last_stats: dict[str, float] = {}

    def _check(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]):
        limit = self.config.max_position_embeddings
        for i, (p, sp) in enumerate(zip(prompts, params)):
            if len(p) == 0:
                raise PromptError(f"prompt {i} is empty")
            if len(p) + sp.max_new_tokens > limit:
                raise PromptError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={sp.max_new_tokens} "
                    f"that exceeds the model's context of {limit} tokens")
            bad = [t for t in p if not 0 <= t < self.config.vocab_size]
            if bad:
                raise PromptError(f"prompt {i} has token ids outside the vocabulary: {bad[:5]}")

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()
                 ) -> list[GenerationResult]:
        """Generate for a batch of tokenized prompts. Returns one result per prompt, in order."""
        if not prompts:
            return []
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        self._check(prompts, params)
        t_start = time.perf_counter()

        n = len(prompts)
        batch = _bucket(n, 1)
        t_len = _bucket(max(len(p) for p in prompts), self.min_prompt_bucket)
        longest = max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, params))
        max_pages = _bucket(-(-longest // self.page_size), 1)
        # Every shape below depends on buckets only, so repeated calls reuse compiled programs.
        alloc = PageAllocator(1 + batch * max_pages, self.page_size)
        for i, (p, sp) in enumerate(zip(prompts, params)):
            alloc.ensure(i, len(p) + sp.max_new_tokens)
        page_table = jnp.asarray(alloc.page_table(list(range(n)) + [-1] * (batch - n), max_pages))
        cache = make_cache(self.kv_cache, self.config.num_layers, alloc.num_pages, self.page_size,
                           self.config.num_kv_heads, self.config.head_dim, self.dtype)

        tokens = np.zeros((batch, t_len), np.int32)
        lengths = np.ones((batch,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        st = self._initial_state(params, batch)
        all_greedy = all(sp.greedy for sp in params)

        first, st, cache = _prefill_and_sample(self.graphdef, self.params, jnp.asarray(tokens),
                                               jnp.asarray(lengths), cache, page_table, st,
                                               all_greedy)
        pieces = [np.asarray(first)[:, None]]
        t_first = time.perf_counter()
        while not bool(np.all(np.asarray(st.done))):
            out, st, cache = _decode_chunk(self.graphdef, self.params, cache, page_table, st,
                                           self.decode_chunk, all_greedy)
            pieces.append(np.asarray(out))
        t_end = time.perf_counter()

        generated = np.concatenate(pieces, axis=1)
        results = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            row = [int(t) for t in generated[i] if t >= 0]
            stops = self._stop_ids(sp)
            reason = "stop" if row and row[-1] in stops else "length"
            results.append(GenerationResult(list(p), row, reason))
        n_new = sum(len(r.tokens) for r in results)
        self.last_stats = {
            "prefill_s": t_first - t_start, "decode_s": t_end - t_first, "total_s": t_end - t_start,
            "new_tokens": n_new, "prompt_tokens": sum(len(p) for p in prompts),
            "tokens_per_s": n_new / max(t_end - t_start, 1e-9),
        }
        return results

    def _stop_ids(self, sp: SamplingParams) -> tuple[int, ...]:
        return self.config.eos_token_ids if sp.stop_token_ids is None else tuple(sp.stop_token_ids)

    def _initial_state(self, params: Sequence[SamplingParams], batch: int) -> DecodeState:
        n = len(params)
        pad = batch - n
        stops = [self._stop_ids(sp) for sp in params]
        width = max(1, max(len(s) for s in stops))
        stop_ids = np.full((batch, width), -1, np.int32)
        for i, s in enumerate(stops):
            stop_ids[i, :len(s)] = s

        def col(values, dtype, fill):
            return jnp.asarray(np.array(list(values) + [fill] * pad, dtype))

        zeros = jnp.zeros((batch,), jnp.int32)
        return DecodeState(
            last_token=zeros, position=zeros, num_generated=zeros,
            done=jnp.zeros((batch,), bool),
            max_new=col((sp.max_new_tokens for sp in params), np.int32, 0),
            temperature=col((sp.temperature for sp in params), np.float32, 0.0),
            top_k=col((sp.top_k for sp in params), np.int32, 0),
            top_p=col((sp.top_p for sp in params), np.float32, 1.0),
            seed=col((sp.seed for sp in params), np.uint32, 0),
            stop_ids=jnp.asarray(stop_ids),
        )
