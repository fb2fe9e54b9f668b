"""A Neuron profile per job, on request (issue 20 item 3), where there is no Neuron runtime,
and the rules that give a profiled job its process on neuron.

On neuron (tests/test_pool_neuron.py, with the fakes) a profiled job's process starts its
runtime with the profiler on. Here: which slot a profiled job is kept for and which spare
takes which job (warm_pool/profiling.py, pure); on cpu a profiled job runs exactly as an
unprofiled one and its result says the profile is unavailable, and why; through the real
service, the request's "profile" (validated, with the operator's default --profile-jobs)
and the result's fields, checked against openapi.yaml.
"""

from __future__ import annotations

import types
import uuid
from concurrent.futures import Future

import pytest
from service_fixtures import openapi, start_server  # noqa: F401

from executor_service import validation
from executor_service.validation import ApiError, Rules
from warm_pool import JobSpec
from warm_pool.profiling import ProfileSlots
from warm_pool.records import Job

pytestmark = pytest.mark.timeout(180)


# --- which slot a profiled job is kept for (profiling.py) -------------------------------

def _job(name: str, profile: bool = False) -> Job:
    return Job(JobSpec(code="pass", job_id=name, profile=profile), Future(), None, f"/j/{name}/main.py",
               f"/j/{name}", 60.0)


def _own(job: Job) -> bool:  # the supervisor's rule on neuron, one process per job
    return job.spec.profile


def _spare(slot: int, profile_job: str | None = None):
    return types.SimpleNamespace(slot=slot, profile_job=profile_job)


def test_a_profiled_job_next_in_line_keeps_a_free_slot_whose_spare_is_retired():
    slots, p = ProfileSlots(2), _job("p", profile=True)
    assert slots.plan([p], busy=set(), ready={0, 1}, own_process=_own) == [(0, "p")]
    assert slots.kept == {0: p} and slots.opening(0) is p
    assert slots.job_for(_spare(0), [p], _own) is None  # the spare holding the core takes nothing
    assert slots.plan([p], busy=set(), ready={1}, own_process=_own) == []  # kept once


def test_older_jobs_take_the_ready_spares_before_a_profiled_job_keeps_a_slot():
    slots = ProfileSlots(2)
    older, p, younger = _job("a"), _job("p", profile=True), _job("b")
    assert slots.plan([older, p, younger], busy=set(), ready={0, 1}, own_process=_own) == [(1, "p")]
    assert slots.job_for(_spare(0), [older, p, younger], _own) is older
    assert slots.job_for(_spare(1), [older, p, younger], _own) is None


def test_a_profiled_job_takes_a_core_no_spare_holds_when_there_is_one():
    slots = ProfileSlots(2)
    assert slots.plan([_job("p", profile=True)], busy=set(), ready={0}, own_process=_own) == [(1, "p")]


def test_without_a_free_slot_a_profiled_job_waits_in_line():
    slots, p = ProfileSlots(2), _job("p", profile=True)
    assert slots.plan([p], busy={0, 1}, ready=set(), own_process=_own) == [] and not slots.kept
    assert slots.job_for(_spare(0), [p], _own) is None  # an unprofiled spare never takes it


def test_the_spare_opened_for_a_profiled_job_takes_it_and_no_other():
    slots, older, p = ProfileSlots(1), _job("a"), _job("p", profile=True)
    slots.plan([p], busy=set(), ready=set(), own_process=_own)
    assert slots.job_for(_spare(0, "p"), [older, p], _own) is p
    assert slots.job_for(_spare(0, "p"), [older], _own) is None
    slots.started(p, 0)
    assert not slots.kept


def test_a_job_whose_runtime_does_not_start_with_the_profiler_is_let_go_after_two_processes():
    slots, p = ProfileSlots(1), _job("p", profile=True)
    slots.plan([p], busy=set(), ready=set(), own_process=_own)
    assert slots.opening(0) is p and slots.opening(0) is p
    assert slots.opening(0) is None and not slots.kept
    assert p.profile_unavailable.startswith("its Neuron runtime did not start with the profiler on (2 ")


def test_a_slot_whose_profiled_job_left_the_queue_is_given_back():
    slots, p = ProfileSlots(1), _job("p", profile=True)
    slots.plan([p], busy=set(), ready={0}, own_process=_own)
    p.ended_mono = 1.0  # cancelled while queued: its slot opens nothing for it
    assert slots.opening(0) is None
    assert slots.plan([], busy=set(), ready=set(), own_process=_own) == [(0, None)]
    assert not slots.kept


# --- the request's "profile" ------------------------------------------------------------

RULES = Rules(default_timeout=600, max_timeout=7200)


def test_profile_defaults_to_the_operators_setting_and_a_request_may_say_either_way():
    assert validation.parse_single({"code": "pass"}, "test", RULES).items[0].profile is False
    on = Rules(default_timeout=600, max_timeout=7200, profile_jobs=True)
    assert validation.parse_single({"code": "pass"}, "test", on).items[0].profile is True
    assert validation.parse_single({"code": "pass", "profile": False}, "test", on).items[0].profile is False
    assert validation.parse_single({"code": "pass", "profile": True}, "test", RULES).items[0].profile is True


def test_profile_beside_a_batch_is_the_default_of_its_items():
    body = {"profile": True, "batch": [{"paper_id": "a", "code": "pass"},
                                       {"paper_id": "b", "code": "pass", "profile": False}]}
    assert [i.profile for i in validation.parse_batch(body, RULES).items] == [True, False]


