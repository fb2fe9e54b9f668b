"""The instance set-up, the deploy script and the systemd unit, against a fake root.

setup_instance.sh runs for real with ``SETUP_ROOT`` pointing at a temp dir: a fake
Deep Learning AMI venv (a ``python`` that records its calls and answers like pip and
torch_neuronx would), fake ``systemctl``/``useradd``/``getent``/``apt-get``/``curl``/``nginx``
first on PATH, each logging its arguments. deploy.sh runs with fake ``ssh``/``scp``/``aws``.
(The shipped nginx.conf itself runs in a real nginx in tests/test_nginx_front_door.py.)
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "deployment" / "setup_instance.sh"
DEPLOY = REPO / "deployment" / "deploy.sh"
SYSTEM_DEPS = REPO / "deployment" / "system-deps.sh"
UNIT = REPO / "systemd" / "trainium-executor.service"
FIREWALL_UNIT = REPO / "systemd" / "trainium-executor-firewall.service"
IDLE_SERVICE = REPO / "systemd" / "trainium-executor-idle-stop.service"
IDLE_TIMER = REPO / "systemd" / "trainium-executor-idle-stop.timer"
RAY_HEAD_UNIT = REPO / "systemd" / "trainium-executor-ray-head.service"
RAY_NODE_UNIT = REPO / "systemd" / "trainium-executor-ray-node.service"
RAY_ENV = REPO / "systemd" / "trainium-executor-ray.env"
RULES = REPO / "deployment" / "nftables" / "trainium-executor-jobs.nft"
ENV_TEMPLATE = REPO / "systemd" / "trainium-executor.env"
NGINX_CONF = REPO / "deployment" / "nginx" / "nginx.conf"
SCRIPTS = [SETUP, DEPLOY, SYSTEM_DEPS]

# A python that stands in for a venv's interpreter (and for python3 -m venv).
FAKE_PYTHON = r"""#!/usr/bin/env bash
here="$(cd "$(dirname "$0")/.." && pwd)"
echo "$here/bin/python $*" >> "$FAKE_LOG"
case "$1" in
  -c)
    case "$2" in *torch_neuronx*)
      [ -e "$here/NO_NEURONX" ] && exit 1
      cat "$here/neuronx_version" 2>/dev/null || echo 2.9.0.2.13.26312
      exit 0 ;;
    esac ;;
  -m)
    case "$2" in
      venv) mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; touch "$3/NO_NEURONX"; exit 0 ;;
      pip)
        case "$3" in
          freeze)
            if [ -e "$here/freeze" ]; then cat "$here/freeze"
            else printf 'flask==3.1.0\ntorch==2.9.1\ntorch-neuronx==2.9.0.2.13.26312\ntorch-xla==2.9.0\n'; fi
            exit 0 ;;
          install)
            case "$*" in *requirements-neuron.txt*)
              [ -n "$FAKE_NEURONX_NEVER" ] || rm -f "$here/NO_NEURONX" ;;
            esac
            case "$*" in *--no-deps*)
              if [ -n "$FAKE_PIP_CHANGES_TORCH" ]; then
                printf 'torch==2.10.0\ntorch-neuronx==2.9.0.2.13.26312\ntorch-xla==2.9.0\n' > "$here/freeze"
              fi ;;
            esac
            exit 0 ;;
        esac ;;
    esac ;;
esac
exit 0
"""

FAKE_TOOLS = {
    "systemctl": r"""#!/usr/bin/env bash
echo "systemctl $*" >> "$FAKE_LOG"
state="$SETUP_ROOT/.systemctl"; mkdir -p "$state"
args=(); for a in "$@"; do [ "$a" = "--quiet" ] || args+=("$a"); done
unit="${args[1]:-}"
case "${args[0]}" in
  is-enabled) [ -e "$state/enabled.$unit" ] ;;
  is-active) [ -e "$state/active.$unit" ] ;;
  enable) touch "$state/enabled.$unit" ;;
  start|restart) touch "$state/active.$unit" ;;
  *) true ;;
esac
""",
    "nginx": r"""#!/usr/bin/env bash
echo "nginx $*" >> "$FAKE_LOG"
[ -z "$FAKE_NGINX_REFUSES" ]
""",
    "useradd": r"""#!/usr/bin/env bash
echo "useradd $*" >> "$FAKE_LOG"
mkdir -p "$SETUP_ROOT/etc"
echo "${!#}:x:998:998::/var/lib/trainium-jobs:/usr/sbin/nologin" >> "$SETUP_ROOT/etc/passwd"
""",
    "getent": r"""#!/usr/bin/env bash
grep "^$2:" "$SETUP_ROOT/etc/$1" 2>/dev/null
""",
    "groupadd": r"""#!/usr/bin/env bash
echo "groupadd $*" >> "$FAKE_LOG"
mkdir -p "$SETUP_ROOT/etc"
echo "${!#}:x:997:" >> "$SETUP_ROOT/etc/group"
""",
    "hostname": r"""#!/usr/bin/env bash
echo "10.1.2.3 172.17.0.1 "
""",
    "udevadm": r"""#!/usr/bin/env bash
