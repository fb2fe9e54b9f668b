#!/usr/bin/env bash
# Put the Trainium Executor on this trn1 instance and start it: one command, idempotent.
#
#   sudo bash deployment/setup_instance.sh [--role single|head|node] [--head ADDR]
#                                          [--root DIR] [--venv DIR] [--health-timeout S]
#                                          [--no-start] [--skip-driver]
#                                          [--idle-stop MINUTES | --no-idle-stop]
#
# What it does, each step only when needed (a second run changes nothing and says so):
#  1. Neuron driver and tools: if /opt/aws/neuron/bin/neuron-ls is missing (plain Ubuntu),
#     adds the Neuron apt repository and installs aws-neuronx-dkms, -collectives,
#     -runtime-lib and -tools (the Deep Learning AMI already has them).
#  2. Python: uses the Deep Learning AMI's Neuron PyTorch venv
#     (/opt/aws_neuronx_venv_pytorch_*) whose torch_neuronx imports; else creates
#     /opt/trainium-executor/venv and installs requirements-neuron.txt from the Neuron pip
#     repository (https://pip.repos.neuron.amazonaws.com; the PyPI projects of the same
#     names are empty placeholders).
#  3. Installs requirements.txt, requirements-jobs.txt (what generated scripts import:
#     torchvision matching the venv's torch, matplotlib, tqdm, pandas, scikit-learn,
#     transformers, datasets) and
#     this project (--no-deps) into that venv, with
#     torch/torch-xla/torch-neuronx/neuronx-cc/libneuronxla pinned by a constraints file
#     so they are never touched, and checks afterwards that they were not.
#  4. Creates the system user trainium-executor, /etc/trainium-executor, the API token
#     (/etc/trainium-executor/api-token, 0600 root) and the environment file (the
#     service on 127.0.0.1:8001; an older file binding 0.0.0.0 or port 8000 is moved
#     there, its other settings kept).
#  5. Job isolation (docs/security.md): the group trainium-jobs, which alone may open the
#     Neuron devices (a udev rule) and share the compile cache, and the network rules for
#     the job uids (deployment/nftables: no instance metadata service, no API on any
#     local address; the uids base .. base + pool size x (spares per slot + 1) - 1), checked
#     with nft -c, installed as /etc/trainium-executor/jobs.nft and loaded by
#     trainium-executor-firewall.service before the service starts.
#  6. Installs the systemd unit (with the venv path filled in), daemon-reload, enable,
#     start or restart. Installs the idle-stop timer and its service (systemd/): left
#     disabled unless --idle-stop MINUTES is given (the instance then shuts itself down
#     after MINUTES with no job queued or running; /etc/trainium-executor/idle-stop.env
#     keeps the minutes); --no-idle-stop disables it again; neither leaves it as it is.
#  7. The front door: installs Debian's nginx, deployment/nginx/nginx.conf as
#     /etc/nginx/nginx.conf (the service's port filled in; Debian's file kept once as
#     nginx.conf.debian), checks it with nginx -t, enables, starts or reloads nginx.
#     nginx listens on port 8000 (what the Lambda calls). See docs/front-door.md.
#  8. Waits until GET /health reports a ready pool (pool.idle > 0), then that the same
#     answer comes through nginx.
#
# Several instances (docs/cluster.md), on Ray:
#  --role head [--head ADDR]   all of the above, plus Ray (requirements-cluster.txt, with
#     torch pinned as in step 3), /etc/trainium-executor/ray.env (Ray's fixed ports, the
#     head's address ADDR: by default this instance's first address) and
#     trainium-executor-ray-head.service (ray start --head --block), started before the
#     service; EXECUTOR_RAY_ADDRESS=ADDR:PORT in the service's environment file makes the
#     service the cluster's dispatcher. Step 8 waits for /health to list the cluster (its
#     pool is ready only once a node has joined).
#  --role node --head ADDR     steps 1-3 (with Ray), the user, the jobs' group, devices and
#     network rules, ray.env and trainium-executor-ray-node.service (ray start --address
#     ADDR:PORT --block): nothing else (no API, token, nginx or idle stop). The head places
#     a warm pool on it by itself. Job uids: EXECUTOR_JOB_UID_BASE from
#     /etc/trainium-executor/trainium-executor.env when there is one, else 61000 (the head's).
# On both, the job network rules (jobs.nft) also reject every port in ray.env, on any
# address. --role single (the default) is one instance, as above.
#
# --root DIR (or SETUP_ROOT) prefixes every path it touches (/opt, /etc, /var/lib), for
# tests; commands (systemctl, useradd, apt-get, curl) are taken from PATH.
set -euo pipefail

