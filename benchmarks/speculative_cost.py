"""What a speculative-decoding round with a W4A8KV4 draft costs on this device, and the speedup
it gives at a measured acceptance profile: the GPU figure of issue #27 (random weights of real
shapes, no checkpoint: the device machine has no network).

    python benchmarks/speculative_cost.py [--k 4] [--batches 1 16] [--context 1024]
    python benchmarks/speculative_cost.py --smoke     # CPU, a tiny model

The target is a Llama-3-8B-shaped model with bf16 weights and a 16-bit KV cache; the draft the
same shapes in W4A8 (g128 weights) with a KV4 cache, as QoQ's copy of the target would be
(benchmarks/_models.py: a kernel's time does not depend on the weight values). Per batch size,
every sequence at `--context` tokens, each program timed on the runners directly (median of
`--iters`, the outputs read back):

- the target's decode step (`runner.decode`, one step): what each token costs without
  speculation;
- the target's verification step: one ragged step of 1 + k tokens per sequence with logits at
  each (`_spec_step`);
- the draft's catch-up step (one ragged step of 2 tokens per sequence, the first proposal
  sampled) and its decode step (k - 1 of them per round).

A round makes 1 + sum_j a_j tokens per sequence, a_j the acceptance rate of proposed position j
(default: the real default model's chat load with its QoQ copy as the draft on the CPU,
docs/PERFORMANCE.md), and costs catch-up + (k - 1) draft steps + verification; the speedup is
tokens per round x decode step / round cost. Host overheads between the programs are not in
it (the engine reads each round back before planning the next). Writes speculative_cost.json to
$OUT (or ./out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import LLAMA3_8B, TINY, random_model  # noqa: E402

# acceptance of proposed positions 0..3: chat load, float32 SmolLM2-135M-Instruct with its QoQ
# W4A8KV4 g128 copy as the draft, batch 1 (docs/results/speculative_draft.json)
CHAT_ACCEPTANCE = (0.752, 0.563, 0.436, 0.342)


def _time(fn, iters: int) -> float:
    from qoq_jax.runner import fetch

    fetch(fn())  # compiled and run once
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fetch(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _runner(model, *, kv_cache, batch, context, k, spec):
    from qoq_jax.runner import DeviceRunner

    page = 16
    pages_per_seq = -(-(context + 64) // page)  # room for the timed steps past `context`
    runner = DeviceRunner(model, kv_cache=kv_cache, num_pages=1 + batch * pages_per_seq,
                          page_size=page, slots=max(2, batch), max_pages_per_seq=pages_per_seq,
                          max_batch_tokens=max(64, batch * (k + 1)), max_logprobs=0,
                          max_stop_ids=1, spec_k=k if spec else 0,
                          min_step_tokens=None if spec else 4)
    runner.allocate()
    table = np.zeros((runner.slots, pages_per_seq), np.int32)
    for s in range(batch):
        table[s] = 1 + s * pages_per_seq + np.arange(pages_per_seq)
    runner.set_page_table(table)
    return runner


def _ragged(runner, batch, context, tokens_per_seq, *, verify: bool):
    """StepInputs: `batch` sequences of `tokens_per_seq` tokens at positions context..; verify:
    decode rows carrying proposals with logits at each token (a speculative engine's step);
    else prompt chunks whose last token samples (a draft's catch-up)."""
    n = batch * tokens_per_seq
    x = runner.empty_inputs(runner.buckets.step_tokens(n))
    rng = np.random.default_rng(0)
    x.tokens[:n] = rng.integers(2, runner.vocab, n)
    at = 0
    for s in range(batch):
        x.slot[s], x.start[s], x.length[s], x.pos0[s] = s, s * tokens_per_seq, tokens_per_seq, context
        x.token_seq[s * tokens_per_seq:(s + 1) * tokens_per_seq] = s
        x.params.max_new[s] = 1 << 20
        if verify:
            x.decode[s] = True
            x.num_proposed[s] = tokens_per_seq - 1
            for j in range(tokens_per_seq):
                x.logit_token[at], x.logit_row[at], x.logit_col[at] = s * tokens_per_seq + j, s, j
                at += 1
        else:
            x.sample[s] = True
            if runner.spec_k:  # a speculative engine's step computes logits where asked
                x.logit_token[at], x.logit_row[at] = (s + 1) * tokens_per_seq - 1, s
                at += 1
    return x


def measure(hf, batch, context, k, iters, dtype):
    """Milliseconds of the four programs at this batch (see the module docstring)."""
    import gc

    from qoq_jax.runner import fetch

    out = {}
    slots = np.zeros((max(2, batch),), bool)
    for name, w4a8, kv in (("target", None, "16bit"), ("draft", "g128", "kv4")):
        model = random_model(hf, dtype=dtype, w4a8_format=w4a8, max_context=context + 128)
        runner = _runner(model, kv_cache=kv, batch=batch, context=context, k=k,
                         spec=name == "target")
        # every slot live at `context`: a prefill-like step samples into each slot
        if name == "target":
            fetch(runner.step(_ragged(runner, batch, context - 1, 1, verify=False)))
            rows = runner.buckets.decode_rows(batch)
            out["target_decode_ms"] = _time(lambda: runner.decode(rows, 1, slots), iters)
            out["target_verify_ms"] = _time(
                lambda: runner.step(_ragged(runner, batch, context, k + 1, verify=True)), iters)
        else:
            out["draft_catch_up_ms"] = _time(
                lambda: runner.step(_ragged(runner, batch, context, 2, verify=False)), iters)
            rows = runner.buckets.decode_rows(batch)
            out["draft_decode_ms"] = _time(lambda: runner.decode(rows, 1, slots), iters)
        del runner, model
        gc.collect()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4, help="proposed tokens per round")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--acceptance", type=float, nargs="+", default=list(CHAT_ACCEPTANCE),
                    help="acceptance rate of each proposed position (k values; the last "
                         "repeats)")
    ap.add_argument("--smoke", action="store_true", help="CPU: a tiny model, tiny sizes")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    hf, dtype = (TINY, jnp.float32) if args.smoke else (LLAMA3_8B, jnp.bfloat16)
    if args.smoke:
        args.context, args.iters = min(args.context, 128), min(args.iters, 2)
    acc = (list(args.acceptance) + [args.acceptance[-1]] * args.k)[:args.k]
    tokens_per_round = 1 + sum(acc)
    rows = []
    for b in args.batches:
        t = measure(hf, b, args.context, args.k, args.iters, dtype)
        cost = t["draft_catch_up_ms"] + (args.k - 1) * t["draft_decode_ms"] + t["target_verify_ms"]
        speedup = tokens_per_round * t["target_decode_ms"] / cost
        rows.append({"batch": b, **t, "round_ms": cost, "tokens_per_round": tokens_per_round,
                     "expected_speedup": speedup})
        print(f"batch {b}: target decode {t['target_decode_ms']:.2f} ms, verify 1+{args.k} "
              f"{t['target_verify_ms']:.2f} ms; draft catch-up {t['draft_catch_up_ms']:.2f} ms, "
              f"decode {t['draft_decode_ms']:.2f} ms; round {cost:.2f} ms for "
              f"{tokens_per_round:.2f} tokens: {speedup:.2f}x", flush=True)
    out = Path(os.environ.get("OUT") or "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative_cost.json").write_text(json.dumps(
        {"device": jax.devices()[0].device_kind, "k": args.k, "context": args.context,
         "acceptance": acc, "model": "tiny" if args.smoke else "llama3-8b shapes",
         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
