"""The W4A8 GEMM's Mosaic GPU (Hopper) kernel: Mosaic GPU interpret mode on CPU (compiled on a
GPU) vs the XLA reference vs an independent NumPy int64 reference; lowering for an abstract H100
(wgmma s8 with the weights in registers, TMA); the backend dispatch."""

import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import lower_for_h100, on_gpu
from test_w4a8_matmul import _act, _unit_scales, _weights, numpy_accumulators, numpy_output

from pallas_kernels import resolve_gemm_backend
from pallas_kernels._common import gemm_backend
from pallas_kernels.quantize import QuantizedActivation
from pallas_kernels.w4a8_matmul import GemmConfig, w4a8_matmul, w4a8_matmul_xla
from pallas_kernels.w4a8_matmul.mosaic_gpu import (MGPU_GEMM_CONFIGS, MgpuGemmConfig, config_for,
                                                   permute_activations, w4a8_matmul_mgpu)

# The kernel-test switch: Mosaic GPU interpret mode on CPU, the compiled kernel on a GPU.
INTERPRET = not on_gpu()
MOSAIC = {"backend": "mosaic", "interpret": INTERPRET}
MGPU_CALL = "custom_call @mosaic_gpu_v2"

# (M, K, N, group, config overrides). Interpret mode is slow: small shapes, a few CTAs each.
CASES = [
    pytest.param(1, 512, 128, None, {}, id="pc-m1"),  # decode: wgmma N = 8, auto split-K
    pytest.param(20, 512, 128, 128, dict(split_k=1), id="g128-m20"),  # M not a multiple of 8
    pytest.param(64, 256, 64, 128, dict(block_m=64, split_k=1), id="g128-m64-full-tile"),
    pytest.param(9, 576, 64, 64, dict(block_m=16, split_k=1), id="g64-m9-kpad"),  # K % 128 != 0
    pytest.param(20, 512, 128, 64, dict(swizzle=64, block_k=128, split_k=2), id="g64-sw64-split2"),
    pytest.param(33, 256, 64, None, dict(block_m=16, swizzle=64, split_k=1), id="pc-m33-3tiles"),
]


def _run(act, w, out_dtype, overrides):
    base = MGPU_GEMM_CONFIGS[0][1] if act.values.shape[0] <= 8 else MGPU_GEMM_CONFIGS[-2][1]
    cfg = dataclasses.replace(base, **overrides) if overrides else None
    return np.asarray(w4a8_matmul(act, w, out_dtype, config=cfg, **MOSAIC))


@pytest.mark.parametrize("m,k,n,group,overrides", CASES)
def test_kernel_matches_numpy_and_xla(m, k, n, group, overrides):
    w = _weights(n, k, group, seed=m + n)
    act = _act(m, k, seed=k + m)
    # 1. Exact INT32 accumulators: unit scales make the float32 output the accumulator itself.
    wu = _unit_scales(w)
    au = QuantizedActivation(act.values, jnp.ones_like(act.scale), jnp.zeros_like(act.row_sum))
    expected = numpy_accumulators(au.values, wu)
    assert 1000 < np.abs(expected).max() < 2 ** 24
    got = _run(au, wu, jnp.float32, overrides).astype(np.int64)
    np.testing.assert_array_equal(got, expected)
    # 2. The real epilogue: the float64 NumPy output, and the compiled XLA reference bit for bit
    # (same operation order; where a backend contracts a multiply-subtract into an FMA, the
    # per-channel output may differ in the last bit, so on a GPU it gets one ulp).
    y = _run(act, w, jnp.float32, overrides)
    ref = numpy_output(act, w)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    xla = np.asarray(jax.jit(w4a8_matmul_xla, static_argnums=2)(act, w, jnp.float32))
    if INTERPRET or group is not None:
        np.testing.assert_array_equal(y, xla)
    else:
        np.testing.assert_array_max_ulp(y, xla, maxulp=1)


def test_bf16_output_and_default_config():
    w = _weights(128, 512, 128, seed=5)
    act = _act(12, 512, seed=6)
    y = np.asarray(w4a8_matmul(act, w, jnp.bfloat16, **MOSAIC), np.float64)
    ref = numpy_output(act, w)
    np.testing.assert_allclose(y, ref, rtol=2 ** -8, atol=2 ** -8 * np.abs(ref).max())


@pytest.mark.skipif(not on_gpu(), reason="GPU interpret mode has no register A operand")
@pytest.mark.parametrize("a_operand", ["registers", "smem"])
def test_both_a_operand_paths_on_gpu(a_operand):
    w = _weights(256, 1024, 128, seed=7)
    act = _act(40, 1024, seed=8)
    for _, cfg in MGPU_GEMM_CONFIGS:
        y = w4a8_matmul_mgpu(act, w, jnp.float32, config=dataclasses.replace(
            cfg, a_operand=a_operand))
        np.testing.assert_array_equal(
            np.asarray(y), np.asarray(jax.jit(w4a8_matmul_xla, static_argnums=2)(
                act, w, jnp.float32)))


def test_permutation_is_the_nibble_order():
    """Column j of the permuted activations holds the k of the nibble that meets it in wgmma."""
    for sw in (64, 128):
        k = 4 * sw
        perm = np.asarray(permute_activations(jnp.arange(k, dtype=jnp.int32)[None], sw))[0]
        for col in range(k):
            sup, rest = divmod(col, 2 * sw)  # super-chunk, then [low nibbles | high nibbles]
            half, byte = divmod(rest, sw)  # byte of the super-chunk's S packed bytes
            chunk, j = divmod(byte, 32)
            assert perm[col] == sup * 2 * sw + 64 * chunk + 32 * half + j


