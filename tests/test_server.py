"""The OpenAI-compatible server, driven by the real `openai` client on 127.0.0.1: concurrent
streams, every bad request, cancellation on disconnect, auth, metrics, and SIGTERM draining."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from helpers import REPO, make_tiny_quant_checkpoint

import qoq_jax
from qoq_jax.serve import EngineThread, create_app

MODEL = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving an app in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_quant_checkpoint(tmp_path_factory.mktemp("srv") / "m", "llama", seed=6)


ENGINE = dict(max_slots=8, page_size=16, num_pages=200, decode_steps=4, prefill_chunk=64,
              max_queue=512)


@pytest.fixture(scope="module")
def llm(ckpt):
    return qoq_jax.load(ckpt, **ENGINE)


@pytest.fixture(scope="module")
def reference(ckpt):
    """The same model with an engine of its own (the server's is driven by its thread)."""
    return qoq_jax.load(ckpt, **ENGINE)


@pytest.fixture(scope="module")
def server(llm):
    srv = Server(create_app(llm, model_name=MODEL))
    yield srv
    srv.stop()


def _client(server, **kw):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                  **kw)


PROMPTS = [f"request {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][: 1 + i % 4]) * (1 + i % 3)
           for i in range(128)]


def test_32_concurrent_streaming_clients_get_their_own_complete_responses(server, llm,
                                                                        reference):
    from openai import AsyncOpenAI

    max_tokens = 10
    expected = {p: c.text for p, c in zip(PROMPTS, reference.generate(
        PROMPTS, max_new_tokens=max_tokens, stop_token_ids=()))}

    async def client_task(i):
        client = AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        got = []
        for j in range(4):
            prompt = PROMPTS[4 * i + j]
            stream = await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            text, finish = "", None
            async for chunk in stream:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            got.append((prompt, text, finish))
        await client.close()
        return got

    async def main():
        return await asyncio.gather(*(client_task(i) for i in range(32)))

    results = [r for rs in asyncio.run(main()) for r in rs]
    assert len(results) == 128
    for prompt, text, finish in results:
        assert finish in ("length", "stop")
        # greedy text equals what the model gives this prompt alone (nothing mixed in)
        if finish == "length":
            assert text == expected[prompt], prompt
        else:
            assert expected[prompt].startswith(text), prompt
    assert llm.engine.allocator.num_used == 0


def test_completion_and_chat_with_usage(server, llm, reference):
    client = _client(server)
    r = client.completions.create(model=MODEL, prompt="hello there", max_tokens=6, temperature=0)
    n_prompt = len(llm.encode("hello there"))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    assert r.choices[0].text == reference.generate("hello there", max_new_tokens=6)[0].text
    c = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=5,
                                       messages=[{"role": "user", "content": "hi"}])
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == reference.generate("hi", chat=True,
                                                               max_new_tokens=5)[0].text
    assert c.usage.prompt_tokens == len(llm.encode("hi", chat=True))


