"""The searched transform strengths of the paper's code (qserve_spec.md sections 1.8, 1.9, 1.11).

Instead of fixed strengths, each search tries a grid of candidates per layer and keeps the one
whose quantized layer is closest to the float layer on the calibration activations (the first
``search_tokens`` tokens of the calibration set, captured by ``calibration.run_layer``):

- ``search_smooth_attention``: SmoothAttention's lambda = K_span^alpha / Q_span^beta over
  (0, 0), (alpha, 0), (alpha, 1 - alpha); objective: the attention output with the keys stored
  in KV4 (queries stay 16-bit; rotated per head first with rotate_k), as the paper's code
  (``beta = -2`` GridSearch).
- ``search_output_smoothing``: (alpha, beta) of v->o and up->down smoothing over the same kind
  of grid; objective: the consumer projection's output (o_proj, down_proj) with its input in
  per-token INT8 and its weight in the W4 format (RTN), i.e. W4A8 as the GEMM computes it.
  The producer's rows (v_proj, up_proj) are scaled per row, which per-row W4 quantization does
  not see, so the consumer's output is the whole effect on the weights. (The V cache also sees
  v->o's lambda; that effect is left out of the objective.)
- ``search_qk_clipping`` (per-channel): one clipping ratio per layer for q_proj, then for k_proj,
  on the attention output (INT8 input, W4 weights, KV4 keys, rotated and scaled as the model
  will store them), where the per-row weight objective of ``clipping.py`` does not see the
  softmax. Each attention-output score is costly (a whole attention over ``search_tokens``
  tokens), so the 81-ratio grid is searched coarse to fine: every 5th ratio, then the ratios
  around the best (25 scores instead of 81).

Every candidate of a grid is scored in one jitted call (``lax.map`` over the candidates), and the
candidate "no change" (alpha = beta = 0, ratio 1) is always in the grid, so a search never does
worse than the fixed recipe's starting point on its own objective.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.kv4 import RANGE_RATIOS
from pallas_kernels.packing import WeightFormat
from qoq_jax.config import ModelConfig
from qoq_jax.layers import apply_rope, model_rope, rms_norm
from qoq_jax.quant import fake
from qoq_jax.quant.calibration import causal_attention
from qoq_jax.quant.transforms import attention_lambda


def alpha_beta_grid(steps: int) -> np.ndarray:
    """[C, 2] candidates: (0, 0), then (a, 0) and (a, 1 - a) for a = 1/steps .. 1 - 1/steps,
    then (0, 1): the family the paper's code searches (and its presets are drawn from)."""
    a = np.arange(1, steps) / steps
    pairs = [(0.0, 0.0)] + [(x, 0.0) for x in a] + [(x, 1.0 - x) for x in a] + [(0.0, 1.0)]
    return np.asarray(pairs, np.float64)


def _sq_err(a: jax.Array, b: jax.Array) -> jax.Array:
    d = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.sum(d * d)


# ----------------------------------------------------------------------------------------------
# SmoothAttention


@functools.partial(jax.jit, static_argnames=("cfg", "kv_ratios"))
def _smooth_attention_errors(q, k, v, k_span, q_span, grid, cfg: ModelConfig, kv_ratios):
    ref = causal_attention(q, k, v)
    g = cfg.q_per_kv

    def err(ab):
        lam = attention_lambda(k_span, q_span, cfg, ab[0], ab[1], xp=jnp)  # [Hkv, D]
        q_s = q * jnp.repeat(lam, g, axis=0)
        k_s = fake.kv4(k / lam, cfg.key_rotation, kv_ratios)
        return _sq_err(causal_attention(q_s, k_s, v), ref)

    return lax.map(err, grid)


def search_smooth_attention(captured: dict, k_span: np.ndarray, q_span: np.ndarray,
                            cfg: ModelConfig, steps: int,
                            kv_ratios: tuple[float, ...] = RANGE_RATIOS) -> tuple[float, float]:
    """The (alpha, beta) of SmoothAttention with the smallest attention-output error (keys in
    KV4 with the cache's candidate ranges `kv_ratios`)."""
    grid = alpha_beta_grid(steps)
    errs = np.asarray(_smooth_attention_errors(
        jnp.asarray(captured["q"]), jnp.asarray(captured["k"]), jnp.asarray(captured["v"]),
        jnp.asarray(k_span, jnp.float32), jnp.asarray(q_span, jnp.float32),
        jnp.asarray(grid, jnp.float32), cfg, tuple(kv_ratios)))
    return tuple(float(x) for x in grid[int(np.argmin(errs))])


# ----------------------------------------------------------------------------------------------
# Output smoothing (v->o, up->down)


@functools.partial(jax.jit, static_argnames="fmt")
def _smoothing_errors(x, w, lams, fmt: WeightFormat):
    """Output error of x [T, K] @ w [N, K]ᵀ in W4A8 after smoothing by each lambda [C, K]."""
    ref = x @ w.T

    def err(lam):
        return _sq_err(fake.int8_per_token(x / lam) @ fake.w4(w * lam, fmt).T, ref)

    return lax.map(err, lams)


