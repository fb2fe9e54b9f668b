"""Request validation: bytes in, plain validated items out, or ApiError with a clear message.

Every rule of the API lives here: JSON object bodies in UTF-8 with no key twice in one
object, `code` a non-empty string, every string storable as UTF-8 (JSON's `\ud800`
escape gives a lone surrogate, which SQLite and main.py cannot hold), `paper_id` a safe
file name ([A-Za-z0-9._-]{1,128}: it names a directory, so no traversal is possible),
unique paper_ids in a batch, at most `max_batch_size` items. `timeout` a positive finite
number; one above the operator's maximum runs with the maximum, and the request says so
(`timeout_clamped_from`) rather than failing: a fire-and-forget caller never reads a 400.
`profile` true or false (a Neuron profile of the job; absent: the operator's default,
`profile_jobs`; beside `batch`, the default of its items). The callers' own fields
(`paper_title`, `slack_thread_ts`, `s3_code_key`) are kept and returned with the result.
`callback_url` is http(s) to a host on the operator's allow-list. A client's value
quoted back in a message is cut to its first ECHO_CHARS characters.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from warm_pool import JOB_ID_RE, STATUS_QUEUED, STATUS_RUNNING, TERMINAL_STATUSES

PAPER_ID_RE = JOB_ID_RE  # a paper id names files as a job id names its dir
# Fields the callers send with a script that the service keeps and returns with its result.
CALLER_FIELDS = ("paper_title", "slack_thread_ts", "s3_code_key")
JOB_STATUSES = (STATUS_QUEUED, STATUS_RUNNING, *TERMINAL_STATUSES)
MAX_URL_CHARS = 2048
MAX_PAGE = 500
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
    """One validated script, with the caller's own fields and where to report its end."""

    paper_id: str
    code: str
    paper_title: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    callback_url: str | None = None
    profile: bool = False


@dataclass(frozen=True)
class Request:
    """A validated request: its items, the timeout for each, single or batch.

    `timeout_clamped_from` is the timeout asked for when it was above the maximum;
    `callback_url` is the whole batch's (an item's own is on the item)."""

    items: tuple[Item, ...]
    timeout: float
    is_batch: bool
    timeout_clamped_from: float | None = None
    respond_async: bool = False
    callback_url: str | None = None


@dataclass(frozen=True)
class Rules:
    """The operator's limits that validation applies."""

    default_timeout: float
    max_timeout: float
    max_batch_size: int = 10
    callback_hosts: tuple[str, ...] = ()
    profile_jobs: bool = False  # a job's "profile" when its request names none


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


def _item(obj: Any, where: str, default_paper_id: str | None, hosts: tuple[str, ...] = (),
          defaults: Mapping[str, Any] | None = None, profile: bool = False) -> Item:
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
    fields = dict(defaults or {})
    fields.update(caller_fields(obj, where))
    title = fields.get("paper_title")
    callback = parse_callback_url(obj.get("callback_url"), hosts, f"{where}callback_url")
    return Item(paper_id=paper_id, code=code, paper_title=title if isinstance(title, str) else None,
                fields=fields, callback_url=callback,
                profile=parse_profile(obj.get("profile"), profile, f"{where}profile"))


def parse_profile(value: Any, default: bool, name: str = "profile") -> bool:
    """Whether to capture a Neuron profile of the job: true or false (None: `default`)."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, not {_kind(value)}")
    return value


def caller_fields(obj: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The callers' own fields present in `obj` (strings, numbers or booleans), as given."""
    out: dict[str, Any] = {}
    for key in CALLER_FIELDS:
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            _storable(value, f"{where}{key}")
        elif not isinstance(value, (bool, int, float)) or (isinstance(value, float)
                                                            and not math.isfinite(value)):
            raise ApiError(400, f"{where}{key} must be a string or a number, not {_kind(value)}")
        out[key] = value
    return out


def host_allowed(host: str, port: int | None, allowed: tuple[str, ...]) -> bool:
    """True when `host` (and `port`) matches an allow-list entry: a name or address, with
    an optional :port, or *.domain for every name below domain."""
    host = host.lower().strip("[]")
    for entry in allowed:
        entry_host, entry_port = split_host(entry)
        if entry_port is not None and entry_port != port:
            continue
        if entry_host.startswith("*."):
            if host.endswith(entry_host[1:]):
                return True
        elif host == entry_host:
            return True
    return False


def split_host(entry: str) -> tuple[str, int | None]:
    """An allow-list entry as (host, port or None); ValueError when it is not host[:port]."""
    text = entry.strip().lower()
    if not text or any(c in text for c in "/?#@ \t"):
        raise ValueError(f"{entry!r} is not a host name or address with an optional :port")
    parts = urlsplit("//" + text.replace("*.", "wildcard.", 1))
    if parts.hostname is None:
        raise ValueError(f"{entry!r} is not a host name or address with an optional :port")
    host = parts.hostname.replace("wildcard.", "*.", 1) if text.startswith("*.") else parts.hostname
    return host, parts.port


