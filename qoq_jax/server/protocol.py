"""The request bodies of the OpenAI API, as far as this server implements them (pydantic), and
what each asks of the engine: its prompt's token ids and its SamplingParams.

Types are strict, as OpenAI's are: no "5" for 5, no true for 1, no 1 for true (an integer is
taken for a number). A limit that the request leaves out (or sends as null) is the server's
default: 16 tokens for /v1/completions (OpenAI's default) and `max_tokens_default` for chat,
either cut to what the context leaves; a limit the request gives is used as given (over the
context: 400 context_length_exceeded). `validation_error` turns pydantic's first error into
one message that names the field and the problem.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_CHARS = 1000  # each stop string (matching one costs up to its length per token)


class Strict(BaseModel):
    """A request body's model: strict types, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class _Base(Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=128)  # choices: samples of one prompt, sharing its KV pages
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> [-100, 100]
    user: str | None = None
    # vLLM's extensions
    ignore_eos: bool = False  # generate max_tokens whatever the model says
    top_k: int = Field(0, ge=-1)  # 0 or -1: no cut
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0)
    prompt_logprobs: int | None = Field(None, ge=0, le=5)  # of the prompt's tokens
    # special tokens written as text in the prompt or messages are control tokens (default:
    # the server's --allow-special-tokens; otherwise they are encoded as text)
    allow_special_tokens: bool | None = None
    # structured output, as vLLM names it: {"json": schema, "regex": ..., "choice": [...],
    # "grammar": ..., "json_object": true}; and its older spellings
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("structured_outputs")
    @classmethod
    def _structured_keys(cls, v):
        known = {"json", "regex", "choice", "grammar", "json_object"}
        # options of vLLM's backends that change nothing here
        ignored = {"disable_any_whitespace", "disable_additional_properties",
                   "whitespace_pattern", "backend", "disable_fallback"}
        unknown = sorted(set(v or {}) - known - ignored)
        if unknown:
            raise ValueError(f"unsupported key {unknown[0]!r} (supported: "
                             f"{', '.join(sorted(known))})")
        if v and "json_object" in v and not isinstance(v["json_object"], bool):
            raise ValueError("json_object must be true or false")
        return v

    def structured(self):
        """The request's StructuredOutput (None: free text); ConstraintError (a 400) for a
        malformed or contradictory one. Compiling it is the engine's (its GrammarCompiler)."""
        from qoq_jax.structured import ConstraintError, structured_output

        so = self.structured_outputs or {}
        given = {"json_schema": so.get("json"), "regex": so.get("regex"),
                 "choice": so.get("choice"), "grammar": so.get("grammar"),
                 "json_object": bool(so.get("json_object"))}
        for key, legacy in (("json_schema", self.guided_json), ("regex", self.guided_regex),
                            ("choice", self.guided_choice), ("grammar", self.guided_grammar)):
            if legacy is not None:
                if given[key] is not None:
                    raise ConstraintError(f"guided_{key.split('_')[0]} and structured_outputs both "
                                          f"give a {key}")
                given[key] = legacy
        rf = self.response_format_constraint()
        if rf is not None:
            if any(v not in (None, False) for v in given.values()):
                raise ConstraintError("response_format and structured_outputs (or guided_*) "
                                      "both constrain the output: give one")
            given[rf[0]] = rf[1]
        return structured_output(**given)

    def response_format_constraint(self) -> tuple[str, Any] | None:
        """Chat's response_format as (keyword of structured_output, value); None elsewhere."""
        return None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if not v:
            return None
        if len(v) > 300:
            raise ValueError(f"at most 300 entries, got {len(v)}")
        out = {}
        for key, bias in v.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise ValueError(f"keys must be token ids (non-negative integers as strings), "
                                 f"got {key[:20]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"values must be in [-100, 100], got {bias} for token {key}")
            out[str(int(key))] = bias
        return out

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return stops

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token to report (None: no logprobs)."""
        raise NotImplementedError

    prompt_param: ClassVar[str] = "prompt"  # the field a prompt_ids() error names
    default_max_tokens: ClassVar[int | None] = None  # None: the server's max_tokens_default

    def prompt_ids(self, llm, *, split_special_tokens: bool = True) -> list[int]:
        """The prompt's token ids (ValueError for a prompt this server cannot take)."""
        raise NotImplementedError

    def max_new_tokens(self, max_context: int, num_prompt_tokens: int,
                       server_default: int) -> int:
        """The request's limit, or the default one cut to what the context leaves."""
        given = (self.max_completion_tokens if self.max_completion_tokens is not None
                 else self.max_tokens)
        if given is not None:
            return given
        default = self.default_max_tokens or server_default
        return max(1, min(default, max_context - num_prompt_tokens))

    def sampling_params(self, max_context: int, num_prompt_tokens: int, index: int = 0, *,
                        max_tokens_default: int = 1024):
        """The engine's SamplingParams of choice `index` (ValueError for values it refuses).
        Choice i samples with seed + i, so that the n choices differ (unless greedy) and each
        is reproducible."""
        from qoq_jax.sampling import SamplingParams

        max_new = self.max_new_tokens(max_context, num_prompt_tokens, max_tokens_default)
        if self.min_tokens > max_new:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({max_new})")
        return SamplingParams(
            max_new_tokens=max_new, temperature=self.temperature, top_p=self.top_p,
            top_k=max(0, self.top_k), min_p=self.min_p,
            seed=((self.seed or 0) + index) % 2**32, logprobs=self.num_logprobs,
            stop_token_ids=() if self.ignore_eos else None,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            min_tokens=self.min_tokens,
            logit_bias={int(k): b for k, b in (self.logit_bias or {}).items()},
            structured=self.structured())

    def prompts_ids(self, llm, *, split_special_tokens: bool = True) -> list[list[int]]:
        """Every prompt of the request (chat: one)."""
        return [self.prompt_ids(llm, split_special_tokens=split_special_tokens)]


MAX_PROMPTS = 64  # prompts in one completions request


class CompletionRequest(_Base):
    # a string, token ids, or a list of either (several prompts: choices prompt-major)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: the prompt scored only
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False  # the prompt before the completion (with logprobs: the prompt's too)
    default_max_tokens: ClassVar[int | None] = COMPLETIONS_DEFAULT_MAX_TOKENS

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("must not be an empty array")
            if isinstance(v[0], (str, list)) and len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _zero_only_with_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: must be >= 1 (0 only with echo), got 0")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def scores_prompt(self) -> int | None:
        """Alternatives per prompt token to report (None: the prompt is not scored)."""
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    def prompts_ids(self, llm, *, split_special_tokens: bool = True) -> list[list[int]]:
        p = self.prompt
        items = p if isinstance(p, list) and isinstance(p[0], (str, list)) else [p]
        out = []
        for item in items:  # token ids are taken as given (the engine checks their range)
            out.append(llm.encode(item, split_special_tokens=split_special_tokens)
                       if isinstance(item, str) else list(item))
        return out


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None

    @field_validator("tool_calls")
    @classmethod
    def _calls(cls, v):
        for i, c in enumerate(v or []):
            fn = c.get("function")
            if c.get("type", "function") != "function" or not isinstance(fn, dict) or not (
                    isinstance(fn.get("name"), str)
                    and isinstance(fn.get("arguments", ""), str)):
                raise ValueError(f"{i}: a call is {{\"type\": \"function\", \"function\": "
                                 f"{{\"name\": str, \"arguments\": JSON text}}}}")
        return v

    def as_dict(self) -> dict:
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v):
        if isinstance(v, list):
            for i, part in enumerate(v):
                if part.get("type") != "text":
                    raise ValueError(f"part {i}: only text parts ({{\"type\": \"text\", "
                                     f"\"text\": \"...\"}}) are supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i}: its text must be a string, got "
                                     f"{json_type(part.get('text'))}")
        return v

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part["text"] for part in self.content)


class ChatRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)
    # OpenAI's structured output: {"type": "text" | "json_object"} or {"type": "json_schema",
    # "json_schema": {"name": ..., "schema": {...}, "strict": ...}}
    response_format: dict[str, Any] | None = None
    # tool calling (qoq_jax.server.tools): [{"type": "function", "function": {...}}], and
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    prompt_param: ClassVar[str] = "messages"

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        from qoq_jax.server.tools import parse_tools

        parse_tools(v or [])
        return v

    @model_validator(mode="after")
    def _tool_choice(self):
        from qoq_jax.server.tools import parse_tool_choice

        try:
            parse_tool_choice(self.tool_choice, self.functions)
        except ValueError as e:
            raise ValueError(f"tool_choice: {e}") from None
        return self

    @property
    def functions(self):
        from qoq_jax.server.tools import parse_tools

        return parse_tools(self.tools or [])

    @property
    def tool_mode(self) -> str:
        """'none', 'auto', 'required' or the function's name (qoq_jax.server.tools)."""
        from qoq_jax.server.tools import parse_tool_choice

        return parse_tool_choice(self.tool_choice, self.functions)

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v):
        if v is None:
            return v
        kind = v.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', got "
                             f"{kind!r}")
        if kind == "json_schema":
            spec = v.get("json_schema")
            if not isinstance(spec, dict):
                raise ValueError("json_schema must be an object with the schema in 'schema'")
            schema = spec.get("schema", {})
            if not isinstance(schema, dict):
                raise ValueError("json_schema.schema must be a JSON object")
        return v

    def response_format_constraint(self) -> tuple[str, Any] | None:
        from qoq_jax.server.tools import constraint_schema
        from qoq_jax.structured import ConstraintError

        rf = self.response_format or {}
        tools = constraint_schema(self.functions, self.tool_mode)
        if tools is not None:
            if rf.get("type") in ("json_object", "json_schema"):
                raise ConstraintError("tool_choice 'required' or a named function already "
                                      "constrains the output: drop response_format")
            return "json_schema", tools
        if rf.get("type") == "json_object":
            return "json_object", True
        if rf.get("type") == "json_schema":
            # no schema: any JSON, as OpenAI does
            return "json_schema", rf["json_schema"].get("schema") or {"type": "object"}
        return None

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def scores_prompt(self) -> int | None:
        return self.prompt_logprobs

    def prompt_ids(self, llm, *, split_special_tokens: bool = True) -> list[int]:
        """ValueError (qoq_jax.api.ChatTemplateError) if the chat template fails."""
        from qoq_jax.server.tools import render_messages, template_knows_tools

        messages, tools = render_messages([m.as_dict() for m in self.messages],
                                          self.functions, self.tool_mode,
                                          template_knows_tools(llm.tokenizer))
        return llm.encode_chat(messages, split_special_tokens=split_special_tokens,
                               tools=tools)


