"""Convert a llama.cpp GGUF file into a Hugging Face checkpoint directory.

    python convert/gguf_to_hf.py SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2-hf
"""

import argparse
import sys

from qoq_jax.cli import ArgumentParser, run_cli


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf_file", help="the .gguf file (llama or qwen2 architecture)")
    parser.add_argument("out", help="output directory (must not exist, or be empty)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    def body() -> int:
        from qoq_jax.gguf import convert_gguf_to_hf

        out = convert_gguf_to_hf(args.gguf_file, args.out, progress=not args.quiet)
        print(f"wrote {out}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
