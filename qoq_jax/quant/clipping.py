"""Weight clipping search for per-channel W4 (qserve_spec.md section 1.11).

For each output row, candidate ranges [r * lo, r * hi] with r = 1.0, 1 - 0.8/G, ..., 0.2 are
quantized round-to-nearest, and the ratio with the smallest layer-output error on the
calibration inputs is kept:
    err_n(r) = sum_tokens (x · (w_n - w_hat_n))^2 = d_nᵀ H d_n,   H = Xᵀ X,  d_n = w_n - w_hat_n
which is the paper code's "products error" objective, computed from the input Hessian instead
of the tokens (one K x K matrix per input instead of tokens x K).
"""

from __future__ import annotations

import numpy as np

from pallas_kernels import packing


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