ROOT="${SETUP_ROOT:-}"
VENV_OVERRIDE="${TRAINIUM_VENV:-}"
HEALTH_TIMEOUT="${SETUP_HEALTH_TIMEOUT:-600}"
HEALTH_INTERVAL="${SETUP_HEALTH_INTERVAL:-2}"
START=1
SKIP_DRIVER=0
IDLE_STOP=""               # minutes; "off" to disable; empty: leave as it is
ROLE=single                # single | head | node (several instances: docs/cluster.md)
HEAD_ADDRESS=""            # the Ray head's address (--head)
SERVICE=trainium-executor
SERVICE_USER=trainium-executor
STATE_DIR=/var/lib/trainium-jobs
CONF_DIR=/etc/trainium-executor
OWN_VENV=/opt/trainium-executor/venv
FRONT_PORT=8000            # nginx, on every interface
SERVICE_PORT_DEFAULT=8001  # the service, on loopback behind it
NEURON_PIP_REPO=https://pip.repos.neuron.amazonaws.com
NEURON_APT_REPO=https://apt.repos.neuron.amazonaws.com
# Packages that belong to the Neuron venv and must never be changed by our install.
PROTECTED_RE='^(torch|torch-xla|torch-neuronx|torch_xla|torch_neuronx|neuronx-cc|libneuronxla)=='

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="$2"; shift 2 ;;
        --venv) VENV_OVERRIDE="$2"; shift 2 ;;
        --health-timeout) HEALTH_TIMEOUT="$2"; shift 2 ;;
        --no-start) START=0; shift ;;
        --skip-driver) SKIP_DRIVER=1; shift ;;
        --idle-stop) IDLE_STOP="$2"; shift 2 ;;
        --no-idle-stop) IDLE_STOP=off; shift ;;
        --role) ROLE="$2"; shift 2 ;;
        --head) HEAD_ADDRESS="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
ROOT="${ROOT%/}"
case "$IDLE_STOP" in
    ""|off) ;;
    *[!0-9.]*|.*|*.*.*) echo "setup: --idle-stop takes a number of minutes, not $IDLE_STOP" >&2; exit 2 ;;
esac
case "$ROLE" in
    single|head|node) ;;
    *) echo "setup: --role takes single, head or node, not $ROLE" >&2; exit 2 ;;
esac
case "$HEAD_ADDRESS" in
    *[!0-9A-Za-z.-]*) echo "setup: --head takes the head's address (IPv4 or a name, no port), not $HEAD_ADDRESS" >&2
                      exit 2 ;;
esac
if [ "$ROLE" = node ] && [ -z "$HEAD_ADDRESS" ]; then
    echo "setup: --role node needs --head ADDR: the address of the cluster's head" >&2
    exit 2
fi
CLUSTER=0
[ "$ROLE" = single ] || CLUSTER=1
PROJECT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SETUP_PYTHON="${SETUP_PYTHON:-python3}"
CHANGES=()

