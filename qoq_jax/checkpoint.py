"""Quantized checkpoints: Orbax state of the W4A8 model, plus config and tokenizer.

Layout of a checkpoint directory:
    config.json     the Hugging Face config, plus "quantization" (the QuantConfig recipe) and
                    "qoq_jax_format"
    tokenizer files as transformers' save_pretrained writes them
    state/          Orbax checkpoint of the model's NNX state (packed weights bit for bit;
                    float tensors in bfloat16)
Writing is atomic: everything goes to a hidden sibling directory that is renamed into place at
the end, so an interrupted or failed conversion leaves nothing that loads as a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qoq_jax.config import ModelConfig
from qoq_jax.quant.config import QuantConfig

FORMAT_VERSION = 1
STORAGE_DTYPE = jnp.bfloat16


def _stored_dtype(dtype):
    """Float tensors are stored in bfloat16; packed fields and fp16 scales keep their dtype."""
    if jnp.issubdtype(dtype, jnp.floating) and dtype != jnp.float16:
        return STORAGE_DTYPE
    return dtype


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and "quantization" in json.loads(cfg.read_text())


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory that becomes `out` only if the block succeeds."""
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def linear_factory(qcfg: QuantConfig):
    import functools

    from qoq_jax.layers import W4A8Linear

    return functools.partial(W4A8Linear, group_size=qcfg.group_size)


def save(model, qcfg: QuantConfig, tokenizer, out_dir: Path) -> None:
    """Write a quantized model into out_dir (an empty directory: see atomic_directory)."""
    import orbax.checkpoint as ocp

    cfg: ModelConfig = model.config
    _, state = nnx.split(model)
    pure = jax.tree.map(lambda a: a.astype(_stored_dtype(a.dtype)), nnx.to_pure_dict(state))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(out_dir / "state", pure)
    ckptr.wait_until_finished()
    hf = cfg.to_hf_dict()
    hf["quantization"] = qcfg.to_dict()
    hf["qoq_jax_format"] = FORMAT_VERSION
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def load_model(path: str | os.PathLike, dtype):
    """(model, QuantConfig) from a quantized checkpoint directory."""
    import orbax.checkpoint as ocp

    from qoq_jax.model import Transformer

    path = Path(path).absolute()
    hf = json.loads((path / "config.json").read_text())
    if hf.get("qoq_jax_format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a qoq-jax checkpoint of format {FORMAT_VERSION}")
    cfg = ModelConfig.from_hf_dict(hf)
    qcfg = QuantConfig.from_dict(hf["quantization"])
    abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype, linear_factory(qcfg)))
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, _stored_dtype(a.dtype)),
                          nnx.to_pure_dict(state))
    if not (path / "state").exists():
        raise FileNotFoundError(f"{path} has no state/ (an incomplete checkpoint?)")
    restored = ocp.StandardCheckpointer().restore(path / "state", target)
    restored = jax.tree.map(
        lambda r, a: jnp.asarray(r, a.dtype), restored, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state), qcfg


def build_quantized_model(cfg: ModelConfig, tensors: dict[str, np.ndarray], qcfg: QuantConfig,
                          dtype):
    """A W4A8 Transformer from the pipeline's named tensors."""
    from qoq_jax.model import from_hf_weights

    return from_hf_weights(cfg, tensors, dtype, linear_factory(qcfg))
