"""The response bodies of the OpenAI API: whole responses, stream chunks (SSE), usage and the
two logprobs formats, for /v1/completions (CompletionFormat) and /v1/chat/completions
(ChatFormat). Each format is made per request (its id, creation time and options)."""

from __future__ import annotations

import json
import time
import uuid


def usage(n_prompt: int, n_out: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out}


def sse(data) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class _Format:
    id_prefix = ""
    object = ""  # of a whole response
    chunk_object = ""  # of a stream chunk

    def __init__(self, tokenizer, model_name: str, req):
        self.tokenizer, self.model_name, self.req = tokenizer, model_name, req
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                "choices": choices, **extra}

    def first_chunk(self) -> dict | None:
        """The chunk sent before any text (None: none)."""
        return None

    def chunk(self, delta) -> dict:
        """The stream chunk of a qoq_jax.session.Delta."""
        raise NotImplementedError

    def response(self, text: str, logprobs: list[dict] | None, finish_reason: str | None,
                 use: dict) -> dict:
        """The whole (non-streamed) response."""
        raise NotImplementedError

    def usage_chunk(self, use: dict) -> dict:
        """The last chunk when stream_options.include_usage is set."""
        return self._envelope(self.chunk_object, [], usage=use)


class CompletionFormat(_Format):
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, tokenizer, model_name, req):
        super().__init__(tokenizer, model_name, req)
        self._offset = 0  # text_offset of the next streamed token

    def _logprobs(self, entries: list[dict], offset: int) -> tuple[dict, int]:
        tok = self.tokenizer
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            piece = tok.decode([e["token"]])
            out["tokens"].append(piece)
            out["token_logprobs"].append(e["logprob"])
            out["top_logprobs"].append({tok.decode([i]): lp for i, lp in e["top"]})
            out["text_offset"].append(offset)
            offset += len(piece)
        return out, offset

    def chunk(self, delta) -> dict:
        lp = None
        if self.req.logprobs is not None and delta.logprobs is not None:
            lp, self._offset = self._logprobs(delta.logprobs, self._offset)
        return self._envelope(self.chunk_object, [{"index": 0, "text": delta.text, "logprobs": lp,
                                                   "finish_reason": delta.finish_reason}])

    def response(self, text, logprobs, finish_reason, use) -> dict:
        lp = self._logprobs(logprobs or [], 0)[0] if self.req.logprobs is not None else None
        return self._envelope(self.object, [{"index": 0, "text": text, "logprobs": lp,
                                             "finish_reason": finish_reason}], usage=use)


class ChatFormat(_Format):
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def _logprobs(self, entries: list[dict]) -> dict:
        tok = self.tokenizer
        return {"content": [{"token": tok.decode([e["token"]]), "logprob": e["logprob"],
                             "top_logprobs": [{"token": tok.decode([i]), "logprob": lp}
                                              for i, lp in e["top"]]} for e in entries]}

    def first_chunk(self) -> dict:
        return self._envelope(self.chunk_object, [{
            "index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def chunk(self, delta) -> dict:
        choice = {"index": 0, "delta": {"content": delta.text},
                  "finish_reason": delta.finish_reason}
        if self.req.logprobs and delta.logprobs:
            choice["logprobs"] = self._logprobs(delta.logprobs)
        return self._envelope(self.chunk_object, [choice])

    def response(self, text, logprobs, finish_reason, use) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish_reason,
                  "logprobs": self._logprobs(logprobs or []) if self.req.logprobs else None}
        return self._envelope(self.object, [choice], usage=use)
