"""JSON parsing with bounds: nesting depth and number length.

Python's own parser turns 10^5000 into a ValueError deep inside int() and a
thousand nested brackets into a RecursionError; here each becomes one clear
JSONRejected. NaN, Infinity and 1e999 parse to non-finite floats, which every
request schema refuses (`allow_inf_nan=False`) naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Union

MAX_NUMBER_CHARS = 40  # far more than an int64 or a float needs


class JSONRejected(ValueError):
    """Well-formed JSON that breaks a bound; the message says which."""


def _int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise JSONRejected(f"a number in the JSON has {len(text)} digits; at most {MAX_NUMBER_CHARS} are accepted")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise JSONRejected(f"a number in the JSON has {len(text)} characters; at most {MAX_NUMBER_CHARS} are accepted")
    return float(text)


def _depth(value: Any, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise JSONRejected(f"the JSON is nested more than {limit} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))


def loads(text: Union[str, bytes], max_depth: int = 32) -> Any:
    """Parse JSON; raises json.JSONDecodeError when malformed and JSONRejected when out of bounds."""
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float)
    except RecursionError:
        raise JSONRejected(f"the JSON is nested more than {max_depth} levels deep") from None
    _depth(value, max_depth)
    return value