echo "udevadm $*" >> "$FAKE_LOG"
""",
    "nft": r"""#!/usr/bin/env bash
echo "nft $*" >> "$FAKE_LOG"
[ -z "$FAKE_NFT_REFUSES" ]
""",
    "apt-get": r"""#!/usr/bin/env bash
echo "apt-get $*" >> "$FAKE_LOG"
case "$*" in *" nginx"*)
  mkdir -p "$SETUP_ROOT/usr/sbin" "$SETUP_ROOT/etc/nginx"
  printf '#!/bin/sh\n' > "$SETUP_ROOT/usr/sbin/nginx"; chmod +x "$SETUP_ROOT/usr/sbin/nginx"
  echo "# Debian's nginx.conf" > "$SETUP_ROOT/etc/nginx/nginx.conf"
  exit 0 ;;
esac
if [ "$1" = "install" ]; then
  mkdir -p "$SETUP_ROOT/opt/aws/neuron/bin"
  printf '#!/bin/sh\necho []\n' > "$SETUP_ROOT/opt/aws/neuron/bin/neuron-ls"
  chmod +x "$SETUP_ROOT/opt/aws/neuron/bin/neuron-ls"
fi
""",
    "curl": r"""#!/usr/bin/env bash
echo "curl $*" >> "$FAKE_LOG"
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
if [ -n "$out" ]; then echo "-----BEGIN PGP PUBLIC KEY BLOCK-----" > "$out"; exit 0; fi
cluster='"cluster":{"engine":"ray","nodes":[]}'  # what a head's /health adds
case "$*" in *"/health"*)  # a head whose cluster has no node yet: 503, no ready worker
  [ -n "$FAKE_NO_NODES" ] && { echo '{"status":"unhealthy","pool":{"size":0,"idle":0},'"$cluster}"; exit 0; }
esac
case "$*" in *":8000/health"*)
  echo '{"status":"healthy","pool":{"size":2,"idle":2,"busy":0,"state":"ready"},'"$cluster}"
  [ -z "$FAKE_FRONT_DOOR_DOWN" ] || exit 7
  exit 0 ;;
esac
case "$*" in *"/health"*)
  n=$(( $(cat "$SETUP_ROOT/.health_calls" 2>/dev/null || echo 0) + 1 ))
  echo "$n" > "$SETUP_ROOT/.health_calls"
  ready_after="${FAKE_HEALTH_READY_AFTER:-1}"
  [ "$ready_after" = "never" ] && { echo '{"status":"starting","pool":{"idle":0,"starting":2}}'; exit 0; }
  [ "$n" -lt "$ready_after" ] && exit 7
  echo '{"status":"healthy","pool":{"backend":"neuron","size":2,"idle":2,"busy":0},'"$cluster}"
  exit 0 ;;
esac
exit 0
""",
}


def make_executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def make_venv(root: Path, name: str, *, neuronx: bool = True) -> Path:
    venv = root / "opt" / name
    make_executable(venv / "bin" / "python", FAKE_PYTHON)
    if not neuronx:
        (venv / "NO_NEURONX").touch()
    return venv


class FakeInstance:
    """A fake root plus fake tools; ``run()`` runs setup_instance.sh against it."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.bin = tmp_path / "bin"
        self.log = tmp_path / "calls.log"
        (self.root / "etc").mkdir(parents=True)
        (self.root / "etc" / "os-release").write_text('NAME="Ubuntu"\nVERSION_CODENAME=jammy\n')
        for name, text in FAKE_TOOLS.items():
            make_executable(self.bin / name, text)
        make_executable(self.bin / "python-for-venvs", FAKE_PYTHON)
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "SETUP_ROOT": str(self.root),
            "SETUP_PYTHON": str(self.bin / "python-for-venvs"),
            "SETUP_HEALTH_INTERVAL": "0.05",
            "SETUP_HEALTH_TIMEOUT": "20",
            "FAKE_LOG": str(self.log),
        }

    def dlami(self) -> None:
        """What the Deep Learning AMI ships: the Neuron tools and its Neuron venvs."""
        make_executable(self.root / "opt/aws/neuron/bin/neuron-ls", "#!/bin/sh\necho []\n")
        make_venv(self.root, "aws_neuronx_venv_pytorch_2_9_nxd_inference")
        make_venv(self.root, "aws_neuronx_venv_pytorch_2_9")

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        if self.log.exists():
            self.log.unlink()
        return subprocess.run(["bash", str(SETUP), *args], env={**self.env, **env},
                              capture_output=True, text=True, timeout=120)

    def calls(self, tool: str = "") -> list[str]:
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text().splitlines() if tool in line]

    @property
    def unit(self) -> Path:
        return self.root / "etc/systemd/system/trainium-executor.service"


@pytest.fixture
def instance(tmp_path):
    return FakeInstance(tmp_path)


# --- static checks ----------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_shellcheck_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (make system-deps)")
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# --- setup_instance.sh ----------------------------------------------------------------