say() { echo "setup: $*"; }
changed() { CHANGES+=("$1"); say "$1"; }
die() { echo "setup: error: $*" >&2; exit 1; }
summary() {
    if [ ${#CHANGES[@]} -eq 0 ]; then
        say "nothing changed"
    else
        say "done, ${#CHANGES[@]} change(s):"
        printf '  - %s\n' "${CHANGES[@]}"
    fi
}

if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo bash $0)"
fi

install_unit() {  # install_unit FILE: systemd/FILE (.service, .timer) with @VENV@ filled in; UNIT_CHANGED=1 if new
    local target="$ROOT/etc/systemd/system/$1" unit_new
    unit_new="$(mktemp)"
    sed "s#@VENV@#$VENV_REAL#g" "$PROJECT_DIR/systemd/$1" > "$unit_new"
    UNIT_CHANGED=0
    if cmp -s "$unit_new" "$target"; then
        say "unit $1 up to date"
        rm -f "$unit_new"
    else
        mkdir -p "$(dirname "$target")"
        install -m 0644 "$unit_new" "$target"
        rm -f "$unit_new"
        systemctl daemon-reload
        changed "installed /etc/systemd/system/$1"
        UNIT_CHANGED=1
    fi
}

run_unit() {  # run_unit NAME CHANGES [restart|reload]: enable and start it, or restart
              # (reload) it when it runs and CHANGES > 0; nothing with --no-start
    local how="${3:-restart}"
    if [ "$START" -eq 0 ]; then
        say "not starting $1 (--no-start)"
        return
    fi
    if ! systemctl is-enabled --quiet "$1"; then
        systemctl enable "$1"
        changed "enabled $1 (starts at boot)"
    fi
    if ! systemctl is-active --quiet "$1"; then
        systemctl start "$1"
        changed "started $1"
    elif [ "$2" -gt 0 ]; then
        systemctl "$how" "$1"
        changed "${how}ed $1 to pick up the changes"
    fi
}

# --- 1. Neuron driver and tools ---------------------------------------------------------
install_neuron_system_packages() {
    local codename=jammy
    if [ -r "$ROOT/etc/os-release" ]; then
        # shellcheck disable=SC1091
        codename="$(. "$ROOT/etc/os-release" && echo "${VERSION_CODENAME:-jammy}")"
    fi
    mkdir -p "$ROOT/etc/apt/keyrings" "$ROOT/etc/apt/sources.list.d"
    # An ASCII-armored key named *.asc works in signed-by without gpg --dearmor.
    curl -fsSL "$NEURON_APT_REPO/GPG-PUB-KEY-AMAZON-AWS-NEURON.PUB" -o "$ROOT/etc/apt/keyrings/neuron.asc"
    echo "deb [signed-by=/etc/apt/keyrings/neuron.asc] $NEURON_APT_REPO $codename main" \
        > "$ROOT/etc/apt/sources.list.d/neuron.list"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -y
    apt-get install -y "linux-headers-$(uname -r)" aws-neuronx-dkms aws-neuronx-collectives \
        aws-neuronx-runtime-lib aws-neuronx-tools python3-venv
}

if [ -x "$ROOT/opt/aws/neuron/bin/neuron-ls" ]; then
    say "Neuron tools present (/opt/aws/neuron/bin/neuron-ls)"
elif [ "$SKIP_DRIVER" -eq 1 ]; then
    say "Neuron tools missing; skipped (--skip-driver)"
else
    install_neuron_system_packages
    changed "installed the Neuron driver and tools from $NEURON_APT_REPO"
fi

# --- 2. The venv --------------------------------------------------------------------------
neuronx_version() {  # prints torch_neuronx's version if the venv's python imports it
    local out
    out="$("$1/bin/python" -c 'import torch, torch_xla, torch_neuronx; print(torch_neuronx.__version__)' \
        2>/dev/null)" || return 1
    printf '%s\n' "${out##*$'\n'}"   # the last line: import-time chatter may precede it
}

find_dlami_venv() {  # prefers the plain training venv, then others with torch_neuronx
    local candidates=() dir
    for dir in "$ROOT"/opt/aws_neuronx_venv_pytorch_2_9 "$ROOT"/opt/aws_neuronx_venv_pytorch_2_9_nxd_training \
               "$ROOT"/opt/aws_neuronx_venv_pytorch_*; do
        [ -x "$dir/bin/python" ] && candidates+=("$dir")
    done
    for dir in "${candidates[@]}"; do
        case "$dir" in *inference*|*vllm*) continue ;; esac
        if neuronx_version "$dir" >/dev/null; then echo "$dir"; return 0; fi
    done
    for dir in "${candidates[@]}"; do
        if neuronx_version "$dir" >/dev/null; then echo "$dir"; return 0; fi
    done
    return 1
}

if [ -n "$VENV_OVERRIDE" ]; then
    VENV="$ROOT${VENV_OVERRIDE#"$ROOT"}"
    [ -x "$VENV/bin/python" ] || die "--venv $VENV_OVERRIDE has no bin/python"
    say "using venv $VENV_OVERRIDE (given)"
elif VENV="$(find_dlami_venv)"; then
    say "using the Deep Learning AMI venv ${VENV#"$ROOT"}"
