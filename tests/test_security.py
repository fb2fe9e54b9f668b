"""Each attack a job script could make, run for real through the real service, contained.

The service runs as root here, like the suite (and CI); jobs run under their slot's own
uid. Every test submits an attacking script over HTTP and checks that it could spoil
nothing but its own result: the service, its token, its store, other jobs and later
jobs are out of its reach.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time

import psutil
import pytest
from conftest import job_uid_base, reachable_by_jobs, wait_until
from service_fixtures import Server

pytestmark = pytest.mark.timeout(180)

TOKEN = "job-must-never-see-this-7f3a"
OUTPUT_LIMIT_MB = 20
MAX_DISK_MB = 100
# A job's memory is its cgroup's: its own pages (not those it shares with the template),
# with every process it starts, tmpfs and shm included; the kernel enforces the limit.
MAX_MEMORY_MB = 2000


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    base = reachable_by_jobs(tmp_path_factory.mktemp("sec"))
    token_file = base / "api-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    srv = Server(reachable_by_jobs(base / "work"), token=TOKEN,
                 env={"EXECUTOR_API_TOKEN_FILE": str(token_file)},
                 args=["--max-memory-mb", str(MAX_MEMORY_MB), "--output-limit-mb", str(OUTPUT_LIMIT_MB),
                       "--max-disk-mb", str(MAX_DISK_MB), "--max-job-files", "2000"])
    srv.start()
    srv.token_file = token_file
    yield srv
    srv.close()


# A job's way to try something and say how it went: `attempt(name, f)` records "done" or
# the OSError's type in `out`, which the job prints as JSON at its end.
ATTEMPT = ("out = {}\n"
           "def attempt(name, f):\n"
           "    try:\n"
           "        f()\n"
           "        out[name] = 'done'\n"
           "    except OSError as exc:\n"
           "        out[name] = type(exc).__name__\n")


def run(srv: Server, code: str, timeout: float = 60) -> dict:
    code = textwrap.dedent(code).replace("{ATTEMPT}", ATTEMPT)
    resp = srv.post("/execute", {"code": code, "timeout": timeout}, timeout=timeout + 60)
    assert resp.status == 200, resp.raw[:500]
    return resp.json


def report(result: dict) -> dict:
    """The JSON the attacking script printed as its last line."""
    return json.loads(result["stdout"].strip().splitlines()[-1])


def job_uids(srv: Server) -> set[int]:
    return set(range(srv.uid_base, srv.uid_base + 2 * 3))  # 2 slots of 3 seats (spares 2)


def processes_of(uids: set[int]) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["uids", "status"]):
        if p.info["uids"] and p.info["uids"].real in uids and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def healthy(srv: Server) -> bool:
    """The service answers and soon has a worker ready again (a replaced one restarts)."""
    return bool(wait_until(lambda: srv.get("/health", token=None).json["status"] == "healthy"))


# --- 1. nothing a worker sends can execute in the service ------------------------------

def test_a_pickle_written_to_the_workers_socket_never_runs_in_the_service(service, tmp_path):
    marker = tmp_path / "pwned"
    result = run(service, f"""
        import os, pickle, socket, stat, struct, json, time
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))
        payload = pickle.dumps(Evil())
        sockets = []
        for fd in range(3, 256):
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    sockets.append(fd)
            except OSError:
                pass
        print(json.dumps({{"sockets": sockets}}), flush=True)
        for fd in sockets:
            socket.socket(fileno=os.dup(fd)).sendall(struct.pack("!i", len(payload)) + payload)
        time.sleep(30)
    """)
    assert report(result)["sockets"], "the attack found no socket to write to"
    assert result["error_type"] == "protocol_error"
    assert "protocol" in result["error_message"]
    time.sleep(1)
    assert not marker.exists()
    assert healthy(service)
    assert run(service, "print('next')")["stdout"] == "next\n"


def test_a_message_about_another_job_kills_the_sender(service):
    result = run(service, """
        import os, socket, stat, struct, json, time
        msg = json.dumps({"v": 1, "type": "job_done", "job_id": "someone-else", "return_code": 0,
                          "error_type": None, "error_message": None,
                          "peak_rss_bytes": 0}).encode()
        for fd in range(3, 256):
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    socket.socket(fileno=os.dup(fd)).sendall(struct.pack("!i", len(msg)) + msg)
            except OSError:
                pass
        time.sleep(30)
    """)
    assert result["error_type"] == "protocol_error"
    assert result["execution_time"] < 20


def test_an_oversized_frame_kills_the_sender_before_it_is_read(service):
    result = run(service, """
        import os, socket, stat, struct, time
        for fd in range(3, 256):
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    socket.socket(fileno=os.dup(fd)).sendall(struct.pack("!i", 1 << 30) + b"x" * 4096)
            except OSError:
                pass
        time.sleep(30)
    """)
    assert result["error_type"] == "protocol_error"
    assert healthy(service)


# --- 2. jobs run as unprivileged uids: the service, its token and other jobs are out of reach

def test_a_job_runs_under_its_slots_uid_without_any_privilege(service):
    result = run(service, """
        import os, json
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                          "groups": os.getgroups(), "cap_eff": status["CapEff"].strip(),
                          "cap_prm": status["CapPrm"].strip(), "cap_bnd": status["CapBnd"].strip(),
                          "no_new_privs": status["NoNewPrivs"].strip()}))
    """)
    r = report(result)
    assert r["uid"] == r["euid"] == r["gid"] and r["uid"] in job_uids(service)
    assert r["groups"] == []
    assert int(r["cap_eff"], 16) == int(r["cap_prm"], 16) == int(r["cap_bnd"], 16) == 0
    assert r["no_new_privs"] == "1"
    health = service.get("/health?verbose=1").json
    assert health["isolation"] == "uid"


def test_a_job_cannot_reach_the_service_its_token_or_its_store(service):
    svc = service.proc.pid
    result = run(service, f"""
        import os, json, signal
        {{ATTEMPT}}
        attempt("service environ", lambda: open("/proc/{svc}/environ", "rb").read())
        attempt("service memory", lambda: open("/proc/{svc}/mem", "rb").read(1))
        attempt("service cmdline fds", lambda: os.listdir("/proc/{svc}/fd"))
        attempt("token file", lambda: open("{service.token_file}").read())
        attempt("job store", lambda: open("{service.work_dir}/jobs.sqlite3", "rb").read(16))
        attempt("job store for writing", lambda: open("{service.work_dir}/jobs.sqlite3", "r+b"))
        attempt("list the jobs", lambda: os.listdir("{service.work_dir}/jobs"))
        attempt("write in the work dir", lambda: open("{service.work_dir}/planted", "w"))
        attempt("stop the service", lambda: os.kill({svc}, signal.SIGSTOP))
        attempt("kill the service", lambda: os.kill({svc}, signal.SIGKILL))
        attempt("stop the template", lambda: os.kill(os.getppid(), signal.SIGSTOP))
        print(json.dumps(out))
    """)
    r = report(result)
    assert all(v in ("PermissionError", "ProcessLookupError") for v in r.values()), r
    assert TOKEN not in result["stdout"] + result["stderr"]
    assert healthy(service)


def test_a_job_cannot_read_or_change_another_running_job(service):
    code = "import time\nprint('secret-output', flush=True)\ntime.sleep(8)\nprint('done')"
    victim = service.post("/jobs", {"paper_id": "victim", "code": code}).json
    victim_id = victim["job_ids"]["victim"]
    wait_until(lambda: service.get(f"/jobs/{victim_id}").json["status"] == "running", timeout=30)
    work = service.work_dir
    result = run(service, f"""
        import os, json
        {{ATTEMPT}}
        attempt("read its code", lambda: open("{work}/jobs/{victim_id}/main.py").read())
        attempt("change its code", lambda: open("{work}/jobs/{victim_id}/main.py", "a").write("x"))
        attempt("read its output", lambda: open("{work}/capture/{victim_id}.stdout").read())
        attempt("list its dir", lambda: os.listdir("{work}/jobs/{victim_id}"))
        attempt("plant a file there", lambda: open("{work}/jobs/{victim_id}/evil.py", "w"))
        for p in os.listdir("/proc"):
            if p.isdigit() and p != str(os.getpid()):
                try:
                    if "secret" in open(f"/proc/{{p}}/cmdline").read():
                        pass
                    os.kill(int(p), 0)
                    out.setdefault("signalable", []).append(int(p))
                except OSError:
                    pass
        out["uid"] = os.getuid()
        print(json.dumps(out))
    """)
    r = report(result)
    signalable = r.pop("signalable", [])
    own_uid = r.pop("uid")
    assert all(v == "PermissionError" for v in r.values()), r
    assert all(psutil.Process(p).uids().real == own_uid for p in signalable if psutil.pid_exists(p)), \
        "the job could signal processes that are not its own"
    done = service.wait_batch(victim["batch_id"], timeout=60)["results"]["victim"]
    assert done["stdout"] == "secret-output\ndone\n" and done["success"]


# --- 3. everything a job starts ends with it ------------------------------------------

def test_a_daemon_a_job_leaves_is_killed_when_the_job_ends(service):
    result = run(service, """
        import os, time, json
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                while True:
                    time.sleep(1)
            os._exit(0)
        print(json.dumps({"daemon": int(os.read(r, 20))}))
    """)
    assert result["success"], (result["error_type"], result["error_message"])
    daemon = report(result)["daemon"]
    wait_until(lambda: not psutil.pid_exists(daemon) or psutil.Process(daemon).status() == "zombie")
    wait_until(lambda: all(p.pid in _worker_pids(service) for p in processes_of(job_uids(service))))


def test_memory_held_by_a_daemon_counts_against_the_limit(service):
    result = run(service, f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                hoard = bytearray({MAX_MEMORY_MB // 2 + 200} * 1024 * 1024)
                hoard[::4096] = b"x" * len(hoard[::4096])
                time.sleep(60)
            os._exit(0)
        mine = bytearray({MAX_MEMORY_MB // 2 + 200} * 1024 * 1024)
        mine[::4096] = b"x" * len(mine[::4096])
        time.sleep(60)
    """)
    assert result["error_type"] == "memory_limit"
    # The job's cgroup held both processes' pages: what the kernel stopped it at.
    assert result["peak_memory_own_mb"] >= MAX_MEMORY_MB * 0.95
    wait_until(lambda: all(p.pid in _worker_pids(service) for p in processes_of(job_uids(service))))


