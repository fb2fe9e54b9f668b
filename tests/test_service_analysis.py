"""executor_service.analysis: code facts and printed metrics, pure functions that never raise."""

from __future__ import annotations

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
