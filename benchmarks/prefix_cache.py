"""Prefix caching on and off in one process, interleaved: two engines over one model, the same
loads, repeated; medians. The in-process twin of `benchmarks/serve.py --shared-prefix` (no HTTP,
so the difference the cache makes, and that it costs nothing without sharing, is measured
closer to the noise floor).

    .venv/bin/python benchmarks/prefix_cache.py [--shared-prefix 1500] [--requests 16]
        [--max-tokens 32] [--repeats 3] [--variant fp32|w4a8kv4]

Loads: "shared": every request is one N-token system prompt (real text) and a short chat
question of its own, after one warm request that puts the system prompt in the cache;
"distinct": the same questions as plain text, no two sharing a full page. Per load and engine: median time to first
token over the requests, output tokens/s of the load. Writes prefix_cache.json to $OUT.
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


def run_load(engine, prompts, params) -> dict:
    t0 = time.perf_counter()
    ids = [engine.submit(p, params) for p in prompts]
    engine.run(lambda: all(engine.finished(i) for i in ids))
    wall = time.perf_counter() - t0
    firsts = [engine.first_token_time(i) - t0 for i in ids]
    results = [engine.result(i) for i in ids]
    for i in ids:
        engine.release(i)
    return {"ttft_median_s": statistics.median(firsts),
            "output_tokens_per_s": sum(len(r.tokens) for r in results) / wall,
            "cached_tokens": sum(r.cached_tokens for r in results)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared-prefix", type=int, default=1500)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", choices=["fp32", "w4a8kv4"], default="fp32")
    ap.add_argument("--loads", nargs="+", choices=["shared", "distinct"],
                    default=["shared", "distinct"])
    args = ap.parse_args(argv)

    import qoq_jax
    from qoq_jax.engine import Engine
    from qoq_jax.sampling import SamplingParams
    from serve import QUESTIONS, shared_system_prompt

    llm = qoq_jax.load(None, dtype="float32",
                       quantize="rtn" if args.variant == "w4a8kv4" else None)
    tok = llm.tokenizer
    system = shared_system_prompt(tok, args.shared_prefix)

    def chat(i, with_system):
        """With the system prompt: a chat. Without: the question as plain text, so that no
        full page is shared (a chat template's own default system prompt would be)."""
        question = f"Question {i}: {QUESTIONS[i % len(QUESTIONS)]}"
        if not with_system:
            return tok.encode(f"{i} {question}", add_special_tokens=False)
        return llm.encode_chat([{"role": "system", "content": system},
                                {"role": "user", "content": question}])

    def ids(x):
        return [int(t) for t in x]

    params = SamplingParams(max_new_tokens=args.max_tokens, stop_token_ids=())
    kv = llm.engine.kv_cache
    engines = {"on": Engine(llm.model, kv_cache=kv, prefix_caching=True),
               "off": Engine(llm.model, kv_cache=kv, prefix_caching=False)}
    for e in engines.values():
        e.warmup()
    rows = []
    for rep in range(args.repeats):
        for load in args.loads:
            # questions differ per repeat: the cache may keep only what loads share
            offset = 100 * (rep + 1)
            prompts = [ids(chat(offset + i, load == "shared")) for i in range(args.requests)]
            # the engines take turns going first (no order effect)
            for name, e in sorted(engines.items(), reverse=bool(rep % 2)):
                e.clear_prefix_cache()
                e.generate([ids(chat(offset - 1, load == "shared"))], params)  # the warm request
                rows.append({"engine": name, "load": load, "repeat": rep,
                             **run_load(e, prompts, params)})
                print(rows[-1], flush=True)
    summary = {}
    for load in args.loads:
        med = {name: {k: statistics.median(r[k] for r in rows
                                           if r["engine"] == name and r["load"] == load)
                      for k in ("ttft_median_s", "output_tokens_per_s")}
               for name in engines}
        summary[load] = {**med, "ttft_on_over_off": med["on"]["ttft_median_s"]
                         / med["off"]["ttft_median_s"],
                         "tokens_per_s_on_over_off": med["on"]["output_tokens_per_s"]
                         / med["off"]["output_tokens_per_s"]}
        s = summary[load]
        print(f"| {args.variant} | {load} | TTFT on {med['on']['ttft_median_s']:.3f} s / off "
              f"{med['off']['ttft_median_s']:.3f} s = {s['ttft_on_over_off']:.3f} | tok/s on "
              f"{med['on']['output_tokens_per_s']:.1f} / off "
              f"{med['off']['output_tokens_per_s']:.1f} = {s['tokens_per_s_on_over_off']:.2f} |")
    out = Path(os.environ.get("OUT") or "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_cache.json").write_text(json.dumps(
        {"args": vars(args), "summary": summary, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
