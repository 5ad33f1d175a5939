"""Timing helpers shared by the GPU benchmarks (METHOD: warm up, rotate inputs past L2, medians)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

import jax

L2_BYTES = 50 * 2 ** 20  # H100; rotating ~3x this keeps weights out of cache


def copies_for(nbytes: int, target: int = 3 * L2_BYTES, cap: int = 64) -> int:
    return max(2, min(cap, math.ceil(target / max(nbytes, 1))))


def time_fn(fn, args_list, iters: int = 30, warmup: int = 3) -> float:
    """Median seconds of one call, cycling through args_list (rotated copies)."""
    for i in range(warmup):
        jax.block_until_ready(fn(*args_list[i % len(args_list)]))
    samples = []
    for i in range(iters):
        reps = len(args_list)
        t = time.perf_counter()
        outs = [fn(*a) for a in args_list]
        jax.block_until_ready(outs)
        samples.append((time.perf_counter() - t) / reps)
    return statistics.median(samples)


def header() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dev = jax.devices()[0]
    return {"device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
            "commit": commit, "date": time.strftime("%Y-%m-%d")}


def save(name: str, payload: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out, f"{name}.json").write_text(json.dumps(payload, indent=1))
