"""Mixture-of-experts layers (Mixtral's block_sparse_moe, Qwen3-MoE's sparse MLP).

A layer's E SwiGLU experts are stacked like the layers are: gate_proj / up_proj [E, F, D],
down_proj [E, D, F]. The router picks each token's top k; the token's k copies are sorted by
expert, so each expert's rows are one contiguous group and every projection is one grouped GEMM
over those groups (group sizes are data, not shapes: one program serves every routing).

Two kinds of stacked projection, as for the dense layers (layers.Linear / W4A8Linear):

- ``ExpertLinear``: float weights, ``jax.lax.ragged_dot`` with float32 accumulation;
- ``W4A8ExpertLinear``: QoQ's W4 formats with a leading expert axis, INT8 activations, the
  grouped W4A8 GEMM (``pallas_kernels.grouped_w4a8_matmul``: the Triton kernel on a GPU, the
  XLA reference on CPU, chosen once by ``gemm_backend`` as W4A8Linear chooses its GEMM; on the
  CPU route ``layers.int8_runtime`` unpacks it to INT8 once like any W4A8Linear).

``expert_factory`` maps a dense projection factory (what ``Transformer(linear=...)`` takes) to
its stacked-expert counterpart, so one factory builds both the dense and the expert layers
(``register_expert_class`` adds a pair: calibration's recording projections).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels._common import fixed_order_sum
from pallas_kernels.grouped_w4a8_matmul import grouped_w4a8_matmul
from pallas_kernels.grouped_w4a8_matmul.xla import RAGGED_DIMS
from pallas_kernels.quantize import (QuantizedActivation, quantize_per_token,
                                     quantize_sharded_rows)
from qoq_jax.config import ModelConfig
from qoq_jax.layers import Linear, LinearFactory, QuantParam, W4A8Linear, make_linear, swiglu_input


class ExpertLinear(nnx.Module):
    """E projections stacked, weight [E, out, in]: each row of x (sorted by expert) times its
    expert's weight, fp32 accumulation (jax.lax.ragged_dot: one program for any routing)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, dtype):
        self.in_features, self.out_features = in_features, out_features
        self.weight = nnx.Param(jnp.zeros((num_experts, out_features, in_features), dtype))

    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        return self.product(x, group_sizes).astype(self.weight.dtype)

    def product(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        w = self.weight[...]
        return jax.lax.ragged_dot_general(x.astype(w.dtype), w, group_sizes, RAGGED_DIMS,
                                          preferred_element_type=jnp.float32)


class W4A8ExpertLinear(W4A8Linear):
    """E W4A8 projections stacked: every field of W4A8Linear with a leading expert axis
    (qweight [E, N, K/2], s1 [E, N], s2 / szero [E, K/g, N]; per-channel scale / szero [E, N]).
    A subclass so that everything that treats W4A8 layers alike (int8_runtime, the tensor-
    parallel checks, the activation-quantization choice) treats these alike too."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, *, dtype,
                 weight_format="g128", gemm_backend: str = "auto"):
        super().__init__(in_features, out_features, bias=False, dtype=dtype,
                         weight_format=weight_format, gemm_backend=gemm_backend)
        self.num_experts = num_experts
        for name, var in list(vars(self).items()):  # the same fields, one per expert
            if isinstance(var, QuantParam):
                v = var[...]
                setattr(self, name, QuantParam(jnp.broadcast_to(v, (num_experts, *v.shape))))

    def __call__(self, x, group_sizes: jax.Array) -> jax.Array:
        return self.finish(self.product(x, group_sizes))

    def product(self, x, group_sizes: jax.Array) -> jax.Array:
        """The grouped GEMM in float32: x (rows sorted by expert; float, or INT8 already)."""
        act = x if isinstance(x, QuantizedActivation) else quantize_per_token(
            x, with_sum=self.needs_row_sum, backend=self.act_backend)
        return grouped_w4a8_matmul(act, self.packed_weight(), group_sizes, jnp.float32,
                                   backend=self.gemm_backend)


# dense projection class -> its stacked-expert counterpart (same keyword arguments)
_EXPERT_CLASSES: dict[type, type] = {Linear: ExpertLinear, W4A8Linear: W4A8ExpertLinear}


def register_expert_class(dense: type, experts: type) -> None:
    """Make `experts` the stacked counterpart of projections made by `dense`."""
    _EXPERT_CLASSES[dense] = experts


def expert_factory(linear: LinearFactory | None):
    """The stacked-expert factory (num_experts, in, out, *, dtype) matching a dense projection
    factory: a class, or a functools.partial of one (its keywords are kept: weight format,
    GEMM backend)."""
    if linear is None:
        return ExpertLinear
    func, keywords = ((linear.func, linear.keywords) if isinstance(linear, functools.partial)
                      else (linear, {}))
    if func not in _EXPERT_CLASSES:
        raise TypeError(f"{getattr(func, '__name__', func)!r} has no stacked-expert "
                        f"counterpart (register_expert_class)")
    return functools.partial(_EXPERT_CLASSES[func], **keywords)


class Experts(nnx.Module):
    """The SwiGLU experts of a mixture-of-experts layer: gate_proj / up_proj [E, F, D],
    down_proj [E, D, F] (F = moe_intermediate_size)."""

    def __init__(self, cfg: ModelConfig, dtype, linear: LinearFactory | None = None):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        make = expert_factory(linear)
        self.gate_proj = make(e, d, f, dtype=dtype)
        self.up_proj = make(e, d, f, dtype=dtype)
        self.down_proj = make(e, f, d, dtype=dtype)

    def __call__(self, rows, group_sizes: jax.Array, axis=None) -> jax.Array:
        """rows [M, D] sorted by expert (float, or INT8 for W4A8 experts) -> float32 [M, D]:
        with tensor parallelism (axis), this device's partial sums over its slice of F."""
        gate = self.gate_proj(rows, group_sizes)
        up = self.up_proj(rows, group_sizes)
        down = self.down_proj
        if isinstance(down, W4A8Linear) and axis is not None:
            # row-parallel: the INT8 scale of the whole row (all shards' F), as dense layers do
            act = quantize_sharded_rows(gate, axis, up=up, with_sum=down.needs_row_sum)
        else:
            act = swiglu_input(gate, up, down)
        return down.product(act, group_sizes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Where a flat batch of T tokens goes: ``weights`` [T, k] (float32, the top-k routing
    weights), ``order`` [T * k] (the token copies sorted by expert: copy i is token i // k's
    i % k-th choice), ``group_sizes`` [E] (rows per expert, int32)."""

    weights: jax.Array
    order: jax.Array
    group_sizes: jax.Array

    @property
    def row_token(self) -> jax.Array:
        """[T * k] the token of each sorted row."""
        return self.order // self.weights.shape[-1]


def route(logits: jax.Array, top_k: int, normalize: bool) -> Routing:
    """Softmax in float32, the k best kept and, with `normalize`, renormalised to sum 1 (as
    transformers does for Mixtral always, for Qwen3-MoE with norm_topk_prob)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, chosen = jax.lax.top_k(probs, top_k)  # [T, k]
    if normalize:
        weights = weights / fixed_order_sum(weights, axis=-1, keepdims=True)
    flat = chosen.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # rows grouped by expert
    sizes = jnp.bincount(flat, length=probs.shape[-1]).astype(jnp.int32)
    return Routing(weights, order, sizes)


def _gather_rows(x: jax.Array, rows_of: jax.Array, experts: Experts):
    """The sorted rows of x [T, D]: float for float experts; for W4A8 experts quantized per
    token first (T rows, not T * k: a row's INT8 codes are its token's) and then gathered."""
    first = experts.gate_proj
    if not isinstance(first, W4A8Linear):
        return x[rows_of]
    act = quantize_per_token(x, with_sum=first.needs_row_sum, backend=first.act_backend)
    return QuantizedActivation(act.values[rows_of], act.scale[rows_of],
                               None if act.row_sum is None else act.row_sum[rows_of])


class MoE(nnx.Module):
    """Top-k routed experts. The router (``gate``) stays 16-bit in every model, quantized or
    not; the experts are float or W4A8 (the `linear` factory's expert counterpart). The k
    outputs go back to their token and are summed with the routing weights in a fixed order
    (batch invariance)."""

    def __init__(self, cfg: ModelConfig, dtype, linear: LinearFactory | None = None):
        self.top_k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = make_linear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=dtype)
        self.experts = Experts(cfg, dtype, linear)

    def __call__(self, h: jax.Array, axis=None) -> jax.Array:
        lead, d = h.shape[:-1], h.shape[-1]
        x = h.reshape(-1, d)
        r = route(self.gate(x), self.top_k, self.normalize)
        y = self.experts(_gather_rows(x, r.row_token, self.experts), r.group_sizes, axis)
        y = y.astype(jnp.float32)[jnp.argsort(r.order)].reshape(x.shape[0], self.top_k, d)
        out = fixed_order_sum(y * r.weights[..., None], axis=1)
        if axis is not None:  # the experts' F is split: sum the partial products
            out = jax.lax.psum(out, axis)
        return out.astype(h.dtype).reshape(*lead, d)
