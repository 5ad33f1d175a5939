"""GPU kernels for W4A8KV4 inference (Pallas, Triton backend), each with an XLA reference.

Knows nothing of models. Every op takes ``backend="auto" | "pallas" | "xla"`` (auto = Pallas on
a GPU, XLA elsewhere) and ``interpret=True`` (run the Pallas kernel on CPU). The W4A8 GEMM also
has a Hopper Mosaic GPU kernel: its backend is "auto" | "pallas" | "mosaic" | "triton" | "xla",
and ``resolve_gemm_backend(backend, device)`` names the concrete one for a device.
"""

from pallas_kernels._common import resolve_gemm_backend
from pallas_kernels.packing import (CHUNK, PROTECTIVE_RANGE, FormatError, W4Group, W4Int8,
                                    W4PerChannel, dequantize, group_size_for, pack_uint4,
                                    quantize_group, quantize_per_channel, to_int8, unpack_uint4)
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.quantize import (QuantizedActivation, quantize_per_token, rmsnorm_quantize,
                                     silu_mul_quantize)
from pallas_kernels.w4a8_matmul import GEMM_CONFIGS, GemmConfig, w4a8_matmul

__all__ = [
    "CHUNK", "PROTECTIVE_RANGE", "FormatError", "W4Group", "W4PerChannel", "dequantize",
    "group_size_for", "pack_uint4", "quantize_group", "quantize_per_channel", "unpack_uint4",
    "paged_attention", "QuantizedActivation", "quantize_per_token",
    "rmsnorm_quantize", "silu_mul_quantize", "GEMM_CONFIGS", "GemmConfig", "w4a8_matmul",
    "resolve_gemm_backend", "W4Int8", "to_int8",
]
