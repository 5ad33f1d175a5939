"""W4A8 GEMM (Triton and Mosaic GPU kernels) vs bf16 jnp.dot vs int8 x int8 jnp.dot (W8A8).

Llama-3-8B shapes (N x K: fused qkv 6144x4096, o 4096x4096, fused gate/up 28672x4096,
down 4096x14336), M = 1 .. 4096. W4A8 runs per-channel and g128 with both Pallas kernels
("triton": pallas_kernels/w4a8_matmul/triton.py, "mosaic": the Hopper kernel
w4a8_matmul/mosaic_gpu.py, sm_90 only), and g128 with the activation quantization included
("+q": bf16 in, the fused quantize kernel then the GEMM the device's "auto" backend picks).
Weight copies are rotated so the working set exceeds L2; times are medians. JSON keys
w4a8_pc_us / w4a8_g128_us are the Triton kernel's, mosaic_pc_us / mosaic_g128_us the Mosaic
kernel's.

    PYTHONPATH=. python benchmarks/gemm.py [--quick] [--no-mosaic] [--mgpu-sweep]
    .venv/bin/python benchmarks/gemm.py --smoke      # CPU: one small shape, interpret mode

--quick: the first two shapes at M = 1, 64, 256, 1024 (one M per target of summary.py).
    PYTHONPATH=. python benchmarks/gemm.py --cpu-scan [--layers 30] [--repeats 10]

--mgpu-sweep times alternative Mosaic configs (g128, first shape only, candidates deduplicated
after fitting to the shape) per M and prints the fastest three: the table MGPU_GEMM_CONFIGS in
pallas_kernels/w4a8_matmul/mosaic_gpu.py is untuned until someone runs it.

--cpu-scan (any machine, meant for CPU) times the CPU route instead: the W4Int8 int8 dot
(packing.to_int8 once) against the packed XLA reference (nibbles unpacked every call) and a
float32 einsum, each inside a lax.scan over --layers stacked layers as the model runs them,
for the default model's shapes (SmolLM2-135M) at M = 2, 16, 512; best of --repeats runs.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import copies_for, header, save, time_fn  # noqa: E402

from pallas_kernels import packing  # noqa: E402
from pallas_kernels.quantize import quantize_per_token  # noqa: E402
from pallas_kernels.w4a8_matmul import w4a8_matmul  # noqa: E402
from pallas_kernels.w4a8_matmul.mosaic_gpu import (MGPU_GEMM_CONFIGS,  # noqa: E402
                                                   MgpuGemmConfig, config_for)

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MS = [1, 16, 64, 256, 1024, 4096]
QUICK_MS = [1, 64, 256, 1024]  # one M per target of benchmarks/summary.py
# The default model's projections (SmolLM2-135M, N x K): gate/up, down, q/o, k/v.
CPU_SHAPES = [(1536, 576), (576, 1536), (576, 576), (192, 576)]
CPU_MS = [2, 16, 512]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _random_w4(n, k, group, key):
    kq, ks, kz, k2 = jax.random.split(key, 4)
    # random packed bytes are exactly the packing of random 4-bit codes (two per byte)
    packed = jax.random.bits(kq, (n, k // 2), jnp.uint8)
    if group is None:
        return packing.W4PerChannel(
            packed, jax.random.uniform(ks, (n,), jnp.float32, 1e-3, 2e-3).astype(jnp.float16),
            jax.random.uniform(kz, (n,), jnp.float32, 0, 2e-2).astype(jnp.float16))
    s2 = jax.random.randint(k2, (k // group, n), 1, 17, jnp.int32)
    z = jnp.minimum(jax.random.randint(kz, (k // group, n), 0, 16, jnp.int32),
                    127 // s2)  # keep the int8 level in range
    return packing.W4Group(
        packed, jax.random.uniform(ks, (n,), jnp.float32, 1e-4, 2e-4).astype(jnp.float16),
        s2.astype(jnp.int8), (z * s2).astype(jnp.uint8), group)


def random_w4(n, k, group, seed):
    """Random codes and scales in the real format, made on the device (quantizing a random
    matrix, or drawing it on the host, is slow for the dozens of copies the rotation needs)."""
    return _random_w4(n, k, group, jax.random.key(seed))


def best_of(calls: dict, repeats: int) -> dict:
    """Best wall time of each {name: (fn, args)} over `repeats` rounds after one warm-up; the
    calls take turns within a round, so a shared, noisy CPU's bursts hit them alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def cpu_scan(layers: int, repeats: int, shapes=CPU_SHAPES, ms=CPU_MS) -> list[dict]:
    """The CPU route vs the packed reference vs float32, each scanned over stacked layers."""

    def scanned(product):  # sum of the layers' products, so that none is dead code
        def run(x, ws):
            out = jax.eval_shape(product, x, jax.tree.map(lambda a: a[0], ws))
            body = lambda acc, w: (acc + product(x, w), None)  # noqa: E731
            return jax.lax.scan(body, jnp.zeros(out.shape, out.dtype), ws)[0]
        return jax.jit(run)

    gemm = scanned(lambda a, w: w4a8_matmul(a, w, jnp.float32, backend="xla"))
    f32 = scanned(lambda x, w: jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32))
    rows = []
    print(f"| N x K | M | f32 einsum ms | ref pc ms | int8 pc ms | ref g ms | int8 g ms | "
          f"pc speed-up | g speed-up | int8 g / f32 |  ({layers} layers per call)")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, k in shapes:
        g = packing.group_size_for(k, 128)
        stack = lambda grp: jax.tree.map(  # noqa: E731
            lambda *a: jnp.stack(a), *[random_w4(n, k, grp, i) for i in range(layers)])
        pc, gr = stack(None), stack(g)
        pc8, gr8 = jax.jit(packing.to_int8)(pc), jax.jit(packing.to_int8)(gr)
        wf = jax.random.normal(jax.random.key(n + k), (layers, n, k), jnp.float32) * 0.02
        for m in ms:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32)
            act = quantize_per_token(x, with_sum=True, backend="xla")
            t = best_of(dict(f32=(f32, (x, wf)), ref_pc=(gemm, (act, pc)),
                             int8_pc=(gemm, (act, pc8)), ref_g=(gemm, (act, gr)),
                             int8_g=(gemm, (act, gr8))), repeats)
            row = dict(n=n, k=k, m=m, layers=layers, group=g, **{f"{a}_ms": b * 1e3
                                                                 for a, b in t.items()})
            rows.append(row)
            print(f"| {n}x{k} | {m} | {t['f32'] * 1e3:.2f} | {t['ref_pc'] * 1e3:.2f} | "
                  f"{t['int8_pc'] * 1e3:.2f} | {t['ref_g'] * 1e3:.2f} | {t['int8_g'] * 1e3:.2f} | "
                  f"{t['ref_pc'] / t['int8_pc']:.1f}x | {t['ref_g'] / t['int8_g']:.1f}x | "
                  f"{t['int8_g'] / t['f32']:.2f} |", flush=True)
    return rows