def test_streaming_chat_with_include_usage(server):
    client = _client(server)
    chunks = list(client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=7, stream=True,
        stream_options={"include_usage": True}, messages=[{"role": "user", "content": "hey"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 7
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens >= 1 and isinstance(text, str)


def test_completion_logprobs(server):
    client = _client(server)
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) <= 3
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: the best one


def test_stop_string(server, reference):
    client = _client(server)
    full = reference.generate("stop test", max_new_tokens=12, stop_token_ids=())[0].text
    stop = full[3:5]
    r = client.completions.create(model=MODEL, prompt="stop test", max_tokens=12,
                                  temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]


BAD = [
    ("malformed json", b"{not json", 400),
    ("not an object", b"[1, 2]", 400),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404),
    ("missing prompt", {"model": MODEL}, 400),
    ("wrong type", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400),
    ("negative max_tokens", {"model": MODEL, "prompt": "x", "max_tokens": -5}, 400),
    ("huge max_tokens", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400),
    ("temperature too high", {"model": MODEL, "prompt": "x", "temperature": 7}, 400),
    ("top_p zero", {"model": MODEL, "prompt": "x", "top_p": 0}, 400),
    ("n=0", {"model": MODEL, "prompt": "x", "n": 0}, 400),
    ("n too large", {"model": MODEL, "prompt": "x", "n": 129}, 400),
    ("prompt over the context", {"model": MODEL, "prompt": "word " * 600}, 400),
    ("bad token id", {"model": MODEL, "prompt": [1, 2, 99999]}, 400),
    ("logprobs too many", {"model": MODEL, "prompt": "x", "logprobs": 9}, 400),
    ("oversized body", {"model": MODEL, "prompt": "x" * (2 << 20)}, 413),
]


@pytest.mark.parametrize("name,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, name, body, status):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/completions", content=data,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    ok = httpx.post(server.url + "/v1/completions", timeout=30,
                    json={"model": MODEL, "prompt": "still up?", "max_tokens": 2})
    assert ok.status_code == 200


def test_errors_map_by_exception_type_not_by_message():
    from qoq_jax.errors import ContextLengthError, PromptError, QueueFullError
    from qoq_jax.server.http_errors import ApiError, to_api_error
    from qoq_jax.session import GenerationError

    table = {ContextLengthError: (400, "invalid_request_error", "context_length_exceeded"),
             PromptError: (400, "invalid_request_error", None),
             QueueFullError: (429, "rate_limit_error", "queue_full"),
             GenerationError: (500, "server_error", None),
             ValueError: (400, "invalid_request_error", None)}
    for cls, want in table.items():
        e = to_api_error(cls("the message"))
        assert (e.status, e.type, e.code, e.message) == (*want, "the message"), cls
    assert to_api_error(PromptError("exceeds the context and the cache")).code is None
    assert to_api_error(ValueError("x"), param="messages").param == "messages"
    err = ApiError(404, "nope", code="model_not_found")
    assert to_api_error(err) is err
    assert to_api_error(KeyError("x")) is None  # not ours to map: a plain 500


@pytest.mark.parametrize("body", [{"model": MODEL, "prompt": "word " * 600},
                                  {"model": MODEL, "prompt": "x", "max_tokens": 10**9}])
def test_too_long_requests_say_context_length_exceeded(server, body):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_bad_chat_requests(server):
    for body in ({"model": MODEL, "messages": []},
                 {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)


def test_client_disconnect_cancels_the_request_and_frees_its_pages(server, llm):
    engine = llm.engine
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "a long one", "max_tokens": 400, "stream": True,
            "temperature": 0, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert engine.allocator.num_used > 0
    deadline = time.time() + 30
    while (engine.allocator.num_used or engine.num_running) and time.time() < deadline:
        time.sleep(0.05)
    assert engine.allocator.num_used == 0 and engine.num_running == 0


def test_models_health_and_metrics(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    text = httpx.get(server.url + "/metrics").text
    for name in ("qoq_requests_total", "qoq_generation_tokens_total", "qoq_queue_depth",
                 "qoq_kv_pages_in_use", "qoq_time_to_first_token_seconds_bucket",
                 "qoq_time_per_output_token_seconds_bucket"):
        assert name in text
    gen = [ln for ln in text.splitlines() if ln.startswith("qoq_generation_tokens_total")]
    assert float(gen[0].split()[-1]) > 0


LONG = "a shared system prompt that is long enough to fill a few KV pages " * 4


def test_n_choices_sample_one_prompt_whose_pages_are_computed_once(server, llm, reference):
    client = _client(server)
    n_prompt = len(llm.encode(LONG))
    computed0 = llm.engine.stats["prompt_tokens"]
    r = client.completions.create(model=MODEL, prompt=LONG, max_tokens=8, temperature=2.0,
                                  seed=5, n=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, c in enumerate(r.choices):  # choice i samples with seed + i
        assert c.text == reference.generate(LONG, max_new_tokens=8, temperature=2.0, seed=5 + i,
                                            stop_token_ids=())[0].text
    # (this tiny model is too peaked for the seeds to show: the seeds themselves are checked)
    from qoq_jax.server.protocol import CompletionRequest

    req = CompletionRequest(model=MODEL, prompt="x", n=3, seed=2**32 - 2)
    assert [req.sampling_params(100, 1, i).seed for i in range(3)] == [2**32 - 2, 2**32 - 1, 0]
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 24
    # the prompt's full pages were computed once, for the first choice
    full = (n_prompt - 1) // 16 * 16
    assert llm.engine.stats["prompt_tokens"] - computed0 <= 3 * n_prompt - 2 * full
    assert llm.engine.allocator.num_used == 0

    chunks = list(client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=5, n=2, stream=True,
        stream_options={"include_usage": True}, messages=[{"role": "user", "content": LONG}]))
    texts = {0: "", 1: ""}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    want = reference.generate(LONG, chat=True, max_new_tokens=5)[0].text
    assert texts == {0: want, 1: want}  # greedy: both choices the same text
    assert chunks[-1].usage.prompt_tokens == len(llm.encode(LONG, chat=True))


def test_usage_reports_cached_prompt_tokens_and_metrics_the_hit_rate(server, llm):
    client = _client(server)
    prompt = "cache me: " + LONG
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    n = len(llm.encode(prompt))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    assert again.choices[0].text == first.choices[0].text
    text = httpx.get(server.url + "/metrics").text
    values = {ln.split()[0]: float(ln.split()[-1]) for ln in text.splitlines()
              if ln and not ln.startswith("#")}
    assert 0 < values["qoq_prefix_cache_hit_rate"] < 1
    assert values["qoq_prefix_cache_pages"] >= (n - 1) // 16
    assert values["qoq_prompt_tokens_cached_total"] >= (n - 1) // 16 * 16


def test_api_key(ckpt):
    llm = qoq_jax.load(ckpt, **ENGINE)
    srv = Server(create_app(llm, model_name=MODEL, api_key="s3cret"))
    try:
        from openai import AuthenticationError

        for key in ("wrong", "none"):
            with pytest.raises(AuthenticationError):
                _client(srv, api_key=key).completions.create(model=MODEL, prompt="x",
                                                             max_tokens=1)
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        r = _client(srv, api_key="s3cret").completions.create(model=MODEL, prompt="x",
                                                               max_tokens=1)
        assert r.choices[0].text is not None
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()


def test_full_queue_answers_429(ckpt):
    llm = qoq_jax.load(ckpt, max_slots=2, num_pages=64, max_queue=1)
    runner = EngineThread(llm.engine)  # not started: requests wait in the queue
    srv = Server(create_app(llm, model_name=MODEL, engine_thread=runner))
    try:
        first = threading.Thread(target=lambda: httpx.post(
            srv.url + "/v1/completions", timeout=60,
            json={"model": MODEL, "prompt": "first", "max_tokens": 3}))
        first.start()
        deadline = time.time() + 10
        while llm.engine.num_waiting == 0 and time.time() < deadline:
            time.sleep(0.01)
        r = httpx.post(srv.url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "second", "max_tokens": 3})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        runner.start()
        first.join(timeout=60)
        assert not first.is_alive()
    finally:
        srv.stop()
        runner.stop()


def test_sigterm_drains_running_requests_then_exits(ckpt):
    """The real signal: the drain answers 503 (not connection refused), lets the stream
    finish, then the process exits with 0."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "qoq_jax.serve", "--model", str(ckpt),
                             "--port", str(port), "--max-slots", "4", "--decode-steps", "2",
                             "--log-level", "warning"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        chunks = []
        with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
                "model": name, "prompt": "drain me", "max_tokens": 400, "stream": True,
                "temperature": 0, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            chunks.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            # during the drain the port stays open: /health says draining, new requests 503
            deadline = time.time() + 10
            while httpx.get(url + "/health", timeout=5).status_code == 200:
                assert time.time() < deadline
                time.sleep(0.02)
            health = httpx.get(url + "/health", timeout=5)
            assert health.status_code == 503 and health.json()["status"] == "draining"
            refused = httpx.post(url + "/v1/completions", timeout=5,
                                 json={"model": name, "prompt": "late", "max_tokens": 2})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "draining"
            for line in lines:
                chunks.append(line)
        chunks = [c for c in chunks if c]
        data = [json.loads(c[6:]) for c in chunks if c.startswith("data: {")]
        assert chunks[-1] == "data: [DONE]"
        assert data[-1]["choices"][0]["finish_reason"] == "length"
        assert len(data) >= 20  # the whole answer came, not a cut-off stream
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------------------------
# the OpenAI surface (#25): sampling parameters, echo and prompt logprobs, token prompts,
# /tokenize, /detokenize, /v1/responses

def test_sampling_parameters_reach_the_engine(server, llm, reference):
    client = _client(server)
    prompt = "the sampling parameters: "
    extra = {"repetition_penalty": 3.0, "min_p": 0.1, "top_k": 5, "min_tokens": 3,
             "ignore_eos": True}
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.7,
                                  seed=9, presence_penalty=1.0, frequency_penalty=0.5,
                                  logit_bias={"101": 5.0}, extra_body=extra)
    want = reference.generate(prompt, max_new_tokens=8, temperature=0.7, seed=9,
                              presence_penalty=1.0, frequency_penalty=0.5,
                              logit_bias={101: 5.0}, repetition_penalty=3.0, min_p=0.1,
                              top_k=5, min_tokens=3, stop_token_ids=())[0]
    assert r.choices[0].text == want.text
    forced = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                       logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == "*" * 5  # token 42 of the byte tokenizer
    chat = client.chat.completions.create(
        model=MODEL, max_completion_tokens=4, temperature=0, logit_bias={"43": 100},
        messages=[{"role": "user", "content": "hi"}], extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == "+" * 4


def test_echo_with_logprobs_equals_the_engines_scoring(server, llm, reference):
    from qoq_jax.eval.scoring import score

    client = _client(server)
    prompt = "score this text, token by token, please"
    ids = llm.encode(prompt)
    want = score(reference.engine, np.asarray([ids]))[0]
    for max_tokens in (0, 1):  # lm-evaluation-harness sends 1 and drops the last entry
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                      temperature=0, echo=True, logprobs=1)
        c = r.choices[0]
        assert c.text.startswith(prompt) and len(c.logprobs.token_logprobs) == len(ids) + max_tokens
        assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
        np.testing.assert_allclose(c.logprobs.token_logprobs[1:len(ids)], want, atol=1e-5)
        assert all(len(t) == 1 for t in c.logprobs.top_logprobs[1:])
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == max_tokens
    # several prompts as token ids in one request, prompt-major choices
    other = llm.encode("a second prompt")
    r = client.completions.create(model=MODEL, prompt=[ids, other], max_tokens=2, n=2,
                                  temperature=0, echo=True, logprobs=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith(llm.tokenizer.decode(ids))
    assert r.choices[2].text.startswith(llm.tokenizer.decode(other))
    assert r.usage.prompt_tokens == len(ids) + len(other) and r.usage.completion_tokens == 8
    np.testing.assert_allclose(r.choices[1].logprobs.token_logprobs[1:len(ids)], want,
                               atol=1e-5)
    # vLLM's prompt_logprobs: the prompt token and the most likely ones, by id
    raw = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2}).json()
    plp = raw["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for j, entry in enumerate(plp[1:], start=1):
        assert entry[str(ids[j])]["logprob"] == pytest.approx(float(want[j - 1]), abs=1e-5)
        assert sum(e["rank"] in (1, 2) for e in entry.values()) == 2
    stream = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=0,
                                            echo=True, logprobs=1, stream=True))
    assert "".join(ch.choices[0].text for ch in stream) == llm.tokenizer.decode(ids)
    assert stream[0].choices[0].logprobs.token_logprobs[0] is None
    assert stream[-1].choices[0].finish_reason == "length"


def test_tokenize_detokenize_and_the_models_context(server, llm):
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": "hello"}).json()
    assert r["tokens"] == llm.encode("hello") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == llm.engine.max_context
    chat = httpx.post(server.url + "/tokenize",
                      json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == llm.encode("hi", chat=True)
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == llm.tokenizer.decode(r["tokens"])
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [1, 10**6]})
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    both = httpx.post(server.url + "/tokenize", json={"prompt": "x", "messages": []})
    assert both.status_code == 400 and "exactly one of prompt and messages" in both.text
    models = _client(server).models.list()
    assert models.data[0].model_extra["max_model_len"] == llm.engine.max_context


def test_the_responses_api_through_the_openai_client(server, llm, reference):
    client = _client(server)
    want = reference.generate("What is up?", chat=True, max_new_tokens=6, temperature=0)[0]
    r = client.responses.create(model=MODEL, input="What is up?", max_output_tokens=6,
                                temperature=0)
    assert r.output_text == want.text and r.object == "response"
    assert r.usage.input_tokens == len(llm.encode("What is up?", chat=True))
    assert r.usage.output_tokens == len(want.token_ids)
    assert r.status == ("incomplete" if want.finish_reason == "length" else "completed")
    events = list(client.responses.create(
        model=MODEL, input=[{"role": "user", "content": "What is up?"}], max_output_tokens=6,
        temperature=0, stream=True, instructions=None))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want.text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with_instructions = client.responses.create(model=MODEL, input="What is up?",
                                                instructions="Be brief.", max_output_tokens=3,
                                                temperature=0)
    assert with_instructions.usage.input_tokens == len(llm.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is up?"}]))