def test_setup_on_the_deep_learning_ami_uses_its_training_venv(instance):
    instance.dlami()
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "using the Deep Learning AMI venv /opt/aws_neuronx_venv_pytorch_2_9\n" in proc.stdout
    unit = instance.unit.read_text()
    assert "ExecStart=/opt/aws_neuronx_venv_pytorch_2_9/bin/trainium-executor serve" in unit
    assert "@VENV@" not in unit
    assert instance.calls("apt-get") == ["apt-get install -y nginx"]  # nothing for Neuron
    assert not [c for c in instance.calls("pip install") if "requirements-neuron.txt" in c]


def test_setup_installs_the_project_without_touching_torch(instance):
    instance.dlami()
    assert instance.run().returncode == 0
    installs = instance.calls("pip install")
    project = [c for c in installs if "--no-deps" in c]
    assert len(project) == 1 and project[0].endswith(str(REPO))
    requirements = [c for c in installs if "requirements.txt" in c and "requirements-neuron" not in c]
    assert len(requirements) == 1 and " -c " in requirements[0]
    assert all("/aws_neuronx_venv_pytorch_2_9/bin/python" in c for c in installs)


def test_setup_refuses_an_install_that_changed_torch(instance):
    instance.dlami()
    proc = instance.run(FAKE_PIP_CHANGES_TORCH="1")
    assert proc.returncode == 1
    assert "changed the Neuron packages" in proc.stderr


def test_setup_creates_user_token_env_file_and_starts_the_unit(instance):
    instance.dlami()
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    assert any("--system" in c and c.endswith(" trainium-executor") for c in instance.calls("useradd"))
    token = instance.root / "etc/trainium-executor/api-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text()) == 64 and token.read_text() not in proc.stdout
    env_file = instance.root / "etc/trainium-executor/trainium-executor.env"
    assert env_file.read_text() == ENV_TEMPLATE.read_text()
    systemctl = [c.removeprefix("systemctl ") for c in instance.calls("systemctl")]
    assert "daemon-reload" in systemctl
    assert "enable trainium-executor" in systemctl and "start trainium-executor" in systemctl
    assert "healthy: http://127.0.0.1:8001/health" in proc.stdout
    assert "front door: http://127.0.0.1:8000/health answers through nginx" in proc.stdout


def test_setup_puts_nginx_in_front_of_the_service_on_loopback(instance):
    instance.dlami()
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    assert "apt-get install -y nginx" in instance.calls("apt-get")
    nginx_conf = instance.root / "etc/nginx/nginx.conf"
    assert nginx_conf.read_text() == NGINX_CONF.read_text()  # the service on 8001, as shipped
    assert (instance.root / "etc/nginx/nginx.conf.debian").read_text() == "# Debian's nginx.conf\n"
    assert any(c.startswith("nginx -t -q -c ") for c in instance.calls("nginx"))
    systemctl = [c.removeprefix("systemctl ") for c in instance.calls("systemctl")]
    assert "enable nginx" in systemctl and "start nginx" in systemctl
    env = (instance.root / "etc/trainium-executor/trainium-executor.env").read_text()
    assert "\nEXECUTOR_HOST=127.0.0.1\n" in env and "\nEXECUTOR_PORT=8001\n" in env


def test_setup_moves_a_service_that_listened_on_0_0_0_0_8000_behind_nginx(instance):
    instance.dlami()
    assert instance.run().returncode == 0
    env_file = instance.root / "etc/trainium-executor/trainium-executor.env"
    env_file.write_text("EXECUTOR_HOST=0.0.0.0\nEXECUTOR_PORT=8000\nEXECUTOR_POOL_SIZE=1\n")
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    assert env_file.read_text() == "EXECUTOR_HOST=127.0.0.1\nEXECUTOR_PORT=8001\nEXECUTOR_POOL_SIZE=1\n"
    assert "moved the service behind nginx" in proc.stdout
    assert "systemctl restart trainium-executor" in instance.calls("systemctl")


def test_setup_refuses_an_nginx_config_that_nginx_rejects(instance):
    instance.dlami()
    proc = instance.run(FAKE_NGINX_REFUSES="1")
    assert proc.returncode == 1 and "nginx -t refused" in proc.stderr
    assert (instance.root / "etc/nginx/nginx.conf").read_text() == "# Debian's nginx.conf\n"


def test_setup_fails_when_nginx_does_not_pass_requests_on(instance):
    instance.dlami()
    proc = instance.run(FAKE_FRONT_DOOR_DOWN="1")
    assert proc.returncode == 1 and "not through nginx on port 8000" in proc.stderr


