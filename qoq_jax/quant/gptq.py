"""GPTQ rounding for both W4 formats (Frantar et al.; as QoQ's reference code configures it:
damping 1% of the mean Hessian diagonal, blocks of 128 columns, act-order, static groups; the
pipeline passes QuantConfig.gptq_damp, 10% by default, which generalizes better).

The scales and zeros are fixed first from the (clipped) float weights, exactly as round-to-
nearest would choose them; GPTQ then picks each column's codes in order of decreasing Hessian
diagonal and spreads the rounding error over the columns not yet quantized, weighted by the
inverse Hessian of the layer's inputs. For the progressive format it works on level-1 values
w / s1 (the INT8 domain), per the reference code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import packing


@jax.jit
def _upper_cholesky_of_inverse(h: jax.Array) -> jax.Array:
    l = jnp.linalg.cholesky(h)
    l_inv = jax.scipy.linalg.solve_triangular(l, jnp.eye(h.shape[0], dtype=h.dtype), lower=True)
    return jnp.linalg.cholesky(l_inv.T @ l_inv).T


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of H^-1 (float32), with damping (more if H is nearly singular)."""
    k = h.shape[0]
    mean_diag = float(np.mean(np.diag(h)))
    for extra in (1.0, 10.0, 100.0, 1000.0):
        hd = (h + np.eye(k) * damp * extra * mean_diag) / mean_diag  # well scaled for float32
        u = np.asarray(_upper_cholesky_of_inverse(jnp.asarray(hd, jnp.float32)), np.float64)
        if np.all(np.isfinite(u)):
            return u / np.sqrt(mean_diag)
    raise np.linalg.LinAlgError("the input Hessian is not positive definite even with damping")


@functools.partial(jax.jit, static_argnames=("block",))
def _gptq_blocks(w, hinv, s, z, cmin, cmax, block: int):
    """The GPTQ sweep in float32 (all arrays act-ordered, K a multiple of block)."""
    n, k = w.shape
    cols = jnp.arange(block)

    def one_block(b, carry):
        w, q = carry
        start = b * block
        wb = lax.dynamic_slice(w, (0, start), (n, block))
        hb = lax.dynamic_slice(hinv, (start, start), (block, block))
        sb, zb = lax.dynamic_slice(s, (0, start), (n, block)), lax.dynamic_slice(z, (0, start), (n, block))
        lob = lax.dynamic_slice(cmin, (0, start), (n, block))
        hib = lax.dynamic_slice(cmax, (0, start), (n, block))

        def one_column(i, carry):
            wb, qb, eb = carry
            col, si, zi = wb[:, i], sb[:, i], zb[:, i]
            qi = jnp.clip(jnp.round(col / si) + zi, lob[:, i], hib[:, i])
            e = (col - (qi - zi) * si) / hb[i, i]
            wb = wb - e[:, None] * jnp.where(cols > i, hb[i], 0.0)[None, :]
            return wb, qb.at[:, i].set(qi), eb.at[:, i].set(e)

        zeros = jnp.zeros((n, block), w.dtype)
        _, qb, eb = lax.fori_loop(0, block, one_column, (wb, zeros, zeros))
        rows = lax.dynamic_slice(hinv, (start, 0), (block, k))
        w = w - eb @ jnp.where(jnp.arange(k)[None, :] >= start + block, rows, 0.0)
        return w, lax.dynamic_update_slice(q, qb, (0, start))

    _, q = lax.fori_loop(0, k // block, one_block, (w, jnp.zeros_like(w)))
    return q


def gptq_codes(w: np.ndarray, hessian: np.ndarray, column_scale: np.ndarray,
               column_zero: np.ndarray, code_min=0.0, code_max=15.0, block: int = 128,
               damp: float = 0.01) -> np.ndarray:
    """Codes [N, K] for values w [N, K] given per-entry scale and zero [N, K] (static groups),
    each code kept within [code_min, code_max] (scalars or [N, K])."""
    w = np.array(w, np.float64)
    h = np.array(hessian, np.float64)
    n, k = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable")  # act-order
    hinv = _inverse_cholesky(h[perm][:, perm], damp)
    pad = -k % block  # padded columns: zero weights, identity rows, never touch the others
    hp = np.eye(k + pad)
    hp[:k, :k] = hinv

    def arr(a, fill):
        a = np.broadcast_to(a, (n, k))[:, perm]
        return np.pad(a, ((0, 0), (0, pad)), constant_values=fill).astype(np.float32)

    q = _gptq_blocks(jnp.asarray(arr(w, 0.0)), jnp.asarray(hp, jnp.float32),
                     jnp.asarray(arr(column_scale, 1.0)), jnp.asarray(arr(column_zero, 0.0)),
                     jnp.asarray(arr(code_min, 0.0)), jnp.asarray(arr(code_max, 15.0)), block)
    out = np.empty((n, k))
    out[:, perm] = np.asarray(q, np.float64)[:, :k]
    return out


def gptq_per_channel(w: np.ndarray, hessian: np.ndarray, lo=None, hi=None,
                     damp: float = 0.01):
    s, z = packing.per_channel_params(w, lo, hi)
    n, k = w.shape
    col_s = np.broadcast_to(s.astype(np.float32)[:, None], (n, k))
    col_z = np.broadcast_to(z[:, None], (n, k))
    return packing.per_channel_format(gptq_codes(w, hessian, col_s, col_z, damp=damp), s, z)


def gptq_group(w: np.ndarray, hessian: np.ndarray, group_size: int = 128, damp: float = 0.01,
               ratio: np.ndarray | float | None = None):
    """ratio: the groups' clipping ratios (packing.group_params)."""
    s1, w1, s2, z, g = packing.group_params(w, group_size, ratio=ratio)
    # RTN stays inside the INT8 level by construction; error feedback can push values past the
    # group's range, so keep each code where (q - z) * s2 is still a valid INT8 value.
    reach = np.floor(127.0 / s2)
    lo, hi = np.maximum(z - reach, 0), np.minimum(z + reach, 15)
    q = gptq_codes(w1, hessian, np.repeat(s2, g, axis=1), np.repeat(z, g, axis=1),
                   np.repeat(lo, g, axis=1), np.repeat(hi, g, axis=1), damp=damp)
    return packing.group_format(q, s1, s2, z, g)
