"""Deterministic Hadamard matrices for the block input rotation.

QoQ rotates the residual stream by R = kron(H_k, H_{2^m}) / sqrt(n) for n = k * 2^m (qserve_spec
section 1.7). H_{2^m} is Sylvester's; the base H_k for k in {12, 20, 28, 36, 44, 60, 108, ...}
comes from Paley's constructions over a prime field:
- Paley I, q prime, q = 3 (mod 4): order q + 1;
- Paley II, q prime, q = 1 (mod 4): order 2 (q + 1);
and doubling (H_2k = kron(H_2, H_k)). That covers the hidden sizes of the supported families
(4096 = 2^12, 5120 = 40 * 128, 7168 = 28 * 256, 3584 = 28 * 128, 576 = 36 * 16, 960 = 60 * 16,
3072 = 12 * 256, 896 = 28 * 32, ...).
"""

from __future__ import annotations

import functools

import numpy as np


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = legendre(j - i mod q) for a prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], np.int64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1, q prime with q % 4 == 3."""
    n = q + 1
    s = np.zeros((n, n), np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    """Order 2 (q + 1), q prime with q % 4 == 1."""
    n = q + 1
    c = np.zeros((n, n), np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(n, dtype=np.int64),
                                                              np.array([[1, -1], [-1, -1]]))


def _direct(k: int) -> np.ndarray | None:
    """A Hadamard matrix of order k from one construction (no doubling), if there is one."""
    if k in (1, 2):
        return np.array([[1]]) if k == 1 else np.array([[1, 1], [1, -1]])
    if k % 4:
        return None
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return _paley1(k - 1)
    if _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return _paley2(k // 2 - 1)
    return None


@functools.lru_cache(maxsize=16)
def hadamard(n: int) -> np.ndarray:
    """An n x n matrix with entries +-1 and H Hᵀ = n I, for n = k * 2^m with a buildable k.

    The smallest base k is chosen (the rest is Sylvester doubling), e.g. 576 = 36 * 16."""
    m = (n & -n).bit_length() - 1  # the power of two in n
    for j in range(m, -1, -1):
        base = _direct(n >> j)
        if base is not None:
            sylvester = np.array([[1]])
            for _ in range(j):
                sylvester = np.kron(np.array([[1, 1], [1, -1]]), sylvester)
            return np.kron(base, sylvester).astype(np.int8)
    raise ValueError(
        f"no Hadamard matrix of order {n} available for the rotation (n must be k * 2^m with "
        "a base k from Paley's constructions, e.g. 12, 20, 28, 36, 40, 44, 60, 108)")
def rotation_matrix(n: int) -> np.ndarray:
    """The orthogonal rotation R = H / sqrt(n) in float64."""
    return hadamard(n).astype(np.float64) / np.sqrt(n)
