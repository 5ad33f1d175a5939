"""The W4 weight formats: packing, code ranges, the exact INT8 level, error bounds."""

import numpy as np
import pytest

from pallas_kernels import packing
from pallas_kernels.packing import FormatError


def _w(n, k, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) * rng.uniform(0.01, 0.1, (n, 1))
    w[rng.integers(0, n, 4), rng.integers(0, k, 4)] *= 15  # a few outliers
    return w.astype(np.float32)


def test_pack_layout_and_roundtrip():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (64, 192)).astype(np.uint8)
    p = packing.pack_uint4(q)
    assert p.shape == (64, 96) and p.dtype == np.uint8
    # byte j of chunk c: low nibble k = 64c + j, high nibble k = 64c + 32 + j
    for c in range(3):
        for j in (0, 7, 31):
            assert p[5, 32 * c + j] & 0xF == q[5, 64 * c + j]
            assert p[5, 32 * c + j] >> 4 == q[5, 64 * c + 32 + j]
    np.testing.assert_array_equal(packing.unpack_uint4(p), q)


def test_pack_rejects_bad_codes_and_shapes():
    with pytest.raises(FormatError, match="0..15"):
        packing.pack_uint4(np.full((1, 64), 16))
    with pytest.raises(FormatError, match="multiple of 64"):
        packing.pack_uint4(np.zeros((1, 96), np.uint8))
    with pytest.raises(FormatError, match="K=100"):
        packing.quantize_per_channel(np.zeros((64, 100), np.float32))
    with pytest.raises(FormatError, match="N=\\(out features\\)|N=100|got N=100"):
        packing.quantize_group(np.zeros((100, 128), np.float32))
    with pytest.raises(FormatError, match="group size"):
        packing.quantize_group(np.zeros((64, 128), np.float32), group_size=32)


@pytest.mark.parametrize("n,k", [(192, 576), (256, 1536)])
def test_per_channel_properties(n, k):
    w = _w(n, k)
    f = packing.quantize_per_channel(w)
    q = packing.codes(f)
    assert f.qweight.shape == (n, k // 2) and f.scale.dtype == np.float16
    assert q.min() >= 0 and q.max() <= 15
    s = f.scale.astype(np.float32)
    z = f.szero.astype(np.float32) / s
    np.testing.assert_allclose(z, np.rint(z), atol=1e-2)  # integer zero points (paper's zint4)
    err = np.abs(packing.dequantize(f) - w)
    # half a step, plus the fp16 rounding of scale and scaled zero
    bound = s[:, None] * (0.5 + 16 * 2 ** -10)
    assert (err <= bound).all()
    assert (err.max(axis=1) >= 0.3 * s).all()  # not trivially exact


@pytest.mark.parametrize("n,k,g,expect_g", [(192, 576, 128, 64), (256, 1024, 128, 128),
                                            (64, 1536, 64, 64)])
def test_group_properties(n, k, g, expect_g):
    w = _w(n, k, seed=1)
    f = packing.quantize_group(w, g)
    assert f.group_size == expect_g  # 576 is not a multiple of 128: falls back to 64
    assert f.s2.shape == (k // expect_g, n) and f.s2.dtype == np.int8
    assert f.szero.dtype == np.uint8
    q = packing.codes(f)
    assert q.min() >= 0 and q.max() <= 15
    s2 = f.s2.astype(np.int32)
    assert s2.min() >= 1 and s2.max() <= 16  # P = 119 keeps s2 <= 16
    assert (f.szero.astype(np.int32) % s2 == 0).all()  # szero = z * s2 with an integer z
    w8 = packing.int8_level(f).astype(np.int32)
    assert np.abs(w8).max() <= 127
    # the int8 level is exactly (q - z) * s2
    z = (f.szero.astype(np.int32) // s2).T
    expected = (q.reshape(n, k // expect_g, expect_g) - z[..., None]) * s2.T[..., None]
    np.testing.assert_array_equal(w8, expected.reshape(n, k))
    # error in level-1 units: half a step inside the range the codes cover, and the distance to
    # the covered range outside it (an integer s2 = round(range / 15) may cover a little less)
    s1 = f.s1.astype(np.float32)[:, None]
    w1 = np.clip(w / s1, -119, 119).reshape(n, k // expect_g, expect_g)
    top, bottom = (15 - z) * s2.T, -z * s2.T
    excess = np.maximum(w1 - top[..., None], bottom[..., None] - w1).clip(min=0)
    allowed = np.maximum(0.5 * s2.T[..., None], excess).reshape(n, k)
    err1 = np.abs(packing.dequantize(f) - w) / s1
    level1_clip = np.abs(w / s1 - w1.reshape(n, k))  # s1 is rounded to fp16, |w / s1| may pass P
    assert (err1 <= allowed + level1_clip + 1e-3).all()
    # 15 * round(range / 15) falls short of the range by <= 7.5, rounding z shifts it by <= s2 / 2
    assert (excess.max(axis=-1) <= 7.5 + s2.T / 2 + 1e-3).all()


def test_protective_range_holds_on_adversarial_rows():
    rng = np.random.default_rng(5)
    w = rng.uniform(-1, 1, (64, 256)).astype(np.float32)
    w[:, 0], w[:, 1] = 1.0, -1.0  # every group of the first block spans the full level-1 range
    w[:, 128] = -1.0
    f = packing.quantize_group(w, 128)
    assert np.abs(packing.int8_level(f).astype(np.int32)).max() <= 127


def test_custom_ranges_clip():
    w = _w(64, 128, seed=2)
    lo, hi = w.min(axis=1) * 0.5, w.max(axis=1) * 0.5
    f = packing.quantize_per_channel(w, lo, hi)
    d = packing.dequantize(f)
    s = f.scale.astype(np.float32)[:, None]
    assert (d <= hi[:, None] + s).all() and (d >= lo[:, None] - s).all()
    glo = np.minimum(w.reshape(64, 1, 128).min(-1) * 0.5, 0)
    ghi = np.maximum(w.reshape(64, 1, 128).max(-1) * 0.5, 0)
    fg = packing.quantize_group(w, 128, glo, ghi)
    dg = packing.dequantize(fg)
    assert np.abs(dg).max() < np.abs(w).max()
