"""Speculative decoding (n-gram or draft-model proposals) on and off in one process,
interleaved: two engines over one model, the same loads, repeated; medians.

    .venv/bin/python benchmarks/speculative.py [--batches 1 4 16] [--max-tokens 64]
        [--repeats 3] [--k 7] [--max-batch N] [--variant fp32|w4a8kv4]
        [--speculative ngram|draft:PATH]

`--speculative draft:PATH` proposes with the model at PATH (the QoQ W4A8KV4 copy of the default
model: `python -c "from qoq_jax.demo import default_qoq_dir; print(default_qoq_dir())"`; a
quantized checkpoint runs with its own KV4 cache).

Loads (greedy, chat template):
- "quote": requests that quote their input back: "repeat/summarise this passage" over a piece
  of real text (Botchan, public domain), and "edit this code" over a short Python function;
- "chat": plain questions with nothing to quote.
Per load, batch size (requests submitted together) and engine: output tokens/s (wall clock,
and per CPU second of this process: steadier on a shared machine), and the
speculating engine's acceptance (proposed, accepted, by position). The tokens of both engines
are compared (they must be the same). Writes speculative.json and speculative.png to $OUT
(--tag NAME: speculative-NAME.*).
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

CODE = '''def moving_average(values, window):
    total = 0.0
    out = []
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i + 1 >= window:
            out.append(total / window)
    return out
'''

CODE_EDITS = ["Rename the variable `total` to `running_sum` in this function and show the whole "
              "function.", "Add type hints to this function and show the whole function.",
              "Add a docstring to this function and show the whole function.",
              "Rename `values` to `xs` in this function and show the whole function."]

QUOTE_ASKS = ["Repeat the following passage exactly.", "Quote the passage below back to me, "
              "word for word.", "Copy out this passage exactly as written.",
              "Summarise this passage by quoting its opening sentences word for word."]


def passages(tokenizer, n: int, tokens: int = 160) -> list[str]:
    from qoq_jax import assets

    text = assets.botchan_path().read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_special_tokens=False)
    start = 2000  # past the title page
    return [tokenizer.decode(ids[start + i * tokens:start + (i + 1) * tokens]) for i in range(n)]


def make_load(llm, load: str, n: int, offset: int) -> list[list[int]]:
    from serve import QUESTIONS

    out = []
    if load == "quote":
        texts = passages(llm.tokenizer, n + offset)
        for i in range(n):
            j = offset + i
            if j % 4 == 3:
                msg = f"{CODE_EDITS[j // 4 % len(CODE_EDITS)]}\n\n```python\n{CODE}```"
            else:
                msg = f"{QUOTE_ASKS[j % len(QUOTE_ASKS)]}\n\n{texts[j]}"
            out.append(llm.encode(msg, chat=True))
    else:
        for i in range(n):
            j = offset + i
            out.append(llm.encode(f"{QUESTIONS[j % len(QUESTIONS)]} (question {j})", chat=True))
    return [[int(t) for t in p] for p in out]


def run_load(engine, groups, params) -> tuple[dict, list[list[int]]]:
    """Each group of prompts submitted together (a batch), the groups one after another."""
    before = engine.speculative_stats
    t0, c0 = time.perf_counter(), time.process_time()
    results = [r for prompts in groups for r in engine.generate(prompts, params)]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    after = engine.speculative_stats
    n = sum(len(r.tokens) for r in results)
    row = {"output_tokens_per_s": n / wall, "output_tokens": n, "wall_s": wall,
           "tokens_per_cpu_s": n / cpu, "cpu_s": cpu}
    if engine.speculative:
        prop = [a - b for a, b in zip(after["proposed_per_position"],
                                      before["proposed_per_position"])]
        acc = [a - b for a, b in zip(after["accepted_per_position"],
                                     before["accepted_per_position"])]
        row.update(proposed=sum(prop), accepted=sum(acc),
                   acceptance_rate=sum(acc) / max(1, sum(prop)),
                   acceptance_rate_per_position=[a / p if p else 0.0 for a, p in zip(acc, prop)],
                   verify_rows=after["verify_rows"] - before["verify_rows"])
    return row, [r.tokens for r in results]


def free_verification_bound(proposer, prompts, outputs, decode_steps: int) -> float:
    """Output tokens per forward step if a verification step cost no more than a decode step:
    the n-gram proposer replayed over the tokens the engine without speculation produced
    (greedy, so the speculating engine's are the same), as the engine schedules it: a
    sequence with proposals verifies them (the accepted ones + the target's own token), one
    without decodes `decode_steps` steps. An upper bound on the speedup of n-gram speculation
    for these outputs, whatever the verification costs on the machine."""
    tokens = steps = 0
    for prompt, out in zip(prompts, outputs):
        t = 0
        while t < len(out):
            k = min(proposer.k, len(out) - t - 1)
            prop = proposer.propose(list(prompt) + list(out[:t]), k) if k > 0 else []
            if prop:
                accepted = 0
                while accepted < len(prop) and prop[accepted] == out[t + accepted]:
                    accepted += 1
                t += accepted + 1
                steps += 1
            else:
                s = min(decode_steps, len(out) - t)
                t += s
                steps += s
        tokens += len(out)
    return tokens / max(1, steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--loads", nargs="+", default=["quote", "chat"])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts-per-point", type=int, default=8,
                    help="at batch b, ceil(N / b) batches of b different prompts run one after "
                         "another (one request's luck does not decide a batch-1 figure)")
    ap.add_argument("--k", type=int, default=7, help="num_speculative_tokens")
    ap.add_argument("--ngram-min", type=int, default=2)
    ap.add_argument("--ngram-max", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=None,
                    help="speculative_max_batch (default: the engine's, 2 on CPU; 0: any)")
    ap.add_argument("--speculative", default="ngram", metavar="ngram|draft:PATH",
                    help="the proposer (default ngram)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--variant", choices=["fp32", "w4a8kv4"], default="fp32")
    args = ap.parse_args(argv)

    import jax

    import qoq_jax
    from qoq_jax.engine import Engine
    from qoq_jax.sampling import SamplingParams

    from qoq_jax.cli import speculative_arg

    kind, draft_path = speculative_arg(args.speculative)
    llm = qoq_jax.load(None, dtype="float32",
                       quantize="rtn" if args.variant == "w4a8kv4" else None)
    kv = llm.engine.kv_cache
    draft = {}
    if kind == "draft":
        d = qoq_jax.load(draft_path, dtype="float32")
        draft = {"draft_model": d.model, "draft_kv_cache": d.engine.kv_cache}
    params = SamplingParams(max_new_tokens=args.max_tokens, stop_token_ids=())
    engines = {"off": Engine(llm.model, kv_cache=kv),
               "on": Engine(llm.model, kv_cache=kv, speculative=kind,
                            num_speculative_tokens=args.k, ngram_min=args.ngram_min,
                            ngram_max=args.ngram_max, speculative_max_batch=args.max_batch,
                            **draft)}
    for e in engines.values():
        e.warmup()
        e.generate(make_load(llm, "quote", 2, 0), params)  # first-run costs out of the way
    rows, mismatches, bounds = [], 0, {}
    for rep in range(args.repeats):
        for load in args.loads:
            for b in args.batches:
                n_groups = -(-args.prompts_per_point // b)
                prompts = make_load(llm, load, b * n_groups, offset=rep * 16)
                groups = [prompts[g * b:(g + 1) * b] for g in range(n_groups)]
                # the two engines in alternating order, so that drifts in the machine's load
                # fall on both
                order = ["off", "on"] if rep % 2 == 0 else ["on", "off"]
                tokens = {}
                for name in order:
                    row, tokens[name] = run_load(engines[name], groups, params)
                    rows.append({"engine": name, "load": load, "batch": b, "repeat": rep, **row})
                    print(rows[-1], flush=True)
                limit = engines["on"].speculative_max_batch
                if kind == "ngram" and (not limit or b <= limit):
                    bounds.setdefault((load, b), []).append(free_verification_bound(
                        engines["on"].scheduler.proposer, prompts, tokens["off"],
                        engines["on"].decode_steps))
                if tokens["on"] != tokens["off"]:
                    mismatches += 1
                    print(f"MISMATCH: {load} batch {b} repeat {rep}", flush=True)
    summary = {}
    for load in args.loads:
        for b in args.batches:
            sel = {n: [r for r in rows if r["engine"] == n and r["load"] == load
                       and r["batch"] == b] for n in engines}
            med = {n: statistics.median(r["output_tokens_per_s"] for r in sel[n])
                   for n in engines}
            ratios = [on["output_tokens_per_s"] / off["output_tokens_per_s"]
                      for on, off in zip(sel["on"], sel["off"])]
            # CPU seconds of this process (all threads): less sensitive to other processes on a
            # shared machine than the wall clock
            cpu_ratios = [on["tokens_per_cpu_s"] / off["tokens_per_cpu_s"]
                          for on, off in zip(sel["on"], sel["off"])]
            on = sel["on"]
            k = len(on[0]["acceptance_rate_per_position"])
            summary[f"{load}/{b}"] = {
                "load": load, "batch": b, "tokens_per_s_off": med["off"],
                "tokens_per_s_on": med["on"], "speedup_of_medians": med["on"] / med["off"],
                "speedup_median_of_pairs": statistics.median(ratios),
                "speedups": ratios,
                "cpu_speedup_median_of_pairs": statistics.median(cpu_ratios),
                "cpu_speedups": cpu_ratios,
                "acceptance_rate": sum(r["accepted"] for r in on) / max(1, sum(
                    r["proposed"] for r in on)),
                "acceptance_rate_per_position": [statistics.mean(
                    r["acceptance_rate_per_position"][j] for r in on) for j in range(k)],
                "proposed_per_output_token": sum(r["proposed"] for r in on) / max(1, sum(
                    r["output_tokens"] for r in on))}
            if (load, b) in bounds:  # n-gram: the speedup if verifying cost a decode step
                summary[f"{load}/{b}"]["bound_free_verification"] = statistics.median(
                    bounds[(load, b)])
            s = summary[f"{load}/{b}"]
            pairs = ", ".join(f"{x:.2f}" for x in ratios)
            print(f"| {args.variant} | {load} | {b} | off {med['off']:.1f} | on {med['on']:.1f} "
                  f"| x{s['speedup_median_of_pairs']:.2f} (pairs {pairs}) "
                  f"| CPU-time x{s['cpu_speedup_median_of_pairs']:.2f} "
                  f"| accepted {s['acceptance_rate']:.2f} "
                  f"| bound {s.get('bound_free_verification', float('nan')):.2f} |", flush=True)
    out = Path(os.environ.get("OUT") or "out")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "device": jax.devices()[0].device_kind,
            "speculative_max_batch": engines["on"].speculative_max_batch,
            "cpus": os.cpu_count(), "mismatches": mismatches}
    (out / f"speculative{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(
        {**meta, "summary": summary, "runs": rows}, indent=1))
    from _plot import plot_curves

    panels = [("output tokens/s", {f"{load}, {n}": (args.batches, [
        summary[f"{load}/{b}"][f"tokens_per_s_{n}"] for b in args.batches])
        for load in args.loads for n in ("off", "on")}),
        ("speedup (median of interleaved pairs)", {load: (args.batches, [
            summary[f"{load}/{b}"]["speedup_median_of_pairs"] for b in args.batches])
            for load in args.loads}),
        ("speedup in tokens per CPU second", {load: (args.batches, [
            summary[f"{load}/{b}"]["cpu_speedup_median_of_pairs"] for b in args.batches])
            for load in args.loads}),
        ("acceptance rate", {load: (args.batches, [
            summary[f"{load}/{b}"]["acceptance_rate"] for b in args.batches])
            for load in args.loads})]
    name = f"speculative{'-' + args.tag if args.tag else ''}"
    what = "n-gram" if kind == "ngram" else f"draft-model ({Path(draft_path).name})"
    plot_curves(out / f"{name}.png", f"{what} speculation (k={args.k}, max batch "
                f"{meta['speculative_max_batch'] or 'any'}), {args.variant}, "
                f"{meta['device']}, {meta['cpus']} CPUs", "batch (requests)", panels)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
