#!/usr/bin/env bash
# Deploy the Trainium Executor from a workstation to a trn1 instance and set it up there.
#
#   deployment/deploy.sh KEY HOST [--user USER] [--s3 s3://bucket/prefix] [-- SETUP_ARGS...]
#
#   KEY    the instance's SSH private key (.pem)
#   HOST   its public IP or DNS name (or USER@HOST)
#   --user login user (default: ubuntu, the Deep Learning AMI's)
#   --s3   stage the project through S3 like the original deployment: upload here with
#          `aws s3 cp`, download on the instance (its instance role needs s3:GetObject)
#   after --, arguments for setup_instance.sh (e.g. --health-timeout 900)
#
# The project is packed into one tarball (no .venv, .git or caches), copied with scp (or
# through S3), unpacked into ~/trainium-executor on the instance, and
# deployment/setup_instance.sh is run there with sudo. Running it again redeploys; the
# set-up only changes what changed.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 2 ]; then
    usage >&2
    exit 2
fi
KEY="$1"
HOST="$2"
shift 2
USER_NAME=ubuntu
S3_PREFIX=""
SETUP_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --user) USER_NAME="$2"; shift 2 ;;
        --s3) S3_PREFIX="${2%/}"; shift 2 ;;
        --) shift; SETUP_ARGS=("$@"); break ;;
        *) echo "deploy: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -r "$KEY" ] || { echo "deploy: cannot read key $KEY" >&2; exit 2; }
case "$HOST" in *@*) TARGET="$HOST" ;; *) TARGET="$USER_NAME@$HOST" ;; esac
case "$S3_PREFIX" in ""|s3://*) ;; *) echo "deploy: --s3 takes s3://bucket/prefix" >&2; exit 2 ;; esac

PROJECT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SSH_OPTS=(-i "$KEY" -o StrictHostKeyChecking=accept-new -o ServerAliveInterval=30)
REMOTE_DIR=trainium-executor
REMOTE_TAR=/tmp/trainium-executor.tar.gz

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tarball="$work/trainium-executor.tar.gz"
tar -C "$PROJECT_DIR" -czf "$tarball" \
    --exclude=./.venv --exclude=./.git --exclude='__pycache__' --exclude='*.pyc' \
    --exclude=./.pytest_cache --exclude=./.ruff_cache --exclude='*.egg-info' --exclude=./build \
    --exclude=./benchmarks/results .
echo "deploy: packed $(du -h "$tarball" | cut -f1) from $PROJECT_DIR"

if [ -n "$S3_PREFIX" ]; then
    aws s3 cp "$tarball" "$S3_PREFIX/trainium-executor.tar.gz"
    fetch="aws s3 cp $(printf '%q' "$S3_PREFIX/trainium-executor.tar.gz") $REMOTE_TAR"
    echo "deploy: staged at $S3_PREFIX/trainium-executor.tar.gz"
else
    scp "${SSH_OPTS[@]}" "$tarball" "$TARGET:$REMOTE_TAR"
    fetch="true"
    echo "deploy: copied to $TARGET:$REMOTE_TAR"
fi

setup_args=""
if [ ${#SETUP_ARGS[@]} -gt 0 ]; then
    setup_args="$(printf ' %q' "${SETUP_ARGS[@]}")"
fi
# One remote shell: fetch, replace the previous copy, run the set-up.
remote="set -e; $fetch; rm -rf ~/$REMOTE_DIR.new; mkdir -p ~/$REMOTE_DIR.new; \
tar -xzf $REMOTE_TAR -C ~/$REMOTE_DIR.new; rm -rf ~/$REMOTE_DIR; mv ~/$REMOTE_DIR.new ~/$REMOTE_DIR; \
rm -f $REMOTE_TAR; sudo bash ~/$REMOTE_DIR/deployment/setup_instance.sh$setup_args"
# The command is built here on purpose (values quoted with %q above).
# shellcheck disable=SC2029
ssh "${SSH_OPTS[@]}" "$TARGET" "$remote"
echo "deploy: done; the service runs on $HOST:8000 (see docs/instance.md)"
