"""Facts about a script and its output, computed on every result: pure, fast, never raising.

analyze_code(code)    -> {"lines_of_code": int, "has_training_loop": bool}
parse_metrics(stdout) -> dict of metrics the script printed
result_document(pool_result, code) -> the result as the callers see it

The document is the original service's response for one script (success,
execution_time, return_code, stdout, stderr, timeout, lines_of_code, has_training_loop,
peak_memory_mb, and the METRICS: values in detailed_metrics and at top level) plus the
pool's own fields (error_type, truncation counts, times, worker). A metric named like a
field the service sets (`service_fields()`: success, status, callbacks, paper_title, ...)
stays in detailed_metrics only: a job's words never become the service's.

Training loop (AST): a ``for``/``while`` loop whose body (nested code included, but not
functions defined inside it) calls ``.backward()``, an optimizer's ``.step()`` or
``.zero_grad()``; or a loop over epochs / a DataLoader (iterable or target named like
``epoch``, ``loader``, ``dataloader``, ``batch``) that calls something (a model) in its
body. A loop that calls a function whose own body has ``.backward()`` counts too. When
the code does not parse, or is longer than MAX_PARSED_CODE, a heuristic over the text
decides instead (a loop keyword and a training call).

Metrics: every line ``METRICS: {json object}`` (anywhere in a line, as the original
found it: the text after the line's last ``METRICS:``) is merged, later keys winning;
lines that are not a JSON object are ignored. NaN / Infinity / -Infinity (which Python's
json.dumps prints) become those strings, so the result stays valid JSON. Fallback values
that are not finite are skipped. Lines longer than MAX_LINE_CHARS are not read at all.

When there is no METRICS line, the fallback patterns of the original apply to the
*last* matching printed value (case-insensitive):

    loss / train_loss / training loss  ``[:=]`` number   -> training_loss
    val_loss / validation loss / test loss ``[:=]`` num  -> validation_loss
    accuracy / acc / val_acc ... ``[:=]`` number          -> validation_accuracy
        (a value followed by ``%`` is divided by 100)

Everything here is linear in its input and bounded: a job chooses its output and a
caller its code, and neither may make the service spend quadratic time on them (one
printed line of ``"METRICS:{" * 111000`` took a backtracking regex 42 s).
"""

from __future__ import annotations

import ast
import functools
import io
import json
import math
import re
import tokenize
from typing import Any

from executor_service.cluster.records import ClusterResult
from executor_service.store import CALLBACKS_FIELD, JobRow
from executor_service.validation import CALLER_FIELDS
from warm_pool import ERROR_TYPES

DETAILED_METRICS = "detailed_metrics"
_STEP_NAMES = {"backward", "step", "zero_grad"}
_LOOP_WORDS = re.compile(r"epoch|loader|batch", re.IGNORECASE)


def count_lines(code: str) -> int:
    """Non-blank lines that are not only a comment."""
    n = 0
    for line in code.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            n += 1
    return n


def _names_in(node: ast.AST) -> str:
    """The identifiers and attribute names in an expression, joined by spaces."""
    parts = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            parts.append(sub.id)
        elif isinstance(sub, ast.Attribute):
            parts.append(sub.attr)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            parts.append(sub.value)
    return " ".join(parts)


# Facts about the calls under a node, as bits (nested functions, lambdas and classes
# excluded: their bodies do not run in the loop that defines them).
_STEP_CALL = 1    # x.backward(), x.step(), x.zero_grad()
_TRAIN_CALL = 2   # a call of a function whose own body trains
_ANY_CALL = 4
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _call_facts(tree: ast.AST, training_funcs: frozenset[str]) -> dict[int, int]:
    """The call bits of every node (by id), in one post-order pass: linear in the tree,
    however deeply its loops nest (walking each loop's body again was quadratic)."""
    facts: dict[int, int] = {}
    stack: list[tuple[ast.AST, list[ast.AST] | None]] = [(tree, None)]
    while stack:
        node, children = stack.pop()
        if children is None:  # first visit: its children first, then it again
            children = list(ast.iter_child_nodes(node))
            stack.append((node, children))
            stack.extend((child, None) for child in children)
            continue
        bits = 0
        for child in children:
            if not isinstance(child, _SCOPES):
                bits |= facts[id(child)]
        if isinstance(node, ast.Call):
            bits |= _ANY_CALL
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if isinstance(func, ast.Attribute) and name in _STEP_NAMES:
                bits |= _STEP_CALL
            if name in training_funcs:
                bits |= _TRAIN_CALL
        facts[id(node)] = bits
    return facts


