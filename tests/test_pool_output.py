"""Live output: what a running job has written, read from an offset while it runs.

Each job here writes, then waits for a gate file the test creates in its dir once it has
seen the output: no sleeps, the job's progress is driven by the test.
"""

from __future__ import annotations

import os
import textwrap
import uuid

import pytest
from conftest import GATE, wait_until

from warm_pool import JobOutput, JobSpec

pytestmark = pytest.mark.timeout(120)



def _submit(pool, code: str):
    job_id = f"out-{uuid.uuid4().hex[:10]}"
    future = pool.pool.submit(JobSpec(code=GATE + textwrap.dedent(code), job_id=job_id, timeout=60))
    return job_id, future


def _open_gate(pool, job_id: str) -> None:
    with open(os.path.join(pool.pool.config.jobs_dir, job_id, "go"), "w"):
        pass


def _read_until(pool, job_id: str, stream: str, size: int, offset: int = 0) -> JobOutput:
    return wait_until(lambda: (lambda o: o if o is not None and o.size >= size else None)(
        pool.pool.output(job_id, stream, offset)), timeout=30)


def test_a_running_jobs_output_is_read_from_an_offset_while_it_runs(make_pool):
    pool = make_pool()
    job_id, future = _submit(pool, """
        print("first line", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        wait_gate()
        print("second line")
    """)
    out = _read_until(pool, job_id, "stdout", len("first line\n"))
    assert out == JobOutput("first line\n", 0, 11, 11, True)
    assert pool.pool.output(job_id, "stdout", offset=6).text == "line\n"
    assert pool.pool.output(job_id, "stdout", offset=11).text == ""
    assert _read_until(pool, job_id, "stderr", 10).text == "to stderr\n"
    _open_gate(pool, job_id)
    result = future.result(timeout=60)
    assert result.success and result.stdout == "first line\nsecond line\n"
    assert pool.pool.output(job_id, "stdout") is None  # ended: the output is in the result


def test_a_character_cut_by_the_end_of_what_was_written_waits_for_the_next_read(make_pool):
    pool = make_pool()
    job_id, future = _submit(pool, """
        sys.stdout.buffer.write(b"a\\xc3"); sys.stdout.flush()
        wait_gate()
        sys.stdout.buffer.write(b"\\xa9b")
    """)
    out = _read_until(pool, job_id, "stdout", 2)
    assert (out.text, out.next_offset, out.size) == ("a", 1, 2)
    _open_gate(pool, job_id)
    assert future.result(timeout=60).stdout == "a\u00e9b"


def test_bytes_that_are_not_utf8_are_replaced_and_a_read_is_capped_at_its_limit(make_pool):
    pool = make_pool()
    job_id, future = _submit(pool, """
        sys.stdout.buffer.write(b"\\xff\\xfe ok " + b"x" * 5000); sys.stdout.flush()
        wait_gate()
    """)
    out = _read_until(pool, job_id, "stdout", 5006, offset=0)
    assert out.text == "\ufffd\ufffd ok " + "x" * 5000
    part = pool.pool.output(job_id, "stdout", offset=100, limit=1000)
    assert (part.text, part.next_offset) == ("x" * 1000, 1100)
    _open_gate(pool, job_id)
    future.result(timeout=60)


def test_the_read_goes_through_the_supervisors_descriptor_never_the_path(make_pool):
    pool = make_pool()
    job_id, future = _submit(pool, """
        print("the job's own words", flush=True)
        wait_gate()
    """)
    _read_until(pool, job_id, "stdout", 5)
    path = os.path.join(pool.pool.config.work_dir, "capture", f"{job_id}.stdout")
    os.unlink(path)
    os.symlink("/etc/passwd", path)  # whatever is put under the name is never read
    assert pool.pool.output(job_id, "stdout").text == "the job's own words\n"
    _open_gate(pool, job_id)
    assert future.result(timeout=60).stdout == "the job's own words\n"


def test_there_is_no_live_output_for_an_unknown_job_and_bad_arguments_are_refused(make_pool):
    pool = make_pool()
    assert pool.pool.output("no-such-job", "stdout") is None
    with pytest.raises(ValueError):
        pool.pool.output("no-such-job", "stdin")
    job_id, future = _submit(pool, "print('x', flush=True)\nwait_gate()\n")
    _read_until(pool, job_id, "stdout", 2)
    with pytest.raises(ValueError):
        pool.pool.output(job_id, "stdout", offset=-1)
    _open_gate(pool, job_id)
    future.result(timeout=60)
