"""executor_service.metrics: every label value comes from a fixed set."""

from __future__ import annotations

import pytest

from executor_service.metrics import Metrics
from warm_pool import PoolStats


def _series(text: str) -> set[str]:
    """Each sample's name and labels (its value left out)."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines()}


def _metrics(stats: dict | None = None) -> Metrics:
    return Metrics(lambda: PoolStats.from_json(stats or {"state": "starting"}), lambda: {})


def test_an_unknown_error_type_is_counted_as_other_and_adds_one_series_at_most():
    metrics = _metrics()
    metrics.job_finished({"success": False, "error_type": "timeout"})
    metrics.job_finished({"success": False, "error_type": "X" * 16_384})
    first = metrics.render().decode()
    for n in range(20):
        metrics.job_finished({"success": False, "error_type": f"forged-{n}"})
    text = metrics.render().decode()
    assert "XXXX" not in text and "forged" not in text
    assert 'executor_jobs_finished_total{outcome="other"} 21.0' in text
    assert 'executor_jobs_finished_total{outcome="timeout"} 1.0' in text
    assert _series(text) == _series(first)


def test_success_and_failure_without_an_error_type_keep_their_words():
    metrics = _metrics()
    metrics.job_finished({"success": True})
    metrics.job_finished({"success": False, "error_type": None})
    text = metrics.render().decode()
    assert 'outcome="success"} 1.0' in text and 'outcome="failed"} 1.0' in text


def test_respawn_reasons_outside_their_set_are_other():
    stats = {"state": "ready", "respawns": {"by_reason": {"dirty": 2, "R" * 1000: 3, "R2": 4}}}
    text = _metrics(stats).render().decode()
    assert "RRRR" not in text and "R2" not in text
    assert 'executor_pool_state{state="ready"} 1.0' in text
    assert 'executor_worker_respawns_total{reason="dirty"} 2.0' in text
    assert 'executor_worker_respawns_total{reason="other"} 7.0' in text


def test_a_pool_state_outside_the_vocabulary_never_reaches_a_label():
    with pytest.raises(ValueError, match="not one of starting, ready, broken, closing, closed"):
        PoolStats.from_json({"state": "S" * 1000})


def test_a_scrape_answers_when_the_pool_cannot_say_and_shows_it_broken():
    def failing() -> PoolStats:
        raise RuntimeError("the pool is gone")

    text = Metrics(failing, lambda: {}).render().decode()
    assert "executor_pool_broken 1.0" in text and 'executor_pool_state{state="broken"} 1.0' in text
    assert "executor_pool_ready 0.0" in text
