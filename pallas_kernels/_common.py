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
