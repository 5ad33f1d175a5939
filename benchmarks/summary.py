"""One screen at the end of a GPU check: each target, the measured figure, met or not.

    python benchmarks/summary.py $OUT       # reads gemm.json, attention.json, throughput.json

Targets (H100; issue "GPU validation" and perf_anchors.md section 0): W4A8 GEMM >= 3.0x bf16 at
M <= 64, >= 1.8x at M = 256, >= 1.5x at M = 1024 (g128, the slowest of the measured shapes);
KV4 decode attention >= 2.5x the bf16 cache from 4k context at batch 64; end to end >= 15,000
tokens/s at batch 256, >= 2x our bf16 engine, >= 400 tokens/s per user at batch 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(out: Path, name: str):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def targets(out: Path) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []
    gemm = _load(out, "gemm")
    for label, ms, goal in (("W4A8 g128 GEMM vs bf16, M <= 64", (1, 16, 64), 3.0),
                            ("W4A8 g128 GEMM vs bf16, M = 256", (256,), 1.8),
                            ("W4A8 g128 GEMM vs bf16, M = 1024", (1024,), 1.5)):
        # the faster of the Triton and the Mosaic GPU kernel (NaN when Mosaic was skipped)
        got = [r["bf16_us"] / min(r["w4a8_g128_us"], r.get("mosaic_g128_us") or float("inf"))
               for r in (gemm or {}).get("rows", []) if r["m"] in ms]
        rows.append((f"{label} >= {goal}x", f"{min(got):.2f}x (worst shape)" if got else "not run",
                     min(got) >= goal if got else None))
    att = _load(out, "attention")
    got = [r["bf16_us"] / r["kv4_us"] for r in (att or {}).get("rows", []) if r["ctx"] >= 4096]
    rows.append(("KV4 decode attention vs bf16 cache, ctx >= 4k, batch 64 >= 2.5x",
                 f"{min(got):.2f}x" if got else "not run", min(got) >= 2.5 if got else None))
    tp = _load(out, "throughput")
    w = {r["batch"]: r for r in (tp or {}).get("rows", []) if r["variant"] == "w4a8kv4"}
    f = {r["batch"]: r for r in (tp or {}).get("rows", []) if r["variant"] == "bf16"}
    top = max(w) if w else None
    rows.append(("end to end W4A8KV4 at batch 256 >= 15000 tokens/s",
                 f"{w[256]['tokens_per_s']:.0f}" if 256 in w else "not run",
                 w[256]["tokens_per_s"] >= 15000 if 256 in w else None))
    rows.append(("end to end W4A8KV4 vs our bf16 engine >= 2x",
                 f"{w[top]['tokens_per_s'] / f[top]['tokens_per_s']:.2f}x at batch {top}"
                 if top in f else "not run",
                 w[top]["tokens_per_s"] / f[top]["tokens_per_s"] >= 2 if top in f else None))
    lat = {(r["variant"], r["batch"]): r for r in (tp or {}).get("latency", [])}
    one = lat.get(("w4a8kv4", 1))
    rows.append(("W4A8KV4 batch 1 >= 400 tokens/s per user",
                 f"{one['tokens_per_s_per_user']:.0f}" if one else "not run",
                 one["tokens_per_s_per_user"] >= 400 if one else None))
    return rows


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:] or ["out"])[0])
    print("== targets")
    for name, value, ok in targets(out):
        mark = {True: "MET ", False: "MISS", None: "----"}[ok]
        print(f"[{mark}] {name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
