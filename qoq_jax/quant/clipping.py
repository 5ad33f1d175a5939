"""Weight clipping search (qserve_spec.md section 1.11).

Per-channel: for each output row, candidate ranges [r * lo, r * hi] with r = 1.0, 1 - 0.8/G,
..., 0.2 are quantized round-to-nearest, and the ratio with the smallest layer-output error on
the calibration inputs is kept:
    err_n(r) = sum_tokens (x · (w_n - w_hat_n))^2 = d_nᵀ H d_n,   H = Xᵀ X,  d_n = w_n - w_hat_n
which is the paper code's "products error" objective, computed from the input Hessian instead
of the tokens (one K x K matrix per input instead of tokens x K).

Groups (progressive g128/g64; the paper's g128 recipe has no clipping, this is an option): the
same search per (row, group) on the group's level-1 range, with the group's own block of the
Hessian (the products error of the group's inputs, as the paper code's Group granularity).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import packing
from qoq_jax.quant import fake


def clip_ratios(grid: int, minimum: float) -> np.ndarray:
    return np.concatenate([[1.0], 1.0 - np.arange(1, grid + 1) / grid * (1.0 - minimum)])


def search_per_channel(w: np.ndarray, hessian: np.ndarray, grid: int = 80,
                       minimum: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Best (lo, hi) per row of w [N, K] under the Hessian [K, K]; returns the clipped ranges."""
    w = np.asarray(w, np.float32)
    h = np.asarray(hessian, np.float32)
    lo0 = np.minimum(w.min(axis=1), 0.0)
    hi0 = np.maximum(w.max(axis=1), 0.0)
    best_err = np.full(w.shape[0], np.inf)
    best = np.ones(w.shape[0])
    for r in clip_ratios(grid, minimum):
        d = w - packing.dequantize(packing.quantize_per_channel(w, lo0 * r, hi0 * r))
        err = np.einsum("nk,nk->n", d @ h, d)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, r, best)
    return lo0 * best, hi0 * best


@functools.partial(jax.jit, static_argnames=("group_size",))
def _group_errors(w: jax.Array, h: jax.Array, ratios: jax.Array, group_size: int) -> jax.Array:
    """Products error [R, N, G] of each candidate ratio, per row and group."""
    n, k = w.shape
    groups = k // group_size
    hb = h.reshape(groups, group_size, groups, group_size)
    blocks = hb[jnp.arange(groups), :, jnp.arange(groups), :]  # [G, g, g] diagonal blocks

    def one(r):
        d = (w - fake.w4_group(w, group_size, r)).reshape(n, groups, group_size)
        return jnp.einsum("ngi,gij,ngj->ng", d, blocks, d)

    return lax.map(one, ratios)


def search_group(w: np.ndarray, hessian: np.ndarray, group_size: int, grid: int = 80,
                 minimum: float = 0.2) -> np.ndarray:
    """Best clipping ratio [N, K/g] per row and group of w [N, K] (group_size resolved for K)
    under the Hessian [K, K]; 1.0 (no clipping) wins ties."""
    ratios = clip_ratios(grid, minimum).astype(np.float32)
    h = np.asarray(hessian, np.float64)
    scale = float(np.mean(np.diag(h))) or 1.0  # errors compared per group: any scale will do
    err = _group_errors(jnp.asarray(w, jnp.float32), jnp.asarray(h / scale, jnp.float32),
                        jnp.asarray(ratios), group_size)
    return ratios[np.asarray(jnp.argmin(err, axis=0))]
