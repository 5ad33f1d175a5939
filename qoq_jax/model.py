"""The Llama-family transformer (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3; Mixtral and
Qwen3-MoE with the mixture-of-experts layers of qoq_jax.moe) in Flax NNX.

The modules hold the weights, named after Hugging Face's so that loading is a mechanical
mapping; the decoder layers are created once with a leading layer axis (``nnx.vmap``) and run
with ``lax.scan``, so a 30- or 80-layer model compiles as one layer. One free function runs it:

- ``forward(model, batch, cache)``: a ragged batch (``TokenBatch``): a flat axis of tokens from
  several sequences (decode rows of one token, prefill chunks of many, mixed freely), each at
  its positions; writes their K/V into the paged cache, then every token attends over what the
  cache holds for its sequence up to its own position. A long prompt is several chunks, so
  prefill memory is bounded by the chunk, not the prompt.
- ``TokenBatch.padded`` builds a batch from [B, T] right-padded rows, and ``prefill`` /
  ``decode_step`` are the two common uses of it (tests, notebooks).

The cache is a ``PagedKVCache`` (16-bit) or a ``PagedKV4Cache`` (QServe's 4-bit KV); the model
only calls its ``write`` and ``attention``. Attention and cache writes go through
``pallas_kernels`` (which kernels: the cache's static ``backend``). Unlike QServe, prefill
attends over K/V as the cache stores them (KV4: quantized), not over the fresh 16-bit values: a
token is then computed the same way in a prompt, a later chunk or a decode step, which chunked
prefill and recompute preemption need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qoq_jax.config import ModelConfig
from qoq_jax.hf import CheckpointError, canonical_weights
from pallas_kernels.paged_attention import ragged_layout
from qoq_jax.kv_cache import slot_indices
from qoq_jax.quant.hadamard import rotation_matrix
from pallas_kernels.quantize import QuantizedActivation, quantize_sharded_rows
from qoq_jax.layers import (Embedding, LinearFactory, QuantParam, RMSNorm, W4A8Linear,
                            apply_rope, make_linear, norm_input, model_rope, swiglu_input)
from qoq_jax.moe import MoE


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, linear: LinearFactory | None = None):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = make_linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias, dtype=dtype, factory=linear)
        self.k_proj = make_linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, factory=linear)
        self.v_proj = make_linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias, dtype=dtype, factory=linear)
        self.o_proj = make_linear(cfg.num_heads * hd, d, bias=cfg.o_bias, dtype=dtype, factory=linear)
        if cfg.qk_norm:  # Qwen3: one [head_dim] weight each, shared by the heads
            self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype)
        if cfg.key_scale:  # SmoothAttention in the rotated basis (ModelConfig.key_scale)
            self.key_scale = nnx.Param(jnp.ones((cfg.num_kv_heads, hd), jnp.float32))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, linear: LinearFactory | None = None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = make_linear(d, f, bias=cfg.mlp_bias, dtype=dtype, factory=linear)
        self.up_proj = make_linear(d, f, bias=cfg.mlp_bias, dtype=dtype, factory=linear)
        self.down_proj = make_linear(f, d, bias=cfg.mlp_bias, dtype=dtype, factory=linear)

    def __call__(self, h) -> jax.Array:
        gate, up = mlp_gate_up(self, h)
        return self.down_proj(swiglu_input(gate, up, self.down_proj))


def first_projection(module: nnx.Module) -> nnx.Module:
    """The projection that reads a block's normalised input (q_proj or qkv_proj; gate_proj or
    gate_up_proj; an MoE's router): its kind decides whether the norm is fused with INT8
    quantization."""
    for name in ("qkv_proj", "q_proj", "gate_up_proj", "gate_proj", "gate"):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"{type(module).__name__} has no input projection")


def mlp_gate_up(mlp: MLP, h) -> tuple[jax.Array, jax.Array]:
    """(gate, up) projections of h: two GEMMs, or one of the fused gate_up_proj."""
    if hasattr(mlp, "gate_up_proj"):
        both = mlp.gate_up_proj(h)
        half = both.shape[-1] // 2
        return both[..., :half], both[..., half:]
    return mlp.gate_proj(h), mlp.up_proj(h)


def attention_qkv(attn: "Attention", cfg: ModelConfig, h):
    """q, k, v [..., heads, head_dim] of h: three GEMMs, or one of the fused qkv_proj (whose
    outputs are q, k, v in that order: on a tensor-parallel shard, its own heads of each)."""
    lead = h.values.shape[:-1] if hasattr(h, "values") else h.shape[:-1]
    if hasattr(attn, "qkv_proj"):
        qkv = attn.qkv_proj(h)
        n, hq, hkv = qkv.shape[-1], cfg.num_heads, cfg.num_kv_heads
        nq, nk = n * hq // (hq + 2 * hkv), n * hkv // (hq + 2 * hkv)
        parts = (qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:])
    else:
        parts = (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
    return tuple(a.reshape(*lead, -1, cfg.head_dim) for a in parts)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, linear: LinearFactory | None = None):
        self.self_attn = Attention(cfg, dtype, linear)
        # (an MoE's router stays 16-bit; its experts follow `linear`: qoq_jax.moe)
        self.mlp = MoE(cfg, dtype, linear) if cfg.is_moe else MLP(cfg, dtype, linear)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, linear: LinearFactory | None = None):
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nnx.vmap(lambda: DecoderLayer(cfg, dtype, linear), axis_size=cfg.num_layers,
                               in_axes=(), out_axes=0)()
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        make_linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype))

    def logits(self, h: jax.Array) -> jax.Array:
        h = self.norm(h)
        if self.lm_head is None:
            return self.embed_tokens.attend(h)
        return self.lm_head(h).astype(jnp.float32)


def _layer_forward(layer: DecoderLayer, cfg: ModelConfig, x, cos, sin, cache, layer_idx,
                   page, slot, attend, axis=None):
    """One decoder layer: write this step's K/V into the cache, then attend over the cache
    (`attend(q_rot, cache, layer_idx)`), then the MLP.

    axis: None, or the mesh axis this runs sharded over (inside shard_map, tensor parallel):
    the layer then holds its shard of the heads and MLP channels (head counts come from the
    arrays' shapes), and o_proj / down_proj sum their partial products over `axis`."""
    lead = x.shape[:-1]  # [T] for a ragged batch ([B, T] in calibration)
    attn = layer.self_attn
    # float, or INT8 for W4A8 layers
    h = norm_input(layer.input_layernorm, x, first_projection(attn))
    q, k, v = attention_qkv(attn, cfg, h)
    if cfg.qk_norm:  # per head, before RoPE (Qwen3)
        q, k = attn.q_norm(q), attn.k_norm(k)
    if cfg.key_rotation:
        # Rotate q and k per head after RoPE (scores unchanged); the cache then gets keys that
        # already carry RoPE, so its fused RoPE runs with the identity angles (cos 1, sin 0).
        k, q = (rotate_heads(apply_rope(a, cos, sin)) for a in (k, q))
        if cfg.key_scale:
            k, q = scale_keys(k, q, attn.key_scale[...])
        cache = cache.write(layer_idx, k, v, jnp.ones_like(cos), jnp.zeros_like(sin), page, slot)
        o = attend(q, cache, layer_idx).reshape(*lead, -1)
    else:
        cache = cache.write(layer_idx, k, v, cos, sin, page, slot)  # RoPE on k happens inside
        o = attend(apply_rope(q, cos, sin), cache, layer_idx).reshape(*lead, -1)
    x = x + (attn.o_proj(o) if axis is None else _row_parallel(attn.o_proj, o, axis))
    x = x + _mlp(layer.mlp, norm_input(layer.post_attention_layernorm, x,
                                       first_projection(layer.mlp)), axis)
    return x, cache


def rotate_heads(x: jax.Array) -> jax.Array:
    """x [..., D] @ the orthogonal Hadamard of size D (computed in float32)."""
    r = jnp.asarray(rotation_matrix(x.shape[-1]), jnp.float32)
    return (x.astype(jnp.float32) @ r).astype(x.dtype)


def scale_keys(k: jax.Array, q: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k [..., Hkv, D] / scale [Hkv, D] and q [..., Hq, D] x scale (each query head by its
    KV head's row): q.k is unchanged, but the KV4 cache rounds the scaled keys."""
    *lead, hkv, d = k.shape
    s = scale.astype(jnp.float32)
    k_s = (k.astype(jnp.float32) / s).astype(k.dtype)
    q_s = (q.astype(jnp.float32).reshape(*lead, hkv, -1, d) * s[:, None]).reshape(q.shape)
    return k_s, q_s.astype(q.dtype)


def _row_parallel(linear, x, axis):
    """A row-parallel projection inside shard_map: x holds this device's slice of K. A W4A8
    layer's float input is quantized with the whole row's scale (quantize_sharded_rows); the
    partial products (float32, before the bias) are summed with one psum, then the bias."""
    if isinstance(linear, W4A8Linear) and not isinstance(x, QuantizedActivation):
        x = quantize_sharded_rows(x, axis, with_sum=linear.needs_row_sum)
    return linear.finish(jax.lax.psum(linear.product(x), axis))


def _mlp(mlp: MLP, h, axis):
    if isinstance(mlp, MoE):
        return mlp(h, axis)
    if axis is None:
        return mlp(h)
    gate, up = mlp_gate_up(mlp, h)
    if isinstance(mlp.down_proj, W4A8Linear):
        act = quantize_sharded_rows(gate, axis, up=up, with_sum=mlp.down_proj.needs_row_sum)
    else:
        act = jax.nn.silu(gate) * up
    return _row_parallel(mlp.down_proj, act, axis)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """A ragged batch: T tokens of up to S sequences on one flat axis (int32 unless said).

    Per token [T]: ``tokens``, ``positions`` and ``token_seq`` (its sequence, -1 for padding:
    no K/V is stored for it, its output is garbage). Per sequence [S]: ``q_start`` (index of
    its first token), ``q_len`` (its tokens here; 0 for an unused row), ``kv_len`` (keys it has
    once this batch is written: its last position + 1), ``page_table`` [S, max_pages] (its
    pages; unused entries the scratch page). A sequence's tokens are consecutive on the axis
    at consecutive positions; decode rows are sequences of one token.
    """

    tokens: jax.Array
    positions: jax.Array
    token_seq: jax.Array
    q_start: jax.Array
    q_len: jax.Array
    kv_len: jax.Array
    page_table: jax.Array

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def last_token(self) -> jax.Array:
        """[S] index of each sequence's last token (where its next-token logits are)."""
        return jnp.maximum(self.q_start + self.q_len - 1, 0)

    @property
    def q_pos0(self) -> jax.Array:
        """[S] position of each sequence's first token here."""
        return self.kv_len - self.q_len

    @classmethod
    def padded(cls, tokens, start, lengths, page_table) -> "TokenBatch":
        """Rows [B, Q] right-padded (row b: lengths[b] real tokens at positions start[b] + i,
        pages page_table[b]) as a ragged batch of B sequences on a flat axis of B * Q."""
        b, q = tokens.shape
        i = jnp.arange(q, dtype=jnp.int32)[None, :]
        real = i < lengths[:, None]
        seq = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, q))
        return cls(tokens=tokens.reshape(-1).astype(jnp.int32),
                   positions=(start[:, None] + i).reshape(-1).astype(jnp.int32),
                   token_seq=jnp.where(real, seq, -1).reshape(-1),
                   q_start=(jnp.arange(b, dtype=jnp.int32) * q),
                   q_len=lengths.astype(jnp.int32),
                   kv_len=(start + lengths).astype(jnp.int32),
                   page_table=page_table.astype(jnp.int32))


# Query tokens per attention work item in a batch with prefill chunks (decode-only batches use
# 1: one item per row). A sequence is cut into items from its first token, so the cut never
# depends on the rest of the batch.
PREFILL_BLOCK_Q = 16


def _run_layers(model: Transformer, x, batch: TokenBatch, cache, attend, axis=None):
    cfg = model.config
    cos, sin = model_rope(cfg, batch.positions)
    page, slot = slot_indices(batch.page_table, batch.token_seq, batch.positions,
                              cache.page_size)
    graphdef, stacked = nnx.split(model.layers)

    def body(carry, xs):
        x, cache = carry
        layer_state, layer_idx = xs
        layer = nnx.merge(graphdef, layer_state)
        return _layer_forward(layer, cfg, x, cos, sin, cache, layer_idx, page, slot, attend,
                              axis), None

    (x, cache), _ = jax.lax.scan(body, (x, cache), (stacked, jnp.arange(cfg.num_layers)))
    return x, cache


def forward(model: Transformer, batch: TokenBatch, cache, *, block_q: int = PREFILL_BLOCK_Q,
            splits: int = 1, all_logits: bool = False, mesh=None):
    """The one forward pass over a ragged batch (see TokenBatch). Returns (logits, cache):
    logits [S, V] at each sequence's last token, or [T, V] at every token with all_logits.

    K/V of the real tokens are written to the cache first, then every query attends over all
    the keys its sequence has in the cache up to its own position. ``block_q``: queries per
    attention work item (1 for decode-only batches); ``splits`` splits long decode contexts on
    a GPU. Both are static.

    mesh: a Mesh (or AbstractMesh) with a "tp" axis of size > 1 runs the pass tensor-parallel
    (qoq_jax.sharding): per device under shard_map, the weights and the cache split by the
    sharding rules, the rest replicated; the logits come back split over the vocabulary.
    """
    from qoq_jax import sharding

    if sharding.tp_size(mesh) > 1:
        return _forward_sharded(model, batch, cache, block_q, splits, all_logits, mesh)
    return _forward_local(model, batch, cache, block_q, splits, all_logits)


def _forward_sharded(model, batch, cache, block_q, splits, all_logits, mesh):
    from jax.sharding import PartitionSpec as P

    from qoq_jax import sharding

    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    cache_specs = sharding.cache_specs(cache)

    def local(leaves, batch, cache):
        shard = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        return _forward_local(shard, batch, cache, block_q, splits, all_logits,
                              axis=sharding.AXIS)

    batch_specs = jax.tree.map(lambda _: P(), batch)
    # check_vma=False: the Pallas kernels have no replication rules
    run = jax.shard_map(local, mesh=mesh, check_vma=False,
                        in_specs=(sharding.state_specs(state), batch_specs, cache_specs),
                        out_specs=(P(None, sharding.AXIS), cache_specs))
    return run(leaves, batch, cache)


def _embed(model: Transformer, tokens, axis):
    if axis is None:
        return model.embed_tokens(tokens)
    # vocabulary-parallel lookup: rows this shard holds, zeros elsewhere, summed (exact)
    w = model.embed_tokens.weight[...]
    local = tokens - jax.lax.axis_index(axis) * w.shape[0]
    inside = (local >= 0) & (local < w.shape[0])
    x = jnp.take(w, jnp.where(inside, local, 0), axis=0)
    return jax.lax.psum(jnp.where(inside[..., None], x, jnp.zeros_like(x)), axis)


def _forward_local(model, batch: TokenBatch, cache, block_q, splits, all_logits, axis=None):
    t = batch.num_tokens
    layout = ragged_layout(batch.q_start, batch.q_len, batch.q_pos0, batch.kv_len,
                           batch.page_table, num_tokens=t, block_q=block_q)

    def attend(q, cache, layer_idx):
        return cache.attention(q, layer_idx, layout, splits)

    x = _embed(model, batch.tokens, axis)
    h, cache = _run_layers(model, x, batch, cache, attend, axis)
    if not all_logits:
        h = h[batch.last_token]
    return model.logits(h), cache


def prefill(model: Transformer, tokens: jax.Array, lengths: jax.Array, cache,
            page_table: jax.Array, *, all_logits: bool = False):
    """Whole prompts in one chunk: tokens [B, T] right-padded, lengths [B] (see forward).
    Returns logits [B, V] at each prompt's last token, or [B, T, V] with all_logits."""
    b, t = tokens.shape
    batch = TokenBatch.padded(tokens, jnp.zeros((b,), jnp.int32), lengths, page_table)
    logits, cache = forward(model, batch, cache, all_logits=all_logits)
    return (logits.reshape(b, t, -1) if all_logits else logits), cache


def decode_step(model: Transformer, tokens: jax.Array, positions: jax.Array, active: jax.Array,
                cache, page_table: jax.Array, *, splits: int = 1, mesh=None):
    """One new token per sequence: tokens, positions, active [B] -> (logits [B, V], cache).

    The token at `positions[b]` is written to the cache and attends over positions 0..pos.
    Inactive rows (idle slots, finished sequences) write to the scratch page only.
    """
    batch = TokenBatch.padded(tokens[:, None], positions, active.astype(jnp.int32), page_table)
    return forward(model, batch, cache, block_q=1, splits=splits, mesh=mesh)


# ----------------------------------------------------------------------------------------------
# The runtime layout: fused projections

# the output-feature axis of each variable of a projection (Linear or W4A8Linear, stacked)
_N_AXIS = {"weight": -2, "qweight": -2, "int8_weight": -2}


def _concat_outputs(parts: list[nnx.Module], tp: int) -> nnx.Module:
    """One projection computing what `parts` (same input, same format) compute, outputs
    concatenated; with tp > 1 in shard-major order (each of the tp equal blocks of N holds that
    shard's outputs of every part), so a column-parallel split still gives each device its
    own outputs of each part."""
    fused = nnx.clone(parts[0])
    for name, var in list(vars(parts[0]).items()):
        if not isinstance(var, nnx.Variable):
            continue
        axis = _N_AXIS.get(name, -1)
        values = [getattr(p, name)[...] for p in parts]
        blocks = [jnp.split(v, tp, axis=axis) for v in values]
        setattr(fused, name, type(var)(jnp.concatenate(
            [b[i] for i in range(tp) for b in blocks], axis=axis)))
    fused.out_features = sum(p.out_features for p in parts)
    return fused


def fuse_projections(model: Transformer, tensor_parallel: int = 1) -> Transformer:
    """`model` with q/k/v_proj as one qkv_proj and gate/up_proj as one gate_up_proj: one GEMM
    each instead of three and two (fewer, larger dots; docs/PERFORMANCE.md). A new module tree
    that shares every other array with `model`, which stays as checkpoints store it."""
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)
    attn, mlp = out.layers.self_attn, out.layers.mlp
    if not hasattr(attn, "qkv_proj"):
        attn.qkv_proj = _concat_outputs([attn.q_proj, attn.k_proj, attn.v_proj],
                                        tensor_parallel)
        del attn.q_proj, attn.k_proj, attn.v_proj
    if hasattr(mlp, "gate_proj"):  # (an MoE layer's experts stay as they are)
        mlp.gate_up_proj = _concat_outputs([mlp.gate_proj, mlp.up_proj], tensor_parallel)
        del mlp.gate_proj, mlp.up_proj
    return out


