"""A request body parsed as JSON with bounds, before any validation or model work: an object,
nested at most MAX_DEPTH levels, integers of at most MAX_INT_DIGITS digits, no NaN or
Infinity (not JSON), strings of valid Unicode (no lone surrogate such as "\\ud800", which
JSON's escapes allow but no tokenizer takes). A body outside them is an ApiError 400 whose
message names the field (its dotted path) and the problem."""

from __future__ import annotations

import json

from qoq_jax.server.http_errors import ApiError

MAX_DEPTH = 64
MAX_INT_DIGITS = 100


class _LongInt:
    """Stands in for an integer literal too long to convert (found by the walk, by path)."""

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(s: str):
    n = len(s) - s.startswith("-")
    return int(s) if n <= MAX_INT_DIGITS else _LongInt(n)


def _no_constant(name: str):
    raise ApiError(400, f"the request body is not valid JSON: {name} is not a JSON value")


def parse_json_object(body: bytes) -> dict:
    """The body as a dict, or ApiError(400)."""
    try:
        data = json.loads(body, parse_int=_parse_int, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, f"the request body is nested more than {MAX_DEPTH} levels "
                            "deep") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid JSON: it is not UTF-8 "
                            "text") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check(data)
    return data


def _path(path: tuple) -> str:
    return ".".join(map(str, path)) or "the request body"


def _check(data: dict) -> None:
    """Depth, long integers and lone surrogates, walked without recursion."""
    stack: list[tuple[object, tuple, int]] = [(data, (), 1)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, _LongInt):
            raise ApiError(400, f"{_path(path)}: an integer of {v.digits} digits (at most "
                                f"{MAX_INT_DIGITS})", param=_path(path) if path else None)
        elif isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise ApiError(400, f"the request body is nested more than {MAX_DEPTH} "
                                    "levels deep")
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(k, str):
                    _check_text(k, path)
                if isinstance(x, (str, dict, list, _LongInt)):
                    stack.append((x, (*path, k), depth + 1))


def _check_text(s: str, path: tuple) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{_path(path)}: not valid Unicode (a lone surrogate, "
                            f"U+{ord(s[e.start]):04X}, at character {e.start})",
                       param=_path(path) if path else None) from None
