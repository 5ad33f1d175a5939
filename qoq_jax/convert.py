"""convert_hf_checkpoint: a Hugging Face checkpoint (or GGUF file) -> a QoQ W4A8KV4 checkpoint.

    convert_hf_checkpoint --out smollm2-qoq-g128                       # the default model
    convert_hf_checkpoint --hf-dir ./Llama-3-8B --out llama3-qoq --weight-format per-channel
    convert_hf_checkpoint --out smollm2-rtn --method rtn               # the plain RTN baseline

--method qoq runs the paper's pipeline (rotation, SmoothAttention, output smoothing, channel
reordering for groups, clipping search for per-channel, GPTQ), with the strengths of
SmoothAttention and of the output smoothing, and the q/k_proj clipping, searched per layer as the
paper's code does (printed per layer, stored in config.json's "quantization_report";
--no-search-* uses the fixed ones), plus two per-head Hadamard rotations of the KV cache that
docs/ACCURACY.md measures as the largest gains on small models: V (deepcompressor's, in place of
v->o smoothing; --no-rotate-v) and K after RoPE (the model rotates q and k as it runs;
--no-rotate-k; --smooth-rotated-keys adds SmoothAttention in the rotated basis, off by default).
rtn quantizes the same formats with no transform. Every step can be turned on
or off (--clip, --no-gptq, ...). Calibration text defaults to the second half of the Wikipedia
summaries (evaluation reads from the start, so the two never overlap). The output directory is
written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qoq_jax.cli import (ArgumentParser, add_weight_format_args, bounded_float, bounded_int,
                         positive_int, run_cli, seed_arg)
from qoq_jax.loading import load_source, resolve_dtype
from qoq_jax.quant.config import DEFAULT_PRESET, SEARCHES, SMOOTH_PRESETS, STEPS, QuantConfig

MAX_CLIP_GRID = 1000
unit_float = bounded_float(0.0, 1.0)
positive_float = bounded_float(0.0, None, low_open=True)


def calibration_docs(files: list[str]) -> list[str]:
    from qoq_jax.eval.data import calibration_split, load_documents

    if not files:
        from qoq_jax.assets import wiki_summaries_path

        files = [str(wiki_summaries_path())]
    docs = []
    for f in files:
        docs += calibration_split(load_documents(f))
    return docs


def quantize(cfg, weights, tokenizer, qcfg: QuantConfig, *, dtype=None, progress: bool = True,
             gemm_backend: str = "auto"):
    """Run the pipeline and build the W4A8 model in memory. Returns (model, QuantReport: what
    the pipeline chose per layer)."""
    from qoq_jax.checkpoint import build_quantized_model
    from qoq_jax.quant.calibration import calibration_tokens
    from qoq_jax.quant.pipeline import quantize_weights

    tokens = None
    if qcfg.needs_calibration:
        tokens = calibration_tokens(tokenizer, calibration_docs(qcfg.calib_text),
                                    qcfg.calib_samples, qcfg.calib_seq_len, qcfg.seed)
    tensors, qmodel_cfg, report = quantize_weights(cfg, weights, qcfg, tokens, progress=progress)
    model = build_quantized_model(qmodel_cfg, tensors, qcfg, resolve_dtype(dtype), gemm_backend)
    return model, report


def check_weights(weights, progress: bool = True) -> None:
    """Read every tensor once before hours of quantization: a NaN or an Inf (or a damaged
    file) is found now, naming the tensor, not when the pipeline reaches it."""
    from tqdm.auto import tqdm

    from qoq_jax.hf import SafetensorsCheckpoint, check_finite

    checked_on_read = isinstance(weights, SafetensorsCheckpoint) and weights.check_finite
    for name in tqdm(list(weights), desc="checking weights", unit="tensor",
                     disable=not progress):
        w = weights[name]
        if not checked_on_read:
            check_finite(name, w)


def convert(source: str | None, out: str, qcfg: QuantConfig, progress: bool = True) -> Path:
    """Quantize `source` and write the checkpoint to `out` (atomically).

    Everything that can be checked is checked before quantizing (which takes hours for a big
    model): the output path (writable, not in the way, enough free space for the checkpoint),
    the calibration text, every weight (no NaN/Inf). Partial directories left by a killed
    earlier run of the same output are removed first (with a note on stderr)."""
    from qoq_jax import checkpoint, fsutil

    out_path = Path(out)
    fsutil.note_stale_partials(out_path)
    fsutil.check_output_dir(out_path)
    if qcfg.needs_calibration and qcfg.calib_text:
        calibration_docs(qcfg.calib_text)  # a missing or binary file fails now
    cfg, weights, tokenizer, _ = load_source(source, progress=progress)
    if qcfg.needs_calibration and qcfg.calib_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--calib-seq-len {qcfg.calib_seq_len} exceeds the model's context "
                         f"({cfg.max_position_embeddings} tokens)")
    expected = checkpoint.expected_size(cfg, qcfg)
    fsutil.check_output_dir(out_path, expected)
    check_weights(weights, progress=progress)
    model, report = quantize(cfg, weights, tokenizer, qcfg, dtype="float32", progress=progress)
    try:
        checkpoint.check_finite_state(nnx_pure_state(model))
    except ValueError as e:
        raise ValueError(f"quantization produced a non-finite value: {e}") from None
    fsutil.check_output_dir(out_path, expected)  # again: the disk may have filled meanwhile
    with fsutil.atomic_directory(out_path) as tmp:
        checkpoint.save(model, qcfg, tokenizer, tmp, report)
    return out_path


def nnx_pure_state(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.split(model)[1])


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="convert_hf_checkpoint", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", help="HF checkpoint directory or .gguf file "
                                    "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    p.add_argument("--method", choices=["qoq", "rtn"], default="qoq",
                   help="qoq: the full QoQ pipeline (default); rtn: round-to-nearest baseline")
    add_weight_format_args(p, "the checkpoint's weights")
    p.add_argument("--calib-text", nargs="+", default=[], metavar="FILE",
                   help="calibration text (plain text or JSON documents); default: the second "
                        "half of the Wikipedia summaries")
    p.add_argument("--calib-samples", type=positive_int, default=128,
                   help="calibration samples (128; fewer if the text is shorter)")
    p.add_argument("--calib-seq-len", type=positive_int, default=1024,
                   help="tokens per sample (1024; at most the model's context)")
    p.add_argument("--seed", type=seed_arg, default=42, help="calibration sampling seed "
                                                            "in [0, 2^32) (42)")
    p.add_argument("--preset", choices=sorted(SMOOTH_PRESETS), default=DEFAULT_PRESET,
                   help="the paper's per-model output-smoothing (alpha, beta)")
    p.add_argument("--smooth-alpha", type=unit_float, help="override the preset's alpha "
                                                           "(in [0, 1])")
    p.add_argument("--smooth-beta", type=unit_float, help="override the preset's beta "
                                                          "(in [0, 1])")
    p.add_argument("--smooth-attention-alpha", type=unit_float, default=0.5,
                   help="SmoothAttention's alpha in [0, 1] (0.5)")
    p.add_argument("--clip-grid", type=bounded_int(1, MAX_CLIP_GRID), default=80,
                   help=f"clipping-search ratios between 1.0 and 0.2 (80, at most "
                        f"{MAX_CLIP_GRID})")
    p.add_argument("--gptq-damp", type=positive_float, default=QuantConfig.gptq_damp,
                   help=f"GPTQ's Hessian damping, a fraction of its mean diagonal "
                        f"({QuantConfig.gptq_damp}; the paper's code: 0.01)")
    p.add_argument("--search-grid", type=bounded_int(2, 100), default=10,
                   help="searched (alpha, beta) candidates step by 1/N (10)")
    p.add_argument("--search-tokens", type=positive_int, default=4096,
                   help="calibration tokens the searches score their candidates on (4096)")
    steps = p.add_argument_group(
        "steps", "turn a step of the recipe on or off (default: the method's recipe, see "
                 "qoq_jax.quant.config.QuantConfig)")
    for step, what in (("rotate", "Hadamard rotation of the block inputs"),
                       ("rotate-v", "per-head Hadamard on v_proj -> o_proj (V cache rotated)"),
                       ("rotate-k", "per-head Hadamard on q and k after RoPE (K cache rotated; "
                                    "the model does it as it runs)"),
                       ("smooth-attention", "SmoothAttention on the keys"),
                       ("smooth-rotated-keys", "SmoothAttention again after the K rotation, "
                                               "per channel, as the model runs (off by "
                                               "default: measured as noise on SmolLM2)"),
                       ("smooth-out", "v_proj -> o_proj output smoothing"),
                       ("smooth-down", "up_proj -> down_proj output smoothing"),
                       ("reorder", "channel reordering (group formats)"),
                       ("clip", "weight clipping search (per row; per group for g128/g64)"),
                       ("gptq", "GPTQ rounding"),
                       ("quantized-inputs", "calibrate each layer on the quantized layers' "
                                            "outputs (GPTQ's sequential mode)")):
        steps.add_argument(f"--{step}", action=argparse.BooleanOptionalAction, default=None,
                           help=what)
    for search, what in (("smooth-attention", "SmoothAttention's (alpha, beta): use "
                                              "--smooth-attention-alpha"),
                         ("smoothing", "v->o and up->down (alpha, beta): use the preset"),
                         ("qk-clip", "q/k_proj clipping on the attention output (per-channel): "
                                     "use the per-row search")):
        steps.add_argument(f"--search-{search}", action=argparse.BooleanOptionalAction,
                           default=None, help=f"search {what} when off")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args) -> QuantConfig:
    return QuantConfig(
        method=args.method, weight_format=args.weight_format, calib_text=args.calib_text,
        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed,
        preset=args.preset, smooth_alpha=args.smooth_alpha, smooth_beta=args.smooth_beta,
        smooth_attention_alpha=args.smooth_attention_alpha, clip_grid=args.clip_grid,
        search_grid=args.search_grid, search_tokens=args.search_tokens,
        gptq_damp=args.gptq_damp,
        **{name: getattr(args, name) for name in STEPS + SEARCHES + ("quantized_inputs",)
           if getattr(args, name) is not None})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        qcfg = config_from_args(args)
        out = convert(args.hf_dir, args.out, qcfg, progress=not args.quiet)
        print(f"wrote {out}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
