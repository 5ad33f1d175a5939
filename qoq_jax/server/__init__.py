"""The OpenAI-compatible HTTP server (its command line is qoq_jax/serve.py):

    engine_thread.py   EngineThread: the engine stepped in a background thread
    jsonbody.py        a request body parsed as JSON within bounds (depth, digits, Unicode)
    protocol.py        request bodies (strict pydantic) -> token ids and SamplingParams
    responses.py       response bodies, stream chunks, usage, logprobs formats
    http_errors.py     ApiError and the table exception class -> (status, type, code)
    metrics.py         the Prometheus metrics
    guard.py           the middleware: Host check, requests in flight, metrics, last-net 500
    app.py             create_app: the routes and their handlers
    transport.py       uvicorn: header/keep-alive timeouts, limits, the drain on SIGTERM

One request's generation (detokenization, stop strings, cancellation) is qoq_jax/session.py,
shared with LLM.stream and LLM.generate.
"""

from qoq_jax.server.app import create_app
from qoq_jax.server.engine_thread import EngineThread

__all__ = ["create_app", "EngineThread"]
