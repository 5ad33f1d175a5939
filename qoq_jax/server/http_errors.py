"""Errors as the OpenAI API reports them: ApiError (status, message, type, param, code), and
one table from exception class to (status, type, code), looked up along the class's MRO (the
most specific entry wins), so that no error is recognised by its message text.

The messages of the exceptions in the table are the engine's and SamplingParams' own (limits,
values); an exception that is not in it is a 500 whose text stays in the server's log.
ChatTemplateError is answered by the handler with its `reason` only (its message names the
model's path)."""

from __future__ import annotations

from qoq_jax.errors import ContextLengthError, PromptError, QueueFullError
from qoq_jax.session import GenerationError


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.headers = headers  # of the response (Connection: close, Allow, Retry-After)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


MAX_MESSAGE_CHARS = 1000

# exception class -> (HTTP status, error type, error code)
ERRORS: dict[type[BaseException], tuple[int, str, str | None]] = {
    ContextLengthError: (400, "invalid_request_error", "context_length_exceeded"),
    PromptError: (400, "invalid_request_error", None),  # empty prompt, bad token ids, limits
    QueueFullError: (429, "rate_limit_error", "queue_full"),
    GenerationError: (500, "server_error", None),  # the engine failed the request
    ValueError: (400, "invalid_request_error", None),  # SamplingParams' checks, chat templates
}


def to_api_error(e: BaseException, *, param: str | None = None) -> ApiError | None:
    """The ApiError for `e` (itself if it is one), or None for an exception not in ERRORS."""
    if isinstance(e, ApiError):
        return e
    for cls in type(e).__mro__:
        if cls in ERRORS:
            status, type_, code = ERRORS[cls]
            message = str(e)
            if len(message) > MAX_MESSAGE_CHARS:  # e.g. every bad token id of a long prompt
                message = message[:MAX_MESSAGE_CHARS] + " ..."
            return ApiError(status, message, type_=type_, param=param, code=code)
    return None
