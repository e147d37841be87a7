"""JSON that every parser reads: a non-finite float (NaN, Infinity, which Python's json writes bare and strict
parsers refuse) is written as null."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float (in dicts, lists and tuples, at any depth) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps of `obj` with non-finite floats as null (allow_nan=False: nothing else slips through)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
