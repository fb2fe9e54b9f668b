"""Live output through the real server (waitress on 127.0.0.1): polling, the event stream,
its bound, the client's iterator and the CLI's --follow and logs.

Jobs that must still be running while the test looks print, then wait for a gate file
that the test creates in their dir once it has seen what it expects: a line that arrives
before the gate opens arrived while the job ran, whatever the machine's speed.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import GATE, wait_until
from service_fixtures import REPO, openapi, server, start_server  # noqa: F401

from executor_service import streaming
from executor_service.client import ExecutorClient
from executor_service.config import ConfigError, ServiceConfig

pytestmark = pytest.mark.timeout(180)



def submit(srv, code: str, paper_id: str = "p") -> str:
    resp = srv.post("/jobs", {"paper_id": paper_id, "code": GATE + textwrap.dedent(code)})
    assert resp.status == 202, resp.json
    return resp.json["job_id"]


def open_gate(srv, job_id: str) -> None:
    path = srv.work_dir / "jobs" / job_id / "go"
    wait_until(lambda: path.parent.is_dir(), timeout=30)  # queued jobs have their dir already
    path.touch()


class EventStream:
    """GET /jobs/<id>/events over a raw HTTP connection, parsed event by event."""

    def __init__(self, srv, job_id: str, headers: dict[str, str] | None = None, timeout: float = 60):
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
        hdrs = dict(headers or {})
        if srv.token:
            hdrs["Authorization"] = f"Bearer {srv.token}"
        self.conn.request("GET", f"/jobs/{job_id}/events", headers=hdrs)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}

    def next(self) -> tuple[str, dict] | None:
        """The next event (name, data), skipping the retry line; None at the end."""
        name, data, event_id = None, [], None
        while True:
            line = self.resp.readline()
            if not line:
                return None
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line.startswith("id: "):
                event_id = line[4:]
            elif not line and name:
                body = json.loads("".join(data))
                if event_id:
                    body["_id"] = event_id
                return name, body

    def until(self, wanted: str) -> list[tuple[str, dict]]:
        """Every event up to and including the first named `wanted`."""
        seen = []
        while True:
            event = self.next()
            assert event is not None, f"stream ended before {wanted}: {seen}"
            seen.append(event)
            if event[0] == wanted:
                return seen

    def until_output(self, text: str, stream: str = "stdout") -> list[tuple[str, dict]]:
        """Every event until the stream's output so far is `text` (a print may come in
        more than one write: its text, then its newline)."""
        seen = []
        while outputs(seen, stream) != text:
            assert text.startswith(outputs(seen, stream)), seen
            seen.extend(self.until("output"))
        return seen

    def close(self) -> None:
        """Hang up (the response holds the socket too: both are closed)."""
        self.resp.close()
        self.conn.close()


def outputs(events, stream: str = "stdout") -> str:
    return "".join(d["text"] for name, d in events if name == "output" and d["stream"] == stream)


# --- the event stream ---------------------------------------------------------------


def test_a_flushed_line_reaches_the_event_stream_while_the_job_runs(server):  # noqa: F811
    submitted = time.monotonic()
    job_id = submit(server, """
        print("epoch 1 loss 0.5", flush=True)
        wait_gate()
        print("done")
    """)
    events = EventStream(server, job_id)
    assert events.status == 200
    assert events.headers["content-type"].startswith("text/event-stream")
    assert events.headers["x-accel-buffering"] == "no"
    assert events.headers["cache-control"].startswith("no-cache")
    events.until_output("epoch 1 loss 0.5\n")
    latency = time.monotonic() - submitted
    assert server.get(f"/jobs/{job_id}").json["status"] == "running"  # the gate is still closed
    assert latency < 5, f"first line after {latency:.2f} s"  # a generous bound: benchmarks time it
    open_gate(server, job_id)
    rest = events.until("result")
    assert outputs(rest) == "done\n"
    assert [n for n, _ in rest[-2:]] == ["status", "result"] and rest[-2][1]["status"] == "completed"
    result = rest[-1][1]
    assert result["success"] and result["stdout"] == "epoch 1 loss 0.5\ndone\n"
    assert events.next() is None  # the stream closes after the result
    events.close()


def test_a_finished_job_replays_its_output_then_its_result(server):  # noqa: F811
    code = "import sys\nprint('one')\nprint('warn', file=sys.stderr)\nprint('two \\u00e9')\nsys.exit(3)\n"
    job_id = server.post("/execute", {"code": code}).json["job_id"]
    events = EventStream(server, job_id)
    seen = events.until("result")
    assert outputs(seen) == "one\ntwo \u00e9\n" and outputs(seen, "stderr") == "warn\n"
    assert seen[-1][1]["return_code"] == 3 and seen[-1][1]["error_type"] == "exit"
    assert events.next() is None
    events.close()
    # Resuming after the first output event's offsets (all of stdout) sends only the rest.
    first_id = next(d["_id"] for n, d in seen if n == "output")
    assert first_id == "11:0"  # 'one\ntwo é\n' in bytes: é takes two
    resumed = EventStream(server, job_id, headers={"Last-Event-ID": first_id})
    again = resumed.until("result")
    resumed.close()
    assert outputs(again) == "" and outputs(again, "stderr") == "warn\n"


def test_a_queued_jobs_stream_waits_for_it_to_start(server):  # noqa: F811
    blockers = [submit(server, "wait_gate()\n", f"block{i}") for i in range(2)]
    wait_until(lambda: all(server.get(f"/jobs/{j}").json["status"] == "running" for j in blockers), 30)
    job_id = submit(server, "print('my turn', flush=True)\nwait_gate()\n", "waiting")
    events = EventStream(server, job_id)
    assert events.next() == ("status", {"job_id": job_id, "status": "queued"})
    for blocker in blockers:
        open_gate(server, blocker)
    seen = events.until_output("my turn\n")
    assert ("status", {"job_id": job_id, "status": "running"}) in seen
    open_gate(server, job_id)
    assert events.until("result")[-1][1]["success"]
    events.close()


def test_an_unknown_jobs_stream_is_404(server, openapi):  # noqa: F811
    resp = server.get("/jobs/nope/events")
    assert resp.status == 404
    openapi.validate("GET", "/jobs/{job_id}/events", resp)


# --- polling ------------------------------------------------------------------------


def test_polling_from_next_offset_gives_the_whole_output_across_the_jobs_end(server, openapi):  # noqa: F811
    job_id = submit(server, """
        print("before \\u00e9", flush=True)
        wait_gate()
        print("after")
    """)
    text, offset = "", 0
    while not text.endswith("\n"):
        resp = server.get(f"/jobs/{job_id}/output?stream=stdout&offset={offset}")
        openapi.validate("GET", "/jobs/{job_id}/output", resp)
        assert not resp.json["ended"]
        text, offset = text + resp.json["text"], resp.json["next_offset"]
    assert (text, offset) == ("before \u00e9\n", len("before \u00e9\n".encode()))
    open_gate(server, job_id)
    while True:
        body = server.get(f"/jobs/{job_id}/output?offset={offset}").json
        text, offset = text + body["text"], body["next_offset"]
        if body["ended"] and body["next_offset"] == body["offset"]:
            break
    assert text == "before \u00e9\nafter\n" and body["status"] == "completed"


@pytest.mark.parametrize("query", ["stream=stdin", "offset=-1", "offset=x", "limit=0", "limit=99999999999"])
def test_bad_output_queries_are_400(server, openapi, query):  # noqa: F811
    job_id = server.post("/execute", {"code": "print(1)"}).json["job_id"]
    resp = server.get(f"/jobs/{job_id}/output?{query}")
    assert resp.status == 400, resp.json
    openapi.validate("GET", "/jobs/{job_id}/output", resp)


def test_a_truncated_result_continues_with_the_mark_and_the_tail():
    cut = 1000
    head, tail = "h" * 50, "t" * 50
    result = {"stdout": head + f"\n... [{cut} bytes truncated] ...\n" + tail, "stdout_truncated_bytes": cut}
    assert streaming.stored(result, "stdout", 40, 5) == ("h" * 5, 45)
    text, nxt = streaming.stored(result, "stdout", 45, 100)
    assert (text, nxt) == ("h" * 5, 50 + cut)  # the head's end: next comes the mark
    text, nxt = streaming.stored(result, "stdout", 60, 100)
    assert text == f"\n... [{cut} bytes truncated] ...\n" and nxt == 50 + cut
    assert streaming.stored(result, "stdout", 50 + cut + 10, 100) == ("t" * 40, 50 + cut + 50)
    assert streaming.stored(result, "stdout", 50 + cut + 50, 100) == ("", 50 + cut + 50)


def test_a_character_cut_by_a_read_of_a_stored_result_waits_for_the_next():
    result = {"stdout": "a\u00e9b", "stdout_truncated_bytes": 0}
    assert streaming.stored(result, "stdout", 0, 2) == ("a", 1)
    assert streaming.stored(result, "stdout", 1, 2) == ("\u00e9", 3)


# --- the bound: streams never take the threads /execute needs --------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Four HTTP threads, at most two event streams, heartbeats every 0.3 s."""
    srv = start_server(tmp_path_factory, "small", args=["--threads", "4", "--max-streams", "2",
                                                        "--stream-heartbeat", "0.3"])
    yield srv
    srv.close()


