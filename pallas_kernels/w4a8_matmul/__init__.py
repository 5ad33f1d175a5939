"""The W4A8 GEMM: INT8 activations x 4-bit weights, INT32 accumulation over all of K.

    y[m, n] = epilogue(sum_k x_q[m, k] * w_int[n, k])

- per-channel (W4PerChannel): w_int = q (raw codes 0..15, already valid INT8 operands);
  epilogue: y = acc * s_x[m] * scale[n] - szero[n] * row_sum[m]   (row_sum: sum of float x)
- progressive group (W4Group): w_int = q * s2[g, n] - szero[g, n], formed in registers before the
  dot and exact in INT8; epilogue: y = acc * s_x[m] * s1[n]
- W4Int8 (packing.to_int8 of either): w_int unpacked once to int8 [N, K]; the fast CPU route
  (XLA only), bit-identical to the packed formats' output.

One op, several backends, one module each (laid out as openxla/tokamax lays out its ops):

    __init__.py    this file: the public op ``w4a8_matmul(act, w, out_dtype, backend=...)`` and
                   the names callers import
    xla.py         the XLA reference (the oracle; the CPU route), _check and _epilogue
    triton.py      the Pallas Triton kernel and its block-size table GEMM_CONFIGS
    mosaic_gpu.py  the Pallas Mosaic GPU kernel for Hopper (sm_90), MGPU_GEMM_CONFIGS

The kernels import xla.py, never this file or each other. mosaic_gpu.py is imported on first
use (its names below too, through __getattr__): jax's Mosaic GPU package costs ~0.3 s to import.
Note: ``pallas_kernels.w4a8_matmul`` (the package's parent attribute) is the *function* once
``pallas_kernels`` is imported; import submodules with ``from pallas_kernels.w4a8_matmul.xla
import ...``, not ``import pallas_kernels.w4a8_matmul.xla as ...``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import gemm_backend, resolve_gemm_backend  # noqa: F401
from pallas_kernels.packing import W4Group, W4Int8, W4PerChannel, to_int8
from pallas_kernels.quantize import QuantizedActivation
from pallas_kernels.w4a8_matmul.triton import (GEMM_CONFIGS, GemmConfig, config_for,
                                               w4a8_matmul_pallas, w4a8_matmul_triton)
from pallas_kernels.w4a8_matmul.xla import w4a8_matmul_xla

_MOSAIC_NAMES = {"MgpuGemmConfig": "MgpuGemmConfig", "MGPU_GEMM_CONFIGS": "MGPU_GEMM_CONFIGS",
                 "w4a8_matmul_mgpu": "w4a8_matmul_mgpu", "mgpu_config_for": "config_for",
                 "permute_activations": "permute_activations"}

__all__ = ["w4a8_matmul", "w4a8_matmul_xla", "w4a8_matmul_pallas", "w4a8_matmul_triton",
           "GemmConfig", "GEMM_CONFIGS", "config_for", "W4Int8", "to_int8",
           "resolve_gemm_backend", *_MOSAIC_NAMES]


def __getattr__(name: str):
    if name in _MOSAIC_NAMES:
        from pallas_kernels.w4a8_matmul import mosaic_gpu
        return getattr(mosaic_gpu, _MOSAIC_NAMES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def w4a8_matmul(act: QuantizedActivation, w: W4PerChannel | W4Group | W4Int8,
                out_dtype=jnp.bfloat16, *, backend: str = "auto", interpret: bool = False,
                config=None) -> jax.Array:
    """y [M, N] = x_q [M, K] · Wᵀ with QServe's epilogue.

    backend: "mosaic" (Mosaic GPU kernel, sm_90: mosaic_gpu.py), "triton" (the Pallas Triton
    kernel: triton.py), "xla" (the reference: xla.py), "pallas" (the best Pallas kernel for the
    device) or "auto" (the best for the device: mosaic on H100/H200, triton on other GPUs, xla on
    CPU); see _common.resolve_gemm_backend, which a model uses to fix the choice once, statically.
    interpret=True runs the chosen kernel in its CPU interpret mode. config: a GemmConfig for
    "triton", an MgpuGemmConfig for "mosaic" (None: the shape's entry of the config table).
    w: packed W4PerChannel / W4Group, or W4Int8 (to_int8: the CPU route, "xla" only).
    """
    name = gemm_backend(backend, interpret)
    if isinstance(w, W4Int8) and name != "xla":
        raise TypeError(f"W4Int8 weights (the unpacked CPU route) run on the 'xla' GEMM backend "
                        f"only, not {name!r}: the GPU kernels take the packed W4PerChannel / "
                        f"W4Group")
    if name == "mosaic":
        from pallas_kernels.w4a8_matmul.mosaic_gpu import MgpuGemmConfig, w4a8_matmul_mgpu
        if config is not None and not isinstance(config, MgpuGemmConfig):
            raise TypeError(f"the mosaic GEMM takes an MgpuGemmConfig, not {config!r}")
        return w4a8_matmul_mgpu(act, w, out_dtype, config=config, interpret=interpret)
    if name == "triton":
        if config is not None and not isinstance(config, GemmConfig):
            raise TypeError(f"the triton GEMM takes a GemmConfig, not {config!r}")
        return w4a8_matmul_triton(act, w, out_dtype, config=config, interpret=interpret)
    return w4a8_matmul_xla(act, w, out_dtype)