else
    VENV="$ROOT$OWN_VENV"
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$SETUP_PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv
            changed "installed python3-venv"
        fi
        mkdir -p "$(dirname "$VENV")"
        "$SETUP_PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        changed "created venv $OWN_VENV"
    fi
    if ! neuronx_version "$VENV" >/dev/null; then
        "$VENV/bin/python" -m pip install --extra-index-url "$NEURON_PIP_REPO" \
            -r "$PROJECT_DIR/requirements-neuron.txt"
        changed "installed torch-neuronx, neuronx-cc, torch, torch-xla from $NEURON_PIP_REPO"
    fi
fi
PY="$VENV/bin/python"
VENV_REAL="${VENV#"$ROOT"}"   # the path as the service will see it
NEURONX="$(neuronx_version "$VENV")" || die "torch_neuronx does not import in $VENV_REAL (a PyPI placeholder?)"
case "$NEURONX" in
    2.9.0.2.*) say "torch-neuronx $NEURONX (the trn1 line)" ;;
    *) say "warning: torch-neuronx $NEURONX is not the 2.9.0.2.* trn1 line this project is pinned to" ;;
esac

# --- 3. This project into the venv ----------------------------------------------------
fingerprint() {  # what was installed: the project's sources, requirements and unit
    (cd "$PROJECT_DIR" && find warm_pool executor_service systemd pyproject.toml requirements.txt \
        requirements-jobs.txt requirements-cluster.txt -type f ! -name '*.pyc' 2>/dev/null | LC_ALL=C sort \
        | xargs sha256sum | sha256sum | cut -d' ' -f1)
}
STAMP="$ROOT$CONF_DIR/.installed"
WANT="$(fingerprint) $VENV_REAL"
REQUIREMENTS=(-r "$PROJECT_DIR/requirements.txt" -r "$PROJECT_DIR/requirements-jobs.txt")
if [ "$CLUSTER" -eq 1 ]; then  # Ray, for the cluster's head or a node
    WANT="$WANT with-ray"
    REQUIREMENTS+=(-r "$PROJECT_DIR/requirements-cluster.txt")
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    say "project already installed in $VENV_REAL"
    PROJECT_CHANGED=0
else
    before="$("$PY" -m pip freeze --all | grep -Ei "$PROTECTED_RE" || true)"
    constraints="$(mktemp)"
    trap 'rm -f "$constraints"' EXIT
    printf '%s\n' "$before" > "$constraints"
    "$PY" -m pip install --quiet -c "$constraints" "${REQUIREMENTS[@]}"
    "$PY" -m pip install --quiet --no-deps --force-reinstall "$PROJECT_DIR"
    after="$("$PY" -m pip freeze --all | grep -Ei "$PROTECTED_RE" || true)"
    [ "$before" = "$after" ] || die "the install changed the Neuron packages:
before: $before
after:  $after"
    mkdir -p "$ROOT$CONF_DIR"
    echo "$WANT" > "$STAMP"
    changed "installed trainium-executor and ${REQUIREMENTS[*]##*/} into $VENV_REAL (torch untouched)"
    PROJECT_CHANGED=1
fi

# --- 4. User, directories, token, environment file ------------------------------------
if getent passwd "$SERVICE_USER" >/dev/null; then
    say "user $SERVICE_USER exists"
else
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin "$SERVICE_USER"
    changed "created system user $SERVICE_USER"
fi

if [ ! -d "$ROOT$CONF_DIR" ]; then
    mkdir -p "$ROOT$CONF_DIR"
fi
chmod 0755 "$ROOT$CONF_DIR"

ENV_FILE="$ROOT$CONF_DIR/$SERVICE.env"
ENV_CHANGED=0
if [ "$ROLE" = node ]; then  # no service here: no token, no environment file of its own
    say "node of a cluster: no API token, no service environment file"
