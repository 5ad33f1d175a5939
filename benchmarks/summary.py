"""One screen at the end of a GPU check: each target, the measured figure, met or not.

    python benchmarks/summary.py [--strict] $OUT   # reads ceilings, gemm, attention, throughput .json

Targets (H100/H200; issue "GPU validation" and perf_anchors.md section 0): W4A8 GEMM >= 3.0x
bf16 at M <= 64, >= 1.8x at M = 256, >= 1.5x at M = 1024 (g128, the slowest of the measured
shapes); KV4 decode attention >= 2.5x the bf16 cache from 4k context at batch 64; end to end
>= 15,000 tokens/s at batch 256, >= 2x our bf16 engine, >= 400 tokens/s per user at batch 1.
Then what was reached against the card's measured ceilings (ceilings.json), and warnings (a
timed throughput run that compiled or hit the prefix cache).

A figure that cannot be computed from a JSON (missing, unreadable, keys renamed) prints as an
error and never stops the summary. --strict (gpu_check.sh --dry-run): exit 1 when a JSON is
missing or broken or any target could not be computed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FILES = ("ceilings", "gemm", "attention", "throughput")


def _load(out: Path, name: str, problems: list[str]):
    p = out / f"{name}.json"
    if not p.exists():
        problems.append(f"{p.name}: missing")
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{p.name}: unreadable ({type(e).__name__}: {e})")
        return None


def _gemm(gemm, ms, goal):
    # the faster of the Triton and the Mosaic GPU kernel (NaN when Mosaic was skipped)
    got = []
    for r in gemm["rows"]:
        if r["m"] in ms:
            mosaic = r.get("mosaic_g128_us")
            best = min(r["w4a8_g128_us"], mosaic if mosaic and not math.isnan(mosaic)
                       else math.inf)
            got.append(r["bf16_us"] / best)
    return (f"{min(got):.2f}x (worst shape)", min(got) >= goal) if got else None


def _attention(att):
    got = [r["bf16_us"] / r["kv4_us"] for r in att["rows"] if r["ctx"] >= 4096]
    return (f"{min(got):.2f}x", min(got) >= 2.5) if got else None


def _rows(tp, variant):
    return {r["batch"]: r for r in tp["rows"] if r["variant"] == variant}


def _e2e_256(tp):
    w = _rows(tp, "w4a8kv4")
    if 256 not in w:
        return None
    return f"{w[256]['tokens_per_s']:.0f}", w[256]["tokens_per_s"] >= 15000


def _e2e_ratio(tp):
    w, f = _rows(tp, "w4a8kv4"), _rows(tp, "bf16")
    both = sorted(set(w) & set(f))
    if not both:
        return None
    top = both[-1]
    ratio = w[top]["tokens_per_s"] / f[top]["tokens_per_s"]
    return f"{ratio:.2f}x at batch {top}", ratio >= 2


def _batch1(tp):
    one = {(r["variant"], r["batch"]): r for r in tp.get("latency", [])}.get(("w4a8kv4", 1))
    if one is None:
        return None
    return f"{one['tokens_per_s_per_user']:.0f}", one["tokens_per_s_per_user"] >= 400


TARGETS = [  # (name, the JSON it reads, the figure and whether it is met, or None: not run)
    ("W4A8 g128 GEMM vs bf16, M <= 64 >= 3.0x", "gemm", lambda d: _gemm(d, (1, 16, 64), 3.0)),
    ("W4A8 g128 GEMM vs bf16, M = 256 >= 1.8x", "gemm", lambda d: _gemm(d, (256,), 1.8)),
    ("W4A8 g128 GEMM vs bf16, M = 1024 >= 1.5x", "gemm", lambda d: _gemm(d, (1024,), 1.5)),
    ("KV4 decode attention vs bf16 cache, ctx >= 4k, batch 64 >= 2.5x", "attention", _attention),
    ("end to end W4A8KV4 at batch 256 >= 15000 tokens/s", "throughput", _e2e_256),
    ("end to end W4A8KV4 vs our bf16 engine >= 2x", "throughput", _e2e_ratio),
    ("W4A8KV4 batch 1 >= 400 tokens/s per user", "throughput", _batch1),
]


def targets(out: Path, problems: list[str] | None = None) -> list[tuple[str, str, bool | None]]:
    """(target, figure, met) per target; met is None when not run (or not computable, which
    also lands in `problems`)."""
    problems = [] if problems is None else problems
    data = {name: _load(out, name, problems) for name in FILES}
    rows: list[tuple[str, str, bool | None]] = []
    for name, source, fn in TARGETS:
        d = data[source]
        if d is None:
            rows.append((name, "not run", None))
            continue
        try:
            got = fn(d)
        except Exception as e:  # noqa: BLE001 - a renamed key must not hide the other targets
            problems.append(f"{name}: {source}.json: {type(e).__name__}: {e}")
            rows.append((name, f"error ({type(e).__name__}: {e})", None))
            continue
        if got is None:
            problems.append(f"{name}: {source}.json has no row for it")
            rows.append((name, "not run", None))
        else:
            rows.append((name, got[0], bool(got[1])))
    return rows


def against_ceilings(out: Path, problems: list[str]) -> list[str]:
    """Lines of what was reached against the measured ceilings, and the runs' warnings."""
    lines = []
    ceil = _load(out, "ceilings", [])
    gemm, att, tp = (_load(out, n, []) for n in ("gemm", "attention", "throughput"))
    try:
        if ceil:
            lines.append(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul "
                         f"{ceil['bf16_TFLOPs']:.1f} TFLOP/s, int8 XLA dot "
                         f"{ceil['int8_TOPs_xla']:.1f} TOP/s")
            bw = ceil["copy_GBps"]
            if gemm and gemm.get("rows"):
                r = max(gemm["rows"], key=lambda r: r["g128_weight_GBps"])
                lines.append(f"  GEMM g128 weight stream, best: {r['g128_weight_GBps']:.0f} GB/s "
                             f"= {r['g128_weight_GBps'] / bw:.0%} of copy ({r['n']}x{r['k']}, "
                             f"M={r['m']})")
            if att and att.get("rows"):
                r = att["rows"][-1]
                lines.append(f"  KV4 attention at ctx {r['ctx']}: {r['kv4_GBps']:.0f} GB/s = "
                             f"{r['kv4_GBps'] / bw:.0%} of copy; bf16 cache {r['bf16_GBps']:.0f} "
                             f"GB/s = {r['bf16_GBps'] / bw:.0%}")
        if tp:
            for r in tp["rows"]:
                if r.get("cached_tokens"):
                    lines.append(f"WARNING: throughput {r['variant']} batch {r['batch']}: "
                                 f"{r['cached_tokens']} prompt tokens came from the prefix cache")
                if r.get("warmed_up", True) and r.get("compiles_in_run"):
                    lines.append(f"WARNING: throughput {r['variant']} batch {r['batch']}: the "
                                 f"timed run compiled {r['compiles_in_run']} programs")
                if not r.get("warmed_up", True):
                    lines.append(f"note: throughput {r['variant']} batch {r['batch']} not warmed "
                                 f"up (--quick): {r.get('compile_s_in_run', 0):.0f} s of "
                                 f"compilation left out of its figure")
    except Exception as e:  # noqa: BLE001
        problems.append(f"ceilings/warnings: {type(e).__name__}: {e}")
        lines.append(f"error reading the ceilings or warnings: {type(e).__name__}: {e}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="out", help="the folder of the JSONs (./out)")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 if a JSON is missing or broken or a target is not computed")
    args = ap.parse_args(argv)
    out = Path(args.out)
    problems: list[str] = []
    heads = {(d.get("device"), d.get("commit"), d.get("date")) for name in FILES
             if isinstance(d := _load(out, name, []), dict)}
    where = "; ".join(f"{dev}, commit {c}, {day}" for dev, c, day in sorted(heads, key=str))
    print(f"== targets ({where or 'no results'})")
    if any(dev == "cpu" for dev, _, _ in heads):
        print("(figures from a CPU: they check the scripts, not the targets)")
    for name, value, ok in targets(out, problems):
        mark = {True: "MET ", False: "MISS", None: "----"}[ok]
        print(f"[{mark}] {name}: {value}")
    for line in against_ceilings(out, problems):
        print(line)
    if problems:
        print("== problems: " + "; ".join(problems))
    return 1 if args.strict and problems else 0


if __name__ == "__main__":
    sys.exit(main())
