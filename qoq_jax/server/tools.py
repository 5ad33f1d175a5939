"""Tool calling on /v1/chat/completions: the request's `tools` and `tool_choice` checked, the
conversation rendered with them, the constraint that enforces `required` and a named function,
and the parsers that find calls in what the model wrote.

- Rendering: a chat template that knows tools (it mentions ``tools``: Qwen2.5/Qwen3, Llama 3.1,
  Hermes, Mistral) gets them as transformers passes them; any other template gets them in a
  system message in the Hermes format (function signatures in ``<tools></tools>``, calls
  answered in ``<tool_call></tool_call>``), earlier calls written back that way and tool
  results as ``<tool_response>`` user turns.
- ``tool_choice``: ``none`` renders no tools and parses nothing; ``auto`` parses the output
  (Hermes ``<tool_call>`` blocks as Qwen writes them, Llama 3.1's bare JSON object with
  ``parameters``, or a generic JSON object / array of ``{"name", "arguments"}``);
  ``required`` constrains the output to a JSON array of one or more calls to the given
  functions, and a named function to a JSON object of its parameters (as vLLM does), so their
  arguments always validate against the function's parameter schema.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


@dataclasses.dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict

    def signature(self) -> dict:
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parse_tools(tools: list) -> list[Function]:
    """The request's tools (ValueError naming the entry and the problem)."""
    out, seen = [], set()
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise ValueError(f"{i}: only {{\"type\": \"function\", \"function\": {{...}}}} "
                             f"tools are supported")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{i}: 'function' must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"{i}: function.name must be 1-64 letters, digits, '_' or '-', "
                             f"got {name!r}"[:200])
        if name in seen:
            raise ValueError(f"{i}: two tools are named {name!r}")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"{i}: function.parameters must be a JSON schema object")
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise ValueError(f"{i}: function.description must be a string")
        out.append(Function(name, desc, params))
    return out


def parse_tool_choice(choice: Any, functions: list[Function]) -> str:
    """'none', 'auto', 'required' or the name of the function that must be called."""
    if choice is None:
        return "auto" if functions else "none"
    if choice in ("none", "auto", "required"):
        if choice == "required" and not functions:
            raise ValueError("'required' needs at least one tool")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in {f.name for f in functions}:
            raise ValueError(f"names the function {name!r}, which is not among the tools"[:200])
        return name
    raise ValueError("must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                     "\"function\": {\"name\": ...}}")


def constraint_schema(functions: list[Function], mode: str) -> dict | None:
    """The JSON schema that enforces `mode` ('required' or a function's name); None for
    'auto' and 'none' (the output is free)."""
    if mode in ("none", "auto"):
        return None
    if mode != "required":
        return next(f.parameters for f in functions if f.name == mode)
    calls = [{"type": "object",
              "properties": {"name": {"const": f.name}, "arguments": f.parameters},
              "required": ["name", "arguments"], "additionalProperties": False}
             for f in functions]
    return {"type": "array", "items": {"anyOf": calls}, "minItems": 1}


def template_knows_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def _arguments_dict(text: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def render_messages(messages: list[dict], functions: list[Function], mode: str,
                    native: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for apply_chat_template. `messages` are dicts with role, content and,
    for assistant turns, OpenAI `tool_calls`; `native`: the template renders tools itself."""
    tools = [f.signature() for f in functions] if mode != "none" and functions else None
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):  # templates read the arguments as a mapping
                m["tool_calls"] = [{"type": "function", "function": {
                    "name": c["function"]["name"],
                    "arguments": _arguments_dict(c["function"].get("arguments"))}}
                    for c in m["tool_calls"]]
            out.append(m)
        return out, tools
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments":
                                              _arguments_dict(c["function"].get("arguments"))})
                + "\n</tool_call>" for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (content + "\n" + calls).strip()})
        elif m["role"] == "tool":
            out.append({"role": "user",
                        "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": content})
    if tools:
        sig = "\n".join(json.dumps(t) for t in tools)
        system = ("You may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML "
                  f"tags:\n<tools>\n{sig}\n</tools>\n\nFor each function call, return a json "
                  "object with function name and arguments within <tool_call></tool_call> XML "
                  "tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                  "<args-json-object>}\n</tool_call>")
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, None


def _call(obj, names: set[str]) -> ToolCall | None:
    """A ToolCall from {"name", "arguments" | "parameters"}, if it names a known function."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _arguments_dict(args)
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_output(text: str, functions: list[Function], mode: str
                 ) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of what the model wrote; content None when it is all calls."""
    names = {f.name for f in functions}
    if mode == "none" or not functions:
        return text, []
    if mode == "required":
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return text, []  # cut by max_tokens
        calls = [c for c in (_call(i, names) for i in items) if c is not None]
        return None, calls
    if mode != "auto":  # a named function: the text is its arguments
        try:
            args = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        return None, [ToolCall(mode, json.dumps(args, ensure_ascii=False))]
    # auto: Hermes blocks, or the whole text as JSON (Llama 3.1, generic)
    blocks = HERMES_CALL.findall(text)
    if blocks:
        calls = []
        for b in blocks:
            try:
                c = _call(json.loads(b), names)
            except json.JSONDecodeError:
                c = None
            if c is not None:
                calls.append(c)
        if calls:
            content = text[:text.find("<tool_call>")].strip()
            return content or None, calls
        return text, []
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if body[:1] in ("{", "["):
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        items = value if isinstance(value, list) else [value]
        calls = [_call(i, names) for i in items]
        if calls and all(c is not None for c in calls):
            return None, calls
    return text, []


def may_be_a_call(text: str) -> bool:
    """Whether streamed text so far could be the start of a tool call (auto mode holds it
    back rather than stream a call's JSON as content)."""
    head = text.lstrip()
    if not head:
        return True
    return any(head.startswith(m) or m.startswith(head)
               for m in ("<tool_call>", "<|python_tag|>", "{", "["))
