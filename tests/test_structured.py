"""Structured output (qoq_jax.structured): constraints compiled by llguidance, masks applied on the
device, on the real default model through LLM.generate, the CLI and the OpenAI server.

Every constrained output must parse and validate (the `jsonschema` package over nested objects,
arrays with min/max items, enums, bounded integers, required and optional fields, strings with
patterns), greedy and sampled; unconstrained requests keep their greedy tokens when constrained
ones share their batch; bad constraints are errors that name the problem, before any work."""

import json
import re

import jsonschema
import numpy as np
import pytest

import qoq_jax
from qoq_jax.runner import _allow
from qoq_jax.structured import ConstraintError, StructuredOutput, structured_output

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                 "minItems": 1, "maxItems": 3},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 12},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "email": {"type": "string", "maxLength": 24},  # optional
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}

PROMPTS = ["Describe a user of a web shop as JSON.", "Invent a person who lives in Paris.",
           "Give me the record of an administrator.", "A guest account, please."]
FREE = ["Write a haiku about the sea.", "What is the capital of France?",
        "List three colours.", "Explain what a compiler does."]
ENGINE = dict(dtype="float32", max_slots=8, prefill_chunk=256)


def test_mask_applies_to_constrained_rows_only():
    """_allow against NumPy: constrained rows keep exactly the allowed tokens' logits (the rest
    -inf); unconstrained rows pass through bit for bit."""
    rng = np.random.default_rng(0)
    rows, vocab = 4, 70
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    allowed_bits = rng.random((rows, vocab)) < 0.3
    words = np.zeros((rows, -(-vocab // 32)), np.uint32)
    for r, t in zip(*np.nonzero(allowed_bits)):
        words[r, t // 32] |= np.uint32(1) << np.uint32(t % 32)
    on = np.array([True, False, True, False])
    got = np.asarray(_allow(logits, on, words.view(np.int32)))
    want = np.where(on[:, None] & ~allowed_bits, -np.inf, logits)
    np.testing.assert_array_equal(got, want)
    none = np.asarray(_allow(logits, np.zeros(rows, bool), words.view(np.int32)))
    np.testing.assert_array_equal(none, logits)


def test_structured_output_arguments():
    assert structured_output() is None
    assert structured_output(regex="[0-9]+") == StructuredOutput("regex", "[0-9]+")
    # the schema's canonical text: the same schema compiles (and caches) once
    assert (StructuredOutput.json_schema({"b": 1, "a": 2})
            == StructuredOutput.json_schema('{"a": 2, "b": 1}'))
    with pytest.raises(ConstraintError, match="at most one"):
        structured_output(regex="a", choice=["a"])
    with pytest.raises(ConstraintError, match="non-empty list"):
        StructuredOutput.choice([])
    with pytest.raises(ConstraintError, match="not valid JSON"):
        StructuredOutput.json_schema("{oops")
    with pytest.raises(ValueError, match="min_tokens"):
        qoq_jax.SamplingParams(min_tokens=3, structured=StructuredOutput.json_object())



@pytest.fixture(scope="module")
def llm():
    return qoq_jax.load(**ENGINE)


@pytest.mark.slow
def test_bad_constraints_are_refused_before_any_work_and_compiles_are_cached(llm):
    g = llm.engine.grammar
    before = llm.engine.stats["requests"]
    for kw, message in [(dict(json_schema={"type": "nonsense"}), "Invalid type: nonsense"),
                        (dict(json_schema={"not": {"type": "string"}}), "Unimplemented keys"),
                        (dict(regex="("), "invalid regex"),
                        (dict(grammar="start: foo"), "unknown name")]:
        with pytest.raises(ConstraintError, match=message):
            llm.generate("hi", max_new_tokens=4, **kw)
    assert llm.engine.stats["requests"] == before and not llm.engine.has_work
    so = StructuredOutput.regex("[a-z]{3}")
    g.compile(so)
    hits = g.stats.hits
    g.compile(so)
    assert g.stats.hits == hits + 1


@pytest.mark.slow
def test_json_schema_outputs_validate_greedy_and_sampled(llm):
    greedy = llm.generate(PROMPTS, chat=True, max_new_tokens=160, json_schema=PERSON)
    sampled = llm.generate(PROMPTS, chat=True, max_new_tokens=160, json_schema=PERSON,
                           temperature=0.9, top_p=0.95, seed=7)
    for c in greedy + sampled:
        assert c.finish_reason == "stop", (c.text, c.finish_reason)
        jsonschema.validate(json.loads(c.text), PERSON)
    # any JSON object (OpenAI's json_object mode)
    obj = llm.generate(PROMPTS[:2], chat=True, params=qoq_jax.SamplingParams(
                           max_new_tokens=96, structured=StructuredOutput.json_object()))
    for c in obj:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:  # cut by max_tokens: still a prefix of an object
            assert c.finish_reason == "length" and c.text.lstrip().startswith("{")


@pytest.mark.slow
def test_regex_choice_and_grammar(llm):
    dates = llm.generate(["When did the Berlin wall fall?"] * 2, chat=True, max_new_tokens=24,
                         regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
    for c in dates:
        assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", c.text), c.text
        assert c.finish_reason == "stop"
    options = ["yes", "no", "maybe"]
    picks = llm.generate(["Is the sky blue?", "Is fire cold?"], chat=True, max_new_tokens=8,
                         choice=options)
    assert all(c.text in options and c.finish_reason == "stop" for c in picks)
    sums = llm.generate(["Write an addition of small numbers."], chat=True, max_new_tokens=24,
                        grammar='start: NUM "+" NUM "=" NUM\nNUM: /[0-9]{1,2}/')
    assert re.fullmatch(r"[0-9]{1,2}\+[0-9]{1,2}=[0-9]{1,2}", sums[0].text), sums[0].text
    assert sums[0].finish_reason == "stop"


@pytest.mark.slow
def test_free_requests_keep_their_tokens_next_to_constrained_ones(llm):
    """Batch invariance: free requests' greedy tokens are the same alone and with constrained
    requests beside them (which switch the engine to single steps); the constrained ones' are
    the same alone and in the mixed batch."""
    free = qoq_jax.SamplingParams(max_new_tokens=24)
    alone = llm.generate(FREE, chat=True, params=free)
    c_params = qoq_jax.SamplingParams(max_new_tokens=48,
                                      structured=StructuredOutput.json_schema(PERSON))
    c_alone = llm.generate(PROMPTS[:2], chat=True, params=c_params)
    mixed = llm.generate(FREE + PROMPTS[:2], chat=True,
                         params=[free] * len(FREE) + [c_params] * 2)
    steps = llm.engine.stats["lockstep_steps"]
    mixed = llm.generate(FREE + PROMPTS[:2], chat=True,
                         params=[free] * len(FREE) + [c_params] * 2)
    assert [c.token_ids for c in mixed[:len(FREE)]] == [c.token_ids for c in alone]
    assert [c.token_ids for c in mixed[len(FREE):]] == [c.token_ids for c in c_alone]
    assert llm.engine.stats["masks"] > 0
    # the mixed batch decoded in split steps (masks computed while the forward ran)
    assert llm.engine.stats["lockstep_steps"] > steps


def test_lockstep_steps_are_warmed_up_and_keep_free_rows_exact(tmp_path):
    """A tiny model with a byte tokenizer: warmup() compiles the two halves of a lockstep
    decode step, so a constrained workload (constrained and free requests arriving while others
    decode: ragged and split lockstep steps) compiles nothing; the free requests' tokens are
    those they have alone, the constrained outputs match their regex."""
    from helpers import make_tiny_quant_checkpoint

    from qoq_jax.runner import COMPILES

    llm = qoq_jax.load(make_tiny_quant_checkpoint(tmp_path / "m", "llama", seed=4),
                       max_slots=4, page_size=16, num_pages=64, prefill_chunk=32)
    eng = llm.engine
    eng.warmup()
    assert {f"forward/{r}" for r in eng.program_shapes()["decode"]} <= set(
        eng.runner.compiled_programs)
    free = qoq_jax.SamplingParams(max_new_tokens=20, stop_token_ids=())
    want = [llm.generate(p, params=free)[0].token_ids for p in ("abc", "hello there")]
    before = COMPILES.count
    regex = qoq_jax.SamplingParams(max_new_tokens=30, structured=structured_output(
        regex="[a-c]{3,6}-[0-9]{2,4}"))
    ids = [eng.submit(llm.encode("abc"), free), eng.submit(llm.encode("x"), regex)]
    for _ in range(3):
        eng.step()
    ids += [eng.submit(llm.encode("hello there"), free), eng.submit(llm.encode("yz"), regex)]
    eng.run(lambda: all(eng.finished(i) for i in ids))
    got = [eng.result(i) for i in ids]
    assert COMPILES.count == before
    assert got[0].tokens == want[0] and got[2].tokens == want[1]
    for r in (got[1], got[3]):
        text = llm.tokenizer.decode(r.tokens, skip_special_tokens=True)
        assert re.fullmatch(r"[a-c]{3,6}-[0-9]{2,4}", text), text
    assert eng.stats["lockstep_steps"] > 0


@pytest.mark.slow
def test_the_cli_takes_a_json_schema_file(tmp_path, capsys):
    from qoq_jax.generate import main

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
              "required": ["city"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    code = main(["--prompt", "Name a city in Japan.", "--chat", "--json-schema", str(path),
                 "--max-new-tokens", "32", "--json", "--batch-size", "8", "--dtype", "float32"])
    assert code == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][0]
    out = json.loads(line)
    jsonschema.validate(json.loads(out["text"]), schema)
    (tmp_path / "bad.json").write_text("{nope")
    assert main(["--prompt", "x", "--json-schema", str(tmp_path / "bad.json")]) == 2
    assert "is not JSON" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the server, with the openai client

@pytest.fixture(scope="module")
def server():
    from test_server import Server

    from qoq_jax.serve import create_app

    srv = Server(create_app(qoq_jax.load(**ENGINE), model_name="m"))
    yield srv
    srv.stop()


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.mark.slow
def test_server_response_format_json_schema_streamed_and_not(server):
    client = _client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=160,
                                       response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    stream = client.chat.completions.create(model="m", messages=msgs, max_tokens=160,
                                            response_format=fmt, stream=True, temperature=0.8,
                                            seed=3)
    text, reasons = "", []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=96,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.slow
def test_server_structured_outputs_and_guided_fields(server):
    client = _client(server)
    r = client.completions.create(model="m", prompt="The date today is", max_tokens=16,
                                  extra_body={"structured_outputs": {"regex": r"[0-9]{2}/[0-9]{2}"}})
    assert re.fullmatch(r"[0-9]{2}/[0-9]{2}", r.choices[0].text)
    r = client.chat.completions.create(model="m", max_tokens=8,
                                       messages=[{"role": "user", "content": "Is water wet?"}],
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
    r = client.completions.create(model="m", prompt="A record:", max_tokens=160,
                                  extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


@pytest.mark.slow
@pytest.mark.parametrize("body, message, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "nonsense"}}}}, "Invalid type: nonsense", "response_format"),
    ({"response_format": {"type": "xml"}}, "type must be 'text', 'json_object' or 'json_schema'",
     "response_format"),
    ({"structured_outputs": {"regex": "("}}, "invalid regex", "structured_outputs"),
    ({"structured_outputs": {"xpath": "//a"}}, "unsupported key 'xpath'", "structured_outputs"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "at most one", "structured_outputs"),
    ({"structured_outputs": {"json": {"type": "object"}}, "response_format": {
        "type": "json_object"}}, "give one", "structured_outputs"),
])
def test_server_refuses_bad_constraints_with_a_400_naming_them(server, body, message, param):
    import httpx

    before = httpx.get(server.url + "/metrics").text
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["param"] == param, err
    after = httpx.get(server.url + "/metrics").text
    tokens = [ln for ln in after.splitlines() if ln.startswith("qoq_generation_tokens_total")]
    assert tokens == [ln for ln in before.splitlines()
                      if ln.startswith("qoq_generation_tokens_total")]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
                   "required": ["zone"], "additionalProperties": False}}}


@pytest.mark.slow
def test_server_tool_calls_named_and_required_streamed_and_not(server):
    client = _client(server)
    msgs = [{"role": "user", "content": "What is the weather in Oslo?"}]
    r = client.chat.completions.create(
        model="m", messages=msgs, max_tokens=64, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # required, streamed: the client assembles the calls from the deltas
    stream = client.chat.completions.create(model="m", messages=msgs, max_tokens=96,
                                            tools=[WEATHER, TIME], tool_choice="required",
                                            stream=True)
    calls, reason = {}, None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                got = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                got["name"] += tc.function.name or ""
                got["arguments"] += tc.function.arguments or ""
            reason = c.finish_reason or reason
    assert reason == "tool_calls" and calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for c in calls.values():
        jsonschema.validate(json.loads(c["arguments"]), schemas[c["name"]])
    # the call and its result go back in the conversation; the model answers
    history = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "12 degrees and rain"}]
    r = client.chat.completions.create(model="m", messages=history, max_tokens=24,
                                       tools=[WEATHER, TIME], tool_choice="none")
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


@pytest.mark.slow
def test_a_template_that_knows_tools_renders_them_itself(llm, monkeypatch):
    from qoq_jax.server.protocol import ChatRequest

    template = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n"
                "{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}"
                "{% if m.tool_calls %}CALL {{ m.tool_calls[0].function.arguments.city }}"
                "{% endif %}\n{% endfor %}")
    monkeypatch.setattr(llm.tokenizer, "chat_template", template)
    req = ChatRequest.model_validate({"model": "m", "tools": [WEATHER, TIME], "messages": [
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                             "function": {"name": "get_weather",
                                                                          "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"}]})
    text = llm.tokenizer.decode(req.prompt_ids(llm))
    assert text.startswith("TOOLS:get_weather;get_time;")
    assert "assistant: CALL Oslo" in text and "tool: rain" in text
    none = ChatRequest.model_validate({"model": "m", "tools": [WEATHER], "tool_choice": "none",
                                       "messages": [{"role": "user", "content": "hi"}]})
    assert "TOOLS" not in llm.tokenizer.decode(none.prompt_ids(llm))
