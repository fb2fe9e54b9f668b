"""Bearer-token authentication: every endpoint but /health, constant-time comparison."""

from __future__ import annotations

import hmac
from collections.abc import Container

# Endpoints anyone may call: load balancers, the Lambda's probe and systemd checks need
# /health without a secret. Its verbose form (worker pids, job ids, memory, respawn
# history, tracebacks) is for operators and needs the token like everything else.
# The dashboard's page, script and style sheet hold no data (dashboard.py): the page asks
# for the token and sends it with every API call it makes.
PUBLIC_PATHS = frozenset({"/health", "/", "/dashboard/app.js", "/dashboard/style.css"})
TOKEN_ONLY_QUERY = "verbose"


def is_public(path: str, query: Container[str]) -> bool:
    """True for the requests anyone may make: GET /health without `verbose`, and the
    dashboard's static files."""
    if path == "/health":
        return TOKEN_ONLY_QUERY not in query
    return path in PUBLIC_PATHS


def check_bearer(header: str | None, token: str | None) -> bool:
    """True when no token is configured, or the Authorization header carries exactly it."""
    if not token:
        return True
    if not header:
        return False
    scheme, _, supplied = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # compare_digest on bytes: constant time in the token's content, and it accepts
    # non-ASCII input, which it refuses as str.
    return hmac.compare_digest(supplied.strip().encode("utf-8"), token.encode("utf-8"))
