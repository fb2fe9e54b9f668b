#!/usr/bin/env bash
# Installs the non-Python tools the test suite calls, when they are missing and we may:
# the shellcheck linter (tests/test_deployment.py lints the scripts), systemd-analyze
# (it verifies the unit) and nginx (tests/test_nginx_front_door.py runs the shipped
# deployment/nginx/nginx.conf in a real nginx of its own, on loopback ports). Never fails
# the build: without them those tests skip, and this says so.
set -euo pipefail
missing=()
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing ${missing[*]}; install them to run every test (those tests skip)" >&2
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