class TokenizeRequest(Strict):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # prompt: the tokenizer's BOS and the like

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self

    def ids(self, llm, *, split_special_tokens: bool = True) -> list[int]:
        if self.messages is not None:
            return llm.encode_chat([{"role": m.role, "content": m.text()}
                                    for m in self.messages],
                                   split_special_tokens=split_special_tokens)
        return llm.encode(self.prompt, split_special_tokens=split_special_tokens,
                          add_special_tokens=self.add_special_tokens)


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


# ----------------------------------------------------------------------------------------------
# errors

# what a field of several types takes, for the message when a value is none of them
_UNIONS = {"prompt": "a string, an array of strings, an array of integer token ids or an "
                     "array of such arrays",
           "stop": "a string, an array of strings or null",
           "content": "a string, an array of content parts or null",
           "input": "a string or an array of messages"}
# pydantic's type errors -> the JSON type that was expected
_TYPES = {"int_type": "an integer", "bool_type": "a boolean", "float_type": "a number",
          "string_type": "a string", "list_type": "an array", "dict_type": "an object",
          "model_type": "an object", "model_attributes_type": "an object"}
_FIELDS = {name for m in (CompletionRequest, ChatRequest, ChatMessage, StreamOptions,
                          TokenizeRequest, DetokenizeRequest)
           for name in m.model_fields}


def register_fields(*models) -> None:
    """Request models defined elsewhere (responses_api.py): their field names, so that
    validation_error tells them from the type tags pydantic adds to a union's path."""
    _FIELDS.update(name for m in models for name in m.model_fields)


def json_type(v) -> str:
    """The JSON type of a parsed value, with its article ("a string")."""
    if v is None:
        return "null"
    for t, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                    (str, "a string"), (list, "an array"), (dict, "an object")):
        if isinstance(v, t):
            return name
    return type(v).__name__


def _at(data, loc):
    for k in loc:
        try:
            data = data[k]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def validation_error(e: ValidationError, data) -> tuple[str, str | None]:
    """(message, param) of a request body's first validation error: the field's dotted path
    ("messages.0.role"), what it must be and what it got."""
    err = e.errors(include_url=False)[0]
    loc = list(err["loc"])
    # a value that fits none of a field's types: pydantic adds the type it tried to the path
    tag = next((i for i, k in enumerate(loc) if isinstance(k, str) and k not in _FIELDS), None)
    if tag is not None and err["type"] in _TYPES:
        loc = loc[:tag]
        param = ".".join(map(str, loc))
        return (f"{param}: must be {_UNIONS.get(str(loc[-1]), 'of another type')}, got "
                f"{json_type(_at(data, loc))}"), param
    if tag is not None:
        loc = loc[:tag] + [k for k in loc[tag + 1:] if isinstance(k, int)]
    param = ".".join(map(str, loc)) or None
    got = err.get("input")
    if err["type"] == "missing":
        msg = "is required"
    elif err["type"] in _TYPES:
        msg = f"must be {_TYPES[err['type']]}, got {json_type(got)}"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg[0].lower() + msg[1:]
        if err["type"] != "literal_error" and isinstance(got, (int, float)) and not isinstance(
                got, bool):
            msg += f", got {got}"
    return (f"{param}: {msg}" if param else msg), param
