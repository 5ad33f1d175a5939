"""W4A8 GEMM vs bf16 jnp.dot vs int8 x int8 jnp.dot (W8A8), side by side on one GPU.

Llama-3-8B shapes (N x K: fused qkv 6144x4096, o 4096x4096, fused gate/up 28672x4096,
down 4096x14336), M = 1 .. 4096. W4A8 runs per-channel and g128, with the activation
quantization included ("+q": bf16 in, the fused quantize kernel then the GEMM) and excluded.
Weight copies are rotated so the working set exceeds L2; times are medians.

    PYTHONPATH=. python benchmarks/gemm.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import copies_for, header, save, time_fn  # noqa: E402

from pallas_kernels import packing  # noqa: E402
from pallas_kernels.quantize import quantize_per_token  # noqa: E402
from pallas_kernels.w4a8_matmul import w4a8_matmul  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MS = [1, 16, 64, 256, 1024, 4096]


def random_w4(n, k, group, seed):
    """Random codes and scales in the real format (quantizing a random matrix is slow on host)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n, k), dtype=np.uint8)
    packed = packing.pack_uint4(q)
    if group is None:
        return packing.W4PerChannel(jnp.asarray(packed),
                                    jnp.asarray(rng.uniform(1e-3, 2e-3, n).astype(np.float16)),
                                    jnp.asarray(rng.uniform(0, 2e-2, n).astype(np.float16)))
    s2 = rng.integers(1, 17, (k // group, n)).astype(np.int8)
    z = rng.integers(0, 16, (k // group, n))
    z = np.minimum(z, 127 // s2.astype(np.int64))  # keep the int8 level in range
    return packing.W4Group(jnp.asarray(packed),
                           jnp.asarray(rng.uniform(1e-4, 2e-4, n).astype(np.float16)),
                           jnp.asarray(s2), jnp.asarray((z * s2).astype(np.uint8)), group)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, kernels in interpret mode: checks the script on a CPU")
    args = ap.parse_args(argv)
    shapes = SHAPES[:2] if args.quick else SHAPES
    ms = [1, 16, 64, 256, 1024] if args.quick else MS
    iters = 10 if args.quick else 30
    kernel = dict(backend="pallas")
    if args.smoke:
        shapes, ms, iters, kernel = [(256, 512)], [1, 16], 2, dict(interpret=True)

    bf16_dot = jax.jit(lambda x, w: jax.lax.dot_general(
        x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    i8_dot = jax.jit(lambda x, w: jax.lax.dot_general(
        x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32))
    gemm = jax.jit(lambda a, w: w4a8_matmul(a, w, jnp.bfloat16, **kernel))
    gemm_q = jax.jit(lambda x, w, s: w4a8_matmul(quantize_per_token(x, with_sum=s, **kernel),
                                                 w, jnp.bfloat16, **kernel),
                     static_argnums=2)

    rows = []
    print("| N x K | M | bf16 us | w8a8 us | w4a8 pc us | w4a8 g128 us | g128+q us | "
          "bf16/g128 | bf16/pc | g128 weight GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, k in shapes:
        key = jax.random.key(n + k)
        nb = copies_for(n * k * 2)
        n8 = copies_for(n * k)
        n4 = copies_for(n * k // 2)
        wb = [jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.bfloat16) * 0.02
              for i in range(nb)]
        w8 = [jax.random.randint(jax.random.fold_in(key, 100 + i), (n, k), -127, 128,
                                 jnp.int8) for i in range(n8)]
        wpc = [random_w4(n, k, None, i) for i in range(n4)]
        wg = [random_w4(n, k, 128, i) for i in range(n4)]
        for m in ms:
            x = jax.random.normal(jax.random.fold_in(key, 7), (m, k), jnp.bfloat16)
            act = quantize_per_token(x, with_sum=True, **kernel)
            t_bf = time_fn(bf16_dot, [(x, w) for w in wb], iters)
            t_i8 = time_fn(i8_dot, [(act.values, w) for w in w8], iters)
            t_pc = time_fn(gemm, [(act, w) for w in wpc], iters)
            t_g = time_fn(gemm, [(act, w) for w in wg], iters)
            t_gq = time_fn(gemm_q, [(x, w, False) for w in wg], iters)
            gbps = (n * k / 2) / t_g / 1e9
            row = dict(n=n, k=k, m=m, bf16_us=t_bf * 1e6, w8a8_us=t_i8 * 1e6,
                       w4a8_pc_us=t_pc * 1e6, w4a8_g128_us=t_g * 1e6, w4a8_g128_q_us=t_gq * 1e6,
                       g128_weight_GBps=gbps)
            rows.append(row)
            print(f"| {n}x{k} | {m} | {t_bf * 1e6:.1f} | {t_i8 * 1e6:.1f} | {t_pc * 1e6:.1f} | "
                  f"{t_g * 1e6:.1f} | {t_gq * 1e6:.1f} | {t_bf / t_g:.2f}x | {t_bf / t_pc:.2f}x | "
                  f"{gbps:.0f} |", flush=True)
        del wb, w8, wpc, wg
    save("gemm", {**header(), "rows": rows})


if __name__ == "__main__":
    main()