def _body_facts(facts: dict[int, int], body: list[ast.stmt]) -> int:
    bits = 0
    for stmt in body:
        if not isinstance(stmt, _SCOPES):
            bits |= facts[id(stmt)]
    return bits


def _ast_training_loop(tree: ast.AST) -> bool:
    facts = _call_facts(tree, frozenset())
    # Functions whose body trains (e.g. def train_step(): loss.backward()).
    training_funcs = frozenset(
        node.name for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _body_facts(facts, node.body) & _STEP_CALL)
    if training_funcs:
        facts = _call_facts(tree, training_funcs)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            continue
        bits = _body_facts(facts, node.body)
        if bits & (_STEP_CALL | _TRAIN_CALL):
            return True
        if isinstance(node, (ast.For, ast.AsyncFor)) and bits & _ANY_CALL:
            if _LOOP_WORDS.search(_names_in(node.iter) + " " + _names_in(node.target)):
                return True
    return False


# Code longer than this (in characters) is not parsed: ast.parse and the walk cost about
# 4 s per MB on a small shared VM, and generated training scripts are a few KB. The
# text heuristic judges longer code instead, in linear time.
MAX_PARSED_CODE = 128 * 1024
# Horizontal space only: with \s, "^\s*" at each of n blank lines scanned every later
# blank line again (quadratic: 20,000 newlines took 3.7 s).
_LOOP_RE = re.compile(r"^[ \t]*(?:for|while)\b", re.MULTILINE)
_LOOP_WORD_RE = re.compile(r"\b(?:for|while)\b")
_STEP_RE = re.compile(r"\.\s*(?:backward|zero_grad|step)\s*\(")


def _regex_training_loop(code: str) -> bool:
    """For code that does not parse (or is too long to): a loop keyword and a training call."""
    text = None
    if len(code) <= MAX_PARSED_CODE:
        try:
            toks = [t for t in tokenize.generate_tokens(io.StringIO(code).readline)
                    if t.type not in (tokenize.COMMENT, tokenize.STRING)]
            text = " ".join(t.string for t in toks)
        except (tokenize.TokenError, IndentationError, SyntaxError, ValueError):
            pass
    if text is None:
        text = "\n".join(line.split("#", 1)[0] for line in code.splitlines())
    has_loop = bool(_LOOP_RE.search(code)) or bool(_LOOP_WORD_RE.search(text))
    return has_loop and bool(_STEP_RE.search(text))


def analyze_code(code: str) -> dict[str, Any]:
    """lines_of_code and has_training_loop for a script; never raises."""
    if not isinstance(code, str):
        return {"lines_of_code": 0, "has_training_loop": False}
    try:
        lines = count_lines(code)
    except Exception:  # noqa: BLE001 - must never raise
        lines = 0
    try:
        if len(code) > MAX_PARSED_CODE:
            raise ValueError("too long to parse")
        tree = ast.parse(code)
        loop = _ast_training_loop(tree)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        try:
            loop = _regex_training_loop(code)
        except Exception:  # noqa: BLE001
            loop = False
    except Exception:  # noqa: BLE001
        loop = False
    return {"lines_of_code": lines, "has_training_loop": loop}


_METRICS_MARK = "METRICS:"
# Longest output line read for metrics, in characters (METRICS: lines and the fallback
# patterns alike); a longer line is skipped. Every parse is linear, so this bounds the
# time and memory one line can cost, while keeping a METRICS: object with a long history
# (thousands of per-epoch values) well within it.
MAX_LINE_CHARS = 256 * 1024
_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(%?)"
_FALLBACKS = (
    ("validation_loss", re.compile(r"\b(?:val(?:idation)?|test|eval)[ _-]?loss\s*[:=]\s*" + _NUM, re.I)),
    ("training_loss", re.compile(r"(?<![A-Za-z_])(?:train(?:ing)?[ _-]?)?loss\s*[:=]\s*" + _NUM, re.I)),
    ("validation_accuracy",
     re.compile(r"\b(?:(?:val(?:idation)?|test|eval)[ _-]?)?acc(?:uracy)?\s*[:=]\s*" + _NUM, re.I)),
)


