"""Helpers shared by the kernel modules: backend choice and bit-exact rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "pallas", "xla")
# The W4A8 GEMM has two Pallas kernels: "mosaic" (Mosaic GPU, sm_90 only) and "triton".
GEMM_BACKENDS = ("auto", "pallas", "mosaic", "triton", "xla")
SM90_DEVICE_KINDS = ("H100", "H200", "H800", "GH200")

def round_half_even(v: jax.Array) -> jax.Array:
    """Round float32 to the nearest integer, ties to even, with ops Triton can lower.

    Pallas' Triton backend has no lowering for lax.round, and the usual trick (v + 1.5 * 2**23)
    - 1.5 * 2**23 is folded away by XLA's simplifier under jit (so interpret mode would truncate).
    floor, compare and select are exact for |v| < 2**23 in both, so kernel and reference agree.
    """
    v = v.astype(jnp.float32)
    f = jnp.floor(v)
    frac = v - f
    odd = (f - 2.0 * jnp.floor(f * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return jnp.where(up, f + 1.0, f)


def use_pallas(backend: str, interpret: bool) -> bool:
    """auto = Pallas on a GPU, XLA elsewhere; interpret=True runs the Pallas kernel on CPU.

    The engine and the model never pass "auto" (they decide their kernels once, when they are
    built for their platform: kv_cache.kernel_backend, W4A8Linear.gemm_backend); "auto" is for
    calling a kernel directly."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if interpret:
        if backend == "xla":
            raise ValueError("interpret=True runs the Pallas kernel; it contradicts backend='xla'")
        return True
    if backend == "auto":
        return jax.default_backend() == "gpu"
    return backend == "pallas"


def is_sm90(device) -> bool:
    """A Hopper GPU: device_kind names an H100/H200/H800/GH200, or compute capability 9.0."""
    kind = str(getattr(device, "device_kind", "") or "").upper()
    if any(name in kind for name in SM90_DEVICE_KINDS):
        return True
    cc = getattr(device, "compute_capability", None)
    return cc is not None and str(cc).strip() in ("9.0", "90", "(9, 0)")


def _is_gpu(device) -> bool:
    return str(getattr(device, "platform", "")).lower() in ("gpu", "cuda", "rocm")


def resolve_gemm_backend(backend: str, device=None) -> str:
    """The concrete W4A8 GEMM implementation ("mosaic", "triton" or "xla") for `device`.

    "auto": "mosaic" on sm_90 (H100/H200/H800/GH200 or compute capability 9.0), "triton" on
    other GPUs, "xla" elsewhere. "pallas": the best Pallas kernel for the device ("mosaic" on
    sm_90, else "triton", also on a CPU, where Pallas kernels only run in interpret mode).
    Concrete names are returned unchanged. `device`: anything with .platform, .device_kind and
    optionally .compute_capability (a jax Device, an AbstractDevice); default jax.devices()[0].
    A pure function of its arguments, so a model can store the result as a static attribute
    (part of the jit cache key) and pass it to w4a8_matmul(backend=...).
    """
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"GEMM backend must be one of {GEMM_BACKENDS}, not {backend!r}")
    if backend in ("mosaic", "triton", "xla"):
        return backend
    if device is None:
        device = jax.devices()[0]
    gpu = _is_gpu(device)
    if backend == "auto" and not gpu:
        return "xla"
    return "mosaic" if gpu and is_sm90(device) else "triton"


def gemm_backend(backend: str, interpret: bool, device=None) -> str:
    """resolve_gemm_backend, where interpret=True needs a kernel."""
    if interpret and backend == "auto":
        backend = "pallas"
    name = resolve_gemm_backend(backend, device)
    if interpret and name == "xla":
        raise ValueError("interpret=True runs a Pallas kernel; it contradicts backend='xla'")
    return name


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pair_lone_rows(x: jax.Array, axis: int = 0) -> jax.Array:
    """x with a lone row (size 1 along `axis`) paired with a copy of itself; else x unchanged.

    XLA:CPU computes a row of a dot the same way for any number of rows >= 2 (checked for
    every count from 2 to 4096 in the [M, K] x [N, K] layout, the one the model uses), but a
    single row goes through a matrix-vector kernel that sums in another order. Pairing keeps a
    row's result independent of how many rows share its dot: batch invariance. The caller
    drops the copy's result. Done on every backend, so a program's shapes never depend on it.
    """
    if x.shape[axis] != 1:
        return x
    return jnp.concatenate([x, x], axis=axis)


def fixed_order_sum(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """Sum along `axis` in one fixed order: zero-pad to a power of two, then add halves.

    XLA:CPU picks a reduction strategy by shape (how many rows, how long), so ``jnp.sum`` of a
    row can differ in its last bit with the batch around it, and a quantized model amplifies
    that bit through its INT8 rounding. Adding halves is elementwise arithmetic, which every
    backend evaluates the same way for each element whatever the shape: a row's sum depends on
    that row alone. This is what keeps a request's greedy tokens independent of its batch.
    """
    x = jnp.moveaxis(x, axis, -1)
    n = x.shape[-1]
    width = next_power_of_2(n)
    if width != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - n)])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    out = x[..., 0]
    return jnp.expand_dims(out, axis) if keepdims else out
