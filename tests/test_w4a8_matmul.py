"""The W4A8 GEMM's Triton kernel (interpret mode on CPU, compiled on a GPU) vs the XLA reference vs
an independent NumPy int64 reference; the package's import layering. The Mosaic GPU kernel:
tests/test_w4a8_mgpu.py; the CPU route (W4Int8): tests/test_w4a8_int8.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PALLAS, TRITON_CALL, lower_for_h100, on_gpu

from pallas_kernels import packing
from pallas_kernels.packing import FormatError, W4Group, W4PerChannel
from pallas_kernels.quantize import QuantizedActivation, quantize_per_token
from pallas_kernels.w4a8_matmul import (GEMM_CONFIGS, GemmConfig, config_for, w4a8_matmul,
                                        w4a8_matmul_pallas)

# The Triton kernel explicitly: on an H100 backend="pallas" would pick the Mosaic GPU kernel.
TRITON = {**PALLAS, "backend": "triton"}

# (M, K, N, group): M = 1, 7, 64, 300; K from 576 to 14336; N from 192 to 6144.
SHAPES = [
    (1, 14336, 192, 128),
    (7, 576, 6144, 128),  # K = 576 is not a multiple of 128: groups of 64
    (64, 4096, 256, 128),
    (300, 576, 192, 64),
    (7, 1536, 576, 64),
    (64, 1024, 448, 128),
]


def numpy_codes(qweight):
    """Independent unpacking: byte j of chunk c -> k = 64c + j (low), 64c + 32 + j (high)."""
    p = np.asarray(qweight).astype(np.int64)
    n, k2 = p.shape
    q = np.zeros((n, 2 * k2), np.int64)
    for c in range(k2 // 32):
        q[:, 64 * c:64 * c + 32] = p[:, 32 * c:32 * c + 32] & 15
        q[:, 64 * c + 32:64 * c + 64] = p[:, 32 * c:32 * c + 32] >> 4
    return q


def numpy_accumulators(xq, w):
    """Exact int64 sum_k x_q * w_int, and the float64 output of QServe's epilogue."""
    q = numpy_codes(w.qweight)
    if isinstance(w, W4Group):
        g = w.group_size
        s2 = np.repeat(np.asarray(w.s2, np.int64).T, g, axis=1)
        sz = np.repeat(np.asarray(w.szero, np.int64).T, g, axis=1)
        q = q * s2 - sz
    return np.asarray(xq, np.int64) @ q.T


def numpy_output(act, w):
    acc = numpy_accumulators(act.values, w).astype(np.float64)
    sx = np.asarray(act.scale, np.float64)[:, None]
    if isinstance(w, W4Group):
        return acc * sx * np.asarray(w.s1, np.float64)[None]
    return (acc * sx * np.asarray(w.scale, np.float64)[None]
            - np.asarray(w.szero, np.float64)[None] * np.asarray(act.row_sum, np.float64)[:, None])


def _weights(n, k, group, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    fmt = packing.quantize_group(w, group) if group else packing.quantize_per_channel(w)
    return jax.tree.map(jnp.asarray, fmt)


def _act(m, k, seed):
    x = np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)
    return quantize_per_token(jnp.asarray(x), with_sum=True, backend="xla")


def _unit_scales(w):
    """The same codes with every scale 1: then the float32 output *is* the INT32 accumulator."""
    if isinstance(w, W4Group):
        return dataclasses.replace(w, s1=jnp.ones_like(w.s1))
    return dataclasses.replace(w, scale=jnp.ones_like(w.scale), szero=jnp.zeros_like(w.szero))


@pytest.mark.parametrize("m,k,n,group", SHAPES)
@pytest.mark.parametrize("variant", ["per_channel", "group"])
def test_int32_accumulators_are_exact(m, k, n, group, variant):
    w = _unit_scales(_weights(n, k, group if variant == "group" else None, seed=m + n))
    act = _act(m, k, seed=k)
    act = QuantizedActivation(act.values, jnp.ones_like(act.scale), jnp.zeros_like(act.row_sum))
    expected = numpy_accumulators(act.values, w)
    assert np.abs(expected).max() < 2 ** 24  # exactly representable in the float32 output
    assert np.abs(expected).max() > 1000  # and not trivially small
    for kw in (dict(backend="xla"), dict(**TRITON)):
        got = np.asarray(w4a8_matmul(act, w, jnp.float32, **kw)).astype(np.int64)
        np.testing.assert_array_equal(got, expected, err_msg=str(kw))


