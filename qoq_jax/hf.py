"""Hugging Face checkpoints without torch: safetensors through numpy, and the tokenizer.

A checkpoint directory holds ``config.json``, the weights (``model.safetensors``, or shards
named by ``model.safetensors.index.json``) and the tokenizer files. Tensors are read lazily,
one at a time, so that converting a large model never holds two copies of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match its config."""


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
    """Read-only, lazy mapping from tensor name to numpy array (bf16 arrives as ml_dtypes.bfloat16)."""

    def __init__(self, model_dir: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        single = self.dir / SINGLE_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files, weight_map = [SINGLE_FILE], None
        else:
            raise CheckpointError(
                f"no weights in {self.dir}: expected {SINGLE_FILE} or {INDEX_FILE}")
        self._handles = {}
        for name in files:
            path = self.dir / name
            if not path.exists():
                raise CheckpointError(f"checkpoint shard {path} named by {INDEX_FILE} is missing")
            try:
                self._handles[name] = safe_open(str(path), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read {path} (truncated or not safetensors): {e}") from e
        if weight_map is None:
            weight_map = {k: SINGLE_FILE for k in self._handles[SINGLE_FILE].keys()}
        self._where = weight_map

    def __getitem__(self, name: str) -> np.ndarray:
        from safetensors import SafetensorError

        if name not in self._where:
            raise KeyError(name)
        file = self._where[name]
        try:
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.dir / file}: {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def save_safetensors(weights: Mapping[str, np.ndarray], model_dir: str | os.PathLike) -> None:
    """Write one model.safetensors (used by the GGUF converter and the tests)."""
    from safetensors.numpy import save_file

    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(out / SINGLE_FILE),
              metadata={"format": "pt"})


def load_tokenizer(model_dir: str | os.PathLike):
    """The transformers fast tokenizer of a checkpoint directory (no torch involved)."""
    # transformers warns at import that torch is absent; here that is by design.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").exists() and not (model_dir / "tokenizer.model").exists():
        raise CheckpointError(f"no tokenizer (tokenizer.json) in {model_dir}")
    return AutoTokenizer.from_pretrained(str(model_dir))