@pytest.mark.parametrize(("body", "message"), [
    ({"code": "pass", "profile": "yes"}, "profile must be true or false, not a string"),
    ({"code": "pass", "profile": 1}, "profile must be true or false, not a number"),
    ({"batch": [{"paper_id": "a", "code": "pass", "profile": None}, {"paper_id": "b", "code": "pass",
                                                                      "profile": [True]}]},
     "batch[1].profile must be true or false, not an array"),
    ({"batch": [{"paper_id": "a", "code": "pass"}], "profile": {}},
     "profile must be true or false, not an object"),
])
def test_a_profile_that_is_not_a_boolean_is_refused(body, message):
    with pytest.raises(ApiError) as info:
        validation.parse_jobs(body, "test", RULES)
    assert info.value.status == 400 and info.value.message == message


# --- without Neuron: the job runs as usual, the result says why there is no profile -------

PRINTS_AND_EXITS = ("import os, sys\n"
                    "print('trained', sorted(k for k in os.environ if k.startswith('NEURON_RT_INSPECT')))\n"
                    "with open('loss.json', 'w') as f:\n"
                    "    f.write('[1.0, 0.5]')\n"
                    "sys.exit(3)\n")


def _run(handle, code: str, profile: bool):
    spec = JobSpec(code=code, job_id=f"c-{uuid.uuid4().hex[:12]}", timeout=60, profile=profile)
    return handle.pool.submit(spec).result(timeout=90)


def test_on_cpu_a_profiled_job_runs_as_usual_and_its_profile_is_unavailable_with_why(shared_pool):
    profiled = _run(shared_pool, PRINTS_AND_EXITS, profile=True)
    plain = _run(shared_pool, PRINTS_AND_EXITS, profile=False)
    for result in (profiled, plain):
        assert (result.return_code, result.error_type, result.stdout) == (3, "exit", "trained []\n")
        assert [a.name for a in result.artifacts] == ["loss.json"]
    assert profiled.profile == "unavailable"
    assert profiled.profile_detail == ("the pool's backend is cpu: a profile is the Neuron runtime's, which "
                                       "only the neuron backend starts")
    assert profiled.to_dict()["profile"] == "unavailable"
    assert plain.profile is None and plain.to_dict()["profile_detail"] is None


def test_a_profiled_script_that_does_not_compile_never_ran_and_says_so(shared_pool):
    result = _run(shared_pool, "def broken(:\n", profile=True)
    assert result.error_type == "syntax_error"
    assert result.profile == "unavailable"
    assert result.profile_detail == "the script does not compile: it never ran"


# --- through the real service (cpu), with --profile-jobs -----------------------------------

@pytest.fixture(scope="module")
def profiling_server(tmp_path_factory):
    """A server whose jobs are profiled unless their request says otherwise."""
    srv = start_server(tmp_path_factory, "profiling", args=["--profile-jobs"])
    yield srv
    srv.close()


def test_the_service_default_profiles_a_job_and_on_cpu_says_it_is_unavailable(profiling_server, openapi):  # noqa: F811
    resp = profiling_server.post("/execute", {"paper_id": "p1", "code": PRINTS_AND_EXITS})
    assert resp.status == 200, resp.raw
    openapi.validate("POST", "/execute", resp)
    body = resp.json
    assert (body["return_code"], body["stdout"], body["artifacts"]) == (3, "trained []\n", ["loss.json"])
    assert body["profile"] == "unavailable" and "backend is cpu" in body["profile_detail"]


def test_a_request_saying_no_profile_gets_none(profiling_server, openapi):  # noqa: F811
    resp = profiling_server.post("/execute", {"paper_id": "p2", "code": "print('hi')", "profile": False})
    openapi.validate("POST", "/execute", resp)
    assert resp.json["stdout"] == "hi\n"
    assert resp.json["profile"] is None and resp.json["profile_detail"] is None


def test_a_batch_item_may_differ_from_the_batchs_profile(profiling_server, openapi):  # noqa: F811
    resp = profiling_server.post("/jobs", {"profile": False, "batch": [
        {"paper_id": "b1", "code": "print(1)", "profile": True}, {"paper_id": "b2", "code": "print(2)"}]})
    assert resp.status == 202, resp.raw
    results = profiling_server.wait_batch(resp.json["batch_id"])["results"]
    assert results["b1"]["profile"] == "unavailable" and results["b2"]["profile"] is None
    assert results["b1"]["stdout"] == "1\n" and results["b2"]["stdout"] == "2\n"


def test_a_request_for_a_profile_never_joins_a_running_job_without_one(profiling_server):
    code = "import time\ntime.sleep(2)\nprint('done')\n"
    first = profiling_server.post("/jobs", {"paper_id": "d1", "code": code, "profile": False}).json
    profiled = profiling_server.post("/jobs", {"paper_id": "d1", "code": code}).json
    plain = profiling_server.post("/jobs", {"paper_id": "d1", "code": code, "profile": False}).json
    assert not profiled["deduplicated"] and profiled["job_id"] != first["job_id"]
    assert plain["deduplicated"] and plain["job_id"] in (first["job_id"], profiled["job_id"])
    done = profiling_server.wait_batch(profiled["batch_id"])["results"]["d1"]
    assert done["profile"] == "unavailable" and done["stdout"] == "done\n"


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/execute", {"code": "print(1)", "profile": "true"}, "profile must be true or false, not a string"),
    ("/execute_batch", {"batch": [{"paper_id": "a", "code": "print(1)", "profile": 0}]},
     "batch[0].profile must be true or false, not a number"),
    ("/jobs", {"batch": [{"paper_id": "a", "code": "print(1)"}], "profile": "no"},
     "profile must be true or false, not a string"),
])
def test_the_service_refuses_a_profile_that_is_not_a_boolean(profiling_server, path, body, message):
    resp = profiling_server.post(path, body)
    assert resp.status == 400 and resp.json == {"error": message}
