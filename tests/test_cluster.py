"""Several instances on Ray, for real: a head, node processes and the service on them.

Everything runs inside a private network and PID namespace (cluster_fixtures.py): a Ray
head (`ray start --head`), nodes that are separate `ray start --block` process groups
with `--resources '{"neuron_cores": 2}'`, and the service with `--ray-address`, its pools
on the nodes with the cpu backend and job isolation uid. The job network rules for a
cluster instance are loaded there, as setup_instance.sh --role head|node installs them.
No packet leaves the namespace; when the module ends no process of it is left.

The tests share one cluster; each makes sure of the nodes it needs (killing and adding
nodes is part of what they test), so they read in any order.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest
from cluster_fixtures import ClusterNamespace, needs_cluster
from conftest import wait_until
from ray_cluster import rule_ports
from service_fixtures import openapi  # noqa: F401

pytestmark = [needs_cluster, pytest.mark.timeout(300)]

SLEEP = "import time, sys\ntime.sleep({s})\nprint(sys.argv[0].split('/')[-2][:8], 'slept', {s})\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = ClusterNamespace(tmp_path_factory.mktemp("cluster")).start(nodes=2)
    try:
        c.wait_nodes(2)
        yield c
    finally:
        c.close()  # asserts that no process of the namespace is left


def ensure_nodes(cluster: ClusterNamespace, count: int) -> list[dict]:
    """At least `count` ready nodes (adding nodes if some were killed); returns them all."""
    have = len(cluster.ready_nodes())
    for _ in range(max(0, count - have)):
        cluster.call("add_node")
    return cluster.wait_nodes(max(count, have))


def batch(n: int, seconds: float, prefix: str) -> dict:
    return {"batch": [{"paper_id": f"{prefix}{i}", "code": SLEEP.format(s=seconds)} for i in range(n)]}


def job_when(cluster: ClusterNamespace, job_id: str, condition, timeout: float = 60) -> dict:
    """GET /jobs/<id> once `condition(job)` holds."""
    def check():
        job = cluster.get(f"/jobs/{job_id}").json
        return job if condition(job) else None

    return wait_until(check, timeout=timeout, interval=0.1)


def node_names(cluster: ClusterNamespace) -> dict[str, str]:
    """Ray node id -> the agent's name of that node (for killing it)."""
    return {info["node_id"]: name for name, info in cluster.call("nodes").items()
            if info["alive"] and info["node_id"]}


# --- the same API, on every node ---------------------------------------------------------

def test_health_shows_the_cluster_and_every_node_with_its_pool(cluster, openapi):  # noqa: F811
    nodes = ensure_nodes(cluster, 2)
    public = cluster.get("/health")
    assert public.status == 200
    openapi.validate("GET", "/health", public)
    shown = public.json["cluster"]
    assert shown["engine"] == "ray" and "address" not in shown  # addresses need the token
    assert len(shown["nodes"]) == len(nodes)
    for node in shown["nodes"]:
        assert node["alive"] and node["neuron_cores"] == 2
        assert node["pool"] == {"size": 2, "idle": 2, "busy": 0, "state": "ready"}
    assert public.json["pool"]["size"] == 2 * len(nodes)  # the cluster counts as one pool

    verbose = cluster.get("/health?verbose=1")
    openapi.validate("GET", "/health", verbose)
    full = verbose.json["cluster"]
    assert full["address"] == cluster.info["address"] and full["max_attempts"] == 2
    assert len({n["address"] for n in full["nodes"]}) == len(nodes)  # 127.0.0.<n>, one each
    pools = [n["pool"] for n in full["nodes"]]
    assert all(p["isolation"] == "uid" and p["backend"] == "cpu" for p in pools)
    uid_ranges = [p["job_uids"] for p in pools]
    assert len(set(uid_ranges)) == len(uid_ranges)  # two pools on one machine: their own uids
    assert verbose.json["isolation"] == "uid"


