"""JSON that other programs can read: NaN and Infinity are not JSON (Python writes them anyway, and
strict parsers such as JavaScript's or jq's reject the file), so non-finite numbers become ``null``."""

from __future__ import annotations

import json
import math


def finite(value):
    """``value`` with every non-finite float (at any depth of dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def dumps(value, **kwargs) -> str:
    """``json.dumps`` of :func:`finite` ``(value)``; never writes NaN or Infinity."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def loads(text: str | bytes, source: str = "JSON") -> object:
    """``json.loads``, with a nesting too deep for Python's parser (``[[[[...]]]]``, a RecursionError otherwise) a
    ValueError naming ``source``, as malformed JSON (``json.JSONDecodeError``, also a ValueError) is."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(
            f"{source}: the JSON is nested too deeply to read (thousands of levels of [ or {{); it is "
            f"not a file adn wrote"
        ) from None
