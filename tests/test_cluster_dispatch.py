"""The dispatcher's decisions on what Ray reports about a node's actor, step by step and
without a cluster: Ray's own exception classes go into ClusterPool's loop steps, and
placing an actor records the node instead of asking Ray. The cluster itself, with real
kills, restarts and network faults, is tested in test_cluster.py and test_cluster_chaos.py;
this covers a race those meet only now and then (issue 21, item 5)."""

from __future__ import annotations

import pytest

from executor_service.cluster.pool import PLACE_AGAIN_S, REPLACE_AFTER_S, ClusterPool
from warm_pool import PoolConfig

ray = pytest.importorskip("ray")  # make test installs it (requirements-cluster.txt)

NODE = "a3" * 28
LISTED = {"NodeID": NODE, "Alive": True, "NodeManagerAddress": "127.0.0.2",
          "Resources": {"neuron_cores": 2.0}}
# What Ray says when the scheduler that places actors does not (yet, or any more) have the node.
UNSCHEDULABLE = ray.exceptions.ActorUnschedulableError(
    "The node specified via NodeAffinitySchedulingStrategy doesn't exist any more or is infeasible, "
    "and soft=False was specified.")
UNAVAILABLE = ray.exceptions.ActorUnavailableError("the actor is temporarily unavailable", None)


@pytest.fixture
def dispatcher(tmp_path):
    pool = ClusterPool(PoolConfig(work_dir=tmp_path, backend="cpu"), "127.0.0.1:6379")
    pool._ray, pool.state, pool.placed = ray, "running", []
    pool._place = lambda node_id, cores: pool.placed.append(node_id) or object()
    return pool


def test_a_node_ray_lists_but_cannot_place_on_is_placed_again_shortly_not_held_lost(dispatcher):
    dispatcher.watch_nodes([LISTED], now=0.0)
    assert dispatcher.placed == [NODE] and dispatcher.nodes[NODE].state == "placing"
    dispatcher._took_stats(dispatcher.nodes[NODE], None, UNSCHEDULABLE, now=0.1)
    dispatcher.confirm_lost(now=0.1)
    assert NODE not in dispatcher.nodes  # dropped: its actor never came to be
    failed = dispatcher.stats().cluster["failed_placements"]
    assert failed == [{"node_id": NODE, "error": f"ActorUnschedulableError: {UNSCHEDULABLE}"}]
    dispatcher.watch_nodes([LISTED], now=0.1 + PLACE_AGAIN_S / 2)
    assert dispatcher.placed == [NODE]  # not at once
    dispatcher.watch_nodes([LISTED], now=0.1 + PLACE_AGAIN_S)
    assert dispatcher.placed == [NODE, NODE] and dispatcher.nodes[NODE].state == "placing"


def test_a_lost_node_whose_probe_finds_its_actor_unschedulable_is_dropped(dispatcher):
    dispatcher.watch_nodes([LISTED], now=0.0)
    node = dispatcher.nodes[NODE]
    dispatcher._took_stats(node, None, UNAVAILABLE, now=0.1)
    assert node.state == "lost"  # unreachable for now: it may answer again
    dispatcher._took_probe(node, UNSCHEDULABLE, now=0.6)
    assert node.state == "dead"
    dispatcher.confirm_lost(now=0.6)
    assert NODE not in dispatcher.nodes
    dispatcher.watch_nodes([LISTED], now=0.6 + PLACE_AGAIN_S)
    assert dispatcher.placed == [NODE, NODE]


def test_an_actor_that_died_before_its_pool_was_ready_waits_longer_to_be_replaced(dispatcher):
    dispatcher.watch_nodes([LISTED], now=0.0)
    dispatcher._took_stats(dispatcher.nodes[NODE], None, ray.exceptions.ActorDiedError(), now=0.1)
    dispatcher.confirm_lost(now=0.1)
    dispatcher.watch_nodes([LISTED], now=0.1 + PLACE_AGAIN_S)
    assert dispatcher.placed == [NODE]
    dispatcher.watch_nodes([LISTED], now=0.1 + REPLACE_AFTER_S)
    assert dispatcher.placed == [NODE, NODE]