def test_a_job_whose_daemon_the_oom_killer_ended_stops_as_memory_limit(service):
    """The kernel enforces the limit on the job's group by killing one of its processes:
    here the daemon, the only one over it. The job itself would sleep on; it ends at once
    as memory_limit instead (the monitor reads the group's OOM kills), never a timeout."""
    result = run(service, f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                hoard = bytearray({MAX_MEMORY_MB + 500} * 1024 * 1024)
                hoard[::4096] = b"x" * len(hoard[::4096])
                time.sleep(60)
            os._exit(0)
        time.sleep(60)
    """, timeout=30)
    assert result["error_type"] == "memory_limit", (result["error_type"], result["error_message"])
    assert "OOM killer" in result["error_message"]
    assert result["execution_time"] < 20
    wait_until(lambda: all(p.pid in _worker_pids(service) for p in processes_of(job_uids(service))))


def _worker_pids(srv: Server) -> set[int]:
    """The pool's spares and the task each keeps sharing its memory (worker._hold_address_space)."""
    pids = {w["pid"] for w in srv.get("/health?verbose=1").json["pool"]["workers"] if w["pid"]}
    for pid in list(pids):
        try:
            pids.update(child.pid for child in psutil.Process(pid).children())
        except psutil.NoSuchProcess:
            pass
    return pids


# --- 4. disk is bounded ---------------------------------------------------------------

def test_a_job_flooding_stdout_is_stopped_at_the_output_limit(service):
    result = run(service, """
        import sys
        chunk = b"x" * (1 << 20)
        for _ in range(4096):  # 4 GiB
            sys.stdout.buffer.write(chunk)
    """)
    assert result["error_type"] == "output_limit"
    assert "stdout" in result["error_message"]
    kept = len(result["stdout"].encode()) + result["stdout_truncated_bytes"]
    assert kept <= OUTPUT_LIMIT_MB * 1024 * 1024 + 200  # the truncation mark
    assert _dir_bytes(service.work_dir / "capture") < 1024 * 1024


def test_a_job_writing_a_huge_file_is_stopped_at_the_disk_limit(service):
    result = run(service, """
        chunk = b"x" * (1 << 20)
        with open("big.bin", "wb") as f:
            for _ in range(4096):  # 4 GiB
                f.write(chunk)
    """)
    assert result["error_type"] == "disk_limit", result["stderr"][-500:]
    # The job's dir is removed right after its result is handed over (the caller does not
    # wait for the removal of what the job wrote).
    wait_until(lambda: _dir_bytes(service.work_dir / "jobs") < 1024 * 1024)


def test_a_job_writing_many_files_is_stopped_at_the_disk_limit(service):
    result = run(service, """
        import time
        chunk = b"x" * (1 << 20)
        for i in range(4096):
            with open(f"part-{i}.bin", "wb") as f:
                f.write(chunk)
        time.sleep(5)
    """)
    assert result["error_type"] == "disk_limit"


def test_a_job_cannot_write_outside_its_own_dirs(service):
    result = run(service, """
        import json, os, tempfile
        out = {}
        for path in ("/tmp/planted", "/var/tmp/planted", os.path.expanduser("~/../planted")):
            try:
                open(path, "w").write("x")
                out[path] = "written"
            except OSError as exc:
                out[path] = type(exc).__name__
        with tempfile.NamedTemporaryFile() as f:
            out["tempfile"] = os.path.dirname(f.name)
        open("allowed.txt", "w").write("ok")
        print(json.dumps(out))
    """)
    r = report(result)
    # /tmp is the job's own (a tmpfs in its mount namespace, gone with it): written there,
    # never on the machine's.
    assert r.pop("tempfile") == "/tmp" and r.pop("/tmp/planted") == "written"
    assert set(r.values()) == {"PermissionError"}, r
    assert not os.path.exists("/tmp/planted") and not os.path.exists("/var/tmp/planted")


def _dir_bytes(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


# --- 5. only what the job needs is open in it -----------------------------------------

def test_only_std_streams_and_the_workers_channel_are_open_in_a_job(service):
    result = run(service, """
        import os, json
        fds = {}
        for fd in sorted(int(f) for f in os.listdir("/proc/self/fd")):
            try:
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        print(json.dumps(fds))
    """)
    fds = {int(k): v for k, v in report(result).items()}
    assert fds[0] == "/dev/null" and fds[1].startswith("pipe:") and fds[2].startswith("pipe:")
    others = {fd: target for fd, target in fds.items() if fd > 2}
    sockets = [t for t in others.values() if t.startswith("socket:")]
    assert len(sockets) == 1, others  # the worker's channel; the rest is listdir's own fd
    assert len(others) <= 2, others


def test_a_job_that_closes_every_fd_gets_its_true_result_not_the_workers_traceback(service):
    result = run(service, """
        import os
        print("before", flush=True)
        os.closerange(3, 65536)
    """)
    # Its end is its process's exit status, whatever it did to its channel.
    assert result["success"] and result["return_code"] == 0, (result["error_type"], result["stderr"])
    assert "warm_pool" not in result["stderr"] and "Traceback" not in result["stderr"]
    assert result["stdout"] == "before\n"
    assert healthy(service)


# --- 6. no interpreter change reaches a later job --------------------------------------

@pytest.fixture(scope="module", params=["process_per_job", "reuse"])
def one_slot(request, tmp_path_factory):
    reuse = ["--reuse-workers"] if request.param == "reuse" else []
    srv = Server(reachable_by_jobs(tmp_path_factory.mktemp("sec1") / "work"),
                 args=["--pool-size", "1", *reuse])
    srv.start()
    srv.reuse = bool(reuse)
    yield srv
    srv.close()


LINEAR_PROBE = ("import torch\nl = torch.nn.Linear(1, 1, bias=False)\ntorch.nn.init.ones_(l.weight)\n"
                "print(l(torch.ones(1)).tolist())")
PATCHES = {
    "tensor_add": ("import torch\ntorch.Tensor.__add__ = lambda a, b: torch.zeros_like(a)",
                   "import torch\nprint((torch.ones(2) + torch.ones(2)).tolist())", "[2.0, 2.0]"),
    "linear_forward": ("import torch\ntorch.nn.Linear.forward = lambda self, x: x * 0 + 7",
                       LINEAR_PROBE, "[1.0]"),
    "global_forward_hook": ("import torch\ntorch.nn.modules.module.register_module_forward_hook("
                            "lambda m, i, o: o * 0 - 99)", LINEAR_PROBE, "[1.0]"),
    "torch_library": ("import torch\nlib = torch.library.Library('aten', 'IMPL')\n"
                      "lib.impl('add.Tensor', lambda a, b, alpha=1: a - b, 'CPU')\n"
                      "import builtins\nbuiltins.__dict__.setdefault('keep', lib)\n"
                      "torch.nn.keep_library_alive = lib",
                      "import torch\nprint(torch.add(torch.ones(2), torch.ones(2)).tolist())", "[2.0, 2.0]"),
    "meta_path": ("import sys\nclass Hijack:\n    def find_spec(self, name, *a):\n"
                  "        raise ImportError('hijacked ' + name)\nsys.meta_path.insert(0, Hijack())",
                  "import csv, fractions\nprint('imports work')", "imports work"),
    "settrace": ("import sys\nsys.settrace(lambda *a: None)", "import sys\nprint(sys.gettrace())", "None"),
    "print_options": ("import torch\ntorch.set_printoptions(precision=1)",
                      "import torch\nprint(torch.tensor([1.23456]))", "tensor([1.2346])"),
}


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_a_patched_interpreter_never_reaches_the_next_job(one_slot, name):
    patch, probe, expected = PATCHES[name]
    run(one_slot, patch)
    after = run(one_slot, probe)
    assert after["stdout"].strip() == expected, after["stderr"][-500:]


def test_a_patch_replaces_the_worker_and_health_says_why(one_slot):
    if not one_slot.reuse:
        pytest.skip("one process per job: every job's process is replaced, patched or not")
    first = run(one_slot, "import torch\ntorch.Tensor.__mul__ = lambda a, b: a")
    wait_until(lambda: any(first["worker"]["pid"] != w["pid"] for w in
                           one_slot.get("/health?verbose=1").json["pool"]["workers"]))
    recent = one_slot.get("/health?verbose=1").json["pool"]["respawns"]["recent"]
    assert any("Tensor patched: __mul__" in d for r in recent for d in r["detail"])


# --- the service as the unit runs it: its own user, six capabilities -------------------

UNIT_CAPS = "+setuid,+setgid,+kill,+chown,+dac_override,+fowner,+sys_admin"


def test_a_service_running_as_its_own_user_with_the_units_capabilities_confines_jobs(tmp_path):
    """As systemd starts it: not root, only AmbientCapabilities. Run inside a PID namespace
    of its own, so that even a mistake (a kill(-1) holding CAP_KILL) reaches nothing else."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip("cannot create a PID namespace here")
    service_uid = job_uid_base()
    work = reachable_by_jobs(tmp_path / "work")
    os.chown(work, service_uid, service_uid)
    srv = Server(work)
    srv.command_prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM",
                          "setpriv", f"--reuid={service_uid}", f"--regid={service_uid}", "--clear-groups",
                          f"--inh-caps={UNIT_CAPS}", f"--ambient-caps={UNIT_CAPS}",
                          f"--bounding-set=-all,{UNIT_CAPS}"]
    srv.start()
    try:
        health = srv.get("/health?verbose=1").json
        assert health["isolation"] == "uid"
        result = run(srv, """
            import os, json, signal
            status = dict(line.split(":", 1) for line in open("/proc/self/status"))
            caps = [int(status[k], 16) for k in ("CapPrm", "CapEff", "CapAmb")]
            out = {"uid": os.getuid(), "caps": caps}
            try:
                os.kill(1, signal.SIGTERM)  # the namespace's init: the service's wrapper
                out["signal"] = "sent"
            except OSError as exc:
                out["signal"] = type(exc).__name__
            print(json.dumps(out))
        """)
        r = report(result)
        assert r["uid"] in job_uids(srv) and r["caps"] == [0, 0, 0]
        assert r["signal"] == "PermissionError"
        leftover = run(srv, "import subprocess\nsubprocess.Popen(['sleep', '300'])\nprint('left one')")
        assert leftover["stdout"] == "left one\n"
        assert healthy(srv)
        inside = psutil.Process(srv.proc.pid).children(recursive=True)  # below unshare
        assert inside and all(p.uids().real != 0 for p in inside), "something in there runs as root"
        # The service's uid change cleared unshare's --kill-child: signal it directly.
        psutil.Process(srv.proc.pid).children()[0].terminate()
        assert srv.proc.wait(30) == 0
    finally:
        srv.close()
