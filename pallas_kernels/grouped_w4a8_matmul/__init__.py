"""The grouped W4A8 GEMM of mixture-of-experts layers: rows sorted by expert, each row times
its expert's 4-bit weight, INT8 x INT8 -> INT32 over all of K, QServe's epilogue with the
expert's scales:

    y[m, n] = epilogue_g(sum_k x_q[m, k] * w_int[g, n, k])     g = the expert of row m

Rows [o_g, o_g + group_sizes[g]) belong to expert g; rows past sum(group_sizes) come back as
zeros. Weights: packing.W4PerChannel / W4Group (or W4Int8, XLA only) with a leading expert
axis. Group sizes are data, not shapes: one compiled program serves every routing.

    __init__.py   this file: the public op grouped_w4a8_matmul(..., backend=...)
    xla.py        the XLA reference (jax.lax.ragged_dot; the oracle and the CPU route)
    triton.py     the Pallas Triton kernel over a static tile schedule (GROUPED_GEMM_CONFIGS)

As in w4a8_matmul/, kernels import xla.py, never this file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import gemm_backend
from pallas_kernels.grouped_w4a8_matmul.triton import (GROUPED_GEMM_CONFIGS, GroupedGemmConfig,
                                                       config_for, grouped_w4a8_matmul_pallas,
                                                       tile_schedule)
from pallas_kernels.grouped_w4a8_matmul.xla import grouped_w4a8_matmul_xla, row_groups
from pallas_kernels.packing import W4Group, W4Int8, W4PerChannel
from pallas_kernels.quantize import QuantizedActivation

__all__ = ["grouped_w4a8_matmul", "grouped_w4a8_matmul_xla", "grouped_w4a8_matmul_pallas",
           "GroupedGemmConfig", "GROUPED_GEMM_CONFIGS", "config_for", "tile_schedule",
           "row_groups"]


def grouped_w4a8_matmul(act: QuantizedActivation, w: W4PerChannel | W4Group | W4Int8,
                        group_sizes: jax.Array, out_dtype=jnp.bfloat16, *,
                        backend: str = "auto", interpret: bool = False,
                        config: GroupedGemmConfig | None = None) -> jax.Array:
    """y [M, N] (see the module docstring). backend: "triton" (or "pallas", or "mosaic": the
    grouped GEMM has no Mosaic GPU kernel yet, so Hopper runs the Triton one), "xla", or
    "auto" (Triton on a GPU, XLA elsewhere). interpret=True runs the kernel on CPU."""
    name = gemm_backend(backend, interpret)
    if name in ("mosaic", "triton"):
        if isinstance(w, W4Int8):
            raise TypeError("W4Int8 weights (the unpacked CPU route) run on the 'xla' backend "
                            "only: the kernel takes the packed W4PerChannel / W4Group")
        return grouped_w4a8_matmul_pallas(act, w, group_sizes, out_dtype, config=config,
                                          interpret=interpret)
    return grouped_w4a8_matmul_xla(act, w, group_sizes, out_dtype)
