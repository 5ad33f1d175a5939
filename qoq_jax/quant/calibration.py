"""Calibration data and the per-layer forward pass that collects activation statistics.

Calibration runs block by block: only one layer's inputs (``samples x seq_len x hidden``) are
held at a time, so memory stays bounded whatever the depth of the model. Each layer's forward
here is plain JAX in float32 on an unpadded batch (every calibration sample is full length),
with the same math as qoq_jax.model, and returns what the QoQ steps need:

- ``k_absmax``   max |K| per (KV head, channel) after RoPE       -> SmoothAttention
- ``o_absmax``   max |x| per input channel of o_proj             -> v->o smoothing, reordering
- ``down_absmax``max |x| per input channel of down_proj          -> up->down smoothing, reordering
- ``hessians``   X^T X of each projection's input (optional)     -> clipping search, GPTQ
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qoq_jax.config import ModelConfig, rope_inv_freq
from qoq_jax.layers import apply_rope, rms_norm, rope_cos_sin

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Inputs shared by several projections: one Hessian serves all of them.
HESSIAN_OF = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
              "self_attn.o_proj": "o", "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up",
              "mlp.down_proj": "down"}


def calibration_tokens(tokenizer, docs: list[str], samples: int, seq_len: int,
                       seed: int) -> np.ndarray:
    """[samples, seq_len] int32, built as QoQ's reference code builds its Pile set: shuffle the
    documents, tokenize each (no BOS), take a random seq_len window of long ones, stop once there
    are >= `samples` documents and >= samples * seq_len tokens, concatenate, cut into chunks."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    pieces, total = [], 0
    for i in order:
        ids = tokenizer.encode(docs[i], add_special_tokens=False)
        if not ids:
            continue
        if len(ids) > seq_len:
            start = int(rng.integers(0, len(ids) - seq_len + 1))
            ids = ids[start:start + seq_len]
        pieces.append(ids)
        total += len(ids)
        if len(pieces) >= samples and total >= samples * seq_len:
            break
    flat = np.concatenate([np.asarray(p, np.int32) for p in pieces]) if pieces else np.zeros(0)
    n = min(samples, len(flat) // seq_len)
    if n == 0:
        raise ValueError(f"the calibration text has {len(flat)} tokens: not one sample of "
                         f"{seq_len}")
    return flat[:n * seq_len].reshape(n, seq_len).astype(np.int32)


@dataclasses.dataclass
class LayerStats:
    k_absmax: np.ndarray  # [Hkv * D]
    o_absmax: np.ndarray  # [Hq * D]
    down_absmax: np.ndarray  # [F]
    hessians: dict[str, np.ndarray] | None  # "qkv", "o", "gate_up", "down" -> [K, K]
    tokens: int


def _linear(w, name, x):
    y = jnp.einsum("...k,nk->...n", x, w[name + ".weight"])
    if name + ".bias" in w:
        y = y + w[name + ".bias"]
    return y


@functools.partial(jax.jit, static_argnames=("cfg", "hessians"))
def _layer(w: dict, cfg: ModelConfig, x: jax.Array, hessians: bool):
    """One decoder layer on x [S, T, D] (float32): returns (output, statistics)."""
    s, t, _ = x.shape
    hd, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    cos, sin = rope_cos_sin(jnp.arange(t)[None, :], rope_inv_freq(cfg))
    h = rms_norm(x, w["input_layernorm.weight"], cfg.rms_norm_eps)
    q = _linear(w, "self_attn.q_proj", h).reshape(s, t, hq, hd)
    k = _linear(w, "self_attn.k_proj", h).reshape(s, t, hkv, hd)
    v = _linear(w, "self_attn.v_proj", h).reshape(s, t, hkv, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    g = hq // hkv
    scores = jnp.einsum("sqhgd,skhd->shgqk", q.reshape(s, t, hkv, g, hd), k) * hd ** -0.5
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    attn = jnp.einsum("shgqk,skhd->sqhgd", jax.nn.softmax(scores, axis=-1), v)
    o_in = attn.reshape(s, t, hq * hd)
    x = x + _linear(w, "self_attn.o_proj", o_in)
    h2 = rms_norm(x, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    gate, up = _linear(w, "mlp.gate_proj", h2), _linear(w, "mlp.up_proj", h2)
    down_in = jax.nn.silu(gate) * up
    x = x + _linear(w, "mlp.down_proj", down_in)

    def amax(a):
        return jnp.abs(a).reshape(-1, a.shape[-1]).max(axis=0)

    def gram(a):
        a = a.reshape(-1, a.shape[-1])
        return a.T @ a

    stats = {"k_absmax": amax(k.reshape(s, t, hkv * hd)), "o_absmax": amax(o_in),
             "down_absmax": amax(down_in)}
    if hessians:
        stats.update(h_qkv=gram(h), h_o=gram(o_in), h_gate_up=gram(h2), h_down=gram(down_in))
    return x, stats


def run_layer(w: dict[str, np.ndarray], cfg: ModelConfig, x: np.ndarray, *,
              hessians: bool = False, chunk: int = 8) -> tuple[np.ndarray, LayerStats]:
    """Run one layer (weights named relative to the layer: "self_attn.q_proj.weight", ...) on the
    calibration inputs x [S, T, D], `chunk` samples at a time; returns (outputs, statistics)."""
    wj = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
    outs, acc = [], None
    for start in range(0, x.shape[0], chunk):
        y, st = _layer(wj, cfg, jnp.asarray(x[start:start + chunk], jnp.float32), hessians)
        outs.append(np.asarray(y))
        st = {k: np.asarray(v, np.float64) for k, v in st.items()}
        if acc is None:
            acc = st
        else:
            for k, v in st.items():
                acc[k] = np.maximum(acc[k], v) if k.endswith("absmax") else acc[k] + v
    h = ({"qkv": acc["h_qkv"], "o": acc["h_o"], "gate_up": acc["h_gate_up"],
          "down": acc["h_down"]} if hessians else None)
    return np.concatenate(outs), LayerStats(acc["k_absmax"], acc["o_absmax"], acc["down_absmax"],
                                            h, x.shape[0] * x.shape[1])
