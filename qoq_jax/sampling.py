"""Token sampling with per-sequence parameters: logit processing (logit bias, min_tokens,
repetition / presence / frequency penalties), then greedy or temperature with top-k, top-p and
min-p.

Every row of a batch carries its own parameters and seed, and its random key is derived from
(seed, index of the token in that sequence) only, so a request samples the same tokens whatever
else shares its batch: what in-flight batching needs to stay reproducible. Every processing step
is elementwise per row, so greedy output stays batch-invariant with penalties too.

The definitions are vLLM's (and OpenAI's): in this order,
- ``logit_bias``: token id -> a bias in [-100, 100] added to its logit;
- ``min_tokens``: the stop token ids cannot be chosen before that many tokens were made;
- ``repetition_penalty`` r (transformers / vLLM, over prompt and output tokens): a seen
  token's logit l becomes l / r if l > 0, else l * r;
- ``frequency_penalty`` f and ``presence_penalty`` p (OpenAI, over output tokens only):
  l - f * count - p * (count > 0);
- temperature, then top-k, top-p and ``min_p`` (tokens below min_p x the top probability are
  dropped) when sampling; greedy takes the argmax of the processed logits.
Log-probabilities reported to the user are those of the model (before processing), as vLLM's.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qoq_jax.structured import StructuredOutput


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 means greedy (top_k / top_p then unused)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 0
    # None: the model's end-of-sequence tokens. An empty tuple never stops early.
    stop_token_ids: tuple[int, ...] | None = None
    # None: no log-probabilities; 0: the chosen token's; N: also the N most likely tokens'.
    logprobs: int | None = None
    min_p: float = 0.0  # drop tokens below min_p x the most likely one's probability (sampling)
    min_tokens: int = 0  # the stop token ids are barred before this many tokens
    repetition_penalty: float = 1.0  # > 0; over prompt and output tokens; 1: none
    presence_penalty: float = 0.0  # in [-2, 2]; over output tokens
    frequency_penalty: float = 0.0  # in [-2, 2]; over output tokens
    # token id -> bias in [-100, 100] added to its logit (a dict or (id, bias) pairs)
    logit_bias: tuple[tuple[int, float], ...] = ()
    # the output must match this (qoq_jax.structured: JSON schema, regex, choice, grammar)
    structured: StructuredOutput | None = None

    def __post_init__(self):
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_int("top_k", self.top_k, 0)
        _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("seed", self.seed, 0, 2**32 - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
            for t in self.stop_token_ids:
                _check_int("stop_token_ids", t, 0)
        _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_int("min_tokens", self.min_tokens, 0, self.max_new_tokens)
        _check_float("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], got "
                             f"{self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name))
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        bias = self.logit_bias
        pairs = list(bias.items()) if isinstance(bias, dict) else list(bias or ())
        clean = {}
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"logit_bias must map token ids to biases, got {pair!r}")
            tok, b = pair
            _check_int("logit_bias token id", tok, 0)
            _check_float("logit_bias value", b)
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b} for "
                                 f"token {tok}")
            clean[int(tok)] = float(b)
        object.__setattr__(self, "logit_bias", tuple(sorted(clean.items())))
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise ValueError(f"structured must be a StructuredOutput, got "
                                 f"{type(self.structured).__name__}")
            if self.min_tokens:  # the constraint decides where the output may end
                raise ValueError("min_tokens cannot be combined with structured output")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Some penalty needs the request's token history on the device."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def bias_logits(logits: jax.Array, bias_ids: jax.Array, bias_values: jax.Array) -> jax.Array:
    """logits [B, V] + per-row biases: bias_ids [B, N] (-1: none), bias_values [B, N]."""
    vocab = logits.shape[-1]
    rows = jnp.arange(logits.shape[0])[:, None]
    ids = jnp.where(bias_ids >= 0, bias_ids, vocab)  # out of range: dropped
    return logits.at[rows, ids].add(bias_values.astype(logits.dtype), mode="drop")


def bar_tokens(logits: jax.Array, ids: jax.Array, bar: jax.Array) -> jax.Array:
    """logits [B, V] with tokens ids [B, W] (-1: none) set to -inf in rows where bar [B]."""
    vocab = logits.shape[-1]
    rows = jnp.arange(logits.shape[0])[:, None]
    ids = jnp.where((ids >= 0) & bar[:, None], ids, vocab)
    return logits.at[rows, ids].set(-jnp.inf, mode="drop")


def penalize(logits: jax.Array, prompt_mask: jax.Array, output_counts: jax.Array,
             repetition: jax.Array, presence: jax.Array, frequency: jax.Array) -> jax.Array:
    """Repetition (prompt and output tokens), presence and frequency (output tokens) penalties.
    logits [B, V]; prompt_mask [B, V] bool; output_counts [B, V] int; the penalties [B]."""
    seen = prompt_mask | (output_counts > 0)
    r = repetition[:, None]
    out = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    counts = output_counts.astype(logits.dtype)
    return out - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seed: jax.Array, index: jax.Array, *, min_p: jax.Array | None = None,
           all_greedy: bool = False) -> jax.Array:
    """logits [B, V] (fp32); per-row temperature, top_k, top_p, seed, index (and min_p) [B]
    -> tokens [B].

    `all_greedy` is static: when every row is greedy the sort is skipped entirely.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if all_greedy:
        return greedy
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    keep = (top_k[:, None] == 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above this token
    keep = keep & (before < top_p[:, None])  # the top token always survives (before = 0)
    if min_p is not None:  # relative to the most likely token (after temperature)
        full = jax.nn.softmax(sorted_logits, axis=-1)
        keep = keep & (full >= min_p[:, None] * full[:, :1])
    masked = jnp.where(keep, sorted_logits, -jnp.inf)

    def draw(row_logits, s, i):
        key = jax.random.fold_in(jax.random.key(s), i)
        return jax.random.categorical(key, row_logits)

    choice = jax.vmap(draw)(masked, seed.astype(jnp.uint32), index)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
