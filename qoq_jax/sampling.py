"""Token sampling: greedy, temperature, top-k and top-p, with per-sequence parameters.

Every row of a batch carries its own parameters and seed, and its random key is derived from
(seed, index of the token in that sequence) only, so a request samples the same tokens whatever
else shares its batch: what in-flight batching needs to stay reproducible.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           seed: jax.Array, index: jax.Array, *, all_greedy: bool = False) -> jax.Array:
    """logits [B, V] (fp32); per-row temperature, top_k, top_p, seed, index [B] -> tokens [B].

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
    masked = jnp.where(keep, sorted_logits, -jnp.inf)

    def draw(row_logits, s, i):
        key = jax.random.fold_in(jax.random.key(s), i)
        return jax.random.categorical(key, row_logits)

    choice = jax.vmap(draw)(masked, seed.astype(jnp.uint32), index)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
