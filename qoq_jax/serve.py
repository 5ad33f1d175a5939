"""An OpenAI-compatible HTTP server over the in-flight-batching engine.

    python -m qoq_jax.serve                          # the default model on 127.0.0.1:8000
    python -m qoq_jax.serve --model smollm2-qoq --port 8080 --api-key secret

Routes: /v1/completions and /v1/chat/completions (with streaming: server-sent events, and
``stream_options.include_usage``), /v1/models, /health, /metrics (Prometheus). Bad requests get
OpenAI-style JSON errors with 4xx codes; a full queue answers 429; the server stays up. A client
that disconnects cancels its request (its slot and KV pages are freed). SIGTERM stops accepting
requests, lets the running ones finish, then exits.

The engine runs in a thread of its own (``EngineThread``); request handlers submit token ids
and receive the engine's TokenEvents through an asyncio queue. Detokenization and stop strings
happen here, per request (qoq_jax/text.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import sys
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qoq_jax.cli import (ArgumentParser, add_gemm_arg, add_kv_cache_arg, add_parallel_args,
                         add_weight_format_args, bounded_int, init_parallel, page_size_arg,
                         positive_int, run_cli)
from qoq_jax.engine import EngineBusyError

log = logging.getLogger("qoq_jax.serve")


# ----------------------------------------------------------------------------------------------
# the engine in its own thread

class EngineThread:
    """Runs Engine.step() in a background thread while there is work; thread-safe front."""

    def __init__(self, engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="qoq-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    # after idling, wait this long for the rest of a burst of requests, so that they are
    # admitted (and prefilled) together rather than one step apart
    COALESCE_S = 0.01

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.has_work:
                if self._wake.wait(0.05):
                    time.sleep(self.COALESCE_S)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except EngineBusyError:  # someone else drives it for a moment (a notebook?)
                time.sleep(0.01)
            except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                log.exception("engine step failed")
                self.error = e
                self.engine.fail_all(f"internal engine error: {type(e).__name__}: {e}")

    def submit(self, ids, params, callback) -> int:
        rid = self.engine.submit(ids, params, callback=callback)
        self._wake.set()
        return rid

    def cancel(self, rid: int, reason: str = "abort") -> None:
        self.engine.cancel(rid, reason)
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)


# ----------------------------------------------------------------------------------------------
# request bodies (the OpenAI API's fields that this server implements)

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


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)


# ----------------------------------------------------------------------------------------------
# the app

def create_app(llm, *, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, engine_thread: EngineThread | None = None):
    """The FastAPI app serving `llm` (a qoq_jax.LLM)."""
    import contextlib

    import prometheus_client as prom
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from qoq_jax.engine import PromptError, QueueFullError
    from qoq_jax.sampling import SamplingParams
    from qoq_jax.text import TextRequest

    engine = llm.engine
    runner = engine_thread or EngineThread(engine)
    registry = prom.CollectorRegistry()
    m_requests = prom.Counter("qoq_requests", "HTTP requests by route and status",
                              ["route", "status"], registry=registry)
    m_prompt = prom.Counter("qoq_prompt_tokens", "prompt tokens of finished requests",
                            registry=registry)
    m_gen = prom.Counter("qoq_generation_tokens", "generated tokens", registry=registry)
    m_ttft = prom.Histogram("qoq_time_to_first_token_seconds", "time to first token",
                            buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                            registry=registry)
    m_tpot = prom.Histogram("qoq_time_per_output_token_seconds", "time per output token after "
                            "the first", buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5,
                                                  1, 2.5), registry=registry)
    prom.Gauge("qoq_queue_depth", "requests waiting for a slot",
               registry=registry).set_function(lambda: engine.num_waiting)
    prom.Gauge("qoq_running_requests", "requests in a decode slot",
               registry=registry).set_function(lambda: engine.num_running)
    prom.Gauge("qoq_kv_pages_in_use", "KV-cache pages in use",
               registry=registry).set_function(lambda: engine.allocator.num_used)
    prom.Gauge("qoq_kv_pages_total", "KV-cache pages (the scratch page excluded)",
               registry=registry).set_function(lambda: engine.num_pages - 1)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine_thread is None:
            runner.start()
        yield
        app.state.draining = True
        if engine_thread is None:
            runner.stop()

    app = FastAPI(title="qoq-jax", lifespan=lifespan)
    app.state.draining = False
    app.state.engine_thread = runner

    def error_response(e: ApiError, route: str) -> JSONResponse:
        m_requests.labels(route, str(e.status)).inc()
        return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param,
                                       "code": e.code}}, status_code=e.status)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:], api_key)):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                           type_="authentication_error", code="invalid_api_key")

    async def parse(request: Request, cls):
        if app.state.draining:
            raise ApiError(503, "the server is shutting down", type_="server_error")
        check_auth(request)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise ApiError(413, f"the request body exceeds {max_body_bytes} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise ApiError(413, f"the request body exceeds {max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"],
                           param=param) from None
        if req.model != model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server has "
                                f"{model_name!r}", code="model_not_found", param="model")
        return req

    def sampling(req, logprobs: int | None, n_prompt: int) -> SamplingParams:
        # chat without a limit: whatever the context leaves
        max_new = (req.max_completion_tokens or req.max_tokens
                   or max(1, engine.max_context - n_prompt))
        try:
            return SamplingParams(max_new_tokens=max_new, temperature=req.temperature,
                                  top_p=req.top_p, seed=req.seed or 0, logprobs=logprobs,
                                  stop_token_ids=() if req.ignore_eos else None)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def start(ids: list[int], params: SamplingParams, stop: list[str]) -> "_Generation":
        try:
            engine.check_request(ids, params)
        except PromptError as e:
            code = "context_length_exceeded" if "context" in str(e) or "cache" in str(e) else None
            raise ApiError(400, str(e), code=code) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            rid = runner.submit(ids, params, lambda ev: loop.call_soon_threadsafe(
                events.put_nowait, ev))
        except QueueFullError as e:
            raise ApiError(429, str(e), type_="rate_limit_error", code="queue_full") from None
        return _Generation(rid, events, TextRequest(llm.tokenizer, ids, stop), len(ids))

    class _Generation:
        """One request in flight: its events as text deltas, and an idempotent close."""

        def __init__(self, rid, events, text, n_prompt):
            self.rid, self.events, self.text, self.n_prompt = rid, events, text, n_prompt
            self.t0 = time.perf_counter()
            self.first = self.last = None
            self.finished = self.closed = False

        async def deltas(self, request: Request):
            """Yields (text delta, logprob entries of the tokens used, finish_reason or None)."""
            text = self.text
            while True:
                try:
                    ev = await asyncio.wait_for(self.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                now = time.perf_counter()
                delta, used = text.feed(ev.token_ids)
                if used:
                    if self.first is None:
                        self.first = now
                        m_ttft.observe(now - self.t0)
                    self.last = now
                lps = ev.logprobs[:used] if ev.logprobs is not None else None
                if ev.finished and ev.finish_reason == "error":
                    self.finished = True
                    raise ApiError(500, ev.error or "generation failed", type_="server_error")
                if text.stopped or ev.finished:
                    self.finished = True
                    if text.stopped and not ev.finished:
                        runner.cancel(self.rid, "stop")
                    yield delta + text.finish(), lps, "stop" if text.stopped else ev.finish_reason
                    return
                if delta or lps:
                    yield delta, lps, None

        def close(self):
            if self.closed:
                return
            self.closed = True
            if not self.finished:
                runner.cancel(self.rid)  # the client went away: free the slot and pages
            n_out = len(self.text.token_ids)
            m_prompt.inc(self.n_prompt)
            m_gen.inc(n_out)
            if self.first is not None and n_out > 1:
                m_tpot.observe((self.last - self.first) / (n_out - 1))
            engine.release_when_done(self.rid)

    def usage(n_prompt, n_out):
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                "total_tokens": n_prompt + n_out}

    def completion_logprobs(entries, offset0: int):
        tok = llm.tokenizer
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = offset0
        for e in entries:
            piece = tok.decode([e["token"]])
            out["tokens"].append(piece)
            out["token_logprobs"].append(e["logprob"])
            out["top_logprobs"].append({tok.decode([i]): lp for i, lp in e["top"]})
            out["text_offset"].append(offset)
            offset += len(piece)
        return out, offset

    async def respond(request: Request, route: str, req, ids: list[int], logprobs: int | None,
                      chunk_object: str, make_chunk, make_final):
        gen = start(ids, sampling(req, logprobs, len(ids)), req.stop)
        created = int(time.time())
        ident = f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        if not req.stream:
            pieces, entries, reason = [], [], None
            try:
                async for delta, lps, fin in gen.deltas(request):
                    pieces.append(delta)
                    entries += lps or []
                    reason = fin or reason
            finally:
                gen.close()
            m_requests.labels(route, "200").inc()
            return JSONResponse(make_final(ident, created, "".join(pieces), entries, reason,
                                           usage(len(ids), len(gen.text.token_ids))))

        async def sse():
            try:
                first = make_chunk(ident, created, None, None, None, start=True)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                async for delta, lps, fin in gen.deltas(request):
                    yield f"data: {json.dumps(make_chunk(ident, created, delta, lps, fin))}\n\n"
                if req.include_usage:
                    yield ("data: " + json.dumps({
                        "id": ident, "object": chunk_object, "created": created,
                        "model": model_name, "choices": [],
                        "usage": usage(len(ids), len(gen.text.token_ids))}) + "\n\n")
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type}})}\n\n"
            finally:
                gen.close()

        m_requests.labels(route, "200").inc()
        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        route = request.url.path.rsplit("/", 1)[-1]
        return error_response(e, route)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        p = req.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise ApiError(400, "one prompt per request (n=1)", param="prompt")
            p = p[0]
        ids = llm.encode(p) if isinstance(p, str) else [int(t) for t in p]
        state = {"offset": 0}

        def chunk(ident, created, delta, lps, fin, start=False):
            if start:
                return None
            lp = None
            if req.logprobs is not None and lps is not None:
                lp, state["offset"] = completion_logprobs(lps, state["offset"])
            return {"id": ident, "object": "text_completion", "created": created,
                    "model": model_name, "choices": [{"index": 0, "text": delta, "logprobs": lp,
                                                      "finish_reason": fin}]}

        def final(ident, created, text, entries, reason, use):
            lp = completion_logprobs(entries, 0)[0] if req.logprobs is not None else None
            return {"id": ident, "object": "text_completion", "created": created,
                    "model": model_name, "choices": [{"index": 0, "text": text, "logprobs": lp,
                                                      "finish_reason": reason}],
                    "usage": use}

        return await respond(request, "completions", req, ids, req.logprobs, "text_completion",
                             chunk, final)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        try:
            ids = llm.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        n_top = (req.top_logprobs or 0) if req.logprobs else None

        def entries_json(entries):
            tok = llm.tokenizer
            return {"content": [{"token": tok.decode([e["token"]]), "logprob": e["logprob"],
                                 "top_logprobs": [{"token": tok.decode([i]), "logprob": lp}
                                                  for i, lp in e["top"]]} for e in entries]}

        def chunk(ident, created, delta, lps, fin, start=False):
            d = {"role": "assistant", "content": ""} if start else {"content": delta}
            choice = {"index": 0, "delta": d, "finish_reason": None if start else fin}
            if req.logprobs and lps:
                choice["logprobs"] = entries_json(lps)
            return {"id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": model_name, "choices": [choice]}

        def final(ident, created, text, entries, reason, use):
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": reason,
                      "logprobs": entries_json(entries) if req.logprobs else None}
            return {"id": ident, "object": "chat.completion", "created": created,
                    "model": model_name, "choices": [choice], "usage": use}

        return await respond(request, "chat", req, ids, n_top, "chat.completion.chunk", chunk,
                             final)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "qoq-jax"}]}

    @app.get("/health")
    async def health():
        if runner.error is not None and not runner._thread.is_alive():
            return JSONResponse({"status": "error"}, status_code=503)
        return {"status": "draining" if app.state.draining else "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prom.generate_latest(registry).decode(),
                                 media_type=prom.CONTENT_TYPE_LATEST)

    return app


# ----------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qoq_jax.serve", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="quantized checkpoint, HF checkpoint directory or .gguf file "
                                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name",
                   help="the model id clients send (default: the model directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=bounded_int(0, 65535), default=8000,
                   help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 route")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    add_kv_cache_arg(p)
    p.add_argument("--quantize", choices=["qoq", "rtn"],
                   help="quantize a float model to W4A8KV4 at start-up (small calibration set; "
                        "convert_hf_checkpoint makes a reusable checkpoint)")
    add_weight_format_args(p, "with --quantize")
    add_gemm_arg(p)
    add_parallel_args(p)
    p.add_argument("--max-slots", type=positive_int,
                   help="sequences decoded together (default 16 on CPU, 128 on GPU)")
    p.add_argument("--num-pages", type=bounded_int(2, None),
                   help="KV-cache pages (default: what --kv-memory-gb holds)")
    p.add_argument("--kv-memory-gb", type=float,
                   help="memory for the KV cache in GiB (default: up to 2 on CPU, half the free "
                        "GPU memory)")
    p.add_argument("--page-size", type=page_size_arg, default=16, help="tokens per KV page")
    p.add_argument("--prefill-chunk", type=page_size_arg,
                   help="prompt tokens per prefill chunk, a power of two (default 512 CPU, 1024 GPU)")
    p.add_argument("--prefill-budget", type=positive_int,
                   help="padded prompt tokens prefilled per engine step (default: one chunk)")
    p.add_argument("--decode-steps", type=positive_int,
                   help="decode steps per dispatch (default 8 CPU, 16 GPU)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="waiting requests before new ones get 429 (default 256)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                   help="largest request body (default 1 MiB)")
    p.add_argument("--warmup", action="store_true",
                   help="compile every program before serving (no request waits for XLA)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _serve(args))


def _serve(args) -> int:
    import os

    import uvicorn

    import qoq_jax

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    engine_kw = {"page_size": args.page_size, "max_queue": args.max_queue}
    for name in ("kv_cache", "max_slots", "num_pages", "prefill_chunk", "prefill_budget",
                 "decode_steps"):
        if getattr(args, name) is not None:
            engine_kw[name] = getattr(args, name)
    if args.kv_memory_gb is not None:
        if not args.kv_memory_gb > 0:
            raise ValueError(f"--kv-memory-gb must be > 0, got {args.kv_memory_gb}")
        engine_kw["kv_memory"] = int(args.kv_memory_gb * 2**30)
    quantize = None
    if args.quantize:
        from qoq_jax.quant.config import QuantConfig

        quantize = QuantConfig(method=args.quantize, weight_format=args.weight_format,
                               calib_samples=16, calib_seq_len=512)
    init_parallel(args)
    llm = qoq_jax.load(args.model, dtype=args.dtype, quantize=quantize, gemm_backend=args.gemm,
                       tensor_parallel=args.tensor_parallel, **engine_kw)
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model))
                                      if args.model else "SmolLM2-135M-Instruct")
    if args.warmup:
        t0 = time.perf_counter()
        n = llm.engine.warmup()
        log.info("compiled %d programs in %.1f s", n, time.perf_counter() - t0)
    app = create_app(llm, model_name=name, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=600)
    server = _DrainingServer(config, app)
    log.info("serving %s (%s, %s KV cache, %d slots, %d pages of %d tokens) on http://%s:%s",
             name, llm.source, llm.engine.kv_cache, llm.engine.max_slots, llm.engine.num_pages,
             llm.engine.page_size, args.host, args.port)
    server.run()
    return 0


class _DrainingServer:
    """uvicorn.Server that refuses new requests (503) from the first SIGTERM/SIGINT on, while
    uvicorn lets the running ones finish; after a SIGTERM drain the process exits with 0
    (uvicorn would re-raise the signal)."""

    def __new__(cls, config, app):
        import signal

        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                app.state.draining = True
                super().handle_exit(sig, frame)
                if sig == signal.SIGTERM:
                    self._captured_signals.remove(sig)

        return Server(config)


if __name__ == "__main__":
    sys.exit(main())
