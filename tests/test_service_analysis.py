"""executor_service.analysis: code facts and printed metrics, pure functions that never raise."""

from __future__ import annotations

import json
import time

import pytest

from executor_service.analysis import analyze_code, parse_metrics, result_document

TRAINING = """
import torch
model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for epoch in range(3):
    opt.zero_grad()
    loss = model(torch.randn(4, 2)).sum()
    loss.backward()
    opt.step()
"""


def test_lines_of_code_skips_blank_and_comment_lines():
    code = "# header\n\nimport torch\n   # indented comment\nx = 1  # trailing\n"
    assert analyze_code(code)["lines_of_code"] == 2


def test_loop_calling_backward_is_a_training_loop():
    assert analyze_code(TRAINING)["has_training_loop"] is True


def test_while_loop_with_optimizer_step_is_a_training_loop():
    code = "i = 0\nwhile i < 3:\n    optimizer.step()\n    i += 1\n"
    assert analyze_code(code)["has_training_loop"] is True


def test_loop_over_dataloader_calling_model_is_a_training_loop():
    code = "for x, y in train_loader:\n    out = model(x)\n"
    assert analyze_code(code)["has_training_loop"] is True


def test_loop_calling_a_function_that_trains_is_a_training_loop():
    code = "def train_step(m):\n    m(1).backward()\n\nfor i in range(3):\n    train_step(net)\n"
    assert analyze_code(code)["has_training_loop"] is True


def test_backward_outside_any_loop_is_not_a_training_loop():
    code = "loss = model(x)\nloss.backward()\nfor i in range(3):\n    print(i)\n"
    assert analyze_code(code)["has_training_loop"] is False


def test_words_in_strings_and_comments_do_not_count():
    code = "# for epoch in range(10): loss.backward()\nprint('for x in loader: loss.backward()')\n"
    assert analyze_code(code)["has_training_loop"] is False


def test_syntax_error_falls_back_to_token_heuristic():
    broken = TRAINING + "\ndef oops(:\n"
    facts = analyze_code(broken)
    assert facts["has_training_loop"] is True
    assert facts["lines_of_code"] == 9


@pytest.mark.parametrize("bad", [None, 42, b"bytes", "\x00\x00", "(" * 10000])
def test_analyze_code_never_raises(bad):
    facts = analyze_code(bad)
    assert set(facts) == {"lines_of_code", "has_training_loop"}


def test_metrics_lines_merge_and_later_keys_win():
    out = 'x\nMETRICS: {"a": 1, "b": 2}\nnoise\nMETRICS: {"b": 3}\n'
    assert parse_metrics(out) == {"a": 1, "b": 3}


def test_non_json_and_non_object_metrics_lines_are_ignored():
    out = 'METRICS: not json\nMETRICS: [1, 2]\nMETRICS: {"ok": true}\nMETRICS: {broken\n'
    assert parse_metrics(out) == {"ok": True}


def test_non_finite_metrics_become_strings_so_results_stay_valid_json():
    import json

    m = parse_metrics('METRICS: {"loss": NaN, "grad": Infinity, "low": -Infinity}\n')
    assert m == {"loss": "NaN", "grad": "Infinity", "low": "-Infinity"}
    json.dumps(m, allow_nan=False)


def test_metrics_line_from_the_seed_readme():
    out = 'METRICS: {"training_loss": 0.023, "validation_accuracy": 0.945}\n'
    assert parse_metrics(out) == {"training_loss": 0.023, "validation_accuracy": 0.945}


def test_fallback_takes_the_last_printed_loss_and_accuracy():
    out = "Epoch 1: loss: 0.9 acc: 0.5\nEpoch 2: Loss = 0.1, val_loss=0.3, accuracy: 91.5%\n"
    m = parse_metrics(out)
    assert m == {"training_loss": 0.1, "validation_loss": 0.3, "validation_accuracy": 0.915}


def test_fallback_is_not_used_when_metrics_lines_exist():
    assert parse_metrics('loss: 0.5\nMETRICS: {"x": 1}\n') == {"x": 1}