def _constant_as_text(name: str) -> str:
    # NaN and Infinity are not JSON: keep them as the strings "NaN", "Infinity",
    # "-Infinity" so that a diverged loss is still reported in valid JSON.
    return name


def parse_metrics(stdout: str) -> dict[str, Any]:
    """Metrics printed by the script (METRICS: lines, else fallback patterns); never raises."""
    if not isinstance(stdout, str) or not stdout:
        return {}
    try:
        return _parse_metrics(stdout)
    except Exception:  # noqa: BLE001 - a result must always be produced
        return {}


def _parse_metrics(stdout: str) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    found = False
    if _METRICS_MARK in stdout:
        for line in stdout.splitlines():
            value = _metrics_object(line)
            if value is not None:
                metrics.update(value)
                found = True
    if found:
        return metrics
    # Fallback: the last value each pattern matched (the final epoch's).
    val_loss = _FALLBACKS[0][1]
    for line in stdout.splitlines()[-5000:]:
        if len(line) > MAX_LINE_CHARS:
            continue
        for name, pattern in _FALLBACKS:
            # "val_loss: 0.3" must not count as the training loss.
            text = val_loss.sub(" ", line) if name == "training_loss" else line
            hits = pattern.findall(text)
            if not hits:
                continue
            number, pct = hits[-1]
            try:
                value = float(number)
            except ValueError:
                continue
            if not math.isfinite(value):
                continue
            metrics[name] = value / 100.0 if pct else value
    return metrics


def _metrics_object(line: str) -> dict[str, Any] | None:
    """The JSON object after the line's last METRICS:, or None. Linear: one rfind and one
    json parse (the C scanner), never a backtracking match."""
    if len(line) > MAX_LINE_CHARS:
        return None
    at = line.rfind(_METRICS_MARK)
    if at < 0:
        return None
    text = line[at + len(_METRICS_MARK):].strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text, parse_constant=_constant_as_text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


@functools.cache
def service_fields() -> frozenset[str]:
    """Every key the service itself may set on a job's document, read off the code that
    builds it: the pool's result (a cluster's too), the code facts, the stored row's
    public view and summary (with every optional part present: deduplicated, the
    callers' fields), and the callbacks the runner adds. A printed metric with one of
    these names is not lifted to the top level, so it can never stand in for one of
    them, even where the service leaves that field out (a job not deduplicated, without
    callbacks or a title)."""
    result = ClusterResult(job_id="", paper_id=None, node="", node_address="")
    row = JobRow(job_id="", batch_id="", paper_id="", paper_title=None, code="", timeout=None,
                 status="", created_at=0.0, started_at=None, finished_at=None, worker=None,
                 result=None, fields=dict.fromkeys(CALLER_FIELDS), deduplicated=True)
    return frozenset({*result.to_dict(), *analyze_code(""), DETAILED_METRICS, CALLBACKS_FIELD,
                      *row.to_public(), *row.summary()})


def result_document(pool_result: dict[str, Any], code: str) -> dict[str, Any]:
    """The callers' result: the pool's fields, the code facts, and the printed metrics
    in detailed_metrics and, those not named like a service field, at top level too.

    This is where every result enters the store (and so HTTP, callbacks and /metrics):
    an error_type that is not one of ERROR_TYPES becomes protocol_error here, whatever
    the pool (or a cluster's node) let through.
    """
    metrics = parse_metrics(pool_result.get("stdout") or "")
    reserved = service_fields()
    out: dict[str, Any] = {k: v for k, v in metrics.items() if k not in reserved}
    out.update(pool_result)
    error_type = out.get("error_type")
    if error_type is not None and not (isinstance(error_type, str) and error_type in ERROR_TYPES):
        out["error_type"], out["success"] = "protocol_error", False
    out.update(analyze_code(code))
    out[DETAILED_METRICS] = metrics
    return out
