"""The text side of a generation: incremental detokenization and stop strings (host only).

The engine produces token ids; everything a user reads is made here, token by token, so that a
stream and a whole response are the same text:

- ``IncrementalDetokenizer`` decodes a growing list of ids into text deltas (the method of
  vLLM and TGI): it decodes a short window that starts a few tokens back, emits only what was
  added, and holds back text that ends in an incomplete UTF-8 character (U+FFFD) until the
  next token completes it. The window starts in the prompt, so a first token's leading space
  (SentencePiece's "▁") is kept.
- ``StopStrings`` ends a generation at the first occurrence of any stop string (excluded from
  the output, as OpenAI does) and holds back text that could be the start of one.
- ``TextRequest`` combines both for one request.
"""

from __future__ import annotations

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens decoded before the output, for leading spaces


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), *,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0  # start of the decoded window
        self._read = len(self._ids)  # end of what has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completes ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """At the end: whatever is held back (an incomplete character shows as U+FFFD)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):]


class StopStrings:
    def __init__(self, stops: Sequence[str] | None = ()):
        self.stops = [s for s in stops or () if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Feed new text; returns what can be shown. Sets `stopped` at a stop string."""
        if self.stopped:
            return ""
        buf = self._held + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[:min(hits)[0]]
        keep = 0  # the longest end of buf that may begin a stop string (longest first)
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if s.startswith(buf[len(buf) - k:]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


class TextRequest:
    """Text of one request, fed with the token ids the engine streams."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopStrings(stop)
        self.text = ""
        self.token_ids: list[int] = []

    @property
    def stopped(self) -> bool:
        """A stop string ended the text: the caller cancels the request."""
        return self.stops.stopped

    def feed(self, token_ids: Sequence[int]) -> tuple[str, int]:
        """Returns (new text, how many of token_ids were used): tokens after the one that
        completed a stop string are dropped."""
        out = []
        used = 0
        for t in token_ids:
            if self.stops.stopped:
                break
            used += 1
            self.token_ids.append(int(t))
            out.append(self.stops.push(self.detok.push(t)))
        delta = "".join(out)
        self.text += delta
        return delta, used

    def finish(self) -> str:
        """The held-back tail at the end of the request."""
        delta = self.stops.push(self.detok.flush()) if not self.stops.stopped else ""
        delta += self.stops.flush()
        self.text += delta
        return delta
