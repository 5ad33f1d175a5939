"""Calibration data, and one decoder layer run on it to collect what the QoQ steps need.

Calibration runs block by block: only one layer's inputs (``samples x seq_len x hidden``) are
held at a time, so memory stays bounded whatever the depth of the model. The layer that runs is
the model's own (``qoq_jax.model.DecoderLayer`` through ``model._layer_forward``), built in
float32 from the layer's transformed weights, with two changes that leave its math alone:

- its projections are ``RecordingLinear``s, which ``sow`` their inputs (nnx.Intermediate);
- its KV cache is a ``DenseKV``: whole sequences, keys after RoPE, causal attention over them.

From one run it returns the layer's outputs (the next layer's inputs) and:

- ``k_absmax`` / ``q_absmax``  max |K| / |Q| per (head, channel) after RoPE -> SmoothAttention
- ``o_absmax``   max |x| per input channel of o_proj             -> v->o smoothing, reordering
- ``down_absmax``max |x| per input channel of down_proj          -> up->down smoothing, reordering
- ``hessians``   X^T X of each projection's input (optional)     -> clipping search, GPTQ
- ``captured``   the activations the transform searches need (h, q, k, v after RoPE, o_proj and
                 down_proj inputs) for the first few samples (optional, see ``capture``)

A mixture-of-experts layer (qoq_jax.moe) records its experts' inputs per expert instead of the
MLP's: ``down_absmax`` [E, F], the ``gate_up`` / ``down`` Hessians [E, K, K] of the rows routed
to each expert (jax.lax.ragged_dot contracting over the sorted rows), ``expert_tokens`` [E]
(rows routed to each) and, captured, up to ``capture`` samples' worth of each expert's down_proj
input rows (``captured["down_in"]``: a list of E arrays).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.grouped_w4a8_matmul.xla import row_groups
from qoq_jax.config import ModelConfig
from qoq_jax.layers import Linear, apply_rope, model_rope
from qoq_jax.moe import ExpertLinear, register_expert_class

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Inputs shared by several projections: one Hessian serves all of them.
HESSIAN_OF = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
              "self_attn.o_proj": "o", "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up",
              "mlp.down_proj": "down"}
# The projection whose recorded input each Hessian is taken from.
INPUT_OF = {"qkv": ("self_attn", "q_proj"), "o": ("self_attn", "o_proj"),
            "gate_up": ("mlp", "gate_proj"), "down": ("mlp", "down_proj")}
# In a mixture-of-experts layer the MLP's inputs are its experts' (sorted rows, per expert).
EXPERT_INPUT_OF = {"gate_up": ("mlp", "experts", "gate_proj"),
                   "down": ("mlp", "experts", "down_proj")}


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


class RecordingLinear(Linear):
    """The float Linear, recording its input with ``sow`` (calibration only)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        self.sow(nnx.Intermediate, "input", x)
        return super().__call__(x)


class RecordingExpertLinear(ExpertLinear):
    """The float stacked experts, recording their sorted input rows and group sizes."""

    def product(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        self.sow(nnx.Intermediate, "input", x)
        self.sow(nnx.Intermediate, "group_sizes", group_sizes)
        return super().product(x, group_sizes)


register_expert_class(RecordingLinear, RecordingExpertLinear)

# x^T x per group of rows: the ragged dimension (rows) contracted, one [K, K] per group
_GRAM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[])