def test_a_batch_of_eight_one_second_jobs_spreads_over_both_nodes_in_about_two_seconds(cluster):
    if len(ensure_nodes(cluster, 2)) != 2:  # the module starts with 2; this test comes before any is added
        pytest.skip("the timing is for exactly two nodes of two workers")
    answer = cluster.post("/execute_batch", batch(8, 1, "spread"))
    assert answer.status == 200, answer.json
    results = list(answer.json["results"].values())
    assert [r["success"] for r in results] == [True] * 8, results
    assert all(r["attempts"] == 1 for r in results)
    per_node = Counter(r["worker"]["node"] for r in results)
    assert len(per_node) == 2 and min(per_node.values()) >= 2, per_node
    # One node's 2 workers would take 4 s; both nodes' 4 take 2 s plus dispatch.
    assert answer.seconds < 3.0, answer.seconds


def test_execute_jobs_and_batches_answer_as_on_one_node(cluster, openapi):  # noqa: F811
    nodes = {n["node_id"] for n in ensure_nodes(cluster, 1)}
    code = "print('hi')\nprint('METRICS: {\"loss\": 0.5}')"
    one = cluster.post("/execute", {"paper_id": "p-one", "code": code})
    assert one.status == 200
    openapi.validate("POST", "/execute", one)
    result = one.json
    assert result["success"] and result["stdout"].startswith("hi\n") and result["loss"] == 0.5
    assert result["attempts"] == 1 and result["worker"]["node"] in nodes and result["worker"]["pid"] > 0

    accepted = cluster.post("/jobs", {"batch": [{"paper_id": "p-ok", "code": "print(1)"},
                                                {"paper_id": "p-exit", "code": "raise SystemExit(3)"},
                                                {"paper_id": "p-syntax", "code": "def broken(:\n"}]})
    assert accepted.status == 202
    openapi.validate("POST", "/jobs", accepted)
    done = cluster.wait_batch(accepted.json["batch_id"])
    results = done["results"]
    assert results["p-ok"]["success"] and results["p-ok"]["stdout"] == "1\n"
    assert results["p-exit"]["error_type"] == "exit" and results["p-exit"]["return_code"] == 3
    assert results["p-syntax"]["error_type"] == "syntax_error"
    job = cluster.get(f"/jobs/{accepted.json['job_ids']['p-exit']}")
    openapi.validate("GET", "/jobs/{job_id}", job)
    assert job.json["attempts"] == 1 and job.json["worker"]["node"] in nodes
    batch_answer = cluster.get(f"/batches/{accepted.json['batch_id']}")
    openapi.validate("GET", "/batches/{batch_id}", batch_answer)


def test_a_jobs_artifacts_come_back_from_its_node_to_the_head(cluster):
    ensure_nodes(cluster, 1)
    code = ("import json, os\nos.makedirs('out', exist_ok=True)\n"
            "open('out/curve.csv', 'w').write('step,loss\\n1,0.5\\n')\n"
            "json.dump({'loss': 0.5}, open('metrics.json', 'w'))\n")
    result = cluster.post("/execute", {"paper_id": "p-artifacts", "code": code}).json
    assert result["success"] and result["artifacts"] == ["metrics.json", "out/curve.csv"]
    listed = cluster.get(f"/jobs/{result['job_id']}/artifacts").json
    assert sorted(a["name"] for a in listed["artifacts"]) == ["metrics.json", "out/curve.csv"]
    csv = cluster.get(f"/jobs/{result['job_id']}/artifacts/out/curve.csv")
    assert csv.status == 200 and csv.json == "step,loss\n1,0.5\n"
    assert cluster.get(f"/jobs/{result['job_id']}/artifacts/metrics.json").json == {"loss": 0.5}