def search_output_smoothing(x: np.ndarray, w: np.ndarray, lambda_of, fmt: WeightFormat,
                            steps: int) -> tuple[float, float]:
    """(alpha, beta) with the smallest W4A8 output error of the consumer w [N, K] on its input
    x [..., K]; lambda_of(alpha, beta) -> the [K] scales the transform would apply."""
    grid = alpha_beta_grid(steps)
    lams = np.stack([lambda_of(a, b) for a, b in grid]).astype(np.float32)
    errs = np.asarray(_smoothing_errors(jnp.asarray(x.reshape(-1, x.shape[-1]), jnp.float32),
                                        jnp.asarray(w, jnp.float32), jnp.asarray(lams),
                                        fmt))
    return tuple(float(v) for v in grid[int(np.argmin(errs))])


# ----------------------------------------------------------------------------------------------
# q/k_proj clipping on the attention output (per-channel weights)


def _project(h, w, b, heads, hd, norm=None, eps=0.0):
    y = h @ w.T
    if b is not None:
        y = y + b
    y = y.reshape(*h.shape[:-1], heads, hd)
    return y if norm is None else rms_norm(y, norm, eps)  # Qwen3's per-head q/k norm


@functools.partial(jax.jit, static_argnames=("cfg", "which", "kv_ratios"))
def _qk_clip_errors(h, wq, bq, wk, bk, wv, bv, q_norm, k_norm, key_scale, ratio_other, ratios,
                    cfg: ModelConfig, which: str, kv_ratios):
    s, t, _ = h.shape
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos, sin = model_rope(cfg, jnp.arange(t)[None, :])
    eps = cfg.rms_norm_eps
    q = apply_rope(_project(h, wq, bq, hq, hd, q_norm, eps), cos, sin)
    k = apply_rope(_project(h, wk, bk, hkv, hd, k_norm, eps), cos, sin)
    v = _project(h, wv, bv, hkv, hd)
    ref = causal_attention(q, k, v)
    hq8 = fake.int8_per_token(h)

    def q_of(r):
        return apply_rope(_project(hq8, fake.w4_per_channel(wq, r), bq, hq, hd, q_norm, eps),
                          cos, sin)

    def k_of(r):
        return fake.kv4(apply_rope(_project(hq8, fake.w4_per_channel(wk, r), bk, hkv, hd, k_norm,
                                            eps), cos, sin), cfg.key_rotation, kv_ratios,
                        key_scale)

    def err(r):
        if which == "q":
            return _sq_err(causal_attention(q_of(r), k_of(ratio_other), v), ref)
        return _sq_err(causal_attention(q_of(ratio_other), k_of(r), v), ref)

    return lax.map(err, ratios)


def coarse_to_fine(errors_of: Callable[[np.ndarray], np.ndarray], ratios: np.ndarray,
                   stride: int) -> float:
    """The ratio of `ratios` (a decreasing grid) with the smallest error, scoring every
    `stride`-th ratio (and the last) first, then every ratio within one coarse step of the
    best: about len/stride + 2 stride evaluations instead of len. It finds the grid's minimum
    whenever the error has no second, deeper dip between coarse points (checked in
    tests/test_quant.py); errors_of maps a batch of ratios to their errors."""
    n = len(ratios)
    coarse = sorted(set(range(0, n, stride)) | {n - 1})
    errs = dict(zip(coarse, np.asarray(errors_of(ratios[coarse]), np.float64)))
    best = min(errs, key=lambda i: (errs[i], i))
    fine = [i for i in range(max(0, best - stride + 1), min(n, best + stride)) if i not in errs]
    if fine:  # padded to one length, so a jitted errors_of compiles once for every layer
        padded = fine + fine[-1:] * (2 * stride - 2 - len(fine))
        errs.update(zip(fine, np.asarray(errors_of(ratios[padded]), np.float64)))
    return float(ratios[min(errs, key=lambda i: (errs[i], i))])  # ties: the larger ratio


def search_qk_clipping(h: np.ndarray, w: dict, cfg: ModelConfig, ratios: np.ndarray,
                       stride: int = 5, kv_ratios: tuple[float, ...] = RANGE_RATIOS
                       ) -> tuple[float, float]:
    """(ratio for q_proj, ratio for k_proj): q first with k unclipped, then k given q, each
    coarse to fine over `ratios` (stride 1: every ratio); keys in KV4 with the cache's
    candidate ranges `kv_ratios`."""
    f32 = lambda name: None if name not in w else jnp.asarray(w[name], jnp.float32)  # noqa: E731
    args = [jnp.asarray(h, jnp.float32)]
    for p in ("q", "k", "v"):
        args += [f32(f"self_attn.{p}_proj.weight"), f32(f"self_attn.{p}_proj.bias")]
    args += [f32("self_attn.q_norm.weight"), f32("self_attn.k_norm.weight")]
    args.append(f32("self_attn.key_scale"))  # the model's, when it scales its rotated keys
    ratios = np.asarray(ratios, np.float32)

    def errors(other: float, which: str):
        return lambda rs: _qk_clip_errors(*args, other, jnp.asarray(rs), cfg, which,
                                          tuple(kv_ratios))

    rq = coarse_to_fine(errors(1.0, "q"), ratios, stride)
    rk = coarse_to_fine(errors(rq, "k"), ratios, stride)
    return rq, rk