def test_no_metrics_gives_an_empty_dict():
    assert parse_metrics("hello\nworld\n") == {}
    assert parse_metrics("") == {}
    assert parse_metrics(None) == {}


def test_parse_metrics_is_fast_on_large_output():
    big = ("step 1 loss: 0.5 some text here\n" * 50_000) + 'METRICS: {"a": 1}\n'
    t0 = time.perf_counter()
    assert parse_metrics(big) == {"a": 1}
    assert parse_metrics(big.replace("METRICS", "X"))["training_loss"] == 0.5
    assert time.perf_counter() - t0 < 2.0


def test_the_document_spreads_metrics_and_adds_code_facts():
    code = ("import json\nfor epoch in range(2):\n    loss = 1.0 / (epoch + 1)\n"
            "print('METRICS: ' + json.dumps({'training_loss': 0.5, 'validation_accuracy': 0.9}))\n")
    stdout = 'METRICS: {"training_loss": 0.5, "validation_accuracy": 0.9, "success": false}\n'
    doc = result_document({"success": True, "stdout": stdout, "return_code": 0}, code)
    assert doc["training_loss"] == 0.5 and doc["validation_accuracy"] == 0.9
    assert doc["detailed_metrics"] == {"training_loss": 0.5, "validation_accuracy": 0.9, "success": False}
    assert doc["success"] is True  # a metric never overwrites a schema field
    assert (doc["lines_of_code"], doc["has_training_loop"]) == (4, False)


# --- hostile output and code: linear time, bounded ----------------------------------------

def _seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def test_a_one_megabyte_hostile_metrics_line_is_analysed_in_well_under_a_second():
    # The line from issue 22: a backtracking regex took 42 s on it, holding the GIL.
    line = "METRICS:{" * 111_000
    assert _seconds(parse_metrics, line) < 1.0
    assert _seconds(result_document, {"success": True, "stdout": line}, "print(1)\n") < 1.0


