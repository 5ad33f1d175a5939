"""/v1/responses: OpenAI's Responses API, stateless (nothing is stored; `previous_response_id`
and tools are refused), over the same engine, sessions and checks as the chat route.

A request is `input` (a string: one user message; or messages with text content, as
`{"role", "content"}` items where content is a string or `input_text` / `output_text` parts),
`instructions` (a system message in front), `max_output_tokens`, `temperature`, `top_p`,
`stream`. The response is a `response` object with one assistant `message` item of one
`output_text` part; streamed, the events are `response.created`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added`, `response.output_text.delta`...,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done` and
`response.completed` (or `response.incomplete` when the token limit ended it), each with its
`sequence_number`. The handler is app.responses; this module holds the request model and
the bodies.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from qoq_jax.server.protocol import Strict, register_fields

class InputMessage(Strict):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_parts(cls, v):
        if isinstance(v, list):
            for i, part in enumerate(v):
                if part.get("type") not in ("input_text", "output_text", "text"):
                    raise ValueError(f"part {i}: only text parts (input_text, output_text) are "
                                     f"supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i}: its text must be a string")
        return v

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)


class ResponsesRequest(Strict):
    model: str
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stream: bool = False
    store: bool | None = None  # accepted; nothing is stored either way
    metadata: dict[str, str] | None = None
    user: str | None = None
    previous_response_id: str | None = None
    tools: list[Any] | None = None
    allow_special_tokens: bool | None = None
    prompt_param: ClassVar[str] = "input"

    @field_validator("previous_response_id")
    @classmethod
    def _stateless(cls, v):
        if v is not None:
            raise ValueError("this server stores no responses: send the whole conversation in "
                             "input")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools are not supported on /v1/responses")
        return v

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must not be an empty array")
        return v

    def messages(self) -> list[dict]:
        msgs = [] if self.instructions is None else [{"role": "system",
                                                      "content": self.instructions}]
        if isinstance(self.input, str):
            return msgs + [{"role": "user", "content": self.input}]
        return msgs + [{"role": "system" if m.role == "developer" else m.role,
                        "content": m.text()} for m in self.input]

    def prompts_ids(self, llm, *, split_special_tokens: bool = True) -> list[list[int]]:
        return [llm.encode_chat(self.messages(), split_special_tokens=split_special_tokens)]

    def sampling_params(self, max_context: int, num_prompt_tokens: int,
                        max_tokens_default: int):
        from qoq_jax.sampling import SamplingParams

        max_new = self.max_output_tokens or max(1, min(max_tokens_default,
                                                       max_context - num_prompt_tokens))
        return SamplingParams(max_new_tokens=max_new, temperature=self.temperature,
                              top_p=self.top_p)


register_fields(InputMessage, ResponsesRequest)


def response_object(req: ResponsesRequest, rid: str, msg_id: str, created: int, model: str,
              status: str, text: str | None, use: dict | None) -> dict:
    """The `response` object; text None: no output yet (in progress)."""
    output = [] if text is None else [{
        "type": "message", "id": msg_id, "status": "completed" if status == "completed"
        else "incomplete", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}]
    return {
        "id": rid, "object": "response", "created_at": created, "status": status,
        "model": model, "output": output, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
        "text": {"format": {"type": "text"}}, "truncation": "disabled", "store": False,
        "metadata": req.metadata or {}, "user": req.user, "previous_response_id": None,
        "reasoning": None, "error": None,
        "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete"
                               else None),
        "usage": use}


def usage_object(session) -> dict:
    n_in, n_out = session.num_prompt_tokens, len(session.token_ids)
    return {"input_tokens": n_in, "input_tokens_details": {"cached_tokens":
                                                           session.cached_tokens},
            "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n_in + n_out}


def sse_event(event: dict) -> str:
    import json

    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