def test_a_jobs_live_output_is_read_from_its_node_while_it_runs(cluster):
    ensure_nodes(cluster, 1)
    code = "import time\nprint('epoch 1 loss 0.5', flush=True)\ntime.sleep(120)\n"
    job_id = cluster.post("/jobs", {"paper_id": "p-live", "code": code}).json["job_id"]

    def line_while_running():
        part = cluster.get(f"/jobs/{job_id}/output?stream=stdout&offset=0").json
        return part if "epoch 1" in part["text"] else None

    part = wait_until(line_while_running, timeout=60, interval=0.2)
    assert part["text"] == "epoch 1 loss 0.5\n" and not part["ended"] and part["next_offset"] == 17
    assert cluster.get(f"/jobs/{job_id}").json["status"] == "running"
    assert cluster.request("DELETE", f"/jobs/{job_id}").json["status"] == "cancelled"
    after = cluster.get(f"/jobs/{job_id}/output?stream=stdout&offset=6").json
    assert after["ended"] and after["text"] == "1 loss 0.5\n"


def test_cancelling_a_job_running_on_a_node(cluster):
    ensure_nodes(cluster, 1)
    accepted = cluster.post("/jobs", {"paper_id": "p-cancel", "code": SLEEP.format(s=120)})
    job_id = accepted.json["job_id"]
    running = job_when(cluster, job_id, lambda j: j["status"] == "running", timeout=30)
    assert running["worker"]["node"] and running["worker"]["attempt"] == 1
    started = time.monotonic()
    cancelled = cluster.request("DELETE", f"/jobs/{job_id}")
    assert cancelled.status == 200 and cancelled.json["status"] == "cancelled"
    assert cancelled.json["error_type"] == "cancelled" and time.monotonic() - started < 15


def test_status_and_metrics_count_every_nodes_workers(cluster):
    nodes = ensure_nodes(cluster, 2)
    wait_until(lambda: cluster.get("/status").json["running_executions"] == 0, timeout=30)
    status = cluster.get("/status").json
    assert status["capacity"] == 2 * len(nodes)
    metrics = cluster.get("/metrics").json
    assert f"executor_pool_size {2 * len(nodes)}.0" in metrics
    assert f'executor_cluster_nodes{{state="ready"}} {len(nodes)}.0' in metrics


# --- jobs cannot reach Ray ----------------------------------------------------------------

PROBE = r"""
import json, os, socket
out = {"ports": {}, "sockets": {}}
for address, port in %(ports)s:
    try:
        socket.create_connection((address, port), timeout=3).close()
        out["ports"][f"{address}:{port}"] = "reached"
    except OSError as exc:
        out["ports"][f"{address}:{port}"] = type(exc).__name__
for path in %(sockets)s:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        out["sockets"][path] = "reached"
    except OSError as exc:
        out["sockets"][path] = type(exc).__name__
    finally:
        s.close()
for name, path in (("listing", %(temp)r), ("parent", os.path.dirname(%(temp)r))):
    try:
        os.listdir(path)
        out[name] = "listed"
    except OSError as exc:
        out[name] = type(exc).__name__
out["ray_env"] = sorted(k for k in os.environ if k.startswith("RAY_") or k == "NEURON_RT_VISIBLE_CORES")
try:
    socket.create_connection(("127.0.0.1", %(control)d), timeout=3).close()
    out["control"] = "reached"
except OSError as exc:
    out["control"] = type(exc).__name__
print(json.dumps(out))
"""


def in_rules(port: int, rules: str) -> bool:
    for item in rules.split(", "):
        low, _, high = item.partition("-")
        if int(low) <= port <= int(high or low):
            return True
    return False


def test_every_port_ray_listens_on_is_one_the_job_rules_reject(cluster):
    ensure_nodes(cluster, 2)
    rules = rule_ports()
    listening = cluster.call("listening")
    api = cluster.info["api_port"]
    ray_ports = {entry["port"]: entry["process"] for entry in listening if entry["port"] != api}
    assert cluster.info["address"].endswith(":6379") and 6379 in ray_ports  # the GCS, on its fixed port
    outside = {port: proc for port, proc in ray_ports.items() if not in_rules(port, rules)}
    assert not outside, f"Ray listens on ports the job rules do not name: {outside}"


