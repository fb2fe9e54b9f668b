"""Facts about a script and its output, computed on every result: pure, fast, never raising.

analyze_code(code)    -> {"lines_of_code": int, "has_training_loop": bool}
parse_metrics(stdout) -> dict of metrics the script printed
result_document(pool_result, code) -> the result as the callers see it

The document is the original service's response for one script (success,
execution_time, return_code, stdout, stderr, timeout, lines_of_code, has_training_loop,
peak_memory_mb, and the METRICS: values both at top level and in detailed_metrics)
plus the pool's own fields (error_type, truncation counts, times, worker).

Training loop (AST): a ``for``/``while`` loop whose body (nested code included, but not
functions defined inside it) calls ``.backward()``, an optimizer's ``.step()`` or
``.zero_grad()``; or a loop over epochs / a DataLoader (iterable or target named like
``epoch``, ``loader``, ``dataloader``, ``batch``) that calls something (a model) in its
body. A loop that calls a function whose own body has ``.backward()`` counts too. When
the code does not parse, a regex heuristic over the text decides instead.

Metrics: every line ``METRICS: {json object}`` (anywhere in a line, as the original
found it) is merged, later keys winning; lines that are not a JSON object are ignored.
NaN / Infinity / -Infinity (which Python's json.dumps prints) become those strings, so
the result stays valid JSON. Fallback values that are not finite are skipped.
When there is no METRICS line, the fallback patterns of the original apply to the
*last* matching printed value (case-insensitive):

    loss / train_loss / training loss  ``[:=]`` number   -> training_loss
    val_loss / validation loss / test loss ``[:=]`` num  -> validation_loss
    accuracy / acc / val_acc ... ``[:=]`` number          -> validation_accuracy
        (a value followed by ``%`` is divided by 100)
"""

from __future__ import annotations

import ast
import io
import json
import math
import re
import tokenize
from typing import Any

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


def _walk_body(nodes: list[ast.stmt]):
    """Walk statements without descending into nested function or class bodies."""
    stack: list[ast.AST] = list(nodes)
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue
            stack.append(child)


def _called_names(nodes: list[ast.stmt]) -> tuple[set[str], set[str], bool]:
    """(attribute names called, plain function names called, any call at all)."""
    attrs: set[str] = set()
    funcs: set[str] = set()
    any_call = False
    for node in _walk_body(nodes):
        if isinstance(node, ast.Call):
            any_call = True
            if isinstance(node.func, ast.Attribute):
                attrs.add(node.func.attr)
            elif isinstance(node.func, ast.Name):
                funcs.add(node.func.id)
    return attrs, funcs, any_call


def _ast_training_loop(tree: ast.AST) -> bool:
    # Functions whose body trains (e.g. def train_step(): loss.backward()).
    training_funcs: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            attrs, _, _ = _called_names(node.body)
            if attrs & _STEP_NAMES:
                training_funcs.add(node.name)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            continue
        attrs, funcs, any_call = _called_names(node.body)
        if attrs & {"backward", "zero_grad"} or ("step" in attrs):
            return True
        if (funcs | attrs) & training_funcs:
            return True
        if isinstance(node, (ast.For, ast.AsyncFor)) and any_call:
            if _LOOP_WORDS.search(_names_in(node.iter) + " " + _names_in(node.target)):
                return True
    return False


_LOOP_RE = re.compile(r"^\s*(for|while)\b", re.MULTILINE)
_STEP_RE = re.compile(r"\.\s*(backward|zero_grad|step)\s*\(")


def _regex_training_loop(code: str) -> bool:
    """Fallback for code that does not parse: a loop keyword and a training call."""
    try:
        toks = [t for t in tokenize.generate_tokens(io.StringIO(code).readline)
                if t.type not in (tokenize.COMMENT, tokenize.STRING)]
        text = " ".join(t.string for t in toks)
    except (tokenize.TokenError, IndentationError, SyntaxError, ValueError):
        text = "\n".join(line.split("#", 1)[0] for line in code.splitlines())
    has_loop = bool(_LOOP_RE.search(code)) or bool(re.search(r"\b(for|while)\b", text))
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


_METRICS_RE = re.compile(r"METRICS:\s*(\{.*\})\s*$")
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
    if "METRICS:" in stdout:
        for line in stdout.splitlines():
            if "METRICS:" not in line:
                continue
            m = _METRICS_RE.search(line)
            if not m:
                continue
            try:
                value = json.loads(m.group(1), parse_constant=_constant_as_text)
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict):
                metrics.update(value)
                found = True
    if found:
        return metrics
    # Fallback: the last value each pattern matched (the final epoch's).
    val_loss = _FALLBACKS[0][1]
    for line in stdout.splitlines()[-5000:]:
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


def result_document(pool_result: dict[str, Any], code: str) -> dict[str, Any]:
    """The callers' result: metrics spread first, then the schema fields, which win.

    Metrics go first so that no script can overwrite a schema field by naming a metric
    "success" or "stdout".
    """
    metrics = parse_metrics(pool_result.get("stdout") or "")
    out: dict[str, Any] = dict(metrics)
    out.update(pool_result)
    out.update(analyze_code(code))
    out["detailed_metrics"] = metrics
    return out
