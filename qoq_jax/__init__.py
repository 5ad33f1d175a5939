"""qoq-jax: QServe's W4A8KV4 quantization (QoQ) and serving system in JAX and Pallas."""

from qoq_jax.api import LLM, Completion, load
from qoq_jax.config import ModelConfig, UnsupportedModelError
from qoq_jax.engine import Engine, GenerationResult, PromptError
from qoq_jax.sampling import SamplingParams

__all__ = ["LLM", "Completion", "load", "ModelConfig", "UnsupportedModelError", "Engine",
           "GenerationResult", "PromptError", "SamplingParams"]
__version__ = "0.1.0"