def test_config_table_fits_shapes():
    assert config_for(1, 4096, 4096).block_m == 8
    assert config_for(100, 4096, 4096).block_m == 64
    c = config_for(1, 4096, 4096)  # 64 CTAs at split 1: split-K fills the 132 SMs
    assert c.split_k > 1 and (4096 // c.block_n) * c.split_k <= 132
    assert config_for(4096, 4096, 4096).split_k == 1
    c = config_for(300, 192, 576)
    assert (c.block_n, c.swizzle) == (64, 64)  # block_n divides N; K % 256 != 0: 64-byte slabs


@pytest.mark.parametrize("variant", ["per_channel", "group128", "group64"])
def test_every_config_lowers_for_h100(variant):
    """Each table entry lowers to one Mosaic GPU call whose PTX has the s8 wgmma with the
    weights as the register A operand (4 registers, not a shared-memory descriptor), fed by TMA
    and mbarriers; the smem-A variant lowers too."""
    k, n = (1024, 768) if variant != "group64" else (576, 192)
    group = {"per_channel": None, "group128": 128, "group64": 64}[variant]
    w = _weights(n, k, group, seed=0)
    reg_a = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k32\.s32\.s8\.s8 \{[^}]*\}, "
                       r"\{\$\d+,\$\d+,\$\d+,\$\d+\}, \$\d+")
    smem_a = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k32\.s32\.s8\.s8 \{[^}]*\}, "
                        r"\$\d+, \$\d+")
    for (limit, cfg), m in zip(MGPU_GEMM_CONFIGS, (1, 16, 32, 64, 100, 256, 1000)):
        assert m <= limit
        act = _act(m, k, seed=0)
        text = lower_for_h100(
            lambda a, w: w4a8_matmul(a, w, jnp.bfloat16, backend="mosaic", config=cfg), act, w)
        assert text.count(MGPU_CALL) == 1
        fitted = config_for(m, n, k, base=cfg)
        assert {int(x) for x in reg_a.findall(text)} == {fitted.block_m}, (m, cfg)
        assert not smem_a.search(text)
        assert "cp.async.bulk.tensor.shared.cluster.global" in text  # TMA loads
        assert "mbarrier.try_wait.parity" in text
    text = lower_for_h100(lambda a, w: w4a8_matmul(
        a, w, jnp.bfloat16, backend="mosaic",
        config=dataclasses.replace(MGPU_GEMM_CONFIGS[1][1], a_operand="smem")), act, w)
    assert smem_a.search(text) and not reg_a.search(text)


def _dev(platform, kind="", cc=None):
    return types.SimpleNamespace(platform=platform, device_kind=kind, compute_capability=cc)


@pytest.mark.parametrize("dev,auto,pallas", [
    (_dev("gpu", "NVIDIA H100 80GB HBM3", "9.0"), "mosaic", "mosaic"),
    (_dev("gpu", "NVIDIA H200"), "mosaic", "mosaic"),
    (_dev("gpu", "NVIDIA H800"), "mosaic", "mosaic"),
    (_dev("gpu", "NVIDIA GH200 480GB"), "mosaic", "mosaic"),
    (_dev("gpu", "some future name", "9.0"), "mosaic", "mosaic"),
    (_dev("cuda", "NVIDIA H100"), "mosaic", "mosaic"),  # an AbstractDevice's platform
    (_dev("gpu", "NVIDIA A100-SXM4-80GB", "8.0"), "triton", "triton"),
    (_dev("gpu", "NVIDIA L40S", "8.9"), "triton", "triton"),
    (_dev("gpu", "NVIDIA B200", "10.0"), "triton", "triton"),
    (_dev("cpu", "cpu"), "xla", "triton"),
])
def test_resolve_gemm_backend(dev, auto, pallas):
    assert resolve_gemm_backend("auto", dev) == auto
    assert resolve_gemm_backend("pallas", dev) == pallas
    for name in ("mosaic", "triton", "xla"):
        assert resolve_gemm_backend(name, dev) == name
    with pytest.raises(ValueError, match="GEMM backend"):
        resolve_gemm_backend("cuda", dev)


def test_resolve_gemm_backend_real_devices():
    dev = jax.devices()[0]
    assert resolve_gemm_backend("auto") == resolve_gemm_backend("auto", dev)
    abstract = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=1,
                                           platform="cuda")
    assert resolve_gemm_backend("auto", abstract) == "mosaic"


def test_dispatch_and_overrides():
    cpu = _dev("cpu", "cpu")
    assert gemm_backend("auto", False, cpu) == "xla"
    assert gemm_backend("auto", True, cpu) == "triton"  # interpret: a kernel, Triton on CPU
    with pytest.raises(ValueError, match="contradicts"):
        gemm_backend("xla", True, cpu)
    for name in ("mosaic", "triton", "xla", "pallas"):
        assert gemm_backend(name, False, cpu) == resolve_gemm_backend(name, cpu)
    w = _weights(64, 256, 128, seed=1)
    act = _act(3, 256, seed=1)
    with pytest.raises(TypeError, match="MgpuGemmConfig"):
        w4a8_matmul(act, w, backend="mosaic", config=GemmConfig(16, 64), interpret=True)
    with pytest.raises(TypeError, match="GemmConfig"):
        w4a8_matmul(act, w, backend="triton", config=MgpuGemmConfig(), interpret=True)
