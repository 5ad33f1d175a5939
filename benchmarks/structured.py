"""What structured output costs: 8 JSON-schema-constrained requests beside 8 free ones, against
the same 8 free requests beside 8 other free ones, side by side in one process (interleaved
repeats).

    .venv/bin/python benchmarks/structured.py [--variant fp32|w4a8kv4] [--repeats 3]

A group's tokens/s is its output tokens over the time from submission until its last request
ends. Free requests decode 64 tokens each (no stop token); constrained ones follow a nested JSON
schema (objects, an array with bounds, an enum, bounded integers, a pattern) and end when it
is complete or at 64 tokens. Also reported: the schema's compile time (cold, and the tokenizer's
one-time setup) and the host time per mask. Writes structured.json to $OUT (or ./out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                 "minItems": 1, "maxItems": 4},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 16},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}


def _run_groups(engine, groups: dict[str, list[tuple[list[int], object]]]) -> dict[str, float]:
    """Submit every group's requests at once; tokens/s of each group."""
    start = time.perf_counter()
    ids = {name: [engine.submit(p, sp) for p, sp in reqs] for name, reqs in groups.items()}
    done: dict[int, float] = {}
    while engine.has_work:
        engine.step()
        now = time.perf_counter()
        for rid in (r for rs in ids.values() for r in rs):
            if rid not in done and engine.finished(rid):
                done[rid] = now
    rates = {}
    for name, rids in ids.items():
        tokens = sum(len(engine.result(r).tokens) for r in rids)
        rates[name] = tokens / (max(done[r] for r in rids) - start)
        for r in rids:
            engine.release(r)
    return rates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["fp32", "w4a8kv4"], default="fp32")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    args = ap.parse_args(argv)

    import qoq_jax
    from qoq_jax.sampling import SamplingParams
    from qoq_jax.structured import StructuredOutput

    llm = qoq_jax.load(args.model, dtype="float32",
                       quantize="rtn" if args.variant == "w4a8kv4" else None, max_slots=16)
    engine, grammar = llm.engine, llm.engine.grammar
    free_prompts = [llm.encode(f"Tell me about topic number {i} in a few sentences.", chat=True)
                    for i in range(8)]
    json_prompts = [llm.encode(f"Describe user number {i} of a web shop as JSON.", chat=True)
                    for i in range(8)]
    so = StructuredOutput.json_schema(SCHEMA)
    t0 = time.perf_counter()
    grammar.compile(StructuredOutput.regex("warm"))  # the tokenizer's one-time setup
    setup_s = time.perf_counter() - t0
    grammar.compile(so)
    compile_s = grammar.stats.last_seconds
    free = SamplingParams(max_new_tokens=args.max_new_tokens, stop_token_ids=())
    constrained = SamplingParams(max_new_tokens=args.max_new_tokens, structured=so)
    loads = {
        "all_free": {"free": [(p, free) for p in free_prompts],
                     "other": [(p, free) for p in json_prompts]},
        "mixed": {"free": [(p, free) for p in free_prompts],
                  "other": [(p, constrained) for p in json_prompts]},
    }
    engine.warmup()
    for groups in loads.values():  # first calls: caches, the lockstep path
        _run_groups(engine, {k: v[:2] for k, v in groups.items()})
    runs: dict[str, dict[str, list[float]]] = {n: {"free": [], "other": []} for n in loads}
    masks0, mask_s0 = engine.stats["masks"], engine.stats["mask_seconds"]
    for _ in range(args.repeats):
        for name, groups in loads.items():
            engine.clear_prefix_cache()
            for g, rate in _run_groups(engine, groups).items():
                runs[name][g].append(rate)
    med = {n: {g: statistics.median(v) for g, v in r.items()} for n, r in runs.items()}
    masks = engine.stats["masks"] - masks0
    row = {
        "variant": args.variant, "max_new_tokens": args.max_new_tokens,
        "tokens_per_s": med, "runs": runs,
        "free_ratio": med["mixed"]["free"] / med["all_free"]["free"],
        "constrained_ratio": med["mixed"]["other"] / med["all_free"]["other"],
        "schema_compile_ms": compile_s * 1e3, "tokenizer_setup_ms": setup_s * 1e3,
        "mask_us": (engine.stats["mask_seconds"] - mask_s0) / max(masks, 1) * 1e6,
    }
    print(f"| {args.variant} | free beside free {med['all_free']['free']:.1f} tok/s | free "
          f"beside constrained {med['mixed']['free']:.1f} tok/s ({row['free_ratio']:.2f}x) | "
          f"constrained {med['mixed']['other']:.1f} tok/s vs free {med['all_free']['other']:.1f}"
          f" ({row['constrained_ratio']:.2f}x) | compile {row['schema_compile_ms']:.1f} ms "
          f"(tokenizer setup {row['tokenizer_setup_ms']:.0f} ms) | mask {row['mask_us']:.0f} us |")
    out = Path(os.environ.get("OUT") or "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured.json").write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
