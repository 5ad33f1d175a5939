"""Where a float model comes from: a source (HF directory, .gguf file, or the default model)
-> (ModelConfig, lazy weights, tokenizer, description), and the compute-dtype rules.

Both qoq_jax.load (api.py) and the converter (convert.py) read models through here, so neither
imports the other for it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_dtype():
    """bf16 on a GPU, fp32 on CPU (where bf16 matmuls are slow and buy nothing)."""
    return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32


def resolve_dtype(dtype) -> jnp.dtype:
    """None -> default_dtype(); a name in DTYPES -> its dtype; a dtype passes through."""
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def load_source(source: str | None, *, progress: bool = True):
    """(ModelConfig, lazy weights, tokenizer, description) of an HF dir, a GGUF, or the default."""
    from qoq_jax.config import ModelConfig
    from qoq_jax.hf import SafetensorsCheckpoint, canonical_weights, load_tokenizer

    if source is None:
        from qoq_jax.assets import default_model_dir

        source = str(default_model_dir())
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        import tempfile

        from qoq_jax.gguf import build_tokenizer_files, read_gguf

        cfg, _, weights, meta = read_gguf(path, progress=progress)
        with tempfile.TemporaryDirectory() as tmp:
            build_tokenizer_files(meta, Path(tmp))
            tokenizer = load_tokenizer(tmp)
        return cfg, weights, tokenizer, str(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no Hugging Face checkpoint directory or .gguf file at {path}")
    cfg = ModelConfig.from_json(path)
    # the weights as the modules name them (Phi-3's fused projections split, lazily)
    weights = canonical_weights(cfg, SafetensorsCheckpoint(path))
    return cfg, weights, load_tokenizer(path), str(path)
