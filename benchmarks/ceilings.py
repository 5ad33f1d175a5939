"""The card's two ceilings, measured: device-to-device copy bandwidth and bf16 matmul rate.

Every other figure in docs/PERFORMANCE.md is given as a fraction of these.
"""

import jax
import jax.numpy as jnp

from _timing import header, save, time_fn


def main():
    n = 1 << 30  # 2 GiB of bf16
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    t = time_fn(copy, [(x,)], iters=20)
    bw = 2 * x.nbytes / t  # read + write
    del x
    s = 8192
    a = jax.random.normal(jax.random.key(1), (s, s), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (s, s), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    tm = time_fn(mm, [(a, b)], iters=20)
    flops = 2 * s ** 3 / tm
    i8a, i8b = a.astype(jnp.int8), b.astype(jnp.int8)
    imm = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32))
    ti = time_fn(imm, [(i8a, i8b)], iters=10)
    res = {**header(), "copy_GBps": bw / 1e9, "bf16_TFLOPs": flops / 1e12,
           "int8_TOPs_xla": 2 * s ** 3 / ti / 1e12}
    print(f"copy {res['copy_GBps']:.0f} GB/s | bf16 matmul 8192^3 {res['bf16_TFLOPs']:.0f} TFLOP/s"
          f" | int8 XLA dot {res['int8_TOPs_xla']:.0f} TOP/s")
    save("ceilings", res)


if __name__ == "__main__":
    main()
