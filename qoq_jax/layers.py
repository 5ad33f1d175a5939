"""Building blocks of the Llama-family transformer: linear, RMSNorm, RoPE, embedding.

Every projection of the model is a ``Linear``, created through ``make_linear``; the W4A8 variant
(packed INT4 weights, INT8 activations) replaces it there without the model code changing.
Weights keep Hugging Face's [out, in] layout, which is also the K-contiguous operand layout the
INT8 tensor-core GEMM wants.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels._common import fixed_order_sum, pair_lone_rows, resolve_gemm_backend
from pallas_kernels.packing import W4Group, W4Int8, W4PerChannel, WeightFormat, to_int8
from pallas_kernels.quantize import (QuantizedActivation, quantize_per_token, rmsnorm_quantize,
                                     silu_mul_quantize)
from pallas_kernels.w4a8_matmul import w4a8_matmul


def rowwise_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] times w [N, K] transposed, fp32 accumulation -> [..., N] float32.

    Batch invariance of the float path: XLA:CPU computes a row of this product the same way
    for every number of rows >= 2 (checked for every row count from 2 to 4096, and by the
    engine's batch-invariance tests), but a single row goes through a matrix-vector kernel
    that sums in another order, so a lone row is paired with a copy (pair_lone_rows). The
    [N, K] weight layout matters too: with [K, N] weights XLA:CPU blocks K by the row count.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    y = jnp.einsum("mk,nk->mn", pair_lone_rows(rows), w, preferred_element_type=jnp.float32)
    return y[:m].reshape(*lead, w.shape[0])


class Linear(nnx.Module):
    """y = x Wᵀ (+ b), W [out, in], computed in the weight dtype with fp32 accumulation."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype):
        self.in_features, self.out_features = in_features, out_features
        self.weight = nnx.Param(jnp.zeros((out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.finish(self.product(x))

    def product(self, x: jax.Array) -> jax.Array:
        """x Wᵀ in float32, no bias: a row-parallel shard's partial sum (see finish)."""
        w = self.weight[...]
        return rowwise_matmul(x.astype(w.dtype), w)

    def finish(self, y: jax.Array) -> jax.Array:
        """float32 product (summed over shards, for a row-parallel layer) -> + bias, cast."""
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.weight.dtype)


class QuantParam(nnx.Variable):
    """Packed quantized weights and their scales: loaded and saved, never trained."""


class W4A8Linear(nnx.Module):
    """QServe's W4A8 linear: INT8 per-token activations x packed UINT4 weights (QoQ formats).

    weight_format: per-channel, or progressive groups of 128 or 64 (g128 falls back to g64 where
    K is not a multiple of 128; ``self.weight_format`` is the one this layer has). Takes a float input (quantized here) or a QuantizedActivation made
    by a fused kernel (RMSNorm or SiLU*up + quantization, see norm_input / swiglu_input).

    gemm_backend: which W4A8 GEMM runs ("auto": the Mosaic GPU kernel on sm_90, the Triton kernel
    on other GPUs, the XLA reference on CPU; or "mosaic", "triton", "xla"). It is resolved here,
    once, and kept as a static attribute, so it is part of every jitted function's cache key.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype,
                 weight_format: WeightFormat | str = WeightFormat.G128,
                 gemm_backend: str = "auto"):
        n, k = out_features, in_features
        self.in_features, self.out_features, self.dtype = k, n, dtype
        self.weight_format = WeightFormat.parse(weight_format).for_input_size(k)
        self.gemm_backend = resolve_gemm_backend(gemm_backend)
        self.qweight = QuantParam(jnp.zeros((n, k // 2), jnp.uint8))
        if not self.weight_format.is_group:
            self.scale = QuantParam(jnp.zeros((n,), jnp.float16))
            self.szero = QuantParam(jnp.zeros((n,), jnp.float16))
        else:
            g = k // self.weight_format.group_size
            self.s1 = QuantParam(jnp.zeros((n,), jnp.float16))
            self.s2 = QuantParam(jnp.ones((g, n), jnp.int8))
            self.szero = QuantParam(jnp.zeros((g, n), jnp.uint8))
        self.bias = nnx.Param(jnp.zeros((n,), dtype)) if bias else None
        self.layout = "packed"  # or "int8": the CPU route's runtime form (int8_runtime)

    @property
    def needs_row_sum(self) -> bool:
        return not self.weight_format.is_group

    @property
    def act_backend(self) -> str:
        """The activation-quantization kernels that go with the GEMM: Pallas beside a Pallas
        GEMM (a GPU, or a lowering test), the XLA references beside the XLA GEMM (CPU)."""
        return "xla" if self.gemm_backend == "xla" else "pallas"

    def packed_weight(self) -> W4PerChannel | W4Group | W4Int8:
        """The weight as the GEMM takes it (packing.W4PerChannel or W4Group; W4Int8 in the
        CPU route's runtime layout)."""
        if self.layout == "int8":
            if not self.weight_format.is_group:
                return W4Int8(self.int8_weight[...], self.scale[...], self.szero[...])
            return W4Int8(self.int8_weight[...], self.s1[...])
        if not self.weight_format.is_group:
            return W4PerChannel(self.qweight[...], self.scale[...], self.szero[...])
        return W4Group(self.qweight[...], self.s1[...], self.s2[...], self.szero[...],
                       self.weight_format.group_size)

    def __call__(self, x) -> jax.Array:
        return self.finish(self.product(x))

    def product(self, x) -> jax.Array:
        """The GEMM and its epilogue in float32, no bias. Sizes come from the packed arrays, not
        from in_/out_features, so that a tensor-parallel shard (a slice of N, or of K on group
        boundaries) runs through the same code."""
        act = x if isinstance(x, QuantizedActivation) else quantize_per_token(
            x, with_sum=self.needs_row_sum, backend=self.act_backend)
        lead = act.values.shape[:-1]
        k = (self.int8_weight.shape[-1] if self.layout == "int8" else self.qweight.shape[-1] * 2)
        flat = QuantizedActivation(
            act.values.reshape(-1, k), act.scale.reshape(-1),
            None if act.row_sum is None else act.row_sum.reshape(-1))
        y = w4a8_matmul(flat, self.packed_weight(), jnp.float32, backend=self.gemm_backend)
        return y.reshape(*lead, y.shape[-1])

    def finish(self, y: jax.Array) -> jax.Array:
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def int8_runtime(model: nnx.Module) -> nnx.Module:
    """`model` for the CPU route: every W4A8 layer on the XLA GEMM holds its weight as the INT8
    operand (packing.W4Int8, unpacked once here) instead of packed nibbles, so XLA:CPU's int8
    dot computes the same INT32 sums without unpacking every step (docs/PERFORMANCE.md). A new
    module tree that shares every other array with `model`, which is left as it is (it is
    what checkpoints store). Layers on a GPU kernel, and float models, are unchanged."""
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)
    convert = jax.jit(to_int8)
    for _, lin in nnx.iter_graph(out):
        if not (isinstance(lin, W4A8Linear) and lin.gemm_backend == "xla"
                and lin.layout == "packed"):
            continue
        w8 = convert(lin.packed_weight())
        lin.int8_weight = QuantParam(w8.values)
        del lin.qweight
        if lin.weight_format.is_group:  # the epilogue keeps s1 only
            del lin.s2, lin.szero
        lin.layout = "int8"
    return out


def norm_input(norm: "RMSNorm", x: jax.Array, consumer: nnx.Module):
    """The normalised input of `consumer`: a float array, or for a W4A8 consumer the INT8
    activation straight from the fused RMSNorm + quantization kernel."""
    if isinstance(consumer, W4A8Linear):
        return rmsnorm_quantize(x, norm.weight[...], norm.eps, with_sum=consumer.needs_row_sum,
                                backend=consumer.act_backend)
    return norm(x)


def swiglu_input(gate: jax.Array, up: jax.Array, consumer: nnx.Module):
    """SiLU(gate) * up for `consumer` (down_proj), fused with its quantization when W4A8."""
    if isinstance(consumer, W4A8Linear):
        return silu_mul_quantize(gate, up, with_sum=consumer.needs_row_sum,
                                 backend=consumer.act_backend)
    return jax.nn.silu(gate) * up


LinearFactory = Callable[..., nnx.Module]


def make_linear(in_features: int, out_features: int, *, bias: bool, dtype,
                factory: LinearFactory | None = None) -> nnx.Module:
    """The one place the model creates projections; `factory` swaps in a quantized layer."""
    return (factory or Linear)(in_features, out_features, bias=bias, dtype=dtype)


class RMSNorm(nnx.Module):
    """Hugging Face's Llama RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean_sq = fixed_order_sum(xf * xf, axis=-1, keepdims=True) / xf.shape[-1]
    xf = xf * jax.lax.rsqrt(mean_sq + eps)
    return weight * xf.astype(x.dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype):
        self.weight = nnx.Param(jnp.zeros((vocab, dim), dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied lm_head: logits = x Eᵀ, in fp32."""
        w = self.weight[...]
        return rowwise_matmul(x.astype(w.dtype), w)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin [..., head_dim // 2] for integer positions, in fp32 (as transformers computes them).

    Taking the inverse frequencies as an input is what makes Llama-3 and linear scaling work:
    the scaling lives entirely in `inv_freq` (config.rope_inv_freq).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles), jnp.sin(angles)


def model_rope(cfg, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin [..., head_dim // 2] of a model (config.ModelConfig) at integer positions, its
    rope scaling applied (LongRoPE's table and cos/sin factor: config.rope_tables)."""
    from qoq_jax.config import rope_tables

    inv_freq, factor = rope_tables(cfg)
    cos, sin = rope_cos_sin(positions, inv_freq)
    if factor != 1.0:  # as transformers scales them (in float32)
        cos, sin = cos * jnp.float32(factor), sin * jnp.float32(factor)
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x [..., T, H, D]; cos/sin [..., T, D/2] broadcast over heads."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[..., None, :], sin[..., None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)
