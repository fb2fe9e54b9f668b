"""Artifacts: the files a job leaves are copied out as the service, trusting none of them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import textwrap
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024

LEAVES_TRAPS = textwrap.dedent("""
    import os
    open("metrics.json", "w").write('{"loss": 0.5}')
    os.makedirs("out/plots", exist_ok=True)
    open("out/plots/curve.png", "wb").write(b"\\x89PNG fake")
    open("big.pt", "wb").write(b"a" * (600 * 1024))
    open("bigger.pt", "wb").write(b"b" * (700 * 1024))
    os.symlink("/etc/shadow", "shadow.txt")
    os.symlink("/etc", "etc_dir")
    open("mine.txt", "w").write("mine")
    os.link("mine.txt", "linked.txt")
    os.mkfifo("pipe.csv")
    open(".hidden.json", "w").write("{}")
    open("bad\\nname.txt", "w").write("x")
    open(b"\\xff\\xfe.txt", "w").write("x")
    open("notes.md", "w").write("not a pattern")
    os.makedirs("__pycache__", exist_ok=True)
    open("__pycache__/x.txt", "w").write("x")
""")


def test_only_safe_regular_files_within_the_cap_are_kept(make_pool):
    pool = make_pool(max_artifacts_mb=1)
    result = pool.run(LEAVES_TRAPS)
    assert result.success, result.stderr
    kept = {a.name: a for a in result.artifacts}
    # Smallest first within 1 MiB: the big checkpoint fits, the bigger one does not.
    assert set(kept) == {"metrics.json", "out/plots/curve.png", "big.pt"}
    assert sum(a.size for a in result.artifacts) <= MIB
    skipped = {s["name"]: s["reason"] for s in result.artifacts_skipped}
    assert skipped == {
        "shadow.txt": "not a regular file",
        "pipe.csv": "not a regular file",
        "linked.txt": "a hard link",
        "mine.txt": "a hard link",
        "bad\\nname.txt": "unsafe name",
        "\\xff\\xfe.txt": "unsafe name",
        ".hidden.json": "unsafe name",
        "bigger.pt": f"over max_artifacts_mb ({700 * 1024} bytes)",
    }
    where = pool.pool.config.artifacts_dir / result.job_id
    assert (where / "big.pt").read_bytes() == b"a" * (600 * 1024)
    assert kept["big.pt"].sha256 == hashlib.sha256(b"a" * (600 * 1024)).hexdigest()
    assert (where / "out" / "plots" / "curve.png").read_bytes() == b"\x89PNG fake"
    assert sorted(p.name for p in where.rglob("*")) == ["big.pt", "curve.png", "metrics.json", "out", "plots"]
    assert oct(where.stat().st_mode & 0o777) == "0o700"
    assert oct(pool.pool.config.artifacts_dir.stat().st_mode & 0o777) == "0o700"


def test_a_file_owned_by_someone_else_is_not_kept(make_pool):
    # A job cannot chown, but a file it did not create (main.py is chowned to it; a
    # copy of a root file it could read is its own) must not pass as its own.
    pool = make_pool(artifacts_pattern=("*.py", "*.txt"))
    result = pool.run("import shutil\nshutil.copy('/etc/hostname', 'copied.txt')\n")
    assert {a.name for a in result.artifacts} == {"main.py", "copied.txt"}


def test_the_cap_is_exact_and_zero_keeps_nothing(make_pool):
    pool = make_pool(max_artifacts_mb=0)
    assert pool.run("open('m.json', 'w').write('{}')").artifacts == []
    capped = make_pool(max_artifacts_mb=1)
    result = capped.run(f"open('a.pt', 'wb').write(b'x' * {MIB})\nopen('b.json', 'w').write('1')\n")
    assert [a.name for a in result.artifacts] == ["b.json"]  # 1 MiB + 1 byte does not fit
    exact = capped.run(f"open('a.pt', 'wb').write(b'x' * {MIB})\n")
    assert [(a.name, a.size) for a in exact.artifacts] == [("a.pt", MIB)]


def test_a_job_that_fails_or_times_out_still_keeps_its_files(make_pool):
    pool = make_pool()
    failed = pool.run("open('partial.json', 'w').write('{}')\nraise SystemExit(3)\n")
    assert failed.return_code == 3 and [a.name for a in failed.artifacts] == ["partial.json"]
    slow = pool.run("import time\nopen('ckpt.pt', 'wb').write(b'1')\ntime.sleep(30)\n", timeout=1)
    assert slow.error_type == "timeout" and [a.name for a in slow.artifacts] == ["ckpt.pt"]


def test_artifacts_moved_to_another_machine_arrive_only_as_kept(make_pool, tmp_path):
    """pack/unpack (a cluster node's artifacts to the head): what arrives is exactly what
    the node kept; a name or bytes that do not match what it listed are dropped."""
    from warm_pool import artifacts

    pool = make_pool()
    result = pool.run(LEAVES_TRAPS)
    root = str(pool.pool.config.artifacts_dir)
    files = artifacts.pack(root, result.job_id, result.artifacts)
    assert not (pool.pool.config.artifacts_dir / result.job_id).exists()  # gone from the node
    assert sorted(n for n, _ in files) == sorted(a.name for a in result.artifacts)
    tampered = [(n, b"x" + d) if n == "metrics.json" else (n, d) for n, d in files]
    tampered += [("../escape.txt", b"x"), ("out/../../x.txt", b"x")]
    head = tmp_path / "elsewhere" / "head"
    written = artifacts.unpack(str(head), result.job_id, result.artifacts, tampered)
    assert {a.name for a in written} == {a.name for a in result.artifacts} - {"metrics.json"}
    for a in written:
        data = (head / result.job_id / a.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == a.sha256
    assert [p.name for p in head.parent.iterdir()] == ["head"]
    assert not list(head.rglob("*escape*")) and not (head / "x.txt").exists()
    assert oct((head / result.job_id / "out").stat().st_mode & 0o777) == "0o700"


# --- a job that leaves tens of thousands of directories ------------------------------------

def _open_fds(under: Path) -> int:
    """This process's open descriptors of files and directories under `under` (other
    threads' descriptors, a pool's say, are not counted)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith(f"{under}/")
        except OSError:
            pass
    return n