def test_a_job_can_reach_neither_rays_ports_nor_its_sockets(cluster):
    ensure_nodes(cluster, 2)
    api = cluster.info["api_port"]
    ports = sorted({(e["address"].removeprefix("::ffff:").replace("0.0.0.0", "127.0.0.1"), e["port"])
                    for e in cluster.call("listening") if e["port"] != api})
    control = cluster.call("listen")["port"]  # the network itself stays open to jobs
    temp = cluster.info["temp_dir"]
    sockets = [f"{temp}/session_latest/sockets/{name}" for name in ("raylet", "plasma_store", "raylet.1",
                                                                     "plasma_store.1", "raylet.2")]
    code = PROBE % {"ports": ports, "sockets": sockets, "temp": temp, "control": control}
    result = cluster.post("/execute", {"paper_id": "p-probe", "code": code}).json
    assert result["success"], result["stderr"]
    seen = json.loads(result["stdout"])
    assert seen["ports"]["127.0.0.1:6379"] == "ConnectionRefusedError"  # the GCS
    assert set(seen["ports"].values()) == {"ConnectionRefusedError"}, seen["ports"]
    assert set(seen["sockets"].values()) == {"PermissionError"}, seen["sockets"]
    assert seen["listing"] == "PermissionError" and seen["parent"] == "PermissionError"
    assert seen["ray_env"] == []  # nothing of Ray's environment reaches a job
    assert seen["control"] == "reached"


# --- nodes that come and go ----------------------------------------------------------------

def test_a_node_added_while_the_service_runs_gets_used(cluster):
    before = {n["node_id"] for n in ensure_nodes(cluster, 1)}
    cluster.call("add_node")
    after = cluster.wait_nodes(len(before) + 1)
    new = {n["node_id"] for n in after} - before
    assert len(new) == 1
    answer = cluster.post("/execute_batch", batch(2 * len(after), 1, "grown"))
    assert answer.status == 200
    used = {r["worker"]["node"] for r in answer.json["results"].values()}
    assert new <= used, (new, used)


class Watch:
    """GET /health?verbose=1 over and over (while waiting on something else): every node
    ever seen lost or dead, and the slowest answer (measured next to the service)."""

    def __init__(self, cluster: ClusterNamespace):
        self.cluster, self.slowest, self.lost = cluster, 0.0, set()

    def look(self) -> dict:
        answer = self.cluster.get("/health?verbose=1")
        self.slowest = max(self.slowest, answer.seconds)
        health = answer.json["cluster"]
        self.lost |= {n["node_id"] for n in health["nodes"] if n["state"] in ("lost", "dead")}
        return health

    def until_batch_done(self, batch_id: str, timeout: float = 90) -> dict:
        def done():
            self.look()
            answer = self.cluster.get(f"/batches/{batch_id}")
            self.slowest = max(self.slowest, answer.seconds)
            return answer.json if answer.json["status"] == "completed" else None

        return wait_until(done, timeout=timeout, interval=0.1)


def pool_of(health: dict, node_id: str) -> dict:
    return next(n["pool"] for n in health["nodes"] if n["node_id"] == node_id)