def test_setup_confines_jobs_group_devices_and_network(instance):
    instance.dlami()
    (instance.root / "dev").mkdir()
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    assert "groupadd --system trainium-jobs" in instance.calls("groupadd")
    rule = (instance.root / "etc/udev/rules.d/90-trainium-executor-neuron.rules").read_text()
    assert rule == 'KERNEL=="neuron[0-9]*", GROUP="trainium-jobs", MODE="0660"\n'
    rules = (instance.root / "etc/trainium-executor/jobs.nft").read_text()
    # No pool size set: 64 slots (the most there can be), 6 uids each (5 spares' and one more).
    assert "meta skuid 61000-61383 ip daddr 169.254.169.254" in rules
    assert "meta skuid 61000-61383 ip6 daddr fd00:ec2::254" in rules
    assert "meta skuid 61000-61383 fib daddr type local tcp dport { 8000, 8001 }" in rules
    assert "@" not in rules.replace("@UID", "")
    assert any(c.startswith("nft -c -f ") for c in instance.calls("nft"))
    assert (instance.root / "etc/systemd/system/trainium-executor-firewall.service").read_text() == \
        FIREWALL_UNIT.read_text()
    systemctl = [c.removeprefix("systemctl ") for c in instance.calls("systemctl")]
    assert {"enable trainium-executor-firewall", "start trainium-executor-firewall"} <= set(systemctl)
    assert systemctl.index("start trainium-executor-firewall") < systemctl.index("start trainium-executor")


def test_setup_renders_the_rules_for_the_configured_uid_base(instance):
    instance.dlami()
    assert instance.run().returncode == 0
    env_file = instance.root / "etc/trainium-executor/trainium-executor.env"
    env_file.write_text(env_file.read_text().replace("UID_BASE=61000", "UID_BASE=70000"))
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    assert "meta skuid 70000-70383" in (instance.root / "etc/trainium-executor/jobs.nft").read_text()
    assert "systemctl restart trainium-executor-firewall" in instance.calls("systemctl")


def test_setup_covers_every_uid_of_every_slot_spares_included(instance):
    """base .. base + pool size x (spares per slot + 1) - 1, from the environment file."""
    instance.dlami()
    assert instance.run().returncode == 0
    env_file = instance.root / "etc/trainium-executor/trainium-executor.env"
    env_file.write_text(env_file.read_text() + "EXECUTOR_POOL_SIZE=2\nEXECUTOR_SPARES_PER_SLOT=1\n")
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    rules = (instance.root / "etc/trainium-executor/jobs.nft").read_text()
    assert "meta skuid 61000-61003 fib daddr type local" in rules
    assert "uids 61000-61003 may not reach" in proc.stdout + proc.stderr
    env_file.write_text(env_file.read_text() + "EXECUTOR_POOL_SIZE=2\nEXECUTOR_SPARES_PER_SLOT=two\n")
    proc = instance.run()
    assert proc.returncode == 1 and "EXECUTOR_SPARES_PER_SLOT=two is not a whole number" in proc.stderr


def test_setup_refuses_rules_that_nft_rejects(instance):
    instance.dlami()
    proc = instance.run(FAKE_NFT_REFUSES="1")
    assert proc.returncode == 1 and "nft -c refused" in proc.stderr
    assert not (instance.root / "etc/trainium-executor/jobs.nft").exists()


def test_setup_a_second_run_changes_nothing(instance):
    instance.dlami()
    assert instance.run().returncode == 0
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("setup: nothing changed")
    assert not instance.calls("pip install") and not instance.calls("useradd")
    assert not instance.calls("apt-get") and not instance.calls("nginx -t")
    mutating = [c for c in instance.calls("systemctl") if "is-" not in c]
    assert mutating == []


def test_setup_installs_the_idle_stop_timer_disabled_by_default(instance):
    instance.dlami()
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    system = instance.root / "etc/systemd/system"
    unit = (system / "trainium-executor-idle-stop.service").read_text()
    assert ("ExecStart=/opt/aws_neuronx_venv_pytorch_2_9/bin/trainium-executor idle-stop "
            "--after ${IDLE_STOP_AFTER_MINUTES} --work-dir %S/trainium-jobs") in unit
    assert (system / "trainium-executor-idle-stop.timer").read_text() == IDLE_TIMER.read_text()
    assert not [c for c in instance.calls("systemctl") if "idle-stop" in c and "is-" not in c]
    assert "idle-stop timer installed, disabled (enable with --idle-stop MINUTES)" in proc.stdout
    assert not (instance.root / "etc/trainium-executor/idle-stop.env").exists()


def test_setup_idle_stop_minutes_enables_the_timer_and_no_idle_stop_disables_it(instance):
    instance.dlami()
    proc = instance.run("--idle-stop", "45")
    assert proc.returncode == 0, proc.stderr
    env = instance.root / "etc/trainium-executor/idle-stop.env"
    assert env.read_text() == "IDLE_STOP_AFTER_MINUTES=45\n"
    systemctl = [c.removeprefix("systemctl ") for c in instance.calls("systemctl")]
    timer = "trainium-executor-idle-stop.timer"
    assert {f"enable {timer}", f"start {timer}"} <= set(systemctl)
    again = instance.run("--idle-stop", "45")
    assert again.returncode == 0 and again.stdout.rstrip().endswith("setup: nothing changed")
    kept = instance.run()  # a later run for an upgrade leaves it enabled
    assert "idle-stop timer enabled (IDLE_STOP_AFTER_MINUTES=45)" in kept.stdout
    off = instance.run("--no-idle-stop")
    assert off.returncode == 0, off.stderr
    assert "systemctl disable trainium-executor-idle-stop.timer" in instance.calls("systemctl")
    assert instance.run("--idle-stop", "soon").returncode == 2


