"""The grouped W4A8 GEMM of mixture-of-experts layers (pallas_kernels/grouped_w4a8_matmul/):
its Triton kernel (interpret mode on CPU, compiled on a GPU) and its XLA reference against an
independent NumPy int64 reference, on the routing edge cases; the kernel lowers for an H100."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PALLAS, TRITON_CALL, lower_for_h100
from test_w4a8_matmul import numpy_codes

from pallas_kernels import packing
from pallas_kernels.grouped_w4a8_matmul import (GroupedGemmConfig, grouped_w4a8_matmul,
                                                tile_schedule)
from pallas_kernels.packing import W4Group, W4PerChannel
from pallas_kernels.quantize import quantize_per_token

TRITON = {**PALLAS, "backend": "triton"}
E, K, N = 4, 256, 128


def _stacked(fmt: str, seed: int = 0):
    """E experts' W4 weights [E, N, K] in one stacked format (each expert quantized alone)."""
    rng = np.random.default_rng(seed)
    per = []
    for e in range(E):
        w = rng.standard_normal((N, K)).astype(np.float32) * (0.5 + e)
        per.append(packing.quantize_group(w, 128) if fmt == "g128"
                   else packing.quantize_per_channel(w))
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *per)


def numpy_grouped(act, w, sizes):
    """float64 output from exact int64 accumulators, each row with its expert's weight."""
    x = np.asarray(act.values, np.int64)
    sx = np.asarray(act.scale, np.float64)
    out = np.zeros((x.shape[0], N))
    row = 0
    for e, n in enumerate(sizes):
        q = numpy_codes(np.asarray(w.qweight[e]))
        if isinstance(w, W4Group):
            g = w.group_size
            q = (q * np.repeat(np.asarray(w.s2[e], np.int64).T, g, axis=1)
                 - np.repeat(np.asarray(w.szero[e], np.int64).T, g, axis=1))
        acc = (x[row:row + n] @ q.T).astype(np.float64)
        if isinstance(w, W4Group):
            y = acc * sx[row:row + n, None] * np.asarray(w.s1[e], np.float64)
        else:
            y = (acc * sx[row:row + n, None] * np.asarray(w.scale[e], np.float64)
                 - np.asarray(w.szero[e], np.float64) * np.asarray(act.row_sum, np.float64)[
                     row:row + n, None])
        out[row:row + n] = y
        row += n
    return out


def _rows(sizes, m, seed=1, duplicate=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, K)).astype(np.float32)
    if duplicate:  # top-2: one token's row in two experts' groups, and twice in one group
        x[sizes[0]] = x[0]
        x[1] = x[0]
    return x


# (group sizes, rows M): rows past sum(sizes) are padding and must come back as zeros
CASES = {
    "mixed": ([5, 17, 3, 9], 34),
    "empty_expert": ([12, 0, 20, 0], 40),
    "all_to_one": ([0, 0, 37, 0], 37),
    "single_rows": ([1, 1, 1, 1], 4),
    "top2_duplicates": ([6, 6, 6, 6], 24),
    "nothing_routed": ([0, 0, 0, 0], 8),
}


@pytest.mark.parametrize("fmt", ["g128", "per-channel"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_and_reference_match_numpy(case, fmt):
    sizes, m = CASES[case]
    w = _stacked(fmt)
    x = _rows(sizes, m, duplicate=case == "top2_duplicates")
    act = quantize_per_token(jnp.asarray(x), with_sum=fmt == "per-channel")
    gs = jnp.asarray(sizes, jnp.int32)
    ref = numpy_grouped(act, w, sizes)
    xla = np.asarray(grouped_w4a8_matmul(act, w, gs, jnp.float32, backend="xla"))
    # 16-row tiles, so that groups share row blocks
    pal = np.asarray(grouped_w4a8_matmul(act, w, gs, jnp.float32,
                                         config=GroupedGemmConfig(16, 64), **TRITON))
    total = sum(sizes)
    scale = max(1.0, np.abs(ref).max())
    for got in (xla, pal):
        np.testing.assert_allclose(got[:total], ref[:total], atol=2e-5 * scale, rtol=2e-6)
        assert not got[total:].any()  # padding rows: zeros
    # the integer sums are exact, so the two agree to float32 epilogue rounding
    np.testing.assert_allclose(pal, xla, atol=1e-6 * scale, rtol=1e-6)
    if case == "top2_duplicates":  # the same row, the same expert: the same output
        np.testing.assert_array_equal(pal[1], pal[0])


def test_one_program_serves_every_routing():
    """Group sizes are data: a second routing reuses the compiled program."""
    w = _stacked("g128")
    act = quantize_per_token(jnp.asarray(_rows([8] * 4, 32)))
    f = jax.jit(lambda a, g: grouped_w4a8_matmul(a, w, g, jnp.float32, backend="xla"))
    f(act, jnp.asarray([8, 8, 8, 8], jnp.int32))
    f(act, jnp.asarray([0, 32, 0, 0], jnp.int32))
    assert f._cache_size() == 1


def test_tile_schedule_covers_every_row_once():
    sizes = jnp.asarray([5, 0, 30, 1, 0, 12], jnp.int32)
    g, block, lo, hi = (np.asarray(a) for a in tile_schedule(sizes, 48, 16))
    assert len(g) == 3 + 6 - 1
    ends = np.cumsum(np.asarray(sizes))
    owner = np.searchsorted(ends, np.arange(48), side="right")
    seen = np.zeros(48, int)
    for t in range(len(g)):
        rows = np.arange(lo[t], hi[t])
        assert (rows // 16 == block[t]).all() and (owner[rows] == g[t]).all()
        seen[rows] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("fmt", ["g128", "per-channel"])
def test_kernel_lowers_for_h100(fmt):
    w = _stacked(fmt)
    act = quantize_per_token(jnp.asarray(_rows([8] * 4, 32)), with_sum=fmt == "per-channel")
    hlo = lower_for_h100(lambda a, w, g: grouped_w4a8_matmul(a, w, g, jnp.bfloat16,
                                                             backend="triton"),
                         act, w, jnp.asarray([8] * 4, jnp.int32))
    assert TRITON_CALL in hlo
