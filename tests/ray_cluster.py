"""A real Ray cluster on this one machine, run INSIDE a private network and PID namespace.

Ray picks addresses of its own and `ray stop` kills every Ray process it can see, so
nothing here may run in the machine's own namespaces: `ClusterNamespace`
(cluster_fixtures.py) starts `python tests/ray_cluster.py` as PID 1 of a new network,
PID and mount namespace (`unshare --net --pid --fork --mount-proc`), where loopback is
the only interface and /proc shows only the namespace's processes. PID 1 is an init
(`as_init`): it reaps the orphans the namespace's processes leave (a zombie still counts
as a live Ray process to `ray stop`) while its child, the agent, reads one JSON command
a line on stdin and answers one JSON line on stdout. When they exit, the kernel kills
whatever is left in the namespace.

`LocalRay` is the cluster itself: a head (`ray start --head`) and nodes, each a separate
`ray start --block` process group with `--resources '{"neuron_cores": 2}'`, all with the
ports of systemd/trainium-executor-ray.env (shifted for each node, since some of Ray's
sockets bind every address), Ray's temporary dir below a 0700 dir, usage stats off. Each
node has an address of its own, 127.0.0.<n> (the head 127.0.0.1), as separate instances
would: Ray attaches a driver to a raylet by the driver's address, and with one address
for all it may pick a node's raylet instead of the head's; that node's death would then
end the driver's Ray job and every actor with it. The benchmarks use it too
(benchmarks/cluster.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RAY_ENV = REPO / "systemd" / "trainium-executor-ray.env"
RULES = (REPO / "deployment" / "nftables" / "trainium-executor-jobs.nft",
         REPO / "deployment" / "nftables" / "trainium-executor-ray.nft")
RAY = str(Path(sys.executable).with_name("ray"))
PER_NODE = ("NODE_MANAGER", "OBJECT_MANAGER", "METRICS_EXPORT", "DASHBOARD_AGENT_GRPC",
            "DASHBOARD_AGENT_LISTEN", "RUNTIME_ENV_AGENT")
MAX_NODES = 8  # nodes a test may start in all (each gets ports of its own)
# Ray notices a dead node after health checks missed in a row: fast here, so tests wait
# seconds rather than the production default's half minute.
FAST_HEALTH = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
               "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "0"}


def unit_settings() -> dict[str, str]:
    """The KEY=VALUE lines of systemd/trainium-executor-ray.env."""
    out = {}
    for line in RAY_ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def node_ports(index: int) -> dict[str, int]:
    """The ports of the index-th Ray node on this machine (0: the head): the unit's, shifted."""
    s = unit_settings()
    ports = {name: int(s[f"CLUSTER_{name}_PORT"]) + 10 * index for name in PER_NODE}
    ports["MIN_WORKER"] = int(s["CLUSTER_MIN_WORKER_PORT"]) + 100 * index
    ports["MAX_WORKER"] = int(s["CLUSTER_MAX_WORKER_PORT"]) + 100 * index
    return ports


def node_ip(index: int) -> str:
    """The address of the index-th Ray node here (0: the head): its own loopback address."""
    return f"127.0.0.{index + 1}"


def rule_ports() -> str:
    """Every port a cluster of MAX_NODES nodes here may use, as nft's set of the unit's
    ports: what setup_instance.sh renders, with the shifted copies of a machine shared by
    several nodes."""
    s = unit_settings()
    items = [s["CLUSTER_GCS_PORT"], s["CLUSTER_DASHBOARD_PORT"], s["AUTOSCALER_METRIC_PORT"],
             s["DASHBOARD_METRIC_PORT"]]
    for index in range(MAX_NODES + 1):
        p = node_ports(index)
        items += [str(p[name]) for name in PER_NODE] + [f"{p['MIN_WORKER']}-{p['MAX_WORKER']}"]
    return ", ".join(items)