else
    TOKEN_FILE="$ROOT$CONF_DIR/api-token"
    if [ -s "$TOKEN_FILE" ]; then
        say "API token exists ($CONF_DIR/api-token)"
    else
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$TOKEN_FILE")
        changed "generated the API token in $CONF_DIR/api-token (read it with: sudo cat $CONF_DIR/api-token)"
    fi
    chown root:root "$TOKEN_FILE" 2>/dev/null || true
    chmod 0600 "$TOKEN_FILE"

    if [ ! -f "$ENV_FILE" ]; then
        install -m 0644 "$PROJECT_DIR/systemd/$SERVICE.env" "$ENV_FILE"
        changed "installed $CONF_DIR/$SERVICE.env"
        ENV_CHANGED=1
    elif ! cmp -s "$PROJECT_DIR/systemd/$SERVICE.env" "$ENV_FILE"; then
        say "kept the edited $CONF_DIR/$SERVICE.env (template: $PROJECT_DIR/systemd/$SERVICE.env)"
    fi
    # Before the front door the service itself listened on 0.0.0.0:8000; nginx has that port
    # now and the service belongs on loopback behind it.
    if grep -Eq "^EXECUTOR_HOST=0\.0\.0\.0\s*$|^EXECUTOR_PORT=$FRONT_PORT\s*$" "$ENV_FILE"; then
        sed -i -E -e 's/^EXECUTOR_HOST=0\.0\.0\.0\s*$/EXECUTOR_HOST=127.0.0.1/' \
            -e "s/^EXECUTOR_PORT=$FRONT_PORT\\s*\$/EXECUTOR_PORT=$SERVICE_PORT_DEFAULT/" "$ENV_FILE"
        changed "moved the service behind nginx in $CONF_DIR/$SERVICE.env (127.0.0.1:$SERVICE_PORT_DEFAULT)"
        ENV_CHANGED=1
    fi
    if ! grep -q '^EXECUTOR_PORT=' "$ENV_FILE"; then  # the service's own default is nginx's port
        echo "EXECUTOR_PORT=$SERVICE_PORT_DEFAULT" >> "$ENV_FILE"
        changed "set EXECUTOR_PORT=$SERVICE_PORT_DEFAULT in $CONF_DIR/$SERVICE.env (port $FRONT_PORT is nginx's)"
        ENV_CHANGED=1
    fi
    SERVICE_HOST="$(sed -n 's/^EXECUTOR_HOST=\([^[:space:]]*\).*/\1/p' "$ENV_FILE" | tail -n1)"
    case "${SERVICE_HOST:-127.0.0.1}" in
        127.*|localhost|::1) ;;
        *) say "warning: the service listens on $SERVICE_HOST: reachable without nginx in front" ;;
    esac
fi
env_value() {  # env_value FILE NAME: the last NAME=value in FILE (empty when there is none)
    sed -n "s/^$2=\([^[:space:]]*\).*/\1/p" "$1" 2>/dev/null | tail -n1 || true
}
PORT="$(env_value "$ENV_FILE" EXECUTOR_PORT)"
PORT="${PORT:-$SERVICE_PORT_DEFAULT}"

