"""The response bodies of the OpenAI API: whole responses, stream chunks (SSE), usage and the
two logprobs formats, for /v1/completions (CompletionFormat) and /v1/chat/completions
(ChatFormat). Each format is made per request (its id, creation time and options); a request
with n > 1 has n choices, told apart by their index."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid


def usage(n_prompt: int, n_out: int, cached: int = 0) -> dict:
    """OpenAI's usage object; `cached`: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out,
            "prompt_tokens_details": {"cached_tokens": cached}}


@dataclasses.dataclass(frozen=True)
class Choice:
    """One finished choice of a whole response; with its prompt's ids and, when the request
    scores the prompt (echo with logprobs, prompt_logprobs), their eval.scoring.PromptLogprobs."""

    text: str
    logprobs: list[dict] | None
    finish_reason: str | None
    prompt_ids: tuple[int, ...] | list[int] = ()
    prompt_scores: object | None = None


def prompt_entries(scores, n_top: int) -> list[dict]:
    """A PromptLogprobs as logprob entries ({"token", "logprob", "top"}; the first token has
    neither a log-probability nor alternatives: None)."""
    return [{"token": t, "logprob": lp, "top": None if i == 0 else top[:n_top]}
            for i, (t, lp, top) in enumerate(zip(scores.token_ids, scores.logprobs, scores.top))]


def vllm_prompt_logprobs(scores, n_top: int, tokenizer) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {"logprob",
    "rank", "decoded_token"}} holding the token itself and the n_top most likely."""
    out: list[dict | None] = [None]
    for t, lp, top in zip(scores.token_ids[1:], scores.logprobs[1:], scores.top[1:]):
        entry = {str(i): {"logprob": v, "rank": r + 1, "decoded_token": tokenizer.decode([i])}
                 for r, (i, v) in enumerate(top[:n_top])}
        if str(t) not in entry:
            rank = 1 + sum(v > lp for _, v in top)
            entry[str(t)] = {"logprob": lp, "rank": rank if rank <= len(top) else None,
                             "decoded_token": tokenizer.decode([t])}
        out.append(entry)
    return out


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

    def first_chunk(self, index: int = 0, choice: Choice | None = None) -> dict | None:
        """The chunk sent before any generated text of choice `index` (None: none); `choice`
        holds its prompt (for echo)."""
        return None

    def chunk(self, delta, index: int = 0) -> dict:
        """The stream chunk of a qoq_jax.session.Delta of choice `index`."""
        raise NotImplementedError

    def chunks(self, delta, index: int = 0) -> list[dict]:
        """The stream chunks of a Delta (a format may hold text back: tool calls)."""
        return [self.chunk(delta, index)]

    def choice(self, c: Choice, index: int) -> dict:
        raise NotImplementedError

    def response(self, choices: list[Choice], use: dict) -> dict:
        """The whole (non-streamed) response."""
        return self._envelope(self.object, [self.choice(c, i) for i, c in enumerate(choices)],
                              usage=use)

    def usage_chunk(self, use: dict) -> dict:
        """The last chunk when stream_options.include_usage is set."""
        return self._envelope(self.chunk_object, [], usage=use)


class CompletionFormat(_Format):
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, tokenizer, model_name, req):
        super().__init__(tokenizer, model_name, req)
        self._offsets: dict[int, int] = {}  # per choice: text_offset of its next streamed token

    def _logprobs(self, entries: list[dict], offset: int) -> tuple[dict, int]:
        tok = self.tokenizer
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            piece = tok.decode([e["token"]])
            out["tokens"].append(piece)
            out["token_logprobs"].append(e["logprob"])
            out["top_logprobs"].append(None if e["top"] is None else
                                       {tok.decode([i]): lp for i, lp in e["top"]})
            out["text_offset"].append(offset)
            offset += len(piece)
        return out, offset

    def chunk(self, delta, index=0) -> dict:
        lp = None
        if self.req.logprobs is not None and delta.logprobs is not None:
            lp, self._offsets[index] = self._logprobs(delta.logprobs,
                                                      self._offsets.get(index, 0))
        return self._envelope(self.chunk_object, [{
            "index": index, "text": delta.text, "logprobs": lp,
            "finish_reason": delta.finish_reason}])

    def _echo(self, c: Choice) -> tuple[str, list[dict]]:
        """The prompt's text and logprob entries an echo puts before the completion."""
        if not self.req.echo:
            return "", []
        entries = (prompt_entries(c.prompt_scores, self.req.logprobs)
                   if self.req.logprobs is not None and c.prompt_scores is not None else [])
        return self.tokenizer.decode(list(c.prompt_ids)), entries

    def first_chunk(self, index=0, choice=None) -> dict | None:
        if choice is None or not (self.req.echo or self.req.prompt_logprobs is not None):
            return None
        text, entries = self._echo(choice)
        lp = None
        if self.req.logprobs is not None:
            lp, _ = self._logprobs(entries, 0)
            self._offsets[index] = len(text)
        body = {"index": index, "text": text, "logprobs": lp, "finish_reason": None}
        if self.req.prompt_logprobs is not None:
            body["prompt_logprobs"] = vllm_prompt_logprobs(
                choice.prompt_scores, self.req.prompt_logprobs, self.tokenizer)
        return self._envelope(self.chunk_object, [body])

    def choice(self, c: Choice, index: int) -> dict:
        echo_text, echo_entries = self._echo(c)
        lp = (self._logprobs(echo_entries + (c.logprobs or []), 0)[0]
              if self.req.logprobs is not None else None)
        out = {"index": index, "text": echo_text + c.text, "logprobs": lp,
               "finish_reason": c.finish_reason}
        if self.req.prompt_logprobs is not None:
            out["prompt_logprobs"] = vllm_prompt_logprobs(c.prompt_scores,
                                                          self.req.prompt_logprobs,
                                                          self.tokenizer)
        return out


