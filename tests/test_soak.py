"""Soak (issue 22): 60 s of hostile jobs against the real service; the service never waits.

benchmarks/soak.py does the work (and `make bench` reports the same figures): hostile
jobs one after another on one slot (a half-sent message, megabyte METRICS lines, 50,000
directories, a 4 MB line), a control job timing out after 2 s again and again on the
other, GET /health every 50 ms.
"""

from __future__ import annotations

import pytest

from benchmarks import soak

pytestmark = pytest.mark.timeout(400)


def test_sixty_seconds_of_hostile_jobs_never_delay_health_or_another_jobs_timeout(tmp_path):
    from conftest import reachable_by_jobs

    figures = soak.soak("cpu", reachable_by_jobs(tmp_path / "soak") / "work", 60.0)
    assert not figures["control_errors"], figures["control_errors"][:3]
    assert figures["control_jobs"] >= 5 and figures["health_requests"] >= 100
    assert figures["health_worst_s"] <= soak.GOAL_S, figures
    assert figures["timeout_overshoot_worst_s"] <= soak.GOAL_S, figures
    assert set(figures["hostile"]) == set(soak.HOSTILE)