# --- 4b. Several instances: Ray's ports and the head's address --------------------------
RAY_ENV="$ROOT$CONF_DIR/ray.env"
RAY_ENV_CHANGED=0
if [ "$CLUSTER" -eq 1 ]; then
    if [ -z "$HEAD_ADDRESS" ]; then  # the head: this instance's first address
        HEAD_ADDRESS="$(env_value "$RAY_ENV" CLUSTER_HEAD_ADDRESS)"
        [ -n "$HEAD_ADDRESS" ] || HEAD_ADDRESS="$(hostname -I | awk '{print $1}')"
        [ -n "$HEAD_ADDRESS" ] || die "could not find this instance's address: give it with --head ADDR"
    fi
    if [ ! -f "$RAY_ENV" ]; then
        sed "s/@HEAD_ADDRESS@/$HEAD_ADDRESS/" "$PROJECT_DIR/systemd/$SERVICE-ray.env" > "$RAY_ENV"
        chmod 0644 "$RAY_ENV"
        changed "installed $CONF_DIR/ray.env (Ray's ports; the head at $HEAD_ADDRESS)"
        RAY_ENV_CHANGED=1
    elif [ "$(env_value "$RAY_ENV" CLUSTER_HEAD_ADDRESS)" != "$HEAD_ADDRESS" ]; then
        sed -i "s/^CLUSTER_HEAD_ADDRESS=.*/CLUSTER_HEAD_ADDRESS=$HEAD_ADDRESS/" "$RAY_ENV"
        changed "the head is at $HEAD_ADDRESS now ($CONF_DIR/ray.env)"
        RAY_ENV_CHANGED=1
    else
        say "$CONF_DIR/ray.env up to date (the head at $HEAD_ADDRESS)"
    fi
    GCS_PORT="$(env_value "$RAY_ENV" CLUSTER_GCS_PORT)"
    RAY_PORTS=""
    for name in CLUSTER_GCS_PORT CLUSTER_DASHBOARD_PORT CLUSTER_NODE_MANAGER_PORT CLUSTER_OBJECT_MANAGER_PORT \
                CLUSTER_METRICS_EXPORT_PORT CLUSTER_DASHBOARD_AGENT_GRPC_PORT CLUSTER_DASHBOARD_AGENT_LISTEN_PORT \
                CLUSTER_RUNTIME_ENV_AGENT_PORT AUTOSCALER_METRIC_PORT DASHBOARD_METRIC_PORT; do
        value="$(env_value "$RAY_ENV" "$name")"
        [ -n "$value" ] || die "$CONF_DIR/ray.env has no $name (template: systemd/$SERVICE-ray.env)"
        RAY_PORTS="$RAY_PORTS$value, "
    done
    RAY_PORTS="$RAY_PORTS$(env_value "$RAY_ENV" CLUSTER_MIN_WORKER_PORT)-$(env_value "$RAY_ENV" CLUSTER_MAX_WORKER_PORT)"
    if [ "$ROLE" = head ]; then  # the service is the cluster's dispatcher
        WANT_ADDRESS="$HEAD_ADDRESS:$GCS_PORT"
        if [ "$(env_value "$ENV_FILE" EXECUTOR_RAY_ADDRESS)" != "$WANT_ADDRESS" ]; then
            sed -i '/^EXECUTOR_RAY_ADDRESS=/d' "$ENV_FILE"
            echo "EXECUTOR_RAY_ADDRESS=$WANT_ADDRESS" >> "$ENV_FILE"
            changed "set EXECUTOR_RAY_ADDRESS=$WANT_ADDRESS in $CONF_DIR/$SERVICE.env: the service dispatches to the nodes"
            ENV_CHANGED=1
        fi
    fi
fi

# --- 5. Job isolation: the jobs' group, the devices, the network rules -----------------
JOB_GROUP=trainium-jobs
if getent group "$JOB_GROUP" >/dev/null; then
    say "group $JOB_GROUP exists"
else
    groupadd --system "$JOB_GROUP"
    changed "created group $JOB_GROUP (the Neuron devices and the compile cache: the job uids' only group)"
fi
UDEV_RULE="$ROOT/etc/udev/rules.d/90-trainium-executor-neuron.rules"
WANT_RULE="KERNEL==\"neuron[0-9]*\", GROUP=\"$JOB_GROUP\", MODE=\"0660\""
if [ "$(cat "$UDEV_RULE" 2>/dev/null)" = "$WANT_RULE" ]; then
    say "udev rule for /dev/neuron* up to date"
else
    mkdir -p "$(dirname "$UDEV_RULE")"
    printf '%s\n' "$WANT_RULE" > "$UDEV_RULE"
    udevadm control --reload-rules || true
    changed "installed ${UDEV_RULE#"$ROOT"}: /dev/neuron* for group $JOB_GROUP only (mode 0660)"
fi
for dev in "$ROOT"/dev/neuron[0-9]*; do  # the devices already present, without a reboot
    [ -e "$dev" ] || continue
    chgrp "$JOB_GROUP" "$dev" && chmod 0660 "$dev"
done

UID_BASE="$(env_value "$ENV_FILE" EXECUTOR_JOB_UID_BASE)"
UID_BASE="${UID_BASE:-61000}"
# Every uid of every pool slot: the slot's own and its spares' (docs/security.md). With no
# pool size set, 64: the most the setting allows (its default is one per NeuronCore).
POOL_SIZE="$(env_value "$ENV_FILE" EXECUTOR_POOL_SIZE)"
POOL_SIZE="${POOL_SIZE:-64}"
SPARES="$(env_value "$ENV_FILE" EXECUTOR_SPARES_PER_SLOT)"
SPARES="${SPARES:-5}"
for setting in "EXECUTOR_JOB_UID_BASE=$UID_BASE" "EXECUTOR_POOL_SIZE=$POOL_SIZE" "EXECUTOR_SPARES_PER_SLOT=$SPARES"; do
    case "${setting#*=}" in
        ""|*[!0-9]*) die "$CONF_DIR/$SERVICE.env: $setting is not a whole number" ;;
    esac