def test_beyond_max_streams_a_stream_is_refused_and_execute_still_answers(small, openapi):  # noqa: F811
    job_id = submit(small, "print('x', flush=True)\nwait_gate()\n")
    streams = [EventStream(small, job_id) for _ in range(2)]
    for s in streams:
        assert s.status == 200
        s.until_output("x\n")
    refused = small.get(f"/jobs/{job_id}/events")
    assert refused.status == 503 and int(refused.headers["retry-after"]) > 0
    assert "max_streams" in refused.json["error"]
    openapi.validate("GET", "/jobs/{job_id}/events", refused)
    # Both streams still open: the other threads serve a synchronous job and the rest.
    executed = small.post("/execute", {"code": "print('served')"}, timeout=60)
    assert executed.status == 200 and executed.json["stdout"] == "served\n"
    assert small.get(f"/jobs/{job_id}/output").json["text"] == "x\n"
    # A stream whose client hung up gives its place back.
    streams[0].close()
    wait_until(lambda: (lambda s: (s.close(), s.status == 200)[1])(EventStream(small, job_id)), timeout=30,
               interval=0.2)
    open_gate(small, job_id)
    assert streams[1].until("result")[-1][1]["success"]
    streams[1].close()


def test_a_quiet_stream_sends_heartbeats(small):
    job_id = submit(small, "print('start', flush=True)\nwait_gate()\n")
    events = EventStream(small, job_id)
    events.until_output("start\n")
    assert events.next() == ("heartbeat", {"status": "running"})
    open_gate(small, job_id)
    events.until("result")
    events.close()