def test_setup_restarts_the_service_when_the_project_changed(instance):
    instance.dlami()
    assert instance.run().returncode == 0
    (instance.root / "etc/trainium-executor/.installed").write_text("an older build\n")
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    assert "systemctl restart trainium-executor" in instance.calls("systemctl")
    assert "nothing changed" not in proc.stdout


def test_setup_keeps_an_edited_environment_file(instance):
    instance.dlami()
    assert instance.run().returncode == 0
    env_file = instance.root / "etc/trainium-executor/trainium-executor.env"
    env_file.write_text("EXECUTOR_PORT=9000\n")
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    assert env_file.read_text() == "EXECUTOR_PORT=9000\n"
    assert "kept the edited" in proc.stdout
    assert any("127.0.0.1:9000/health" in c for c in instance.calls("curl"))
    assert "server 127.0.0.1:9000;" in (instance.root / "etc/nginx/nginx.conf").read_text()
    assert "systemctl reload nginx" in instance.calls("systemctl")


def test_setup_on_plain_ubuntu_installs_neuron_from_the_neuron_repositories(instance):
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr + proc.stdout
    apt = instance.calls("apt-get install")
    packages = ("aws-neuronx-dkms", "aws-neuronx-runtime-lib", "aws-neuronx-tools")
    assert apt and all(p in apt[0] for p in packages)
    sources = (instance.root / "etc/apt/sources.list.d/neuron.list").read_text()
    assert sources.strip() == ("deb [signed-by=/etc/apt/keyrings/neuron.asc] "
                               "https://apt.repos.neuron.amazonaws.com jammy main")
    venv = instance.root / "opt/trainium-executor/venv"
    assert f"-m venv {venv}" in "\n".join(instance.calls())
    neuron_pip = [c for c in instance.calls("pip install") if "requirements-neuron.txt" in c]
    assert len(neuron_pip) == 1
    assert "--extra-index-url https://pip.repos.neuron.amazonaws.com" in neuron_pip[0]
    assert "ExecStart=/opt/trainium-executor/venv/bin/trainium-executor serve" in instance.unit.read_text()


def test_setup_on_plain_ubuntu_second_run_changes_nothing(instance):
    assert instance.run().returncode == 0
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    assert "nothing changed" in proc.stdout
    assert not instance.calls("apt-get") and not instance.calls("pip install")


def test_setup_refuses_a_venv_where_torch_neuronx_does_not_import(instance):
    proc = instance.run(FAKE_NEURONX_NEVER="1")
    assert proc.returncode == 1
    assert "torch_neuronx does not import" in proc.stderr


def test_setup_skips_dlami_venvs_without_torch_neuronx(instance):
    make_executable(instance.root / "opt/aws/neuron/bin/neuron-ls", "#!/bin/sh\necho []\n")
    make_venv(instance.root, "aws_neuronx_venv_pytorch_2_9", neuronx=False)
    make_venv(instance.root, "aws_neuronx_venv_pytorch_2_9_nxd_training")
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    assert "/opt/aws_neuronx_venv_pytorch_2_9_nxd_training/bin/trainium-executor" in instance.unit.read_text()


def test_setup_warns_about_a_torch_neuronx_outside_the_trn1_line(instance):
    make_executable(instance.root / "opt/aws/neuron/bin/neuron-ls", "#!/bin/sh\necho []\n")
    venv = make_venv(instance.root, "aws_neuronx_venv_pytorch_2_8")
    (venv / "neuronx_version").write_text("WARNING: import-time chatter\n2.8.0.2.10\n")
    proc = instance.run()
    assert proc.returncode == 0, proc.stderr
    assert "warning: torch-neuronx 2.8.0.2.10 is not the 2.9.0.2.* trn1 line" in proc.stdout


def test_setup_uses_a_venv_given_with_dash_dash_venv(instance):
    instance.dlami()
    make_venv(instance.root, "custom-venv")
    proc = instance.run("--venv", "/opt/custom-venv")
    assert proc.returncode == 0, proc.stderr
    assert "ExecStart=/opt/custom-venv/bin/trainium-executor serve" in instance.unit.read_text()


def test_setup_waits_for_the_pool_to_become_ready(instance):
    instance.dlami()
    proc = instance.run(FAKE_HEALTH_READY_AFTER="4")
    assert proc.returncode == 0, proc.stderr
    assert (instance.root / ".health_calls").read_text().strip() == "4"


def test_setup_fails_when_the_pool_never_becomes_ready(instance):
    instance.dlami()
    proc = instance.run("--health-timeout", "1", FAKE_HEALTH_READY_AFTER="never")
    assert proc.returncode == 1
    assert "no ready pool after 1s" in proc.stderr and "journalctl -u trainium-executor" in proc.stderr


def test_setup_no_start_installs_but_does_not_start(instance):
    instance.dlami()
    proc = instance.run("--no-start")
    assert proc.returncode == 0, proc.stderr
    assert instance.unit.exists()
    assert set(instance.calls("systemctl")) == {"systemctl daemon-reload"}
    assert not instance.calls("curl")


