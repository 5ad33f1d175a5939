"""GPTQ rounding for both W4 formats (Frantar et al.; as QoQ's reference code configures it:
damping 1% of the mean Hessian diagonal, blocks of 128 columns, act-order, static groups).

The scales and zeros are fixed first from the (clipped) float weights, exactly as round-to-
nearest would choose them; GPTQ then picks each column's codes in order of decreasing Hessian
diagonal and spreads the rounding error over the columns not yet quantized, weighted by the
inverse Hessian of the layer's inputs. For the progressive format it works on level-1 values
w / s1 (the INT8 domain), per the reference code.
"""

from __future__ import annotations

import numpy as np

from pallas_kernels import packing


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of H^-1, with damping (more if H is numerically singular)."""
    k = h.shape[0]
    mean_diag = float(np.mean(np.diag(h)))
    for extra in (1.0, 10.0, 100.0, 1000.0):
        try:
            hd = h + np.eye(k) * damp * extra * mean_diag
            inv = np.linalg.inv(np.linalg.cholesky(hd))
            return np.linalg.cholesky(inv.T @ inv).T
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the input Hessian is not positive definite even with damping")


def gptq_codes(w: np.ndarray, hessian: np.ndarray, column_scale: np.ndarray,
               column_zero: np.ndarray, code_min=0.0, code_max=15.0, block: int = 128,
               damp: float = 0.01) -> np.ndarray:
    """Codes [N, K] for values w [N, K] given per-entry scale and zero [N, K] (static groups),
    each code kept within [code_min, code_max] (scalars or [N, K])."""
    w = np.array(w, np.float64)
    h = np.array(hessian, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable")  # act-order
    w, h = w[:, perm], h[perm][:, perm]
    s, z = column_scale[:, perm].astype(np.float64), column_zero[:, perm].astype(np.float64)
    n, k = w.shape
    cmin = np.broadcast_to(code_min, (n, k))[:, perm]
    cmax = np.broadcast_to(code_max, (n, k))[:, perm]
    hinv = _inverse_cholesky(h, damp)
    q = np.zeros((n, k))
    for start in range(0, k, block):
        end = min(start + block, k)
        err = np.zeros((n, end - start))
        for i in range(start, end):
            col = w[:, i]
            qi = np.clip(np.rint(col / s[:, i]) + z[:, i], cmin[:, i], cmax[:, i])
            q[:, i] = qi
            e = (col - (qi - z[:, i]) * s[:, i]) / hinv[i, i]
            w[:, i + 1:end] -= np.outer(e, hinv[i, i + 1:end])
            err[:, i - start] = e
        w[:, end:] -= err @ hinv[start:end, end:]
    out = np.empty_like(q)
    out[:, perm] = q
    return out


def gptq_per_channel(w: np.ndarray, hessian: np.ndarray, lo=None, hi=None):
    s, z = packing.per_channel_params(w, lo, hi)
    n, k = w.shape
    col_s = np.broadcast_to(s.astype(np.float32)[:, None], (n, k))
    col_z = np.broadcast_to(z[:, None], (n, k))
    return packing.per_channel_format(gptq_codes(w, hessian, col_s, col_z), s, z)


def gptq_group(w: np.ndarray, hessian: np.ndarray, group_size: int = 128):
    s1, w1, s2, z, g = packing.group_params(w, group_size)
    # RTN stays inside the INT8 level by construction; error feedback can push values past the
    # group's range, so keep each code where (q - z) * s2 is still a valid INT8 value.
    reach = np.floor(127.0 / s2)
    lo, hi = np.maximum(z - reach, 0), np.minimum(z + reach, 15)
    q = gptq_codes(w1, hessian, np.repeat(s2, g, axis=1), np.repeat(z, g, axis=1),
                   np.repeat(lo, g, axis=1), np.repeat(hi, g, axis=1))
    return packing.group_format(q, s1, s2, z, g)
