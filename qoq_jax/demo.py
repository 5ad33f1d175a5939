"""The demo: the default model quantized with QoQ to W4A8KV4, then generation from it.

    python -m qoq_jax.demo [--prompt "..."] [--max-new-tokens 64]

The first run converts SmolLM2-135M-Instruct with QoQ (g128 weights, KV4 cache, a small
calibration set; a minute or two on two CPU cores, with a progress bar) into the cache; later
runs reuse it. Generation time is reported in two parts: the first call (which compiles the
programs) and a second, steady-state call with the same shapes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from qoq_jax.assets import DEFAULT_MODEL_NAME, cache_dir, cache_lock
from qoq_jax.cli import ArgumentParser, positive_int, run_cli, utf8_arg

# The demo's quantized default model: QoQ g128 with a small calibration set (a minute or two on
# two CPU cores; docs/ACCURACY.md has the perplexity of larger calibration sets).
DEMO_CALIBRATION = {"calib_samples": 16, "calib_seq_len": 256}


def default_qoq_dir(progress: bool = True) -> Path:
    """The default model quantized with QoQ W4A8KV4 (g128), converted once into the cache."""
    target = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-qoq-g128"
    if not (target / "config.json").exists():
        with cache_lock("qoq-model"):
            if not (target / "config.json").exists():
                from qoq_jax.convert import convert
                from qoq_jax.quant.config import QuantConfig

                print(f"quantizing the default model with QoQ W4A8KV4 into {target} (once) ...",
                      file=sys.stderr)
                if target.exists():
                    shutil.rmtree(target)
                convert(None, str(target), QuantConfig(weight_format="g128", **DEMO_CALIBRATION),
                        progress=progress)
    return target


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m qoq_jax.demo", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=utf8_arg, default="What is the capital of France?")
    ap.add_argument("--max-new-tokens", type=positive_int, default=64)
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args) -> int:
    import qoq_jax
    from qoq_jax.engine import COMPILES

    path = default_qoq_dir()
    llm = qoq_jax.load(path)
    q = llm.config
    print(f"model: {path.name} (W4A8 g128 weights, {llm.engine.kv_cache} KV cache; "
          f"{q.num_layers} layers, hidden {q.hidden_size})", file=sys.stderr)
    c0, t0 = COMPILES.count, time.perf_counter()
    out = llm.generate(args.prompt, chat=True, max_new_tokens=args.max_new_tokens)[0]
    first = time.perf_counter() - t0
    print(out.text, flush=True)
    t1 = time.perf_counter()
    again = llm.generate(args.prompt, chat=True, max_new_tokens=args.max_new_tokens)[0]
    steady = time.perf_counter() - t1
    n = len(again.token_ids)
    print(f"[first call {first:.1f} s, compiling {COMPILES.count - c0} programs included; "
          f"steady state: {n} tokens in {steady:.2f} s = {n / max(steady, 1e-9):.1f} tokens/s]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