def _chain(top: Path, depth: int) -> None:
    """top/c/c/c/... `depth` levels (far past PATH_MAX), made relative to each level."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("c", dir_fd=fd)
            sub = os.open("c", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)


@pytest.fixture
def many_dirs(tmp_path):
    """A job dir with 45,000 sibling directories and a chain 5,000 deep, a few files in them."""
    job = tmp_path / "job"
    for i in range(45_000):
        (job / f"d{i:05}").mkdir(parents=True)
    (job / "d00007" / "kept.json").write_text("{}")
    (job / "d44999" / "last.csv").write_text("1,2\n")
    _chain(job, 5_000)
    (job / "c/c/c/c/c/deep.json").write_text("[]")      # 6 parts: within MAX_DEPTH
    (job / "c/c/c/c/c/c/too_deep.json").write_text("[]")
    yield job
    # shutil.rmtree (and so pytest's cleanup) recurses once per level: rm does not.
    subprocess.run(["rm", "-rf", str(job)], check=True)


def test_fifty_thousand_directories_are_collected_with_a_few_fds_open(many_dirs, tmp_path):
    from warm_pool import artifacts

    highest, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            highest[0] = max(highest[0], _open_fds(many_dirs.parent))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        kept, skipped = artifacts.collect(str(many_dirs), str(tmp_path / "dest"), os.geteuid(),
                                          ("*.json", "*.csv"), 10 * MIB)
    finally:
        done.set()
        watcher.join()
    assert 0 < highest[0] <= artifacts.MAX_DEPTH + 2  # one per level, not one per directory
    assert [a.name for a in kept] == ["c/c/c/c/c/deep.json", "d00007/kept.json", "d44999/last.csv"]
    assert (tmp_path / "dest" / "d44999" / "last.csv").read_text() == "1,2\n"
    assert skipped == [{"name": "c/c/c/c/c/c/", "reason": "deeper than 6 levels: not looked into"}]
    assert _open_fds(many_dirs.parent) == 0


def test_a_scan_stops_after_max_scanned_entries_and_says_so(tmp_path, monkeypatch):
    from warm_pool import artifacts

    job = tmp_path / "job"
    for i in range(30):
        (job / f"d{i:02}").mkdir(parents=True)
        (job / f"d{i:02}" / "m.json").write_text("{}")
    monkeypatch.setattr(artifacts, "MAX_SCANNED", 40)
    kept, skipped = artifacts.collect(str(job), str(tmp_path / "dest"), os.geteuid(), ("*.json",), MIB)
    # The job dir's 30 entries, then one in each of the first 10 directories.
    assert [a.name for a in kept] == [f"d{i:02}/m.json" for i in range(10)]
    assert skipped == [{"name": "d10/", "reason": "more than 40 entries: the rest were not looked at"}]


def test_a_directory_swapped_after_the_scan_is_not_followed(tmp_path, monkeypatch):
    """A kept file is opened again by walking down from the job dir; a directory replaced
    by a symlink (or another directory) between the scan and the copy is refused."""
    from warm_pool import artifacts

    job = tmp_path / "job"
    (job / "out").mkdir(parents=True)
    (job / "out" / "m.json").write_text("{}")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "m.json").write_text('{"not": "the job\'s"}')
    scan = artifacts._scan

    def scan_then_swap(*args):
        scan(*args)
        if args[1] == "":  # the whole scan is done: swap out/ for a symlink
            (job / "out").rename(job / "was_out")
            (job / "out").symlink_to(tmp_path / "elsewhere")

    monkeypatch.setattr(artifacts, "_scan", scan_then_swap)
    kept, skipped = artifacts.collect(str(job), str(tmp_path / "dest"), os.geteuid(), ("*.json",), MIB)
    assert kept == [] and skipped[0]["name"] == "out/m.json"
    assert skipped[0]["reason"].startswith("cannot open")
