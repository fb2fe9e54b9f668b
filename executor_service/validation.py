"""Request validation: bytes in, plain validated items out, or ApiError with a clear message.

Every rule of the API lives here: JSON object bodies in UTF-8 with no key twice in one
object, `code` a non-empty string, every string storable as UTF-8 (JSON's `\ud800`
escape gives a lone surrogate, which SQLite and main.py cannot hold), `paper_id` a safe
file name ([A-Za-z0-9._-]{1,128}: it names a directory, so no traversal is possible),
unique paper_ids in a batch, `timeout` a positive finite number not above the configured
maximum, at most `max_batch_size` items. A client's value quoted back in a message is
cut to its first ECHO_CHARS characters.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

PAPER_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
# How much of a client's value an error message quotes back (ids, paths, header lines).
ECHO_CHARS = 64


class ApiError(Exception):
    """An error answered to the client as JSON {"error": message} with an HTTP status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra


@dataclass(frozen=True)
class Item:
    """One validated script."""

    paper_id: str
    code: str
    paper_title: str | None = None


@dataclass(frozen=True)
class Request:
    """A validated request: its items, the timeout for each, single or batch."""

    items: tuple[Item, ...]
    timeout: float
    is_batch: bool


def cut(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` cut to its first `limit` characters ("..." marks a cut)."""
    return text if len(text) <= limit else text[:limit] + "..."


def echo(value: str) -> str:
    """A client's value quoted for an error message, cut to its first ECHO_CHARS characters."""
    return repr(value) if len(value) <= ECHO_CHARS else repr(value[:ECHO_CHARS]) + "..."


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; ApiError 400 for non-UTF-8, malformed, a key given
    twice in one object, or not an object."""
    if not body:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"request body must be a JSON object, not {_kind(value)}")
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are all different: json.loads would let the last one win, so
    a body with two `code` fields would run the second."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ApiError(400, f"request body has the key {echo(key)} twice in one object")
        obj[key] = value
    return obj


def _storable(value: str, name: str) -> str:
    """A string the job store (SQLite text is UTF-8) and the job's main.py can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{name} contains U+{ord(value[exc.start]):04X} at character {exc.start}, "
                            "a lone surrogate that cannot be stored as UTF-8") from None
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def _paper_id(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{where}paper_id must be a string, not {_kind(value)}")
    if not PAPER_ID_RE.fullmatch(value) or value in (".", ".."):
        raise ApiError(400, f"{where}paper_id {echo(value)} is invalid: use 1 to 128 characters "
                            "from A-Z a-z 0-9 . _ - (and not '.' or '..')")
    return value


def _item(obj: Any, where: str, default_paper_id: str | None) -> Item:
    if not isinstance(obj, dict):
        raise ApiError(400, f"{where}must be a JSON object, not {_kind(obj)}")
    code = obj.get("code")
    if code is None:
        raise ApiError(400, f"{where}code is missing")
    if not isinstance(code, str):
        raise ApiError(400, f"{where}code must be a string, not {_kind(code)}")
    if not code.strip():
        raise ApiError(400, f"{where}code is empty")
    if "\x00" in code:
        raise ApiError(400, f"{where}code contains a NUL character")
    _storable(code, f"{where}code")
    if "paper_id" in obj or default_paper_id is None:
        if "paper_id" not in obj:
            raise ApiError(400, f"{where}paper_id is missing")
        paper_id = _paper_id(obj["paper_id"], where)
    else:
        paper_id = default_paper_id
    title = obj.get("paper_title")
    if title is not None and not isinstance(title, str):
        raise ApiError(400, f"{where}paper_title must be a string, not {_kind(title)}")
    if title is not None:
        _storable(title, f"{where}paper_title")
    for key in ("s3_code_key",):
        if obj.get(key) is not None:
            if not isinstance(obj[key], str):
                raise ApiError(400, f"{where}{key} must be a string, not {_kind(obj[key])}")
            _storable(obj[key], f"{where}{key}")
    return Item(paper_id=paper_id, code=code, paper_title=title)


def parse_timeout(value: Any, default: float, maximum: float) -> float:
    """A positive finite number of seconds not above `maximum` (None: the default)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"timeout must be a number of seconds, not {_kind(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ApiError(400, f"timeout must be a positive finite number of seconds, not {value}")
    if value > maximum:
        raise ApiError(400, f"timeout {value} exceeds the maximum of {maximum:g} seconds")
    return float(value)


_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def parse_flag(value: str | None, name: str) -> bool:
    """A query flag such as `?verbose=1`: 1/true/yes or 0/false/no (absent: false)."""
    if value is None:
        return False
    if value.lower() not in _FLAGS:
        raise ApiError(400, f"{name} must be 1, true, yes, 0, false or no, not {echo(value)}")
    return _FLAGS[value.lower()]


IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,200}")


def parse_idempotency_key(value: str | None) -> str | None:
    """The Idempotency-Key header of POST /jobs: 1-200 printable ASCII characters."""
    if value is None:
        return None
    if not IDEMPOTENCY_KEY_RE.fullmatch(value):
        raise ApiError(400, "Idempotency-Key must be 1 to 200 printable ASCII characters")
    return value


def parse_single(obj: dict[str, Any], default_paper_id: str, default_timeout: float,
                 max_timeout: float) -> Request:
    """POST /execute: {"code", "paper_id"?, "timeout"?}."""
    item = _item(obj, "", default_paper_id)
    timeout = parse_timeout(obj.get("timeout"), default_timeout, max_timeout)
    return Request(items=(item,), timeout=timeout, is_batch=False)


def parse_batch(obj: dict[str, Any], default_timeout: float, max_timeout: float,
                max_batch_size: int) -> Request:
    """POST /execute_batch: {"batch": [{"paper_id", "code", ...}], "timeout"?}."""
    if "batch" not in obj:
        raise ApiError(400, "batch is missing")
    batch = obj["batch"]
    if not isinstance(batch, list):
        raise ApiError(400, f"batch must be an array, not {_kind(batch)}")
    if not batch:
        raise ApiError(400, "batch is empty")
    if len(batch) > max_batch_size:
        raise ApiError(400, f"batch has {len(batch)} items; the maximum is {max_batch_size}")
    items = tuple(_item(entry, f"batch[{i}].", None) for i, entry in enumerate(batch))
    seen: set[str] = set()
    for item in items:
        if item.paper_id in seen:
            raise ApiError(400, f"duplicate paper_id {item.paper_id!r} in batch")
        seen.add(item.paper_id)
    timeout = parse_timeout(obj.get("timeout"), default_timeout, max_timeout)
    return Request(items=items, timeout=timeout, is_batch=True)


def parse_jobs(obj: dict[str, Any], default_paper_id: str, default_timeout: float,
               max_timeout: float, max_batch_size: int) -> Request:
    """POST /jobs: a batch (has "batch") or a single script (has "code")."""
    if "batch" in obj:
        return parse_batch(obj, default_timeout, max_timeout, max_batch_size)
    return parse_single(obj, default_paper_id, default_timeout, max_timeout)
