"""The mixture-of-experts grouped W4A8 GEMM (pallas_kernels/grouped_w4a8_matmul: the Triton
kernel) vs bf16 jax.lax.ragged_dot, on real MoE expert shapes.

Shapes (E experts, top k, one projection N x K each): Mixtral-8x7B (E 8, top 2; up 14336 x 4096,
down 4096 x 14336) and Qwen3-30B-A3B (E 128, top 8; up 768 x 2048, down 2048 x 768). T tokens
are routed uniformly at random (k distinct experts each, a fixed seed), so M = T * k rows in
groups of varying size, some empty at small T. Both formats (per-channel, g128) of the W4A8
kernel; the INT8 activations are made once (the GEMM alone). "weight GB/s": the packed bytes
of the experts that got at least one row, over the time. One program per (shape, M) whatever
the routing (the group sizes are data).

    PYTHONPATH=. python benchmarks/grouped_gemm.py [--quick]
    .venv/bin/python benchmarks/grouped_gemm.py --smoke   # CPU: one tiny shape, interpret mode

--quick: T = 16, 256, 1024 only. Writes $OUT/grouped_gemm.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import header, save, time_fn  # noqa: E402
from gemm import random_w4  # noqa: E402

from pallas_kernels.grouped_w4a8_matmul import grouped_w4a8_matmul  # noqa: E402
from pallas_kernels.grouped_w4a8_matmul.xla import RAGGED_DIMS  # noqa: E402
from pallas_kernels.quantize import quantize_per_token  # noqa: E402

# (model, projection, E, top k, N, K)
SHAPES = [("mixtral-8x7b", "up", 8, 2, 14336, 4096), ("mixtral-8x7b", "down", 8, 2, 4096, 14336),
          ("qwen3-30b-a3b", "up", 128, 8, 768, 2048), ("qwen3-30b-a3b", "down", 128, 8, 2048, 768)]
TOKENS = [1, 16, 64, 256, 1024, 4096]
QUICK_TOKENS = [16, 256, 1024]


def group_sizes(tokens: int, experts: int, top_k: int, seed: int = 0) -> np.ndarray:
    """Rows per expert when each token picks top_k distinct experts at random."""
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)])
    return np.bincount(picks.reshape(-1), minlength=experts).astype(np.int32)


def stacked_w4(e: int, n: int, k: int, group: int | None, seed: int):
    """E random W4 weights [E, N, ...] in the real format, made on the device."""
    return jax.tree.map(lambda *a: jnp.stack(a), *[random_w4(n, k, group, seed + i)
                                                   for i in range(e)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer token counts")
    ap.add_argument("--smoke", action="store_true",
                    help="one tiny shape, the kernel in interpret mode: checks the script on a CPU")
    args = ap.parse_args(argv)
    shapes, tokens, iters, warmup, interpret = SHAPES, TOKENS, 20, 3, False
    if args.quick:
        tokens, iters = QUICK_TOKENS, 10
    if args.smoke:
        shapes, tokens, iters, warmup = [("tiny", "up", 4, 2, 128, 256)], [1, 8], 1, 1
        interpret = True
    kernel = jax.jit(lambda a, w, s: grouped_w4a8_matmul(a, w, s, jnp.bfloat16, backend="triton",
                                                         interpret=interpret))
    # the float experts' op (qoq_jax/moe.py ExpertLinear): weights [E, N, K], K contracted
    bf16 = jax.jit(lambda x, w, s: jax.lax.ragged_dot_general(
        x, w, s, RAGGED_DIMS, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    rows = []
    print("| model | proj | E | top-k | N x K | T | M | experts hit | bf16 us | w4a8 pc us | "
          "w4a8 g128 us | bf16/g128 | g128 weight GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, proj, e, top_k, n, k in shapes:
        key = jax.random.key(n + k + e)
        wb = jax.random.normal(key, (e, n, k), jnp.bfloat16) * 0.02
        wpc, wg = stacked_w4(e, n, k, None, 0), stacked_w4(e, n, k, 128, 100)
        for t in tokens:
            sizes = group_sizes(t, e, top_k)
            m = int(sizes.sum())
            s = jnp.asarray(sizes)
            x = jax.random.normal(jax.random.fold_in(key, t), (m, k), jnp.bfloat16)
            act = quantize_per_token(x, with_sum=True, backend="xla")
            t_bf = time_fn(bf16, [(x, wb, s)], iters, warmup)
            t_pc = time_fn(kernel, [(act, wpc, s)], iters, warmup)
            t_g = time_fn(kernel, [(act, wg, s)], iters, warmup)
            hit = int((sizes > 0).sum())
            gbps = hit * n * k / 2 / t_g / 1e9
            rows.append(dict(model=model, proj=proj, experts=e, top_k=top_k, n=n, k=k, tokens=t,
                             m=m, experts_hit=hit, bf16_us=t_bf * 1e6, w4a8_pc_us=t_pc * 1e6,
                             w4a8_g128_us=t_g * 1e6, g128_weight_GBps=gbps))
            print(f"| {model} | {proj} | {e} | {top_k} | {n}x{k} | {t} | {m} | {hit} | "
                  f"{t_bf * 1e6:.1f} | {t_pc * 1e6:.1f} | {t_g * 1e6:.1f} | {t_bf / t_g:.2f}x | "
                  f"{gbps:.0f} |", flush=True)
        del wb, wpc, wg
    save("grouped_gemm", {**header(), "rows": rows})


if __name__ == "__main__":
    main()