def test_a_hostile_metrics_line_just_under_the_cap_is_still_linear():
    from executor_service.analysis import MAX_LINE_CHARS

    line = "METRICS:{" * (MAX_LINE_CHARS // len("METRICS:{"))
    assert len(line) <= MAX_LINE_CHARS
    assert _seconds(parse_metrics, line) < 1.0  # quadratic: about 3 s
    assert parse_metrics(line + '\nMETRICS: {"a": 1}') == {"a": 1}


def test_a_metrics_line_longer_than_the_cap_is_skipped_and_one_within_it_is_read():
    from executor_service.analysis import MAX_LINE_CHARS

    history = ", ".join(["0.5"] * ((MAX_LINE_CHARS - 100) // 5))
    within = f'METRICS: {{"losses": [{history}]}}'
    assert len(within) <= MAX_LINE_CHARS
    assert len(parse_metrics(within)["losses"]) == (MAX_LINE_CHARS - 100) // 5
    over = f'METRICS: {{"pad": "{"x" * MAX_LINE_CHARS}", "a": 1}}'
    assert parse_metrics(over + '\nMETRICS: {"b": 2}\n') == {"b": 2}
    assert parse_metrics("loss: 0.7 " + " " * MAX_LINE_CHARS + "\nloss: 0.2\n") == {"training_loss": 0.2}


def test_metrics_are_read_after_the_last_marker_on_a_line():
    assert parse_metrics('log METRICS: noise METRICS: {"a": 1}\n') == {"a": 1}
    assert parse_metrics('METRICS: {"a": 1} METRICS: oops\n') == {}


def test_many_hostile_lines_are_analysed_in_well_under_a_second():
    hostile = ["METRICS:{" * 10, "loss" + " " * 20, "val_loss val_loss: x", "acc:" * 5,
               "METRICS: {" + "[" * 50]
    out = "\n".join(hostile * 20_000)  # 1.7 MB, 100,000 lines
    assert _seconds(parse_metrics, out) < 1.0
    assert _seconds(parse_metrics, out.replace("METRICS", "M")) < 1.0


@pytest.mark.parametrize("line", ["loss" + " " * 1_000_000, "val_loss " * 100_000, "acc:" * 250_000,
                                  "loss:" + "1" * 1_000_000 + "x", "." + " " * 1_000_000])
def test_one_huge_line_without_metrics_is_analysed_in_well_under_a_second(line):
    assert _seconds(parse_metrics, line) < 1.0
    assert _seconds(analyze_code, line + "\n(:\n") < 1.0


def test_code_of_many_blank_lines_that_does_not_parse_is_judged_in_linear_time():
    # "^\s*(for|while)" rescanned every later blank line from each one: 20,000 took 3.7 s.
    assert _seconds(analyze_code, "\n" * 1_000_000 + "def oops(:\n") < 1.0


def test_deeply_nested_loops_are_walked_once():
    loops = "".join("    " * d + f"for i{d} in range(3):\n" for d in range(90))
    code = loops + ("    " * 90 + "x = y(z)\n") * 1000
    assert _seconds(analyze_code, code) < 1.0
    assert analyze_code(code + "    " * 90 + "loss.backward()\n")["has_training_loop"] is True


def test_code_too_long_to_parse_is_judged_by_the_text_heuristic():
    from executor_service.analysis import MAX_PARSED_CODE

    padding = "x = 1\n" * (MAX_PARSED_CODE // 6 + 1)
    assert _seconds(analyze_code, padding * 10) < 1.0
    facts = analyze_code(padding + TRAINING)
    assert facts == {"lines_of_code": MAX_PARSED_CODE // 6 + 1 + 8, "has_training_loop": True}
    assert analyze_code(padding + "print('done')\n")["has_training_loop"] is False


# --- a job's words never become the service's fields ----------------------------------------

def test_metrics_named_like_service_fields_stay_in_detailed_metrics_only():
    forged = {"callbacks": [{"state": "delivered"}], "deduplicated": True, "paper_title": "forged",
              "slack_thread_ts": "1.2", "job_url": "/x", "attempts": 9, "status": "cancelled",
              "success": False, "error_type": "timeout", "training_loss": 0.5}
    stdout = "METRICS: " + json.dumps(forged) + "\n"
    doc = result_document({"success": True, "status": "completed", "error_type": None, "stdout": stdout}, "")
    assert doc["detailed_metrics"] == forged
    assert doc["training_loss"] == 0.5
    assert (doc["success"], doc["status"], doc["error_type"]) == (True, "completed", None)
    for absent in ("callbacks", "deduplicated", "paper_title", "slack_thread_ts", "job_url", "attempts"):
        assert absent not in doc, absent


def test_the_service_fields_are_read_off_the_documents_builders():
    from executor_service.analysis import service_fields

    fields = service_fields()
    assert {"success", "stdout", "error_type", "status", "job_id", "batch_id", "callbacks", "deduplicated",
            "paper_title", "s3_code_key", "timeout_clamped_from", "attempts", "detailed_metrics",
            "lines_of_code", "worker", "job_url"} <= fields
    assert not {"training_loss", "validation_accuracy", "validation_loss"} & fields


@pytest.mark.parametrize("forged", ["X" * 16_384, "", "Timeout", ["timeout"], 3])
def test_an_error_type_that_is_not_a_documented_word_becomes_protocol_error(forged):
    doc = result_document({"success": True, "status": "completed", "error_type": forged, "stdout": ""}, "")
    assert (doc["error_type"], doc["success"]) == ("protocol_error", False)


@pytest.mark.parametrize("word", [None, "timeout", "exception", "node_lost", "internal"])
def test_documented_error_types_pass_unchanged(word):
    doc = result_document({"success": word is None, "error_type": word, "stdout": ""}, "")
    assert (doc["error_type"], doc["success"]) == (word, word is None)


def test_the_documented_error_types_are_the_openapi_enum():
    from pathlib import Path

    import yaml

    import executor_service
    from warm_pool import ERROR_TYPES

    spec = yaml.safe_load((Path(executor_service.__file__).parent / "openapi.yaml").read_text())
    enum = spec["components"]["schemas"]["Result"]["properties"]["error_type"]["enum"]
    assert set(enum) == {None, *ERROR_TYPES}
