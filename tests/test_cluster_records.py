"""The cluster seen as one pool, from the stats its nodes' pools last reported: one state
vocabulary with the local pool (warm_pool.contract.POOL_STATES). Pure functions, no Ray:
the cluster itself is tested in test_cluster.py."""

from __future__ import annotations

import pytest

from executor_service.cluster.records import cluster_state
from warm_pool import POOL_STATES

READY = {"state": "ready", "idle": 1, "busy": 1}
STARTING = {"state": "starting", "idle": 0, "busy": 0}
BROKEN = {"state": "broken", "idle": 0, "busy": 0, "broken_reason": "imports fail"}


@pytest.mark.parametrize(("pools", "loop_state", "expected"), [
    ([], "starting", "starting"),                 # no node has reported yet
    ([STARTING], "running", "starting"),
    ([STARTING, READY], "running", "ready"),      # one ready node is enough
    ([BROKEN, READY], "running", "ready"),        # one broken node breaks nothing else
    ([READY], "closing", "closing"),
    ([READY], "closed", "closed"),
])
def test_the_clusters_state_is_one_of_the_pools_states(pools, loop_state, expected):
    state, reason = cluster_state(pools, loop_state)
    assert state == expected and state in POOL_STATES and reason is None


def test_the_cluster_is_broken_only_when_every_nodes_pool_is_and_says_why():
    other = {**BROKEN, "broken_reason": "disk full"}
    state, reason = cluster_state([BROKEN, other], "running")
    assert state == "broken" and "imports fail" in reason and "disk full" in reason