def expert_hessians(rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """[E, K, K]: X_e^T X_e of the rows [M, K] (sorted by expert) routed to each expert."""
    return jax.lax.ragged_dot_general(rows, rows, group_sizes, _GRAM_DIMS,
                                      preferred_element_type=jnp.float32)


def expert_absmax(rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """[E, K]: max |x| per input channel over each expert's rows (0 for an expert with none)."""
    g, inside = row_groups(group_sizes, rows.shape[0])
    a = jnp.where(inside[:, None], jnp.abs(rows), 0.0)
    return jax.ops.segment_max(a, g, num_segments=group_sizes.shape[0]).clip(min=0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DenseKV:
    """The calibration stand-in for the paged cache: one layer's whole sequences, float32,
    keys after RoPE. Same ``write`` interface as the paged caches (pages are not used)."""

    k: Any = None  # [S, T, Hkv, D]
    v: Any = None

    def write(self, layer, k, v, cos, sin, page, slot) -> "DenseKV":
        return DenseKV(apply_rope(k, cos, sin), v)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Dense causal attention in float32: q [S, T, Hq, D], k/v [S, T, Hkv, D] -> [S, T, Hq, D]."""
    s, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(s, t, hkv, hq // hkv, d).astype(jnp.float32)
    scores = jnp.einsum("sqhgd,skhd->shgqk", qg, k.astype(jnp.float32)) * d ** -0.5
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    out = jnp.einsum("shgqk,skhd->sqhgd", jax.nn.softmax(scores, axis=-1), v.astype(jnp.float32))
    return out.reshape(s, t, hq, d)


def layer_module(w: dict[str, np.ndarray], cfg: ModelConfig) -> nnx.Module:
    """The model's DecoderLayer with RecordingLinear projections, filled from weights named
    relative to the layer ("self_attn.q_proj.weight", ...)."""
    from qoq_jax.model import DecoderLayer

    abstract = nnx.eval_shape(lambda: DecoderLayer(cfg, jnp.float32, RecordingLinear))
    graphdef, state = nnx.split(abstract)
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        if name not in w:
            raise KeyError(f"calibration: no weight {name!r} for the layer")
        flat.append((path, var.replace(value=jnp.asarray(w[name], jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@functools.partial(jax.jit, static_argnames=("cfg", "hessians", "capture"))
def _calibrate(graphdef, state, cfg: ModelConfig, x: jax.Array, hessians: bool, capture: int):
    """The layer on x [S, T, D]: (outputs, statistics, captured activations of `capture` rows)."""
    from qoq_jax.model import _layer_forward

    layer = nnx.merge(graphdef, state)
    s, t, _ = x.shape
    cos, sin = model_rope(cfg, jnp.arange(t)[None, :])
    seen = {}

    def attend(q, cache, layer_idx):
        seen["q"] = q
        o = causal_attention(q, cache.k, cache.v)
        seen["k"], seen["v"] = cache.k, cache.v
        return o.astype(q.dtype)

    def run(layer):
        return _layer_forward(layer, cfg, x, cos, sin, DenseKV(), 0, None, None, attend)[0]

    y, sown = nnx.capture(run, nnx.Intermediate)(layer)
    moe = cfg.is_moe
    where = dict(INPUT_OF, **(EXPERT_INPUT_OF if moe else {}))
    inputs = {name: _sown(sown, path)["input"][0] for name, path in where.items()}

    def amax(a):  # per channel; heads and head_dim flattened for q/k [S, T, H, D]
        return jnp.abs(a.reshape(s * t, -1)).max(axis=0)

    stats = {"k_absmax": amax(seen["k"]), "q_absmax": amax(seen["q"]),
             "o_absmax": amax(inputs["o"])}
    if moe:
        sizes = _sown(sown, EXPERT_INPUT_OF["down"])["group_sizes"][0]
        stats["down_absmax"] = expert_absmax(inputs["down"], sizes)
        stats["expert_tokens"] = sizes
    else:
        stats["down_absmax"] = amax(inputs["down"])
    if hessians:
        for name, a in inputs.items():
            a = a.reshape(-1, a.shape[-1])
            stats["h_" + name] = (expert_hessians(a, sizes) if moe and name in EXPERT_INPUT_OF
                                  else a.T @ a)
    captured = {}
    if capture:
        captured = {"h": inputs["qkv"][:capture], "q": seen["q"][:capture],
                    "k": seen["k"][:capture], "v": seen["v"][:capture],
                    "o_in": inputs["o"][:capture]}
        # an MoE's down_proj rows mix the chunk's samples (sorted by expert): all of them,
        # with the group sizes; run_layer keeps each expert's first rows
        captured["down_in"] = inputs["down"] if moe else inputs["down"][:capture]
        if moe:
            captured["down_sizes"] = sizes
    return y, stats, captured


def _sown(sown, path: tuple[str, ...]):
    for p in path:
        sown = sown[p]
    return sown


@dataclasses.dataclass
class LayerStats:
    k_absmax: np.ndarray  # [Hkv * D]
    q_absmax: np.ndarray  # [Hq * D]
    o_absmax: np.ndarray  # [Hq * D]
    down_absmax: np.ndarray  # [F] ([E, F] for experts)
    # "qkv", "o", "gate_up", "down" -> [K, K] (experts' "gate_up", "down": [E, K, K])
    hessians: dict[str, np.ndarray] | None
    tokens: int
    captured: dict[str, Any] | None = None  # see the module docstring
    expert_tokens: np.ndarray | None = None  # [E] rows routed to each expert (MoE layers)


def run_layer(w: dict[str, np.ndarray], cfg: ModelConfig, x: np.ndarray, *,
              hessians: bool = False, capture: int = 0,
              chunk: int = 8) -> tuple[np.ndarray, LayerStats]:
    """Run one layer (weights named relative to the layer) on the calibration inputs
    x [S, T, D], `chunk` samples at a time; returns (outputs, statistics). `capture` > 0 also
    returns the searches' activations of the first `capture` samples."""
    graphdef, state = nnx.split(layer_module(w, cfg))
    outs, acc, captured = [], None, None
    for start in range(0, x.shape[0], chunk):
        rows = min(capture - start, chunk) if capture > start else 0
        y, st, cap = _calibrate(graphdef, state, cfg, jnp.asarray(x[start:start + chunk],
                                                                   jnp.float32), hessians, rows)
        outs.append(np.asarray(y))
        st = {k: np.asarray(v, np.float64) for k, v in st.items()}
        if rows:
            cap = {k: np.asarray(v) for k, v in cap.items()}
            if cfg.is_moe:  # each expert's rows, at most `capture` samples' worth of tokens
                cap["down_in"] = _expert_rows(cap.pop("down_in"), cap.pop("down_sizes"),
                                              None if captured is None else captured["down_in"],
                                              capture * x.shape[1])
                captured = cap if captured is None else {
                    k: (cap[k] if k == "down_in" else np.concatenate([captured[k], cap[k]]))
                    for k in cap}
            else:
                captured = cap if captured is None else {
                    k: np.concatenate([captured[k], cap[k]]) for k in cap}
        if acc is None:
            acc = st
        else:
            for k, v in st.items():
                acc[k] = np.maximum(acc[k], v) if k.endswith("absmax") else acc[k] + v
    h = {name: acc["h_" + name] for name in INPUT_OF} if hessians else None
    experts = acc.get("expert_tokens")
    return np.concatenate(outs), LayerStats(
        acc["k_absmax"], acc["q_absmax"], acc["o_absmax"], acc["down_absmax"], h,
        x.shape[0] * x.shape[1], captured,
        None if experts is None else experts.astype(np.int64))


def _expert_rows(rows: np.ndarray, sizes: np.ndarray, have: list[np.ndarray] | None,
                 limit: int) -> list[np.ndarray]:
    """The sorted rows cut per expert, appended to what each already has, at most `limit`."""
    ends = np.cumsum(sizes)
    out = []
    for e, (lo, hi) in enumerate(zip(ends - sizes, ends)):
        prev = have[e] if have is not None else rows[:0]
        out.append(np.concatenate([prev, rows[lo:hi]])[:limit])
    return out