def render_rules(uid_first: int, uid_last: int, api_ports: tuple[int, ...]) -> str:
    """jobs.nft as setup_instance.sh --role head|node writes it."""
    text = "".join(p.read_text() for p in RULES)
    return (text.replace("@UID_FIRST@", str(uid_first)).replace("@UID_LAST@", str(uid_last))
            .replace("@PORTS@", ", ".join(map(str, api_ports))).replace("@RAY_PORTS@", rule_ports()))


@dataclass
class RayNode:
    name: str
    index: int
    proc: subprocess.Popen
    log: Path
    ports: dict[str, int] = field(default_factory=dict)


class LocalRay:
    """A head and nodes on this machine (inside the namespace: see the module docstring)."""

    def __init__(self, root: Path, cores: int = 2):
        self.root = root
        self.closed = root / "r"         # only its owner (root here) may enter it
        self.temp_dir = self.closed / "ray"
        self.cores = cores
        self.nodes: dict[str, RayNode] = {}
        self.next_index = 1
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **FAST_HEALTH,
                    **{k: v for k, v in unit_settings().items() if not k.startswith("CLUSTER_")}}
        self.address = f"127.0.0.1:{unit_settings()['CLUSTER_GCS_PORT']}"

    def _ray_start(self, index: int) -> list[str]:
        ports = node_ports(index)
        return [RAY, "start", "--node-ip-address", node_ip(index), "--num-cpus", "0", "--disable-usage-stats",
                "--object-store-memory", str(80 * 1024 * 1024),
                "--node-manager-port", str(ports["NODE_MANAGER"]),
                "--object-manager-port", str(ports["OBJECT_MANAGER"]),
                "--metrics-export-port", str(ports["METRICS_EXPORT"]),
                "--dashboard-agent-grpc-port", str(ports["DASHBOARD_AGENT_GRPC"]),
                "--dashboard-agent-listen-port", str(ports["DASHBOARD_AGENT_LISTEN"]),
                "--runtime-env-agent-port", str(ports["RUNTIME_ENV_AGENT"]),
                "--min-worker-port", str(ports["MIN_WORKER"]), "--max-worker-port", str(ports["MAX_WORKER"])]

    def start_head(self) -> None:
        """`ray start --head` as the head's unit runs it (no NeuronCores on the head here)."""
        self.closed.mkdir(mode=0o700, parents=True, exist_ok=True)
        s = unit_settings()
        cmd = [*self._ray_start(0), "--head", "--port", s["CLUSTER_GCS_PORT"],
               "--include-dashboard=false", "--dashboard-port", s["CLUSTER_DASHBOARD_PORT"],
               "--temp-dir", str(self.temp_dir)]
        with open(self.root / "head.log", "wb") as log:
            subprocess.run(cmd, env=self.env, stdout=log, stderr=log, check=True, timeout=120)

    def add_node(self, name: str | None = None, timeout: float = 60, wait: bool = True) -> RayNode:
        """`ray start --address HEAD --block` in a process group of its own, as the node's
        unit runs it; returns once it has joined (at once unless `wait`)."""
        index = self.next_index
        self.next_index += 1
        return self._start_node(name or f"node{index}", index, timeout, wait)

    def restart_node(self, name: str, timeout: float = 60, wait: bool = True) -> RayNode:
        """Start a killed node again on its own address and ports, as an instance that
        rebooted: Ray sees a new node (a new node id) there."""
        node = self.nodes[name]
        if node.proc.poll() is None:
            raise RuntimeError(f"ray node {name} still runs")
        return self._start_node(name, node.index, timeout, wait)

    def _start_node(self, name: str, index: int, timeout: float, wait: bool) -> RayNode:
        ports = node_ports(index)
        log = self.root / f"{name}.log"
        cmd = [*self._ray_start(index), "--address", self.address, "--block",
               "--resources", json.dumps({"neuron_cores": self.cores})]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=out, start_new_session=True)
        node = self.nodes[name] = RayNode(name, index, proc, log, ports)
        deadline = time.monotonic() + timeout
        while wait and b"block forever" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        return node

    def node_id(self, name: str) -> str | None:
        """The Ray node id of a running node: its raylet's --node_id."""
        import psutil

        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                if p.info["name"] == "raylet" and os.getpgid(p.pid) == self.nodes[name].proc.pid:
                    return next(a.split("=", 1)[1] for a in p.info["cmdline"] if a.startswith("--node_id="))
            except (OSError, StopIteration, psutil.Error):
                pass
        return None

    def kill_node(self, name: str) -> int:
        """SIGKILL the node's whole process group (its raylet, agents, actor): a Spot reclaim."""
        node = self.nodes[name]
        os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)
        return node.proc.pid

    def stop(self) -> None:
        """Every Ray process of the namespace, and the nodes' groups."""
        if not in_own_namespace():  # `ray stop` kills every Ray process it can see: never outside
            raise RuntimeError("LocalRay.stop runs only below as_init, in a PID namespace of its own")
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=60)
        for node in self.nodes.values():
            try:
                os.killpg(node.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def as_init(main: Callable[[], None]) -> None:
    """As PID 1 of a new PID namespace: run `main` in a child and reap every process that
    ends in the namespace, as an init does, until that child ends; exit with its status."""
    if os.getpid() != 1:
        sys.exit(f"{sys.argv[0]} runs as PID 1 of a PID namespace of its own (unshare --pid --fork)")
    child = os.fork()
    if child == 0:
        code = 0
        try:
            main()
        except BaseException:  # noqa: BLE001 - reported, then the namespace ends
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            os._exit(code)
    while True:
        pid, status = os.wait()
        if pid == child:
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def in_own_namespace() -> bool:
    """True below as_init: PID 1 is the same program as this process (its fork)."""
    try:
        with open("/proc/1/cmdline", "rb") as init, open("/proc/self/cmdline", "rb") as me:
            return init.read() == me.read()
    except OSError:
        return False


# --- the agent: below PID 1 of the namespace, driven over stdin/stdout --------------------

class Agent:
    """The cluster, the service and a client, answering one JSON command a line."""

    def __init__(self, root: Path):
        sys.path.insert(0, str(REPO / "tests"))
        self.root = root
        self.ray = LocalRay(root)
        self.server: Any = None
        self.listeners: list[socket.socket] = []

    def op_start(self, nodes: int, work_dir: str, uid_base: int, args: list[str],
                 rules: bool = True) -> dict[str, Any]:
        from service_fixtures import Server

        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        self.ray.start_head()
        for _ in range(nodes):
            self.ray.add_node()
        self.server = Server(Path(work_dir), args=["--ray-address", self.ray.address, *args],
                             env={"RAY_USAGE_STATS_ENABLED": "0"})
        self.server.uid_base = uid_base
        if rules:
            text = render_rules(uid_base, uid_base + 63, (self.server.port,))
            (self.root / "jobs.nft").write_text(text)
            subprocess.run(["nft", "-f", str(self.root / "jobs.nft")], check=True, capture_output=True)
        self.server.start()
        return {"address": self.ray.address, "api_port": self.server.port,
                "temp_dir": str(self.ray.temp_dir), "nodes": self.op_nodes()}

    def op_nodes(self) -> dict[str, Any]:
        """Each node by name: its process group, whether it runs, its Ray node id."""
        return {n.name: {"pgid": n.proc.pid, "alive": n.proc.poll() is None, "ports": n.ports,
                         "node_id": self.ray.node_id(n.name)} for n in self.ray.nodes.values()}

    def op_add_node(self, wait: bool = True) -> dict[str, Any]:
        return {"name": self.ray.add_node(wait=wait).name}

    def op_restart_node(self, name: str, wait: bool = True) -> dict[str, Any]:
        return {"name": self.ray.restart_node(name, wait=wait).name}

    def op_kill_node(self, name: str) -> dict[str, Any]:
        return {"pgid": self.ray.kill_node(name)}

    def op_cut_node(self, name: str, seconds: float) -> dict[str, Any]:
        """A passing network fault: for `seconds`, every TCP packet to the node's Ray
        workers (its node-pool actor among them) is answered with a reset, so the head's
        calls to that actor fail while the node and its actor live on."""
        ports = self.ray.nodes[name].ports
        table = f"cut_{name}"
        rule = (f"table inet {table} {{\n chain out {{\n  type filter hook output priority 0;\n"
                f"  tcp dport {ports['MIN_WORKER']}-{ports['MAX_WORKER']} reject with tcp reset\n }}\n}}\n")
        subprocess.run(["nft", "-f", "-"], input=rule.encode(), check=True, capture_output=True)
        threading.Timer(seconds, subprocess.run, (["nft", "delete", "table", "inet", table],),
                        {"capture_output": True}).start()
        return {"ports": [ports["MIN_WORKER"], ports["MAX_WORKER"]]}

    def op_http(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                timeout: float = 120) -> dict[str, Any]:
        start = time.monotonic()
        resp = self.server.request(method, path, body, headers=headers, timeout=timeout)
        try:
            payload = resp.json
        except ValueError:
            payload = resp.raw.decode(errors="replace")
        return {"status": resp.status, "headers": resp.headers, "body": payload,
                "seconds": time.monotonic() - start}

    def op_restart_service(self, sig: int = signal.SIGKILL) -> dict[str, Any]:
        """Kill the service (SIGKILL: the head's process dies) and start it again on the
        same work dir and port."""
        from service_fixtures import Server

        old = self.server
        old.proc.send_signal(sig)
        old.proc.wait(30)
        old.log.close()
        self.server = Server(old.work_dir, args=old.args, env=old.extra_env)
        self.server.uid_base, self.server.port = old.uid_base, old.port
        self.server.start()
        return {"api_port": self.server.port}

    def op_processes(self) -> list[dict[str, Any]]:
        import psutil

        out = []
        for p in psutil.process_iter(["pid", "ppid", "uids", "name", "cmdline"]):
            info = p.info
            out.append({"pid": info["pid"], "ppid": info["ppid"], "uid": info["uids"].real if info["uids"]
                        else None, "name": info["name"], "cmdline": " ".join(info["cmdline"] or [])[:300]})
        return out

    def op_listening(self) -> list[dict[str, Any]]:
        """Every TCP socket listening in the namespace, with its process."""
        import psutil

        out = []
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                try:
                    name = " ".join(psutil.Process(conn.pid).cmdline()[:2]) if conn.pid else None
                except psutil.Error:
                    name = None
                out.append({"port": conn.laddr.port, "address": conn.laddr.ip, "pid": conn.pid,
                            "process": name})
        return out

    def op_listen(self) -> dict[str, Any]:
        """A TCP port of the test's own (not Ray's, not the API's): a job may reach it."""
        sock = socket.create_server(("127.0.0.1", 0))
        self.listeners.append(sock)

        def serve() -> None:
            while True:
                try:
                    sock.accept()[0].close()
                except OSError:
                    return

        threading.Thread(target=serve, daemon=True).start()
        return {"port": sock.getsockname()[1]}

    def op_logs(self) -> dict[str, str]:
        logs = {p.name: p.read_text(errors="replace")[-4000:] for p in self.root.glob("*.log")}
        if self.server is not None:
            logs["service"] = self.server.read_log(8000)
        return logs

    def op_stop(self) -> dict[str, Any]:
        """The service (SIGTERM: it drains and stops the node pools), then Ray."""
        status = None
        if self.server is not None and self.server.proc.poll() is None:
            status = self.server.stop(timeout=60)
        self.ray.stop()
        return {"service_exit": status}

    def serve(self) -> None:
        for line in sys.stdin:
            command = json.loads(line)
            op = command.pop("op")
            try:
                reply = {"ok": True, "value": getattr(self, f"op_{op}")(**command)}
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the test
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
            if op == "stop":
                return


if __name__ == "__main__":
    as_init(lambda: Agent(Path(sys.argv[1])).serve())