# --- several instances: --role head | node ------------------------------------------------

def ray_env(instance: FakeInstance) -> dict[str, str]:
    lines = (instance.root / "etc/trainium-executor/ray.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_setup_head_adds_ray_its_unit_and_points_the_service_at_it(instance):
    instance.dlami()
    proc = instance.run("--role", "head", "--head", "10.0.0.5")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    installs = [c for c in instance.calls("pip install") if "requirements.txt" in c]
    assert len(installs) == 1 and "requirements-cluster.txt" in installs[0] and " -c " in installs[0]
    ports = ray_env(instance)
    assert ports["CLUSTER_HEAD_ADDRESS"] == "10.0.0.5" and ports["CLUSTER_GCS_PORT"] == "6379"
    env = (instance.root / "etc/trainium-executor/trainium-executor.env").read_text().splitlines()
    assert "EXECUTOR_RAY_ADDRESS=10.0.0.5:6379" in env
    unit = (instance.root / "etc/systemd/system/trainium-executor-ray-head.service").read_text()
    assert "ExecStart=/opt/aws_neuronx_venv_pytorch_2_9/bin/ray start --head --block" in unit
    systemctl = [c.removeprefix("systemctl ") for c in instance.calls("systemctl")]
    assert systemctl.index("start trainium-executor-ray-head") < systemctl.index("start trainium-executor")
    rules = (instance.root / "etc/trainium-executor/jobs.nft").read_text()
    ray_rule = next(line for line in rules.splitlines() if line.startswith("add rule"))
    assert "meta skuid 61000-61383 tcp dport { 6379, 8265, 6380, 6381, 6382, 6383, 6384, 6385, 44217, " \
           "44227, 10100-10199 } counter reject" in ray_rule
    assert "tcp dport { 8000, 8001 }" in rules  # and still the API's ports
    assert "healthy: http://127.0.0.1:8001/health" in proc.stdout
    assert instance.calls("nginx")  # the head keeps the front door


def test_setup_head_finishes_before_any_node_has_joined(instance):
    instance.dlami()
    proc = instance.run("--role", "head", "--head", "10.0.0.5", "--health-timeout", "2", FAKE_NO_NODES="1")
    assert proc.returncode == 0, proc.stderr
    single = instance.run("--role", "single", "--health-timeout", "1", FAKE_NO_NODES="1")
    assert single.returncode == 1 and "no ready pool" in single.stderr  # one instance needs its pool


def test_setup_head_defaults_to_this_instances_first_address(instance):
    instance.dlami()
    assert instance.run("--role", "head").returncode == 0
    assert ray_env(instance)["CLUSTER_HEAD_ADDRESS"] == "10.1.2.3"


def test_setup_node_installs_ray_its_unit_and_the_job_confinement_only(instance):
    instance.dlami()
    (instance.root / "dev").mkdir()
    proc = instance.run("--role", "node", "--head", "10.0.0.5")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    system = instance.root / "etc/systemd/system"
    unit = (system / "trainium-executor-ray-node.service").read_text()
    assert "ExecStart=/opt/aws_neuronx_venv_pytorch_2_9/bin/ray start --block" in unit
    assert ray_env(instance)["CLUSTER_HEAD_ADDRESS"] == "10.0.0.5"
    systemctl = [c.removeprefix("systemctl ") for c in instance.calls("systemctl")]
    assert {"enable trainium-executor-ray-node", "start trainium-executor-ray-node",
            "start trainium-executor-firewall"} <= set(systemctl)
    assert systemctl.index("start trainium-executor-firewall") < systemctl.index(
        "start trainium-executor-ray-node")
    assert not (system / "trainium-executor.service").exists()  # no API here: no service,
    assert not (instance.root / "etc/trainium-executor/api-token").exists()  # token,
    assert not instance.calls("nginx") and not instance.calls("curl")  # front door or health wait
    assert not (system / "trainium-executor-idle-stop.timer").exists()
    assert "groupadd --system trainium-jobs" in instance.calls("groupadd")
    rules = (instance.root / "etc/trainium-executor/jobs.nft").read_text()
    assert "meta skuid 61000-61383 tcp dport { 6379," in rules
    assert any("requirements-cluster.txt" in c for c in instance.calls("pip install"))


@pytest.mark.parametrize("args, message", [
    (["--role", "node"], "--role node needs --head ADDR"),
    (["--role", "primary"], "--role takes single, head or node"),
    (["--role", "node", "--head", "10.0.0.5:6379"], "no port"),
])
def test_setup_refuses_a_cluster_role_it_cannot_set_up(instance, args, message):
    proc = instance.run(*args)
    assert proc.returncode == 2 and message in proc.stderr
    assert not instance.calls()


@pytest.mark.parametrize("role", ["head", "node"])
def test_setup_cluster_roles_second_run_changes_nothing(instance, role):
    instance.dlami()
    assert instance.run("--role", role, "--head", "10.0.0.5").returncode == 0
    proc = instance.run("--role", role, "--head", "10.0.0.5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("setup: nothing changed")
    assert not [c for c in instance.calls("systemctl") if "is-" not in c]


def test_setup_moving_the_head_updates_the_node_and_restarts_ray(instance):
    instance.dlami()
    assert instance.run("--role", "node", "--head", "10.0.0.5").returncode == 0
    proc = instance.run("--role", "node", "--head", "10.0.0.9")
    assert proc.returncode == 0, proc.stderr
    assert ray_env(instance)["CLUSTER_HEAD_ADDRESS"] == "10.0.0.9"
    assert "systemctl restart trainium-executor-ray-node" in instance.calls("systemctl")


def test_ray_units_pass_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (make system-deps)")
    venv = tmp_path / "venv"
    make_executable(venv / "bin" / "ray", "#!/bin/sh\n")
    units = []
    for unit in (RAY_HEAD_UNIT, RAY_NODE_UNIT):
        units.append(tmp_path / unit.name)
        units[-1].write_text(unit.read_text().replace("@VENV@", str(venv)))
    shutil.copy(FIREWALL_UNIT, tmp_path / FIREWALL_UNIT.name)
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, units), str(tmp_path / FIREWALL_UNIT.name)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ray-" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("unit", [RAY_HEAD_UNIT, RAY_NODE_UNIT], ids=lambda p: p.name)
def test_ray_units_fix_every_port_and_close_rays_temporary_dir(unit):
    text = unit.read_text()
    lines = {line.strip() for line in text.splitlines()}
    exec_start = text.split("ExecStart=", 1)[1].split("\n#", 1)[0]
    assert "ray start" in exec_start and "--block" in exec_start and "--disable-usage-stats" in exec_start
    names = [line.split("=", 1)[0] for line in RAY_ENV.read_text().splitlines()
             if line.startswith("CLUSTER_") and line.split("=", 1)[0].endswith("_PORT")]
    node_only = {"CLUSTER_GCS_PORT", "CLUSTER_DASHBOARD_PORT"} if unit == RAY_NODE_UNIT else set()
    for name in names:  # every port of ray.env, so that the job rules can name it
        if name not in node_only:
            assert "${" + name + "}" in exec_start, name
    assert "CacheDirectory=trainium-ray" in lines and "CacheDirectoryMode=0700" in lines
    assert "EnvironmentFile=/etc/trainium-executor/ray.env" in lines
    assert "Requires=trainium-executor-firewall.service" in lines
    caps = "CAP_SETUID CAP_SETGID CAP_KILL CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_SYS_ADMIN"
    assert f"AmbientCapabilities={caps}" in lines and "User=trainium-executor" in lines
    if unit == RAY_HEAD_UNIT:
        assert "--temp-dir %C/trainium-ray/tmp" in exec_start and "--include-dashboard=false" in exec_start


def test_ray_env_turns_off_usage_stats_and_rays_memory_monitor():
    lines = RAY_ENV.read_text().splitlines()
    assert "RAY_USAGE_STATS_ENABLED=0" in lines and "RAY_memory_monitor_refresh_ms=0" in lines


# --- systemd unit ---------------------------------------------------------------------

def substituted_unit(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    make_executable(venv / "bin" / "trainium-executor", "#!/bin/sh\n")
    unit = tmp_path / "trainium-executor.service"
    unit.write_text(UNIT.read_text().replace("@VENV@", str(venv)))
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (make system-deps)")
    unit = substituted_unit(tmp_path)
    firewall = tmp_path / FIREWALL_UNIT.name
    shutil.copy(FIREWALL_UNIT, firewall)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit), str(firewall)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "trainium-executor.service" not in proc.stderr, proc.stderr


def test_firewall_unit_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (make system-deps)")
    proc = subprocess.run(["systemd-analyze", "verify", str(FIREWALL_UNIT)], capture_output=True, text=True)
    assert "trainium-executor-firewall.service" not in proc.stderr, proc.stderr


def test_idle_stop_units_pass_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (make system-deps)")
    venv = tmp_path / "venv"
    make_executable(venv / "bin" / "trainium-executor", "#!/bin/sh\n")
    service = tmp_path / IDLE_SERVICE.name
    service.write_text(IDLE_SERVICE.read_text().replace("@VENV@", str(venv)))
    timer = tmp_path / IDLE_TIMER.name
    shutil.copy(IDLE_TIMER, timer)
    proc = subprocess.run(["systemd-analyze", "verify", str(service), str(timer)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "idle-stop" not in proc.stderr, proc.stderr


def test_unit_grants_only_the_capabilities_job_isolation_needs():
    lines = {line.strip() for line in UNIT.read_text().splitlines()}
    caps = "CAP_SETUID CAP_SETGID CAP_KILL CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_SYS_ADMIN"
    assert f"AmbientCapabilities={caps}" in lines and f"CapabilityBoundingSet={caps}" in lines
    assert "StateDirectoryMode=0711" in lines  # job uids traverse to their own dirs
    assert "Requires=trainium-executor-firewall.service" in lines
    env = ENV_TEMPLATE.read_text().splitlines()
    assert "EXECUTOR_ISOLATION=uid" in env and "EXECUTOR_JOB_GROUPS=trainium-jobs" in env


def test_unit_has_the_settings_the_service_relies_on():
    lines = {line.strip() for line in UNIT.read_text().splitlines()}
    for setting in ("User=trainium-executor", "StateDirectory=trainium-jobs", "Restart=on-failure",
                    "KillMode=mixed", "KillSignal=SIGTERM", "NoNewPrivileges=yes", "ProtectSystem=strict",
                    "ProtectHome=yes", "PrivateTmp=yes", "DevicePolicy=closed", "DeviceAllow=char-neuron rw",
                    "OOMPolicy=continue", "LoadCredential=api-token:/etc/trainium-executor/api-token",
                    "EnvironmentFile=/etc/trainium-executor/trainium-executor.env"):
        assert setting in lines, setting
    assert "ExecStart=@VENV@/bin/trainium-executor serve --work-dir %S/trainium-jobs" in lines
    stop = [int(line.split("=")[1]) for line in lines if line.startswith("TimeoutStopSec=")]
    assert stop and stop[0] > 600


def test_environment_template_has_no_secret_and_sets_the_neuron_cache():
    text = ENV_TEMPLATE.read_text()
    assert "EXECUTOR_API_TOKEN=" not in text
    assert "NEURON_COMPILE_CACHE_URL=/var/lib/trainium-jobs/" in text


def test_the_service_listens_on_loopback_where_nginx_forwards_to():
    lines = ENV_TEMPLATE.read_text().splitlines()
    assert "EXECUTOR_HOST=127.0.0.1" in lines and "EXECUTOR_PORT=8001" in lines
    conf = NGINX_CONF.read_text()
    assert "server 127.0.0.1:8001;" in conf and "listen 8000 default_server;" in conf


def test_nginx_config_passes_nginx_t(tmp_path):
    if shutil.which("nginx") is None and not os.access("/usr/sbin/nginx", os.X_OK):
        pytest.skip("nginx not installed (make system-deps)")
    from nginx_fixtures import render

    conf = tmp_path / "nginx.conf"
    conf.write_text(render(NGINX_CONF.read_text(), tmp_path, 8000, 8001))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "e.log")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- deploy.sh ------------------------------------------------------------------------

@pytest.fixture
def workstation(tmp_path):
    """Fake ssh/scp/aws that log their argv; returns (env, log path, key path)."""
    bin_dir = tmp_path / "bin"
    log = tmp_path / "deploy.log"
    for tool in ("ssh", "scp", "aws"):
        make_executable(bin_dir / tool, f'#!/usr/bin/env bash\nprintf "{tool}" >> "{log}"\n'
                        f'printf " %q" "$@" >> "{log}"\necho >> "{log}"\n'
                        'for a in "$@"; do case "$a" in *.tar.gz) [ -f "$a" ] && '
                        f'cp "$a" "{tmp_path}/shipped.tar.gz";; esac; done\nexit 0\n')
    key = tmp_path / "key.pem"
    key.write_text("KEY")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return env, log, key


def run_deploy(env, *args):
    return subprocess.run(["bash", str(DEPLOY), *args], env=env, capture_output=True, text=True, timeout=60)


def test_deploy_copies_with_scp_and_runs_setup_over_ssh(workstation, tmp_path):
    env, log, key = workstation
    proc = run_deploy(env, str(key), "10.0.0.5", "--", "--health-timeout", "900")
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["scp", "ssh"]
    assert f"-i {key}" in calls[0] and calls[0].endswith("ubuntu@10.0.0.5:/tmp/trainium-executor.tar.gz")
    assert "ubuntu@10.0.0.5" in calls[1]
    assert "setup_instance.sh\\ --health-timeout\\ 900" in calls[1]
    with tarfile.open(tmp_path / "shipped.tar.gz") as tar:
        names = tar.getnames()
    assert "./deployment/setup_instance.sh" in names and "./systemd/trainium-executor.service" in names
    assert not any("/.venv/" in n or n.startswith("./.git/") for n in names)


def test_deploy_through_s3_stages_with_aws_and_fetches_on_the_instance(workstation):
    env, log, key = workstation
    proc = run_deploy(env, str(key), "admin@host.example", "--s3", "s3://papers-test-outputs/setup/")
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["aws", "ssh"]
    assert calls[0].endswith("s3://papers-test-outputs/setup/trainium-executor.tar.gz")
    # the remote command is logged %q-quoted: spaces appear as "\ "
    assert "aws\\ s3\\ cp\\ s3://papers-test-outputs/setup/trainium-executor.tar.gz" in calls[1]
    assert "admin@host.example" in calls[1]


@pytest.mark.parametrize("args", [[], ["only-a-key"], ["KEY", "host", "--s3", "bucket/prefix"]])
def test_deploy_rejects_bad_arguments(workstation, args):
    env, log, key = workstation
    args = [str(key) if a == "KEY" else a for a in args]
    proc = run_deploy(env, *args)
    assert proc.returncode == 2
    assert not log.exists()