@pytest.mark.parametrize("m,k,n,group", SHAPES[:4])
@pytest.mark.parametrize("variant", ["per_channel", "group"])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_outputs_match_references(m, k, n, group, variant, out_dtype):
    w = _weights(n, k, group if variant == "group" else None, seed=m)
    act = _act(m, k, seed=m + 1)
    ref = numpy_output(act, w)
    xla = np.asarray(w4a8_matmul(act, w, out_dtype, backend="xla"), np.float64)
    pal = np.asarray(w4a8_matmul(act, w, out_dtype, **TRITON), np.float64)
    scale = np.abs(ref).max()
    rtol = 1e-5 if out_dtype == jnp.float32 else 2 ** -8
    np.testing.assert_allclose(pal, ref, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(xla, ref, rtol=rtol, atol=rtol * scale)
    # kernel and reference may round an fp32 value on a 16-bit boundary differently: one ulp
    np.testing.assert_allclose(pal, xla, rtol=2 * rtol, atol=rtol * scale * 1e-2)


def test_gemm_approximates_the_float_product():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    w = (rng.standard_normal((256, 1024)) * 0.05).astype(np.float32)
    exact = x @ w.T
    for fmt, with_sum in ((packing.quantize_group(w, 128), False),
                          (packing.quantize_per_channel(w), True)):
        act = quantize_per_token(jnp.asarray(x), with_sum=with_sum, backend="xla")
        y = np.asarray(w4a8_matmul(act, jax.tree.map(jnp.asarray, fmt), jnp.float32,
                                   **TRITON))
        rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
        assert rel < 0.15, (type(fmt).__name__, rel)  # 4-bit weights, 8-bit activations


@pytest.mark.parametrize("cfg", sorted({c for _, c in GEMM_CONFIGS}, key=str))
def test_every_block_config_runs(cfg):
    w = _weights(256, 512, 128, seed=3)
    act = _act(33, 512, seed=4)
    got = w4a8_matmul_pallas(act, w, jnp.float32, config=dataclasses.replace(cfg, block_n=128),
                             interpret=PALLAS["interpret"])
    np.testing.assert_allclose(np.asarray(got), numpy_output(act, w), rtol=1e-5, atol=1e-4)


def test_config_table_buckets():
    assert config_for(1, 4096).block_m == 16
    assert config_for(64, 4096).block_m == 64
    assert config_for(300, 192).block_n == 64  # block_n shrinks to divide N


def test_shape_errors_name_the_shape():
    w = _weights(192, 576, 128, seed=0)
    act = _act(4, 512, seed=0)
    with pytest.raises(FormatError, match="K=512 but the weight has K=576"):
        w4a8_matmul(act, w, backend="xla")
    pc = _weights(192, 576, None, seed=0)
    act = QuantizedActivation(_act(4, 576, 0).values, _act(4, 576, 0).scale, None)
    with pytest.raises(ValueError, match="row sums"):
        w4a8_matmul(act, pc, backend="xla")


@pytest.mark.parametrize("variant", ["per_channel", "group128", "group64"])
@pytest.mark.parametrize("m", [1, 64, 300])
def test_every_config_lowers_for_h100(variant, m):
    k, n = (4096, 6144) if variant != "group64" else (576, 192)
    group = {"per_channel": None, "group128": 128, "group64": 64}[variant]
    w = _weights(n, k, group, seed=0)
    act = _act(m, k, seed=0)
    for _, cfg in GEMM_CONFIGS:
        cfg = dataclasses.replace(cfg, block_n=min(cfg.block_n, 64 if n == 192 else cfg.block_n))
        text = lower_for_h100(
            lambda a, w: w4a8_matmul(a, w, jnp.bfloat16, backend="triton", config=cfg), act, w)
        assert TRITON_CALL in text


def test_package_layers_import_no_cycle():
    """pallas_kernels/w4a8_matmul/: the kernels import xla.py only, xla.py no module of the
    package, and the public __init__ none that imports it back (the Mosaic GPU module lazily)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "pallas_kernels" / "w4a8_matmul"
    prefix = "pallas_kernels.w4a8_matmul"
    allowed = {"xla.py": set(), "triton.py": {prefix + ".xla"},
               "mosaic_gpu.py": {prefix + ".xla"}}
    for name, ok in allowed.items():
        tree = ast.parse((pkg / name).read_text())
        mods = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        mods |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names}
        assert {m for m in mods if m and m.startswith(prefix)} == ok, name
    code = ("import sys, pallas_kernels\n"
            "assert 'jax.experimental.pallas.mosaic_gpu' not in sys.modules\n"
            "from pallas_kernels.w4a8_matmul import MgpuGemmConfig, mgpu_config_for\n"
            "assert 'pallas_kernels.w4a8_matmul.mosaic_gpu' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=pkg.parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
