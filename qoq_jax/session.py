"""One generation request, from token ids in to text deltas out: the logic that LLM.generate,
LLM.stream and the HTTP server share.

A ``Session`` submits the prompt's token ids to an engine front (the ``Engine`` itself, or the
server's ``EngineThread``: anything with ``submit(ids, params, callback)``, ``cancel(rid,
reason)`` and ``release_when_done(rid)``), then turns the engine's TokenEvents into ``Delta``s
with ``qoq_jax.text.TextRequest`` (incremental detokenization, stop strings). A stop string ends
the text and cancels the request; a consumer that goes away (``close()`` before the end) cancels
it too, so its slot and KV pages are freed. The session keeps the finish reason, the error and
the logprob entries of the tokens that were used (not those after a stop string).

``Session.feed`` is plain and synchronous; it never raises (it may run inside the engine's
step). Two drivers deliver the events:

- ``stream(engine, ...)`` (synchronous, for LLM.stream): the events go to a deque, and the
  driver steps the engine itself whenever none is pending.
- ``AsyncSession.deltas()`` (for the server): the events cross from the engine's thread into an
  asyncio queue via ``loop.call_soon_threadsafe``; the engine is driven by someone else.

Both raise ``GenerationError`` when the engine ends the request with an error.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

from qoq_jax.errors import EngineBusyError
from qoq_jax.text import TextRequest


class GenerationError(RuntimeError):
    """The engine ended the request with finish_reason "error" (e.g. non-finite logits)."""


@dataclasses.dataclass(frozen=True)
class Delta:
    """New text of a request, the logprob entries of the tokens behind it (None when logprobs
    were not asked for), and on the last delta the finish reason (and error, if any)."""

    text: str
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    error: str | None = None


class Session:
    """One request in flight: submitted on construction, fed its TokenEvents, closed once."""

    def __init__(self, front, tokenizer, prompt_ids: Sequence[int], params,
                 stop: Sequence[str] = (), *, deliver: Callable | None = None,
                 on_first_token: Callable[[float], None] | None = None):
        """front: where to submit and cancel (Engine or EngineThread). deliver: the engine's
        callback (default: feed the events straight in, from the thread that steps the engine).
        on_first_token: called with the seconds from submission to the first token used."""
        self.text = TextRequest(tokenizer, prompt_ids, stop)
        self.num_prompt_tokens = len(prompt_ids)
        self.cached_tokens = 0  # of the prompt, found in the engine's prefix cache
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.done = False  # the last delta has been made: later events are ignored
        self.ended = False  # the engine's last event (finished=True) has come
        self.closed = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._front = front
        self._on_first_token = on_first_token
        self.request_id = front.submit(prompt_ids, params, deliver or self.feed)

    @property
    def token_ids(self) -> list[int]:
        """The generated tokens that were used (none after a stop string)."""
        return self.text.token_ids

    def feed(self, ev) -> Delta | None:
        """One TokenEvent in; the Delta it makes, or None (nothing new, or already done)."""
        self.ended = self.ended or ev.finished
        self.cached_tokens = max(self.cached_tokens, ev.cached_tokens)
        if self.done:
            return None
        delta, used = self.text.feed(ev.token_ids)
        if used:
            now = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = now
                if self._on_first_token is not None:
                    self._on_first_token(now - self.submitted_at)
            self.last_token_at = now
        lps = ev.logprobs[:used] if ev.logprobs is not None else None
        if lps and self.logprobs is not None:
            self.logprobs += lps
        if ev.finished and ev.finish_reason == "error":
            self.done = True
            self.finish_reason, self.error = "error", ev.error or "generation failed"
            return Delta(delta, lps, "error", self.error)
        if self.text.stopped or ev.finished:
            self.done = True
            if self.text.stopped and not ev.finished:
                self._front.cancel(ev.request_id, "stop")
            self.finish_reason = "stop" if self.text.stopped else ev.finish_reason
            return Delta(delta + self.text.finish(), lps, self.finish_reason)
        if delta or lps:
            return Delta(delta, lps)
        return None

    def close(self) -> None:
        """Idempotent. Before the end (the consumer went away): cancel the request, freeing its
        slot and pages. Either way the engine forgets it once it has finished."""
        if self.closed:
            return
        self.closed = True
        if not self.done:
            self._front.cancel(self.request_id)
        self._front.release_when_done(self.request_id)


def _checked(d: Delta) -> Delta:
    if d.error is not None:
        raise GenerationError(d.error)
    return d


def stream(engine, tokenizer, prompt_ids: Sequence[int], params, stop: Sequence[str] = ()
           ) -> Iterator[Delta]:
    """Generate one request synchronously, yielding its Deltas (stepping the engine itself when
    no event is pending). Raises GenerationError if the engine fails the request."""
    events: collections.deque = collections.deque()
    session = Session(engine, tokenizer, prompt_ids, params, stop, deliver=events.append)
    clean = True
    try:
        while True:
            while events:
                d = session.feed(events.popleft())
                if d is not None:
                    yield _checked(d)
                    if d.finish_reason is not None:
                        return
            if not engine.has_work:
                raise RuntimeError("the engine went idle before the request finished")
            engine.step()
    except GeneratorExit:  # the consumer went away
        raise
    except BaseException:
        clean = False
        raise
    finally:
        session.close()
        if clean and not session.ended:
            # a stop string or the consumer ended it: take the cancel in now, so that the slot
            # and pages are free when this returns
            try:
                engine.step()
            except EngineBusyError:  # another thread drives the engine: it takes it in
                pass


class AsyncSession(Session):
    """A Session consumed from an asyncio event loop; the engine runs in another thread (the
    server's EngineThread), which hands each event over with loop.call_soon_threadsafe."""

    def __init__(self, front, tokenizer, prompt_ids, params, stop=(), **kw):
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        super().__init__(front, tokenizer, prompt_ids, params, stop, deliver=lambda ev: (
            loop.call_soon_threadsafe(self._events.put_nowait, ev)), **kw)

    async def deltas(self, disconnected: Callable[[], Awaitable[bool]] | None = None,
                     poll_s: float = 1.0) -> AsyncIterator[Delta]:
        """The Deltas until the last one; stops early (without a finish reason) once
        `disconnected()` says the consumer is gone (asked every `poll_s` of silence). Raises
        GenerationError if the engine fails the request."""
        while True:
            try:
                ev = await asyncio.wait_for(self._events.get(), timeout=poll_s)
            except asyncio.TimeoutError:
                if disconnected is not None and await disconnected():
                    return
                continue
            d = self.feed(ev)
            if d is not None:
                yield _checked(d)
                if d.finish_reason is not None:
                    return