done
[ "$POOL_SIZE" -ge 1 ] || die "$CONF_DIR/$SERVICE.env: EXECUTOR_POOL_SIZE must be at least 1"
UID_LAST=$((UID_BASE + POOL_SIZE * (SPARES + 1) - 1))
if ! command -v nft >/dev/null 2>&1 && [ ! -x "$ROOT/usr/sbin/nft" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y nftables
    changed "installed nftables"
fi
RULES_FILE="$ROOT$CONF_DIR/jobs.nft"
rules_new="$(mktemp)"
RULE_FILES=("$PROJECT_DIR/deployment/nftables/trainium-executor-jobs.nft")
BLOCKED="169.254.169.254, fd00:ec2::254 or ports $FRONT_PORT, $PORT on any local address"
if [ "$CLUSTER" -eq 1 ]; then  # and no port of Ray's, on any address
    RULE_FILES+=("$PROJECT_DIR/deployment/nftables/trainium-executor-ray.nft")
    BLOCKED="$BLOCKED; nor Ray's ports $RAY_PORTS anywhere"
fi
cat "${RULE_FILES[@]}" | sed -e "s/@UID_FIRST@/$UID_BASE/g" -e "s/@UID_LAST@/$UID_LAST/g" \
    -e "s/@PORTS@/$FRONT_PORT, $PORT/g" -e "s/@RAY_PORTS@/${RAY_PORTS:-}/g" > "$rules_new"
RULES_CHANGED=0
if cmp -s "$rules_new" "$RULES_FILE"; then
    say "network rules for job uids up to date ($CONF_DIR/jobs.nft)"
    rm -f "$rules_new"
else
    nft -c -f "$rules_new" || { rm -f "$rules_new"; die "nft -c refused ${RULE_FILES[*]#"$PROJECT_DIR/"}"; }
    install -m 0644 "$rules_new" "$RULES_FILE"
    rm -f "$rules_new"
    changed "installed $CONF_DIR/jobs.nft: uids $UID_BASE-$UID_LAST may not reach $BLOCKED"
    RULES_CHANGED=1
fi
FIREWALL=trainium-executor-firewall
install_unit "$FIREWALL.service"
run_unit "$FIREWALL" $((RULES_CHANGED + UNIT_CHANGED))

# --- 6. The units ---------------------------------------------------------------------
if [ "$CLUSTER" -eq 1 ]; then  # Ray first: on the head, the service connects to it
    RAY_UNIT="$SERVICE-ray-$ROLE"
    install_unit "$RAY_UNIT.service"
    run_unit "$RAY_UNIT" $((PROJECT_CHANGED + UNIT_CHANGED + RAY_ENV_CHANGED))
fi
if [ "$ROLE" = node ]; then
    say "node: Ray joins the head at $HEAD_ADDRESS:$GCS_PORT; the head's /health?verbose=1 lists it under cluster.nodes"
    summary
    exit 0
fi
install_unit "$SERVICE.service"
run_unit "$SERVICE" $((PROJECT_CHANGED + UNIT_CHANGED + ENV_CHANGED))

# --- 6b. The idle-stop timer (disabled unless asked for) ------------------------------------
IDLE_UNIT=trainium-executor-idle-stop
install_unit "$IDLE_UNIT.service"
install_unit "$IDLE_UNIT.timer"
IDLE_ENV="$ROOT$CONF_DIR/idle-stop.env"
if [ -n "$IDLE_STOP" ] && [ "$IDLE_STOP" != off ]; then
    if [ "$(cat "$IDLE_ENV" 2>/dev/null)" != "IDLE_STOP_AFTER_MINUTES=$IDLE_STOP" ]; then
        echo "IDLE_STOP_AFTER_MINUTES=$IDLE_STOP" > "$IDLE_ENV"
        chmod 0644 "$IDLE_ENV"
        changed "idle stop after $IDLE_STOP minutes ($CONF_DIR/idle-stop.env)"
    fi
fi
if [ "$START" -eq 0 ]; then
    say "idle-stop timer: not touched (--no-start)"
elif [ "$IDLE_STOP" = off ]; then
    if systemctl is-enabled --quiet "$IDLE_UNIT.timer"; then
        systemctl disable "$IDLE_UNIT.timer"
        systemctl stop "$IDLE_UNIT.timer"
        changed "disabled $IDLE_UNIT.timer (the instance no longer stops itself when idle)"
    else
        say "idle-stop timer disabled"
    fi
elif [ -n "$IDLE_STOP" ]; then
    run_unit "$IDLE_UNIT.timer" 0
elif systemctl is-enabled --quiet "$IDLE_UNIT.timer"; then
    say "idle-stop timer enabled ($(cat "$IDLE_ENV" 2>/dev/null || echo 'IDLE_STOP_AFTER_MINUTES=30'))"
else
    say "idle-stop timer installed, disabled (enable with --idle-stop MINUTES)"
fi

# --- 7. The front door: nginx --------------------------------------------------------------
NGINX_DIR="$ROOT/etc/nginx"
if [ -x "$ROOT/usr/sbin/nginx" ]; then
    say "nginx present"
else
    DEBIAN_FRONTEND=noninteractive apt-get install -y nginx
    changed "installed nginx"
fi
nginx_new="$(mktemp)"
sed "s#server 127\.0\.0\.1:$SERVICE_PORT_DEFAULT;#server 127.0.0.1:$PORT;#" \
    "$PROJECT_DIR/deployment/nginx/nginx.conf" > "$nginx_new"
NGINX_CHANGED=0
if cmp -s "$nginx_new" "$NGINX_DIR/nginx.conf"; then
    say "nginx.conf up to date"
    rm -f "$nginx_new"
else
    nginx -t -q -c "$nginx_new" || { rm -f "$nginx_new"; die "nginx -t refused deployment/nginx/nginx.conf"; }
    mkdir -p "$NGINX_DIR"
    if [ -f "$NGINX_DIR/nginx.conf" ] && [ ! -e "$NGINX_DIR/nginx.conf.debian" ]; then
        cp -p "$NGINX_DIR/nginx.conf" "$NGINX_DIR/nginx.conf.debian"
    fi
    install -m 0644 "$nginx_new" "$NGINX_DIR/nginx.conf"
    rm -f "$nginx_new"
    changed "installed /etc/nginx/nginx.conf: port $FRONT_PORT in front of 127.0.0.1:$PORT"
    NGINX_CHANGED=1
fi
run_unit nginx "$NGINX_CHANGED" reload

# --- 8. Wait for a ready pool, then for the same through nginx -----------------------------
health_ready() {  # true when $1/health answers with pool.idle > 0 (a head's: lists its cluster,
                  # whose pool is ready only once a node has joined)
    local body
    body="$(curl -sS --max-time 5 "$1/health" 2>/dev/null)" || return 1
    printf '%s' "$body" | SETUP_ROLE="$ROLE" python3 -c '
import json, os, sys
try:
    health = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
if os.environ["SETUP_ROLE"] == "head":
    sys.exit(0 if "cluster" in health else 1)
sys.exit(0 if int((health.get("pool") or {}).get("idle") or 0) > 0 else 1)'
}

if [ "$START" -eq 1 ]; then
    if [ "$ROLE" = head ]; then
        say "the head's service dispatches to the nodes (--role node --head $HEAD_ADDRESS on each)"
    fi
    say "waiting up to ${HEALTH_TIMEOUT}s for http://127.0.0.1:$PORT/health to report a ready pool"
    deadline=$(( $(date +%s) + ${HEALTH_TIMEOUT%.*} ))
    until health_ready "http://127.0.0.1:$PORT"; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "setup: error: no ready pool after ${HEALTH_TIMEOUT}s; see: journalctl -u $SERVICE -n 100" >&2
            exit 1
        fi
        sleep "$HEALTH_INTERVAL"
    done
    say "healthy: http://127.0.0.1:$PORT/health reports idle workers"
    tries=0
    until health_ready "http://127.0.0.1:$FRONT_PORT"; do
        tries=$((tries + 1))
        if [ "$tries" -ge 10 ]; then
            echo "setup: error: the service is healthy but not through nginx on port $FRONT_PORT;" \
                 "see: journalctl -u nginx -n 50 and /var/log/nginx/error.log" >&2
            exit 1
        fi
        sleep "$HEALTH_INTERVAL"
    done
    say "front door: http://127.0.0.1:$FRONT_PORT/health answers through nginx"
fi

summary