def test_max_streams_above_half_the_threads_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="max_streams"):
        ServiceConfig(threads=8, max_streams=5).validate()
    assert ServiceConfig(threads=8, max_streams=4).validate().stream_limit == 4
    assert ServiceConfig(threads=32).stream_limit == 8


# --- the client and the CLI ---------------------------------------------------------


def test_the_clients_event_iterator_follows_a_job_to_its_result(server):  # noqa: F811
    job_id = submit(server, "print('a', flush=True)\nwait_gate()\nprint('b')\n")
    client = ExecutorClient(server.url)
    events = client.events(job_id)
    assert _client_output(events, "a\n")[0] == {"event": "status", "data": {"job_id": job_id,
                                                                              "status": "running"}}
    open_gate(server, job_id)
    rest = list(events)
    assert rest[-1]["event"] == "result" and rest[-1]["data"]["stdout"] == "a\nb\n"


def _client_output(events, text: str) -> list[dict]:
    """Client events until the stdout so far is `text`."""
    seen, got = [], ""
    while got != text:
        assert text.startswith(got), seen
        seen.append(next(events))
        if seen[-1]["event"] == "output" and seen[-1]["data"]["stream"] == "stdout":
            got += seen[-1]["data"]["text"]
    return seen


def test_the_client_polls_when_no_stream_is_free(small):
    job_id = submit(small, "print('polled', flush=True)\nwait_gate()\nprint('end')\n")
    held = [EventStream(small, job_id) for _ in range(2)]
    client = ExecutorClient(small.url)
    events = client.events(job_id, poll_interval=0.05)
    _client_output(events, "polled\n")
    open_gate(small, job_id)
    rest = list(events)
    assert rest[-1]["event"] == "result" and rest[-1]["data"]["stdout"] == "polled\nend\n"
    assert "".join(e["data"]["text"] for e in rest if e["event"] == "output") == "end\n"
    for s in held:
        s.close()