def test_a_node_killed_mid_batch_has_its_jobs_run_again_elsewhere_and_no_other_node_sees_it(cluster):
    ensure_nodes(cluster, 2)
    watch = Watch(cluster)
    accepted = cluster.post("/jobs", batch(8, 3, "killed")).json
    ids = accepted["job_ids"]

    def running_on() -> dict:
        jobs = {job_id: cluster.get(f"/jobs/{job_id}").json for job_id in ids.values()}
        return {job_id: j["worker"]["node"] for job_id, j in jobs.items()
                if j["status"] == "running" and j.get("worker")}

    on = wait_until(lambda: (lambda r: r if len(set(r.values())) >= 2 else None)(running_on()),
                    timeout=30, interval=0.1)
    victim = sorted(set(on.values()))[0]
    survivor = next(n for n in set(on.values()) if n != victim)
    health = watch.look()
    first, last = map(int, pool_of(health, victim)["job_uids"].split("-"))
    survivor_template = pool_of(health, survivor)["template_pid"]
    names = node_names(cluster)
    cluster.call("kill_node", name=names[victim])

    done = watch.until_batch_done(accepted["batch_id"])
    results = done["results"]
    assert sorted(results) == sorted(ids)  # none lost
    assert [r["job_id"] for r in results.values()] == [ids[p] for p in results]  # none duplicated
    assert all(r["status"] == "completed" and r["success"] for r in results.values()), results
    again = [r for r in results.values() if r["attempts"] == 2]
    assert len(again) >= 1 and all(r["attempts"] in (1, 2) for r in results.values())
    assert all(r["worker"]["node"] != victim for r in again)
    for paper, r in results.items():  # each ran to the end exactly once where it finished
        assert r["stdout"] == f"{ids[paper][:8]} slept 3\n"
    # The survivor never saw it: never lost, its pool the same, its jobs started once.
    assert watch.lost <= {victim}, watch.lost
    assert all(results[p]["attempts"] == 1 for p, job_id in ids.items() if on.get(job_id) == survivor)
    health = watch.look()
    assert pool_of(health, survivor)["template_pid"] == survivor_template
    assert health["jobs_on_lost_nodes"]["run_again"] >= len(again)
    assert victim not in {n["node_id"] for n in health["nodes"]}  # dropped
    assert watch.slowest < 1.0, watch.slowest  # the API never waited on the dead node
    # Nothing of the killed node's pool or its jobs lives on. Its template outlives the
    # node's process group for a moment: it sees its supervisor's channel close, then
    # kills its workers and every process of its job uids, and exits.
    def left() -> list[dict]:
        return [p for p in cluster.call("processes") if p["uid"] is not None and first <= p["uid"] <= last]

    try:
        wait_until(lambda: not left(), timeout=15, interval=0.1)
    except AssertionError:
        raise AssertionError(f"still alive 15 s after the node was killed: {left()}") from None
    metrics = cluster.get("/metrics").json
    counted = re.search(r'executor_cluster_lost_jobs_total\{outcome="run_again"\} (\d+)', metrics)
    assert counted and int(counted.group(1)) >= len(again), metrics


def test_a_node_restarted_after_a_loss_takes_queued_jobs_at_once(cluster):
    ensure_nodes(cluster, 2)
    names = node_names(cluster)
    victim = sorted(names)[0]
    cluster.call("kill_node", name=names[victim])
    wait_until(lambda: victim not in {n["node_id"] for n in cluster.health()["cluster"]["nodes"]},
               timeout=30, interval=0.2)
    cluster.call("restart_node", name=names[victim])  # the same address, a new Ray node
    nodes = cluster.wait_nodes(2)
    rejoined = {n["node_id"] for n in nodes} - set(names)
    assert len(rejoined) == 1
    slots = sum(n["pool"]["size"] for n in nodes)
    watch = Watch(cluster)
    done = watch.until_batch_done(cluster.post("/jobs", batch(2 * slots, 1, "rejoined")).json["batch_id"])
    results = done["results"].values()
    assert all(r["success"] and r["attempts"] == 1 for r in results), results
    assert rejoined <= {r["worker"]["node"] for r in results}
    # Half start at once, half as soon as the first half ends: none waits 2 s on a free slot.
    waits = sorted(r["queue_time"] for r in results)
    assert waits[slots - 1] < 2.0 and waits[-1] < 1.0 + 2.0, waits
    assert watch.slowest < 1.0, watch.slowest


