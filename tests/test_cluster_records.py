"""The cluster seen as one pool, from the stats its nodes' pools last reported: one state
vocabulary with the local pool (warm_pool.contract.POOL_STATES). Pure functions, no Ray:
the cluster itself is tested in test_cluster.py."""

from __future__ import annotations

import dataclasses

import pytest

from executor_service.cluster.records import cluster_state
from warm_pool import POOL_STATES, PoolStats

READY = PoolStats.from_json({"state": "ready", "size": 2, "idle": 1, "busy": 1})
STARTING = PoolStats.from_json({"state": "starting", "size": 2, "starting": 2})
BROKEN = PoolStats.from_json({"state": "broken", "size": 2, "starting": 2, "broken_reason": "imports fail"})


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
    other = dataclasses.replace(BROKEN, broken_reason="disk full")
    state, reason = cluster_state([BROKEN, other], "running")
    assert state == "broken" and "imports fail" in reason and "disk full" in reason


def test_a_nodes_pool_stats_are_decoded_not_trusted():
    """What a node's pool reports crosses from the node as JSON: PoolStats.from_json
    refuses what would mislead the head (the dispatcher then keeps the node's last)."""
    picture = {"state": "ready", "size": 2, "idle": 2, "busy": 0, "starting": 0, "queued": 0,
               "backend": "cpu", "isolation": "uid", "workers": [{"pid": 7, "state": "idle"}],
               "respawns": {"total": 1, "by_reason": {"crashed": 1}, "recent": [{"reason": "crashed"}]},
               "template_pid": 6}
    stats = PoolStats.from_json(picture)
    assert (stats.state, stats.ready_workers, stats.healthy, stats.respawns_by_reason) == ("ready", 2, True,
                                                                                          {"crashed": 1})
    assert stats.detail == {"template_pid": 6} and stats.to_json() == {**picture, "broken_reason": None}
    for bad in ({**picture, "state": "fine"}, {**picture, "idle": -1}, {**picture, "busy": "2"},
                {**picture, "size": True}, {**picture, "respawns": {"by_reason": {"crashed": "x"}}},
                {**picture, "workers": [1]}, {**picture, "workers": {"pid": 7}}, {**picture, "backend": 3},
                [picture]):
        with pytest.raises(ValueError):
            PoolStats.from_json(bad)
