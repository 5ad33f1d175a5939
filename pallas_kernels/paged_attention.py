"""Decode attention over a paged KV cache: one query token per sequence.

Cache layout (docs/FORMATS.md): per model a pool ``[L, num_pages, page_size, Hkv, D]`` for K and
one for V; sequence b owns pages ``page_table[b, :]`` (int32) and its first ``lengths[b]`` token
slots are valid. Page 0 is a scratch page that padding writes go to; no sequence reads it.

This module holds the XLA reference for the 16-bit cache; the Pallas kernels (16-bit and KV4)
come with issue #4 behind the same signature.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def paged_decode_attention_xla(q: jax.Array, k_pool: jax.Array, v_pool: jax.Array,
                               layer: jax.Array | int, page_table: jax.Array,
                               lengths: jax.Array, *, scale: float | None = None) -> jax.Array:
    """q [B, Hq, D]; pools [L, N, P, Hkv, D]; page_table [B, maxp]; lengths [B] -> [B, Hq, D].

    Gathers each sequence's pages straight out of the whole pool (the layer index is an input),
    so no per-layer copy of the pool is made.
    """
    b, hq, d = q.shape
    _, _, p, hkv, _ = k_pool.shape
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    k = k_pool[layer, page_table].reshape(b, -1, hkv, d)  # [B, S, Hkv, D]
    v = v_pool[layer, page_table].reshape(b, -1, hkv, d)
    qg = q.reshape(b, hkv, g, d)
    s = jnp.einsum("bhgd,bshd->bhgs", qg, k.astype(q.dtype),
                   preferred_element_type=jnp.float32) * scale
    valid = jnp.arange(k.shape[1])[None, :] < lengths[:, None]  # [B, S]
    s = jnp.where(valid[:, None, None], s, -jnp.inf)
    probs = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgs,bshd->bhgd", probs.astype(q.dtype), v.astype(q.dtype),
                   preferred_element_type=jnp.float32)
    return o.reshape(b, hq, d).astype(q.dtype)


def paged_decode_attention(q, k_pool, v_pool, layer, page_table, lengths, *, scale=None,
                           backend: str = "auto", interpret: bool = False) -> jax.Array:
    """Public entry point. backend: "auto" | "xla" | "pallas" (Pallas lands with issue #4)."""
    if backend == "pallas" or interpret:
        raise NotImplementedError("the Pallas paged-attention kernel is not built yet (issue #4)")
    if backend not in ("auto", "xla"):
        raise ValueError(f"backend must be 'auto', 'xla' or 'pallas', not {backend!r}")
    return paged_decode_attention_xla(q, k_pool, v_pool, layer, page_table, lengths, scale=scale)
