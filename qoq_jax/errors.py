"""The errors a caller of the engine can meet, by kind (the server maps each type to a status).

They live apart from the engine so that the HTTP layer, the notebook API and the CLIs can tell
them apart without importing the engine's device code.
"""

from __future__ import annotations


class PromptError(ValueError):
    """A request the engine can never serve: empty, bad token ids, bad limits (HTTP 400)."""


class ContextLengthError(PromptError):
    """The prompt plus max_new_tokens exceed the model's context or the whole KV cache
    (HTTP 400, code "context_length_exceeded")."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its limit (HTTP 429)."""


class EngineBusyError(RuntimeError):
    """step() was called while another thread is stepping the same engine."""


class EngineMemoryError(MemoryError):
    """The KV cache asked for does not fit in the memory there is."""