def test_a_passing_fault_between_head_and_node_neither_kills_its_pool_nor_runs_its_jobs_again(cluster):
    ensure_nodes(cluster, 2)
    watch = Watch(cluster)
    accepted = cluster.post("/jobs", batch(4, 8, "cut")).json
    ids = accepted["job_ids"]
    on = wait_until(lambda: (lambda jobs: jobs if len(jobs) == 4 else None)(
        {j["job_id"]: j["worker"]["node"] for j in (cluster.get(f"/jobs/{i}").json for i in ids.values())
         if j["status"] == "running"}), timeout=30, interval=0.1)
    node = sorted(set(on.values()))[0]
    health = watch.look()
    template, before = pool_of(health, node)["template_pid"], dict(health["jobs_on_lost_nodes"])
    answered = health["nodes_answered_again"]
    cluster.call("cut_node", name=node_names(cluster)[node], seconds=4)

    results = watch.until_batch_done(accepted["batch_id"])["results"]
    # The head did notice (its calls failed: the node was lost), and the node came back.
    assert watch.look()["nodes_answered_again"] > answered
    assert all(r["success"] and r["attempts"] == 1 for r in results.values()), results
    assert {r["worker"]["node"] for r in results.values()} == set(on.values())  # each where it started
    health = wait_until(lambda: (lambda h: h if any(n["node_id"] == node and n["state"] == "ready"
                                                    for n in h["nodes"]) else None)(watch.look()), timeout=15)
    assert pool_of(health, node)["template_pid"] == template  # the same pool: never killed
    assert health["jobs_on_lost_nodes"] == before
    assert watch.slowest < 1.0, watch.slowest


def test_a_job_whose_nodes_are_lost_max_attempts_times_ends_node_lost(cluster):
    ensure_nodes(cluster, 2)
    accepted = cluster.post("/jobs", {"paper_id": "p-unlucky", "code": SLEEP.format(s=120)}).json
    job_id = accepted["job_id"]
    killed = []
    for attempt in (1, 2):
        job = job_when(cluster, job_id,
                       lambda j, n=attempt: j["status"] == "running" and j["worker"]["attempt"] == n)
        node = job["worker"]["node"]
        assert node not in killed
        cluster.call("kill_node", name=node_names(cluster)[node])
        killed.append(node)
    result = job_when(cluster, job_id, lambda j: j["status"] == "completed")
    assert result["error_type"] == "node_lost" and not result["success"]
    assert result["attempts"] == 2 and result["worker"]["node"] == killed[-1]
    assert "max_attempts" in result["error_message"]


def test_the_head_restarting_reports_running_jobs_and_runs_queued_ones(cluster):
    nodes = ensure_nodes(cluster, 1)
    capacity = 2 * len(nodes)
    long_jobs = cluster.post("/jobs", batch(capacity, 120, "head")).json["job_ids"]
    for job_id in long_jobs.values():
        job_when(cluster, job_id, lambda j: j["status"] == "running", timeout=30)
    queued = cluster.post("/jobs", {"paper_id": "p-after", "code": "print('after')"}).json["job_id"]
    assert cluster.get(f"/jobs/{queued}").json["status"] == "queued"

    def busy_workers() -> list[int]:
        return [w["pid"] for n in cluster.health()["cluster"]["nodes"] for w in n["pool"]["workers"]
                if w["current_job"] in long_jobs.values()]

    workers = wait_until(lambda: (lambda pids: pids if len(pids) == capacity else None)(busy_workers()),
                         timeout=10, interval=0.1)

    cluster.call("restart_service")  # SIGKILL of the head's service, then a new one
    for job_id in long_jobs.values():
        job = cluster.get(f"/jobs/{job_id}").json
        assert job["status"] == "interrupted" and job["error_type"] == "interrupted"
    after = job_when(cluster, queued, lambda j: j["status"] == "completed", timeout=90)
    assert after["success"] and after["stdout"] == "after\n"
    alive = {p["pid"] for p in cluster.call("processes")}
    assert not alive & set(workers)  # the old pools' workers (and their jobs) died with the head
    live = {n["node_id"][:12] for n in cluster.health()["cluster"]["nodes"]}
    left = {d.name for d in (cluster.root / "work" / "nodes").iterdir()}
    assert left == live  # the new pools removed what nodes killed earlier left behind