class ChatFormat(_Format):
    """Chat responses; with tools (qoq_jax.server.tools), the output is parsed for calls: a
    whole response carries them as `tool_calls` (finish_reason "tool_calls"); a stream holds
    text back while it may be a call (auto: while it starts like one; required or a named
    function: all of it) and sends the calls in one delta at the end."""

    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, tokenizer, model_name, req):
        super().__init__(tokenizer, model_name, req)
        self.tool_mode = req.tool_mode if req.tools else "none"
        self.functions = req.functions if req.tools else []
        self._text: dict[int, str] = {}  # per choice: all text so far (tools only)
        self._held: dict[int, tuple[str, list]] = {}  # per choice: text and logprobs held back
        self._streaming: set[int] = set()  # choices whose text goes out as content

    def _calls(self, text: str, finish_reason: str | None):
        """(content, calls as OpenAI dicts, finish_reason) of a choice's text."""
        from qoq_jax.server.tools import parse_output

        content, calls = parse_output(text, self.functions, self.tool_mode)
        if calls and not self.req.parallel_tool_calls:
            calls = calls[:1]
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return content, calls, finish_reason

    def _logprobs(self, entries: list[dict]) -> dict:
        tok = self.tokenizer
        return {"content": [{"token": tok.decode([e["token"]]), "logprob": e["logprob"],
                             "top_logprobs": [{"token": tok.decode([i]), "logprob": lp}
                                              for i, lp in e["top"]]} for e in entries]}

    def first_chunk(self, index=0, choice=None) -> dict:
        return self._envelope(self.chunk_object, [{
            "index": index, "delta": {"role": "assistant", "content": ""},
            "finish_reason": None}])

    def response(self, choices: list[Choice], use: dict) -> dict:
        out = super().response(choices, use)
        if self.req.prompt_logprobs is not None and choices:  # vLLM: one per response
            out["prompt_logprobs"] = vllm_prompt_logprobs(
                choices[0].prompt_scores, self.req.prompt_logprobs, self.tokenizer)
        return out

    def chunk(self, delta, index=0) -> dict:
        choice = {"index": index, "delta": {"content": delta.text},
                  "finish_reason": delta.finish_reason}
        if self.req.logprobs and delta.logprobs:
            choice["logprobs"] = self._logprobs(delta.logprobs)
        return self._envelope(self.chunk_object, [choice])

    def chunks(self, delta, index=0) -> list[dict]:
        if self.tool_mode == "none":
            return [self.chunk(delta, index)]
        from qoq_jax.server.tools import may_be_a_call

        text = self._text[index] = self._text.get(index, "") + delta.text
        held_text, held_lps = self._held.get(index, ("", []))
        held = (held_text + delta.text, held_lps + list(delta.logprobs or []))
        out = []
        if index not in self._streaming and not (
                self.tool_mode != "auto" or may_be_a_call(text)):
            self._streaming.add(index)  # plain text after all: what was held goes out now
        if index in self._streaming and (held[0] or held[1]):
            lps = held[1] if delta.logprobs is not None else None
            out.append(self.chunk(type(delta)(held[0], lps), index))
            held = ("", [])
        self._held[index] = held
        if delta.finish_reason is None:
            return out
        content, calls, reason = self._calls(text, delta.finish_reason)
        if calls:
            body = {"tool_calls": [c.openai(i) for i, c in enumerate(calls)]}
            if index not in self._streaming and content:
                body["content"] = content
            out.append(self._envelope(self.chunk_object, [
                {"index": index, "delta": body, "finish_reason": None}]))
        elif held[0] or held[1]:
            out.append(self.chunk(type(delta)(held[0], held[1] if delta.logprobs is not None
                                              else None), index))
        out.append(self._envelope(self.chunk_object, [
            {"index": index, "delta": {}, "finish_reason": reason}]))
        return out

    def choice(self, c: Choice, index: int) -> dict:
        message = {"role": "assistant", "content": c.text}
        reason = c.finish_reason
        if self.tool_mode != "none":
            content, calls, reason = self._calls(c.text, c.finish_reason)
            if calls:
                message = {"role": "assistant", "content": content,
                           "tool_calls": [call.openai() for call in calls]}
        return {"index": index, "message": message, "finish_reason": reason,
                "logprobs": self._logprobs(c.logprobs or []) if self.req.logprobs else None}
