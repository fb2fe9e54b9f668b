"""Chaos on a cluster (issue 21 item 4): 60 s of mixed batches (ok, raise, sleep, a memory
bomb) on a real Ray cluster in a private namespace while a node's whole process group is
SIGKILLed and the node started again about every 10 s. benchmarks/cluster_chaos.py does
the work (`make bench` reports the same figures); this test holds it to the issue: every
job ends with exactly one terminal result, as its kind does (`node_lost` only once its
attempts are spent); nothing stays queued while a node is ready (a batch run on the
re-joined nodes starts at once); the API answers within 1 s throughout; and nothing of a
killed node is left behind.
"""

from __future__ import annotations

import json

import pytest
from cluster_fixtures import ClusterNamespace, needs_cluster

from benchmarks import cluster_chaos

# Start (~20 s), 60 s of chaos, the last batches, the re-joined check, the stop: a few
# minutes at most on this 2-core machine, far less than this.
pytestmark = [needs_cluster, pytest.mark.timeout(480)]


def test_sixty_seconds_of_node_kills_and_restarts_end_every_job_once_and_leave_nothing_stuck(
        tmp_path_factory):
    # A short root: jobs' socket paths below the nodes' work dirs must fit 107 bytes.
    root = tmp_path_factory.mktemp("cchaos")
    cluster = ClusterNamespace(root).start(nodes=2, args=cluster_chaos.SERVICE_ARGS)
    try:
        cluster.wait_nodes(2)
        figures = cluster_chaos.ClusterChaos(cluster, 60.0).run()
    finally:
        cluster.close()  # asserts that no process of the namespace is left
    print(json.dumps(figures, indent=1))  # the figures, for the report (pytest -s)
    assert not figures["problems"], figures["problems"]
    # About one every 10 s, but a kill waits until the other node is ready again: on this
    # loaded 2-core machine a restart (ray start, the actor, the template's imports) can take
    # longer, and a run of 60 s had 3 kills (every check held).
    assert figures["kills"] >= 3, figures
    assert figures["jobs_submitted"] >= 40 and figures["results"] == figures["jobs_submitted"], figures
    assert figures["run_again"] >= 1, figures  # the kills did hit running jobs
