#!/usr/bin/env bash
# Prepares this machine for the test suite, when we may (as root):
# - installs the non-Python tools the tests call when they are missing: the shellcheck
#   linter (tests/test_deployment.py lints the scripts), systemd-analyze (it verifies the
#   units), nft (it checks the job network rules) and nginx (tests/test_nginx_front_door.py
#   runs the shipped deployment/nginx/nginx.conf in a real nginx of its own, on loopback)
#   and Debian's chromium (tests/test_dashboard.py drives the dashboard in it, headless);
# - lets job uids reach the interpreter: jobs run under their own unprivileged uids and
#   must read Python's standard library and the venv. Where those live below a directory
#   closed to other users (pyenv under /root on some machines), that directory is opened
#   for traversal only (o+x: no listing, no reading of anything not already readable).
# Never fails the build over a tool: without one those tests skip, and this says so.
# Usage: system-deps.sh [PYTHON]   (PYTHON: the venv's interpreter, default python3)
set -euo pipefail
python=${1:-python3}

missing=()
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing+=(nftables)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ "$(id -u)" -ne 0 ]; then
    [ ${#missing[@]} -eq 0 ] || echo "system-deps: missing ${missing[*]}; install them to run every test (those tests skip)" >&2
    exit 0
fi

# Python and the venv must be reachable by job uids (see above).
for dir in $("$python" -c 'import sys, sysconfig; print(sysconfig.get_paths()["stdlib"], sys.prefix)'); do
    path=""
    IFS=/ read -r -a parts <<<"${dir#/}"
    for part in "${parts[@]}"; do
        path="$path/$part"
        if [ -d "$path" ] && ! su -s /bin/sh nobody -c "test -x '$path'" 2>/dev/null; then
            echo "system-deps: opening $path for traversal: job uids must reach $dir" >&2
            chmod o+x "$path"
        fi
    done
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing ${missing[*]} and no apt-get; those tests skip" >&2
    exit 0
fi
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
    echo "system-deps: could not install ${missing[*]}; those tests skip" >&2
fi
# The tests start nginx themselves; on a machine with systemd Debian's package would also
# start the system's nginx with its default site on port 80. Leave the machine as it was.
case " ${missing[*]} " in *" nginx "*)
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
        systemctl disable --now nginx >/dev/null 2>&1 || true
        echo "system-deps: stopped and disabled the system nginx the package started (tests run their own)" >&2
    fi ;;
esac
