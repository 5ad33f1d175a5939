"""Hugging Face checkpoint -> QoQ W4A8KV4 checkpoint. A thin script over qoq_jax.convert; the
console script `convert_hf_checkpoint` runs the same function. `--help` lists the options."""

import sys

from qoq_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