# ----------------------------------------------------------------------------------------------
# Loading Hugging Face weights


def hf_name(path: tuple, layer: int | None = None) -> str:
    """NNX parameter path -> Hugging Face tensor name (the modules mirror HF's names).

    Quantized layers extend the scheme: model.layers.3.mlp.up_proj.{qweight,s1,s2,szero,...}.
    """
    parts = [str(p) for p in path]
    if parts[0] == "layers":
        return f"model.layers.{layer}." + ".".join(parts[1:])
    if parts[0] == "lm_head":
        return "lm_head.weight"
    return "model." + ".".join(parts)


def from_hf_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray], dtype=jnp.float32,
                    linear: LinearFactory | None = None, mesh=None) -> Transformer:
    """Build the model from HF-named tensors, checking every name and shape.

    With a quantized `linear` factory, `weights` also holds the packed formats under the
    extended names (see hf_name); those are taken bit for bit, never cast.

    mesh (tensor parallel, see qoq_jax.sharding): every parameter is created sharded, each
    device's block read from the checkpoint as it is placed (jax.make_array_from_callback,
    one layer's tensor at a time), so the whole model never sits on one host or device.
    """
    from qoq_jax import sharding

    weights = canonical_weights(cfg, weights)  # Phi-3's fused projections split
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype, linear))
    if mesh is not None:
        sharding.check_tensor_parallel(abstract, sharding.tp_size(mesh))
    graphdef, state = nnx.split(abstract)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if not isinstance(var, (nnx.Param, QuantParam)):
            flat.append((path, var))
            continue
        exact = isinstance(var, QuantParam)
        shape = tuple(var.shape)

        def read(index=(), path=path, shape=shape, var=var, exact=exact):
            index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
            if path[0] == "layers":
                return np.stack([
                    _get(weights, hf_name(path, i), shape[1:], var.dtype, exact)[index[1:]]
                    for i in range(cfg.num_layers)[index[0]]])
            return _get(weights, hf_name(path), shape, var.dtype, exact)[index]

        if mesh is None:
            value = jnp.asarray(read(), dtype=var.dtype)
        else:
            spec = sharding.spec_for(sharding.logical_axes(path, len(shape)))
            value = jax.make_array_from_callback(
                shape, jax.sharding.NamedSharding(mesh, spec),
                lambda index, read=read, dt=var.dtype: np.asarray(read(index), dtype=dt))
        flat.append((path, var.replace(value=value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _get(weights: Mapping[str, np.ndarray], name: str, shape: tuple, dtype, exact: bool):
    if name not in weights:
        raise CheckpointError(f"checkpoint has no tensor {name!r}")
    w = weights[name]
    if tuple(w.shape) != tuple(shape):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(w.shape)}, but the config implies {tuple(shape)}")
    if exact:
        if np.dtype(w.dtype) != np.dtype(dtype):
            raise CheckpointError(f"tensor {name!r} is {w.dtype}, the format needs {dtype}")
        return w
    return np.asarray(w, dtype=np.float32) if w.dtype != np.float32 else w
