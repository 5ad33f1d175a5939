"""What the command-line tools share: argument types that name the allowed range, prompt files,
and one error line (no traceback) for every failure a user can cause."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path


class CliError(Exception):
    """A user error found by a CLI itself (printed as one line, exit status 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr, 'error: ...' (no usage block), with
    exit status 2 as argparse's."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())}\n")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def bounded_int(low: int | None, high: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        v = _int(text)
        if (low is not None and v < low) or (high is not None and v > high):
            if high is None:
                raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {v}")
        return v
    return parse


positive_int = bounded_int(1, None)
seed_arg = bounded_int(0, 2**32 - 1)


def page_size_arg(text: str) -> int:
    v = positive_int(text)
    if v & (v - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two, got {v}")
    return v


def bounded_float(low: float | None, high: float | None, *,
                  low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        too_low = low is not None and (v <= low if low_open else v < low)
        if too_low or (high is not None and v > high):
            if high is None:
                rule = f"> {low}" if low_open else f">= {low}"
            else:
                rule = f"in {'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {v}")
        return v
    return parse


def utf8_arg(text: str) -> str:
    """A command-line string that must be valid UTF-8 (Python keeps bad bytes as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text") from None
    return text


def weight_format_arg(text: str):
    """--weight-format / --group-size: g128, g64, per-channel (or 128, 64, -1)."""
    from pallas_kernels.packing import FormatError, WeightFormat

    try:
        return WeightFormat.parse(text)
    except FormatError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_weight_format_args(p: argparse.ArgumentParser, what: str) -> None:
    """--weight-format, and --group-size (its older spelling by group size) for the same value."""
    from pallas_kernels.packing import WeightFormat

    p.add_argument("--weight-format", type=weight_format_arg, default=WeightFormat.G128,
                   metavar="{g128,g64,per-channel}",
                   help=f"{what}: W4 weight format: progressive groups of 128 inputs (default; "
                        f"64 where a layer's input size is not a multiple of 128), of 64, or "
                        f"one scale per output channel")
    p.add_argument("--group-size", dest="weight_format", type=weight_format_arg,
                   metavar="{128,64,-1}", help="the same, by group size (-1 = per-channel)")


def add_kv_cache_arg(p: argparse.ArgumentParser) -> None:
    from qoq_jax.kv_cache import KV_CACHE_KINDS

    p.add_argument("--kv-cache", choices=KV_CACHE_KINDS,
                   help="KV cache format: 16-bit, or QServe's 4-bit KV4 (default: kv4 for "
                        "quantized models, 16bit otherwise; kv4-minmax: KV4 with QServe's "
                        "min/max range per row instead of the searched one)")


def add_gemm_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gemm", choices=["auto", "mosaic", "triton", "xla"], default="auto",
                   help="W4A8 GEMM of a quantized model: auto (default) = the Mosaic GPU kernel "
                        "on Hopper, the Triton kernel on other GPUs, the XLA reference on CPU")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel", type=bounded_int(1, None), default=1, metavar="N",
                   help="split the model over N devices (Megatron-style tensor parallelism; "
                        "N must divide the KV heads). Across hosts add --distributed")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (coordinator, "
                        "process count and id from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                        "JAX_PROCESS_ID or the cluster's environment); every host runs the "
                        "same command and the mesh spans all hosts' devices")


def speculative_arg(text: str) -> tuple[str, str | None]:
    """--speculative's value: "ngram" -> ("ngram", None), "draft:PATH" -> ("draft", PATH)."""
    if text == "ngram":
        return "ngram", None
    if text.startswith("draft:") and text[len("draft:"):]:
        return "draft", text[len("draft:"):]
    raise argparse.ArgumentTypeError(
        f"expected 'ngram' or 'draft:PATH' (a draft model with the target's tokenizer: a "
        f"quantized checkpoint, a Hugging Face directory or a .gguf file), got {text!r}")


def add_speculative_args(parser: argparse.ArgumentParser) -> None:
    """--speculative, --num-speculative-tokens, --ngram-max, --ngram-min,
    --speculative-max-batch (generate, serve)."""
    parser.add_argument("--speculative", type=speculative_arg, metavar="ngram|draft:PATH",
                        help="speculative decoding, verified in one pass of the model; the "
                             "output is the same as without (off by default). 'ngram' proposes "
                             "tokens from earlier occurrences of a sequence's last tokens in its "
                             "prompt and output (prompt lookup); 'draft:PATH' has a smaller "
                             "model with the same tokenizer propose them (a quantized "
                             "checkpoint, e.g. the QoQ W4A8KV4 copy of the model, keeps its KV4 "
                             "cache)")
    parser.add_argument("--num-speculative-tokens", type=bounded_int(1, 15), default=7,
                        help="the most tokens proposed per sequence and step (default 7: with "
                             "its last token a lone sequence's row fills an 8-token step)")
    parser.add_argument("--ngram-max", type=bounded_int(1, None), default=4,
                        help="longest suffix n-gram looked up (default 4)")
    parser.add_argument("--ngram-min", type=bounded_int(1, None), default=2,
                        help="shortest suffix n-gram looked up (default 2)")
    parser.add_argument("--speculative-max-batch", type=bounded_int(0, None),
                        help="speculate only while at most this many sequences decode (0: any "
                             "number; default 2 on CPU, where larger batches are compute-bound "
                             "and lose, no limit on GPU)")


def speculative_kwargs(args) -> dict:
    """qoq_jax.load's keywords for add_speculative_args' flags ({} when off)."""
    if not args.speculative:
        return {}
    kind, draft = args.speculative
    out = {"speculative": kind, "num_speculative_tokens": args.num_speculative_tokens,
           "ngram_max": args.ngram_max, "ngram_min": args.ngram_min,
           "speculative_max_batch": args.speculative_max_batch}
    if draft is not None:
        out["draft_model"] = draft
    return out


def init_parallel(args) -> None:
    """Start jax.distributed when --distributed was given (before any device is touched)."""
    if getattr(args, "distributed", False):
        import jax

        jax.distributed.initialize()


def read_prompts_file(path: Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file."""
    if not path.exists():
        raise CliError(f"no prompts file {path}")
    if path.is_dir():
        raise CliError(f"the prompts file {path} is a directory")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"the prompts file {path} is not UTF-8 text (byte {e.start} is "
                       f"{path.read_bytes()[e.start]:#04x})") from None
    prompts = [ln for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise CliError(f"the prompts file {path} has no non-blank line")
    return prompts


def enable_compilation_cache() -> Path | None:
    """Keep compiled XLA programs on disk between runs of the command-line tools.

    A CLI run compiles a dozen programs (prefill and decode shapes) every start; with the cache a
    second start loads them instead (on CPU: `generate` starts in 7 s instead of 13). The cache
    lives in $QOQ_JAX_CACHE/xla (capped at 2 GiB, least recently used entries go first); an
    explicit $JAX_COMPILATION_CACHE_DIR wins, and QOQ_JAX_COMPILATION_CACHE=0 turns it off.
    Library users (`import qoq_jax`) are left alone: their process, their JAX configuration.
    """
    import jax

    from qoq_jax.assets import cache_dir

    if os.environ.get("QOQ_JAX_COMPILATION_CACHE", "1") == "0":
        return None
    if jax.config.jax_compilation_cache_dir:  # set by the user (JAX_COMPILATION_CACHE_DIR)
        return Path(jax.config.jax_compilation_cache_dir)
    path = cache_dir() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Our programs compile in well under JAX's default 1 s threshold; cache them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", 2 << 30)
    return path


def run_cli(body: Callable[[], int]) -> int:
    """Run a CLI's body (with the on-disk compilation cache, see enable_compilation_cache); a user
    error becomes one 'error: ...' line on stderr."""
    from qoq_jax.engine import EngineMemoryError, QueueFullError

    enable_compilation_cache()
    try:
        return body()
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, EngineMemoryError, QueueFullError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
