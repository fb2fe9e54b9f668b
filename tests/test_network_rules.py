"""The job network rules (deployment/nftables), for real, inside a private network namespace.

Everything here runs in a network namespace of its own (`unshare --net`): loopback,
which also holds the metadata service's address with a stand-in metadata server on it,
and an interface of the namespace's own with a second address (as an instance's VPC
address). No packet leaves the namespace. The real service runs in there with the rules
loaded, and a real job tries what a job would try; processes of job uids, and of root,
try the service's ports on every local address.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import job_uid_base, reachable_by_jobs

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deployment" / "nftables" / "trainium-executor-jobs.nft"

needs_nft = pytest.mark.skipif(shutil.which("nft") is None and not Path("/usr/sbin/nft").exists(),
                               reason="nft not installed (make system-deps)")
pytestmark = [needs_nft, pytest.mark.timeout(180)]


def render(first_uid: int, ports: tuple[int, ...], last_uid: int | None = None) -> str:
    """The rules as setup_instance.sh installs them (by default for 64 slots of 3 uids)."""
    last = last_uid if last_uid is not None else first_uid + 64 * 3 - 1
    text = RULES.read_text()
    return (text.replace("@UID_FIRST@", str(first_uid)).replace("@UID_LAST@", str(last))
            .replace("@PORTS@", ", ".join(map(str, ports))))


def nft() -> str:
    return shutil.which("nft") or "/usr/sbin/nft"


def test_the_rules_file_is_valid_nftables(tmp_path):
    rules = tmp_path / "jobs.nft"
    rules.write_text(render(61000, (8000, 8001)))
    proc = subprocess.run([nft(), "-c", "-f", str(rules)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_cluster_rules_are_valid_nftables(tmp_path):
    """jobs.nft with the rule that setup_instance.sh --role head|node appends (Ray's ports);
    tests/test_cluster.py loads them in a real cluster's namespace and tries them."""
    from ray_cluster import render_rules

    rules = tmp_path / "jobs.nft"
    rules.write_text(render_rules(61000, 61191, (8000, 8001)))
    proc = subprocess.run([nft(), "-c", "-f", str(rules)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# Runs as root inside the private namespace: sets up the stand-ins, loads the rules,
# starts the real service, and has a job try the metadata service, the API and a port
# of its own. Prints one JSON line.
INSIDE = r"""
import http.server, json, socket, subprocess, sys, threading
sys.path.insert(0, sys.argv[1])
from service_fixtures import Server
from pathlib import Path

def ip(*args):
    subprocess.run(["ip", *args], check=True)

ip("link", "set", "lo", "up")
ip("addr", "add", "169.254.169.254/32", "dev", "lo")

class Metadata(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"role-credentials")
    def log_message(self, *a):
        pass

imds = http.server.HTTPServer(("169.254.169.254", 80), Metadata)
threading.Thread(target=imds.serve_forever, daemon=True).start()
other = socket.socket(); other.bind(("127.0.0.1", 0)); other.listen(8)
threading.Thread(target=lambda: [other.accept()[0].close() for _ in range(8)], daemon=True).start()

work, uid_base, rules = Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
srv = Server(work)
srv.uid_base = uid_base
text = rules.replace("@API_PORT@", str(srv.port))
Path(work.parent / "rules.nft").write_text(text)
subprocess.run([sys.argv[5], "-f", str(work.parent / "rules.nft")], check=True)
srv.start()
try:
    code = '''
import json, socket, urllib.request
out = {}
def attempt(name, f):
    try:
        f()
        out[name] = "reached"
    except OSError as exc:
        out[name] = type(exc).__name__
attempt("metadata", lambda: urllib.request.urlopen("http://169.254.169.254/latest/", timeout=3).read())
attempt("api", lambda: socket.create_connection(("127.0.0.1", %d), timeout=3).close())
attempt("own port", lambda: socket.create_connection(("127.0.0.1", %d), timeout=3).close())
print(json.dumps(out))
''' % (srv.port, other.getsockname()[1])
    job = srv.post("/execute", {"code": code}).json
    import urllib.request
    from_root = urllib.request.urlopen("http://169.254.169.254/", timeout=3).read().decode()
    print(json.dumps({"job": job, "root": from_root}))
finally:
    srv.close()
"""


def test_a_job_cannot_reach_the_metadata_service_or_the_api_but_keeps_the_network(tmp_path):
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    work = reachable_by_jobs(tmp_path / "work")
    base = job_uid_base()
    rules = render(base, (8000, 8001)).replace("8000, 8001", "@API_PORT@")
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", INSIDE, str(REPO / "tests"), str(work),
                           str(base), rules, nft()], capture_output=True, text=True, timeout=150, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    job = out["job"]
    assert job["success"], job["stderr"]
    reached = json.loads(job["stdout"])
    assert reached["metadata"] != "reached" and reached["api"] != "reached", reached
    assert reached["own port"] == "reached", reached
    assert out["root"] == "role-credentials"  # the rules hold for job uids only


# Runs as root inside the private namespace: a second interface with addresses of its own
# (IPv4 and IPv6, as an instance's VPC address), listeners on every address on the
# API's and nginx's ports and on a port of no one's, the rules loaded; then a process of
# each uid (forked, setuid) tries each (address, port). Prints one JSON line:
# {"uid host port": "reached" | "refused" | error name}.
EVERY_LOCAL_ADDRESS = r"""
import json, os, socket, subprocess, sys

def ip(*args):
    return subprocess.run(["ip", *args], capture_output=True).returncode == 0

rules, nft, uids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
api, front, free = map(int, sys.argv[4:7])
ip("link", "set", "lo", "up")
# A dummy interface where the kernel has the driver, else one end of a veth pair (the
# other end here too): either way an interface and addresses of this namespace only.
if not ip("link", "add", "ext0", "type", "dummy"):
    assert ip("link", "add", "ext0", "type", "veth", "peer", "name", "ext1")
    assert ip("link", "set", "ext1", "up")
assert ip("addr", "add", "10.123.0.1/24", "dev", "ext0")
assert ip("-6", "addr", "add", "fd12:3456::1/64", "dev", "ext0", "nodad")
assert ip("link", "set", "ext0", "up")
subprocess.run([nft, "-f", rules], check=True)

listeners = []
for port in (api, front, free):  # the kernel completes handshakes from the backlog: no accept()
    for family, anywhere in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        s = socket.socket(family)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((anywhere, port))
        s.listen(64)
        listeners.append(s)

def attempt(uid, host, port):
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            if uid != 0:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            c = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            c.settimeout(3)
            c.connect((host, port))
            code = 0
        except ConnectionRefusedError:
            code = 1
        except OSError:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "reached", 1: "refused", 2: "error"}.get(os.waitstatus_to_exitcode(status), "crashed")

hosts = ("127.0.0.1", "10.123.0.1", "0.0.0.0", "::1", "fd12:3456::1")
print(json.dumps({f"{uid} {host} {port}": attempt(uid, host, port)
                  for uid in uids for host in hosts for port in (api, front, free)}))
"""


def test_job_uids_cannot_reach_the_service_ports_on_any_local_address(tmp_path):
    """Not only loopback: nginx listens on every address, so the instance's own VPC
    address (here a second interface's, IPv4 and IPv6) must be refused too; the first and
    the last job uid are refused, root and a uid past the range are not, and a port of
    no one's stays open to jobs."""
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    first = job_uid_base()
    last = first + 2 * (2 + 1) - 1  # a pool of 2 slots with 2 spares each
    api, front, free = 8001, 8000, 9000
    rules = tmp_path / "jobs.nft"
    rules.write_text(render(first, (front, api), last))
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", EVERY_LOCAL_ADDRESS, str(rules), nft(),
                           json.dumps([first, last, last + 1, 0]), str(api), str(front), str(free)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    hosts = ("127.0.0.1", "10.123.0.1", "0.0.0.0", "::1", "fd12:3456::1")
    for host in hosts:
        for uid in (first, last):
            assert seen[f"{uid} {host} {api}"] == "refused", (uid, host)
            assert seen[f"{uid} {host} {front}"] == "refused", (uid, host)
            assert seen[f"{uid} {host} {free}"] == "reached", (uid, host)
        for uid in (0, last + 1):
            for port in (api, front, free):
                assert seen[f"{uid} {host} {port}"] == "reached", (uid, host, port)
