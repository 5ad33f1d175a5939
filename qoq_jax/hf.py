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


# Exponent masks by float width: a value is NaN or Inf when all its exponent bits are set.
_EXPONENT_BITS = {2: None, 4: np.uint32(0x7F800000), 8: np.uint64(0x7FF0000000000000)}
_CHUNK = 1 << 24  # elements checked at a time (bounded temporary memory)


def count_nonfinite(a) -> int:
    """How many NaN/Inf values a float array holds (0 for integer arrays). Works on numpy
    float16/32/64, ml_dtypes' bfloat16 and the like, and on JAX arrays."""
    a = np.asarray(a)
    dt = np.dtype(a.dtype)
    if dt.kind == "f":
        width = dt.itemsize
    elif dt.kind == "V" and dt.itemsize == 2 and "float" in dt.name:  # bfloat16 (ml_dtypes)
        width = 2
    else:
        return 0
    if width == 2:  # float16: 5 exponent bits; bfloat16: 8
        mask = np.uint16(0x7C00 if dt == np.float16 else 0x7F80)
        view = np.uint16
    elif width in _EXPONENT_BITS:
        mask, view = _EXPONENT_BITS[width], np.uint32 if width == 4 else np.uint64
    else:  # long double and other exotic widths
        return int(a.size - np.count_nonzero(np.isfinite(a)))
    flat = np.ascontiguousarray(a).reshape(-1).view(view)
    bad = 0
    for i in range(0, flat.size, _CHUNK):
        part = flat[i:i + _CHUNK]
        bad += int(np.count_nonzero((part & mask) == mask))
    return bad


def check_finite(name: str, a) -> None:
    """Raise CheckpointError naming the tensor if `a` holds a NaN or an Inf."""
    n = count_nonfinite(a)
    if n:
        raise CheckpointError(
            f"tensor {name!r} has {n} non-finite value{'s' if n > 1 else ''} (NaN/Inf)")


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
    """Read-only, lazy mapping from tensor name to numpy array (bf16 arrives as ml_dtypes.bfloat16).

    Every tensor read is checked for NaN/Inf (check_finite=False skips it): a model with a
    non-finite weight fails at load, naming the tensor, instead of generating garbage."""

    def __init__(self, model_dir: str | os.PathLike, *, check_finite: bool = True):
        self.check_finite = check_finite
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
            w = self._handles[file].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.dir / file}: {e}") from e
        if self.check_finite:
            check_finite(name, w)
        return w

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class _DerivedWeights(Mapping[str, np.ndarray]):
    """A lazy view of `base` in which some names are computed from other tensors: derived
    name -> (function, source names); the sources are hidden. Reading a derived tensor reads
    its sources then (one at a time, as the base mapping does)."""

    def __init__(self, base: Mapping[str, np.ndarray], derived: dict[str, tuple]):
        self.base, self.derived = base, derived
        hidden = {src for _, srcs in derived.values() for src in srcs}
        self._names = [n for n in base if n not in hidden] + list(derived)
        self._known = set(self._names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.derived:
            fn, srcs = self.derived[name]
            return fn(*(self.base[src] for src in srcs))
        if name not in self._known:
            raise KeyError(name)
        return self.base[name]

    def __contains__(self, name) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _rows(start: int, stop: int):
    return lambda w: w[start:stop]


def canonical_weights(cfg, weights: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """`weights` (HF names) with the tensors named as qoq_jax's modules name them.

    Phi-3 checkpoints fuse q/k/v into self_attn.qkv_proj and gate/up into mlp.gate_up_proj
    (gate first); they are split here, lazily, into q/k/v_proj and gate/up_proj, so that the
    model, the quantizer and the tensor-parallel rules see one layout for every family (the
    runner fuses them again for speed: model.fuse_projections). Mixture-of-experts checkpoints
    keep one tensor per expert (Qwen3-MoE: mlp.experts.{e}.gate_proj/up_proj/down_proj,
    Mixtral: block_sparse_moe.experts.{e}.w1/w3/w2, its router block_sparse_moe.gate); here
    they become the stacked mlp.experts.gate_proj.weight [E, F, D] (up_proj alike, down_proj
    [E, D, F]) and mlp.gate.weight [E, D] that the model holds. A mapping already in these
    names is returned as it is, so calling this twice is harmless."""
    derived: dict[str, tuple] = {}
    if getattr(cfg, "num_experts", 0):
        _stack_experts(cfg, weights, derived)
    hd = cfg.head_dim
    nq, nkv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    f = cfg.intermediate_size
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = f"{p}self_attn.qkv_proj.{kind}"
            if qkv in weights:
                for name, (a, b) in (("q_proj", (0, nq)), ("k_proj", (nq, nq + nkv)),
                                     ("v_proj", (nq + nkv, nq + 2 * nkv))):
                    derived[f"{p}self_attn.{name}.{kind}"] = (_rows(a, b), (qkv,))
            gate_up = f"{p}mlp.gate_up_proj.{kind}"
            if gate_up in weights:
                derived[f"{p}mlp.gate_proj.{kind}"] = (_rows(0, f), (gate_up,))
                derived[f"{p}mlp.up_proj.{kind}"] = (_rows(f, 2 * f), (gate_up,))
    return _DerivedWeights(weights, derived) if derived else weights


def _stack(*ws):
    return np.stack(ws)


def _stack_experts(cfg, weights: Mapping[str, np.ndarray], derived: dict[str, tuple]) -> None:
    e = cfg.num_experts
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        if f"{p}block_sparse_moe.gate.weight" in weights:  # Mixtral
            derived[f"{p}mlp.gate.weight"] = (lambda w: w, (f"{p}block_sparse_moe.gate.weight",))
            names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
            src = f"{p}block_sparse_moe.experts.{{}}.{{}}.weight"
        else:  # Qwen3-MoE
            names = {n: n for n in ("gate_proj", "up_proj", "down_proj")}
            src = f"{p}mlp.experts.{{}}.{{}}.weight"
        for ours, theirs in names.items():
            parts = tuple(src.format(x, theirs) for x in range(e))
            if parts[0] in weights:
                derived[f"{p}mlp.experts.{ours}.weight"] = (_stack, parts)


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
