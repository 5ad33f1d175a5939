"""The notebook-level API: ``qoq_jax.load(...)`` returns an ``LLM`` that generates text.

    import qoq_jax
    llm = qoq_jax.load()                      # the embedded default model (SmolLM2-135M-Instruct)
    print(llm.generate("What is the capital of France?", chat=True)[0].text)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from qoq_jax.config import ModelConfig
from qoq_jax.engine import Engine, GenerationResult
from qoq_jax.sampling import SamplingParams

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_dtype():
    """bf16 on a GPU, fp32 on CPU (where bf16 matmuls are slow and buy nothing)."""
    return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32


def resolve_dtype(dtype) -> jnp.dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


@dataclasses.dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str


class LLM:
    """A loaded model with its tokenizer and generation engine."""

    def __init__(self, model, tokenizer, *, source: str = "", **engine_kwargs):
        self.model = model
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.source = source
        self.engine = Engine(model, **engine_kwargs)

    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"the tokenizer of {self.source} has no chat template")
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer.encode(prompt, add_special_tokens=True)]

    def generate(self, prompts: str | Sequence[str], *, chat: bool = False,
                 **sampling) -> list[Completion]:
        """Generate for one prompt or a batch. Keyword arguments are SamplingParams fields."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = SamplingParams(**sampling)
        ids = [self.encode(p, chat=chat) for p in prompts]
        results = self.engine.generate(ids, params)
        return [self._completion(p, r) for p, r in zip(prompts, results)]

    def _completion(self, prompt: str, r: GenerationResult) -> Completion:
        return Completion(prompt, self.tokenizer.decode(r.tokens, skip_special_tokens=True),
                          r.tokens, r.finish_reason)


def load(path: str | os.PathLike | None = None, *, dtype=None, quantize=None,
         **engine_kwargs) -> LLM:
    """Load a model for generation.

    path: None (the embedded default model), a Hugging Face checkpoint directory, a .gguf file,
    or a quantized checkpoint written by convert_hf_checkpoint (then it runs W4A8 with a KV4
    cache). quantize: a QuantConfig (or "qoq" / "rtn") to quantize a float model on the fly.
    Engine keywords (kv_cache="16bit" | "kv4", page_size, ...) pass through.
    """
    from qoq_jax import checkpoint
    from qoq_jax.convert import load_source, quantize as run_quantize
    from qoq_jax.hf import load_tokenizer
    from qoq_jax.quant.config import QuantConfig

    dtype = resolve_dtype(dtype)
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no model at {p}")
        if not p.is_dir() and p.suffix != ".gguf":
            raise ValueError(f"{p} is neither a model directory nor a .gguf file")
        if checkpoint.is_quantized_checkpoint(p):
            if quantize is not None:
                raise ValueError(f"{p} is already quantized")
            model, qcfg = checkpoint.load_model(p, dtype)
            engine_kwargs.setdefault("kv_cache", qcfg.kv_cache)
            return LLM(model, load_tokenizer(p), source=str(p), **engine_kwargs)
    cfg, weights, tokenizer, source = load_source(None if path is None else str(path))
    if quantize is None:
        from qoq_jax.model import from_hf_weights

        return LLM(from_hf_weights(cfg, weights, dtype), tokenizer, source=source,
                   **engine_kwargs)
    qcfg = QuantConfig(method=quantize) if isinstance(quantize, str) else quantize
    model, qcfg = run_quantize(cfg, weights, tokenizer, qcfg, dtype=dtype)
    engine_kwargs.setdefault("kv_cache", qcfg.kv_cache)
    return LLM(model, tokenizer, source=f"{source} ({qcfg.method} on the fly)", **engine_kwargs)
