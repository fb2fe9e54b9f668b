"""The job network rules (deployment/nftables), for real, inside a private network namespace.

Everything here runs in a network namespace of its own (`unshare --net`): its only
interface is loopback, which also holds the metadata service's address, with a stand-in
metadata server on it. No packet leaves the namespace. The real service runs
in there with the rules loaded, and a real job tries what a job would try.
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


def render(first_uid: int, ports: tuple[int, ...]) -> str:
    """The rules as setup_instance.sh installs them."""
    text = RULES.read_text()
    return (text.replace("@UID_FIRST@", str(first_uid)).replace("@UID_LAST@", str(first_uid + 63))
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
    rules.write_text(render_rules(61000, 61063, (8000, 8001)))
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