def parse_callback_url(value: Any, allowed: tuple[str, ...], name: str = "callback_url") -> str | None:
    """An http(s) URL whose host is on the allow-list (None: no callback)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string, not {_kind(value)}")
    if len(value) > MAX_URL_CHARS or any(ord(c) <= 32 or ord(c) == 127 for c in value):
        raise ApiError(400, f"{name} must be a URL of at most {MAX_URL_CHARS} characters without "
                            "spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ApiError(400, f"{name} {echo(value)} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"{name} must be an http:// or https:// URL with a host, not {echo(value)}")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if not allowed:
        raise ApiError(400, f"{name}: this service sends no callbacks (no host is allowed; the "
                            "operator sets --callback-hosts)")
    if not host_allowed(parts.hostname, port, allowed):
        raise ApiError(400, f"{name}: host {echo(parts.hostname)} is not on this service's "
                            "callback allow-list (--callback-hosts)")
    return value


def parse_timeout(value: Any, default: float, maximum: float) -> tuple[float, float | None]:
    """(seconds to run, the timeout asked for when it was above `maximum`, else None).

    None gives the default; a positive finite number above `maximum` runs with `maximum`
    (the original service ran whatever a request named; a fire-and-forget caller would
    never read a 400). Only a malformed timeout is refused.
    """
    if value is None:
        return default, None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"timeout must be a number of seconds, not {_kind(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ApiError(400, f"timeout must be a positive finite number of seconds, not {value}")
    if value > maximum:
        return float(maximum), float(value)
    return float(value), None


def parse_async(obj: dict[str, Any], prefer: str | None) -> bool:
    """Answer at once (202)? The body's `"async"` when it has one, else `Prefer:
    respond-async` (RFC 7240: comma-separated preferences, each with optional parameters)."""
    value = obj.get("async")
    if value is not None:
        if not isinstance(value, bool):
            raise ApiError(400, f"async must be true or false, not {_kind(value)}")
        return value
    return prefers_async(prefer)


def prefers_async(prefer: str | None) -> bool:
    """True when a Prefer header value holds the preference respond-async."""
    return any(preference.split(";", 1)[0].split("=", 1)[0].strip().lower() == "respond-async"
               for preference in (prefer or "").split(","))


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


def parse_single(obj: dict[str, Any], default_paper_id: str, rules: Rules,
                 prefer: str | None = None) -> Request:
    """POST /execute: {"code", "paper_id"?, "timeout"?, "async"?, "callback_url"?, "profile"?,
    caller fields}."""
    item = _item(obj, "", default_paper_id, rules.callback_hosts, profile=rules.profile_jobs)
    timeout, asked = parse_timeout(obj.get("timeout"), rules.default_timeout, rules.max_timeout)
    return Request(items=(item,), timeout=timeout, is_batch=False, timeout_clamped_from=asked,
                   respond_async=parse_async(obj, prefer))


def parse_batch(obj: dict[str, Any], rules: Rules, prefer: str | None = None) -> Request:
    """POST /execute_batch: {"batch": [{"paper_id", "code", ...}], "timeout"?, "async"?,
    "callback_url"?, "profile"?}; caller fields and "profile" given beside "batch" apply to
    every item that lacks them."""
    if "batch" not in obj:
        raise ApiError(400, "batch is missing")
    batch = obj["batch"]
    if not isinstance(batch, list):
        raise ApiError(400, f"batch must be an array, not {_kind(batch)}")
    if not batch:
        raise ApiError(400, "batch is empty")
    if len(batch) > rules.max_batch_size:
        raise ApiError(400, f"batch has {len(batch)} items; the maximum is {rules.max_batch_size}")
    shared = caller_fields(obj)
    profile = parse_profile(obj.get("profile"), rules.profile_jobs)
    items = tuple(_item(entry, f"batch[{i}].", None, rules.callback_hosts, shared, profile)
                  for i, entry in enumerate(batch))
    seen: set[str] = set()
    for item in items:
        if item.paper_id in seen:
            raise ApiError(400, f"duplicate paper_id {item.paper_id!r} in batch")
        seen.add(item.paper_id)
    timeout, asked = parse_timeout(obj.get("timeout"), rules.default_timeout, rules.max_timeout)
    callback = parse_callback_url(obj.get("callback_url"), rules.callback_hosts)
    return Request(items=items, timeout=timeout, is_batch=True, timeout_clamped_from=asked,
                   respond_async=parse_async(obj, prefer), callback_url=callback)


def parse_jobs(obj: dict[str, Any], default_paper_id: str, rules: Rules) -> Request:
    """POST /jobs: a batch (has "batch") or a single script (has "code"); always async."""
    if "batch" in obj:
        return parse_batch(obj, rules)
    return parse_single(obj, default_paper_id, rules)


def parse_paper_id(value: str) -> str:
    """A paper_id from a path or query (the same rule as in a body)."""
    return _paper_id(value, "")


@dataclass(frozen=True)
class JobQuery:
    """GET /jobs: which jobs, newest first, one page."""

    paper_id: str | None
    statuses: tuple[str, ...]
    limit: int
    before: int | None


def parse_job_query(args: Mapping[str, str]) -> JobQuery:
    """?paper_id=&status=a,b&limit=&cursor= (cursor: the next_cursor of the previous page)."""
    paper_id = parse_paper_id(args["paper_id"]) if "paper_id" in args else None
    statuses = tuple(s.strip() for s in args.get("status", "").split(",") if s.strip())
    for status in statuses:
        if status not in JOB_STATUSES:
            raise ApiError(400, f"status {echo(status)} is not one of {', '.join(JOB_STATUSES)}")
    limit_text = args.get("limit", "50")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_PAGE:
        raise ApiError(400, f"limit must be a whole number from 1 to {MAX_PAGE}, not {echo(limit_text)}")
    cursor = args.get("cursor")
    if cursor is not None and not (cursor.isdigit() and len(cursor) < 19):
        raise ApiError(400, f"cursor {echo(cursor)} is not one this service gave out")
    return JobQuery(paper_id, statuses, int(limit_text), int(cursor) if cursor is not None else None)
