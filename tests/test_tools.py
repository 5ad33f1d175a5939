"""Tool calling's host side (qoq_jax.server.tools): the checks of `tools` and `tool_choice`, the
rendering for templates with and without tools, the constraint of `required` and a named
function, and the parsers of what models write (Hermes blocks, Llama 3.1 JSON, generic JSON)."""

import json

import jsonschema
import pytest

from qoq_jax.server.tools import (constraint_schema, may_be_a_call, parse_output,
                                  parse_tool_choice, parse_tools, render_messages)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
FUNCS = parse_tools([WEATHER, TIME])


@pytest.mark.parametrize("tools, message", [
    ([{"type": "retrieval"}], "0: only"),
    ([{"type": "function", "function": {"name": "bad name"}}], "function.name must be"),
    ([WEATHER, WEATHER], "1: two tools are named 'get_weather'"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}],
     "parameters must be a JSON schema object"),
])
def test_bad_tools_are_named(tools, message):
    with pytest.raises(ValueError, match=message):
        parse_tools(tools)


def test_tool_choice():
    assert parse_tool_choice(None, FUNCS) == "auto"
    assert parse_tool_choice(None, []) == "none"
    assert parse_tool_choice("required", FUNCS) == "required"
    assert parse_tool_choice({"type": "function", "function": {"name": "get_time"}},
                             FUNCS) == "get_time"
    with pytest.raises(ValueError, match="not among the tools"):
        parse_tool_choice({"type": "function", "function": {"name": "nope"}}, FUNCS)
    with pytest.raises(ValueError, match="needs at least one tool"):
        parse_tool_choice("required", [])
    with pytest.raises(ValueError, match="must be"):
        parse_tool_choice("sometimes", FUNCS)


def test_the_constraints_accept_exactly_valid_calls():
    required = constraint_schema(FUNCS, "required")
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Oslo"}},
                         {"name": "get_time", "arguments": {"zone": "UTC"}}], required)
    for bad in ([], [{"name": "get_weather", "arguments": {"town": "Oslo"}}],
                [{"name": "other", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)
    assert constraint_schema(FUNCS, "get_time") == TIME["function"]["parameters"]
    assert constraint_schema(FUNCS, "auto") is None


def test_parsers():
    hermes = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
              '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}'
              '\n</tool_call>')
    content, calls = parse_output(hermes, FUNCS, "auto")
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    # Llama 3.1 writes a bare object with "parameters"
    content, calls = parse_output('<|python_tag|>{"name": "get_time", "parameters": '
                                  '{"zone": "UTC"}}', FUNCS, "auto")
    assert content is None and calls[0].name == "get_time"
    # plain text, unknown functions and broken JSON stay text
    for text in ("It is sunny.", '{"name": "launch", "arguments": {}}', "<tool_call>{oops"):
        assert parse_output(text, FUNCS, "auto") == (text, [])
    # enforced modes: the constrained JSON
    _, calls = parse_output('[{"name": "get_time", "arguments": {"zone": "UTC"}}]', FUNCS,
                            "required")
    assert calls[0].name == "get_time"
    _, calls = parse_output('{"city": "Rome"}', FUNCS, "get_weather")
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Rome"}
    assert parse_output("x", FUNCS, "none") == ("x", [])


def test_streaming_holds_back_only_what_may_be_a_call():
    assert may_be_a_call("") and may_be_a_call("  <tool") and may_be_a_call('{"na')
    assert not may_be_a_call("Hello") and not may_be_a_call("<b>")


def test_rendering_without_a_tools_template_uses_the_hermes_format():
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "12 C"}]
    out, tools = render_messages(msgs, FUNCS, "auto", native=False)
    assert tools is None and out[0]["role"] == "system"
    assert "<tools>" in out[0]["content"] and '"get_time"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", '
                                                      '"arguments": {"city": "Oslo"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n12 C\n</tool_response>"}
    # a template that knows tools gets them, and the arguments as a mapping
    out, tools = render_messages(msgs, FUNCS, "auto", native=True)
    assert [t["function"]["name"] for t in tools] == ["get_weather", "get_time"]
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    # tool_choice none: no tools at all
    out, tools = render_messages(msgs[:1], FUNCS, "none", native=False)
    assert tools is None and out == msgs[:1]


class _Req:
    """The fields of a ChatRequest that ChatFormat reads."""

    def __init__(self, tool_choice="auto", logprobs=False):
        self.tools, self.functions = [WEATHER, TIME], FUNCS
        self.tool_mode = parse_tool_choice(tool_choice, FUNCS)
        self.logprobs, self.prompt_logprobs, self.parallel_tool_calls = logprobs, None, True


def _stream(req, pieces):
    from qoq_jax.server.responses import ChatFormat
    from qoq_jax.session import Delta

    fmt = ChatFormat(None, "m", req)
    out = []
    for i, p in enumerate(pieces):
        last = i == len(pieces) - 1
        out += fmt.chunks(Delta(p, None, "stop" if last else None), 0)
    return [c["choices"][0] for c in out]


def test_a_streamed_call_comes_as_one_tool_calls_delta_and_text_streams_as_text():
    pieces = ["<tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": ",
              "\"Oslo\"}}\n</tool_call>"]
    chunks = _stream(_Req(), pieces)
    assert not any(c["delta"].get("content") for c in chunks)  # no call JSON leaks as text
    calls = [t for c in chunks for t in c["delta"].get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["type"] == "function"
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert chunks[-1]["finish_reason"] == "tool_calls"
    # plain text goes out as it comes, from the first piece that cannot start a call
    chunks = _stream(_Req(), ["", "It is", " sunny", "."])
    assert "".join(c["delta"].get("content") or "" for c in chunks) == "It is sunny."
    assert chunks[0]["delta"]["content"] == "It is"  # the empty piece sent nothing
    assert chunks[-1]["finish_reason"] == "stop"
    # a named function: everything is held, then sent as that function's arguments
    chunks = _stream(_Req({"type": "function", "function": {"name": "get_time"}}),
                     ['{"zone"', ': "UTC"}'])
    calls = [t for c in chunks for t in c["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_time" and chunks[-1]["finish_reason"] == "tool_calls"
