"""Helpers shared by the kernel modules: backend choice and bit-exact rounding."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "pallas", "xla")

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


_auto_override: list[str] = []


@contextlib.contextmanager
def default_backend(backend: str):
    """Within the block, backend="auto" means `backend` ("pallas" or "xla").

    Lets a whole model be traced with the Pallas kernels on a machine without a GPU (to lower it
    for CUDA), or with the XLA references on a GPU (to compare).
    """
    if backend not in ("pallas", "xla"):
        raise ValueError(f"default backend must be 'pallas' or 'xla', not {backend!r}")
    _auto_override.append(backend)
    try:
        yield
    finally:
        _auto_override.pop()


def use_pallas(backend: str, interpret: bool) -> bool:
    """auto = Pallas on a GPU, XLA elsewhere; interpret=True runs the Pallas kernel on CPU."""
    if backend == "auto" and _auto_override:
        backend = _auto_override[-1]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if interpret:
        if backend == "xla":
            raise ValueError("interpret=True runs the Pallas kernel; it contradicts backend='xla'")
        return True
    if backend == "auto":
        return jax.default_backend() == "gpu"
    return backend == "pallas"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


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
