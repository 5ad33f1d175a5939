"""The request bodies of the OpenAI API, as far as this server implements them (pydantic), and
what each asks of the engine: its prompt's token ids and its SamplingParams."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says

    @field_validator("n")
    @classmethod
    def _one(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v != 0:
            raise ValueError("penalties are not supported (must be 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token to report (None: no logprobs)."""
        raise NotImplementedError

    prompt_param: ClassVar[str] = "prompt"  # the field a prompt_ids() error names

    def prompt_ids(self, llm) -> list[int]:
        """The prompt's token ids (ValueError for a prompt this server cannot take)."""
        raise NotImplementedError

    def sampling_params(self, max_context: int, num_prompt_tokens: int):
        """The engine's SamplingParams (ValueError for values it refuses). Without a limit:
        whatever the context leaves."""
        from qoq_jax.sampling import SamplingParams

        max_new = (self.max_completion_tokens or self.max_tokens
                   or max(1, max_context - num_prompt_tokens))
        return SamplingParams(max_new_tokens=max_new, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed or 0, logprobs=self.num_logprobs,
                              stop_token_ids=() if self.ignore_eos else None)


class CompletionRequest(_Base):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_ids(self, llm) -> list[int]:
        p = self.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise ValueError("one prompt per request (n=1)")
            p = p[0]
        return llm.encode(p) if isinstance(p, str) else [int(t) for t in p]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)
    prompt_param: ClassVar[str] = "messages"

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_ids(self, llm) -> list[int]:
        """ValueError for content this server cannot read, or a failing chat template."""
        return llm.encode_chat([{"role": m.role, "content": m.text()} for m in self.messages])
