"""Causal attention over the 16-bit q/k/v of a batch of prompts (prefill).

As in QServe, prefill attends over the fresh, unquantized q/k/v of the prompt; the paged cache is
written (by the model) but not read here. Prompts of different lengths share one padded batch:
query i of sequence b sees keys j <= i with j < lengths[b].

This module holds the XLA reference; the flash-style Pallas kernel comes with the KV4 work
(issue #4) behind the same signature.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def prefill_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                          *, scale: float | None = None) -> jax.Array:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D], lengths [B] -> [B, T, Hq, D] (dtype of q).

    GQA: query head h reads KV head h // (Hq // Hkv). Scores and softmax in fp32.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, hkv, g, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    qi = jnp.arange(t)[:, None]
    kj = jnp.arange(t)[None, :]
    mask = (kj <= qi)[None] & (kj[None] < lengths[:, None, None])  # [B, T, T]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, hq, d).astype(q.dtype)


def prefill_attention(q, k, v, lengths, *, scale=None, backend: str = "auto",
                      interpret: bool = False) -> jax.Array:
    """Public entry point. backend: "auto" | "xla" | "pallas" (Pallas lands with issue #4)."""
    if backend == "pallas" or interpret:
        raise NotImplementedError("the Pallas prefill-attention kernel is not built yet (issue #4)")
    if backend not in ("auto", "xla"):
        raise ValueError(f"backend must be 'auto', 'xla' or 'pallas', not {backend!r}")
    return prefill_attention_xla(q, k, v, lengths, scale=scale)