def sweep_configs() -> list[MgpuGemmConfig]:
    """Candidate Mosaic configs for --mgpu-sweep (block_m is fitted to M by config_for)."""
    out = []
    for bn in (64, 128):
        for bm in (8, 16, 32, 64, 128, 256):
            for bk in (256, 512):
                for stages in (3, 4):
                    for split in (None, 1):
                        if bn * bm > 128 * 128 or stages * (bn * bk // 2 + bm * bk) > 160 * 1024:
                            continue  # accumulator registers, shared memory
                        out.append(MgpuGemmConfig(block_n=bn, block_m=bm, block_k=bk,
                                                  max_concurrent_steps=stages, split_k=split))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, kernels in interpret mode: checks the script on a CPU")
    ap.add_argument("--no-mosaic", action="store_true",
                    help="skip the Mosaic GPU kernel (it needs sm_90: H100/H200)")
    ap.add_argument("--mgpu-sweep", action="store_true",
                    help="also time candidate Mosaic configs (g128) per shape and M")
    ap.add_argument("--cpu-scan", action="store_true",
                    help="time the CPU route (W4Int8) vs the packed reference vs float32 "
                         "in a scan over stacked layers, the default model's shapes")
    ap.add_argument("--layers", type=int, default=30, help="stacked layers for --cpu-scan")
    ap.add_argument("--repeats", type=int, default=10, help="runs per timing for --cpu-scan")
    args = ap.parse_args(argv)
    if args.cpu_scan:
        save("gemm_cpu_scan", {**header(), "rows": cpu_scan(args.layers, args.repeats)})
        return
    shapes = SHAPES[:2] if args.quick else SHAPES
    ms = QUICK_MS if args.quick else MS
    iters, warmup = (10 if args.quick else 30), 3
    interpret = False
    if args.smoke:  # every M the summary's targets read, on one small shape
        shapes, ms, iters, warmup, interpret = [(256, 512)], QUICK_MS, 1, 1, True
    triton = dict(backend="triton", interpret=interpret)
    mosaic = dict(backend="mosaic", interpret=interpret)
    auto = dict(backend="triton", interpret=True) if interpret else dict(backend="auto")
    quant = dict(interpret=True) if interpret else dict(backend="auto")
    with_mosaic = not args.no_mosaic

    def rotate(n):  # interpret mode is slow per call: two copies are enough to check the script
        return 2 if interpret else n

    bf16_dot = jax.jit(lambda x, w: jax.lax.dot_general(
        x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    i8_dot = jax.jit(lambda x, w: jax.lax.dot_general(
        x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32))
    gemm_t = jax.jit(lambda a, w: w4a8_matmul(a, w, jnp.bfloat16, **triton))
    gemm_m = jax.jit(lambda a, w: w4a8_matmul(a, w, jnp.bfloat16, **mosaic))
    gemm_cfg = jax.jit(lambda a, w, cfg: w4a8_matmul(a, w, jnp.bfloat16, config=cfg, **mosaic),
                       static_argnums=2)
    gemm_q = jax.jit(lambda x, w, s: w4a8_matmul(quantize_per_token(x, with_sum=s, **quant),
                                                 w, jnp.bfloat16, **auto),
                     static_argnums=2)

    rows = []
    print("| N x K | M | bf16 us | w8a8 us | triton pc us | triton g128 us | mosaic pc us | "
          "mosaic g128 us | g128+q us | bf16/triton g128 | bf16/mosaic g128 | "
          "best g128 weight GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    sweep = []
    for n, k in shapes:
        key = jax.random.key(n + k)
        nb = rotate(copies_for(n * k * 2))
        n8 = rotate(copies_for(n * k))
        n4 = rotate(copies_for(n * k // 2))
        wb = [jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.bfloat16) * 0.02
              for i in range(nb)]
        w8 = [jax.random.randint(jax.random.fold_in(key, 100 + i), (n, k), -127, 128,
                                 jnp.int8) for i in range(n8)]
        wpc = [random_w4(n, k, None, i) for i in range(n4)]
        wg = [random_w4(n, k, 128, i) for i in range(n4)]
        for m in ms:
            x = jax.random.normal(jax.random.fold_in(key, 7), (m, k), jnp.bfloat16)
            act = quantize_per_token(x, with_sum=True, **quant)
            t_bf = time_fn(bf16_dot, [(x, w) for w in wb], iters, warmup)
            t_i8 = time_fn(i8_dot, [(act.values, w) for w in w8], iters, warmup)
            t_pc = time_fn(gemm_t, [(act, w) for w in wpc], iters, warmup)
            t_g = time_fn(gemm_t, [(act, w) for w in wg], iters, warmup)
            nan = float("nan")
            t_mpc = (time_fn(gemm_m, [(act, w) for w in wpc], iters, warmup)
                     if with_mosaic else nan)
            t_mg = time_fn(gemm_m, [(act, w) for w in wg], iters, warmup) if with_mosaic else nan
            t_gq = time_fn(gemm_q, [(x, w, False) for w in wg], iters, warmup)
            best = min(t_g, t_mg) if with_mosaic else t_g
            gbps = (n * k / 2) / best / 1e9
            row = dict(n=n, k=k, m=m, bf16_us=t_bf * 1e6, w8a8_us=t_i8 * 1e6,
                       w4a8_pc_us=t_pc * 1e6, w4a8_g128_us=t_g * 1e6,
                       mosaic_pc_us=t_mpc * 1e6, mosaic_g128_us=t_mg * 1e6,
                       w4a8_g128_q_us=t_gq * 1e6, g128_weight_GBps=gbps)
            rows.append(row)
            print(f"| {n}x{k} | {m} | {t_bf * 1e6:.1f} | {t_i8 * 1e6:.1f} | {t_pc * 1e6:.1f} | "
                  f"{t_g * 1e6:.1f} | {t_mpc * 1e6:.1f} | {t_mg * 1e6:.1f} | {t_gq * 1e6:.1f} | "
                  f"{t_bf / t_g:.2f}x | {t_bf / t_mg:.2f}x | {gbps:.0f} |", flush=True)
            # interpret mode (--smoke) is slow per call: the sweep's code path at one M
            if (args.mgpu_sweep and with_mosaic and (n, k) == shapes[0]
                    and (not interpret or m == ms[0])):
                times = []
                cands = sweep_configs() if not interpret else [MGPU_GEMM_CONFIGS[0][1]]
                fitted = {}
                for cfg in cands:  # block_m shrinks to M, split_k resolves: many coincide
                    fitted.setdefault(config_for(m, n, k, base=cfg), cfg)
                for cfg in fitted:
                    try:
                        t = time_fn(lambda a, w, c=cfg: gemm_cfg(a, w, c),
                                    [(act, w) for w in wg],
                                    iters if interpret else max(3, iters // 3), warmup)
                    except Exception as e:  # noqa: BLE001 - e.g. shared memory exceeded
                        print(f"  sweep {cfg}: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    times.append((t, cfg))
                times.sort(key=lambda tc: tc[0])
                for t, cfg in times[:3]:
                    print(f"  sweep {n}x{k} M={m}: {t * 1e6:.1f} us  {cfg}", flush=True)
                sweep += [dict(n=n, k=k, m=m, us=t * 1e6, config=str(cfg)) for t, cfg in times]
        del wb, w8, wpc, wg
    save("gemm", {**header(), "rows": rows, "mgpu_sweep": sweep})


if __name__ == "__main__":
    main()