def _cli(srv, *args: str, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen([sys.executable, "-m", "executor_service", *args, "--url", srv.url], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _rest(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    """The rest of a CLI's stdout, and its stderr, once it exits: read through the same
    buffered readers as the readline() calls before. communicate() reads the raw pipes
    and would lose what a reader already holds (a line that came in the same chunk as the
    one readline() returned)."""
    out, err = proc.stdout.read(), proc.stderr.read()  # small: neither pipe fills up
    proc.wait(timeout=timeout)
    return out, err


def test_submit_follow_prints_each_jobs_output_as_it_comes_then_the_results(server, tmp_path):  # noqa: F811
    a, b = tmp_path / "alpha.py", tmp_path / "beta.py"
    a.write_text(GATE + "print('alpha 1', flush=True)\nwait_gate()\nprint('alpha 2')\n")
    b.write_text("import sys\nprint('beta out')\nprint('beta err', file=sys.stderr)\n")
    proc = _cli(server, "submit", "--follow", str(a), str(b))
    lines = []
    while "[alpha] alpha 1\n" not in lines:  # printed while alpha waits at its gate
        lines.append(proc.stdout.readline())
        assert lines[-1], proc.communicate()
    job_id = server.get("/jobs?paper_id=alpha&limit=1").json["jobs"][0]["job_id"]
    open_gate(server, job_id)
    out, err = _rest(proc)
    out = "".join(lines) + out
    assert proc.returncode == 0, err
    results = json.loads(out[out.index("{"):])
    printed = out[:out.index("{")]
    assert "[alpha] alpha 2\n" in printed and "[beta] beta out\n" in printed, (
        printed, err, results["results"])
    assert "[beta] beta err\n" in err, (err, results["results"]["beta"])
    assert out.index("[alpha] alpha 1") < out.index("[alpha] alpha 2") < out.index("{")
    assert results["successful"] == 2 and results["results"]["alpha"]["stdout"] == "alpha 1\nalpha 2\n"


def test_logs_prints_the_output_so_far_and_follows_with_f(server):  # noqa: F811
    job_id = submit(server, "print('so far', flush=True)\nprint('e', file=sys.stderr, flush=True)\n"
                            "wait_gate()\nprint('later')\n")
    wait_until(lambda: server.get(f"/jobs/{job_id}/output").json["text"], timeout=30)
    now = _cli(server, "logs", job_id)
    out, err = now.communicate(timeout=60)
    assert (now.returncode, out, err) == (0, "so far\n", "e\n")
    follow = _cli(server, "logs", "-f", job_id)
    assert follow.stdout.readline() == "so far\n"
    open_gate(server, job_id)
    out, err = _rest(follow)
    assert follow.returncode == 0 and out == "later\n" and err == "e\n"


def test_follow_prints_from_the_result_what_a_lost_stream_missed(server, capsys):  # noqa: F811
    """A job's event stream that breaks after its first line: `--follow` still prints the
    whole output, the rest taken from the job's result, and says the stream was lost."""
    from executor_service import follow
    from executor_service.client import ExecutorError

    class BreaksAfterOneOutput(ExecutorClient):
        def events(self, job_id, poll_interval=0.5):
            for event in super().events(job_id, poll_interval):
                yield event
                if event["event"] == "output":
                    raise ExecutorError(None, "connection reset")

    job_id = submit(server, "print('one', flush=True)\nwait_gate()\nprint('two')\nprint('three')\n",
                    paper_id="lossy")
    client = BreaksAfterOneOutput(server.url)
    wait_until(lambda: server.get(f"/jobs/{job_id}/output").json["text"] == "one\n")
    open_gate(server, job_id)
    results = follow.follow_jobs(client, {"lossy": job_id}, prefix=False)
    out, err = capsys.readouterr()
    assert out == "one\ntwo\nthree\n" and "lost the event stream" in err
    assert results["lossy"]["stdout"] == "one\ntwo\nthree\n"
