"""Bearer-token authentication: every endpoint but /health, constant-time comparison."""

from __future__ import annotations

import hmac

# Endpoints anyone may call: load balancers and systemd checks need /health without a secret.
PUBLIC_PATHS = frozenset({"/health"})


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
