"""The card's two ceilings, measured: device-to-device copy bandwidth and bf16 matmul rate.

Every other figure in docs/PERFORMANCE.md is given as a fraction of these.

    PYTHONPATH=. python benchmarks/ceilings.py [--smoke]     # --smoke: tiny sizes (CPU)
"""

import argparse

import jax
import jax.numpy as jnp

from _timing import header, save, time_fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, few iterations: checks the script on a CPU")
    args = ap.parse_args(argv)
    n, s, iters = (1 << 30, 8192, 20) if not args.smoke else (1 << 20, 256, 3)  # 2 GiB of bf16
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    t = time_fn(copy, [(x,)], iters=iters)
    bw = 2 * x.nbytes / t  # read + write
    del x
    a = jax.random.normal(jax.random.key(1), (s, s), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (s, s), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    tm = time_fn(mm, [(a, b)], iters=iters)
    flops = 2 * s ** 3 / tm
    i8a, i8b = a.astype(jnp.int8), b.astype(jnp.int8)
    imm = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32))
    ti = time_fn(imm, [(i8a, i8b)], iters=max(3, iters // 2))
    res = {**header(), "copy_GBps": bw / 1e9, "bf16_TFLOPs": flops / 1e12,
           "int8_TOPs_xla": 2 * s ** 3 / ti / 1e12, "copy_bytes": 2 * n * 2, "matmul_size": s}
    print(f"copy {res['copy_GBps']:.0f} GB/s | bf16 matmul {s}^3 {res['bf16_TFLOPs']:.1f} "
          f"TFLOP/s | int8 XLA dot {res['int8_TOPs_xla']:.1f} TOP/s")
    save("ceilings", res)


if __name__ == "__main__":
    main()
