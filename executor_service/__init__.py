"""Trainium Executor HTTP service on top of the warm pool.

Modules, one role each: config (settings, flags, environment), app (Flask app factory
and routes), validation (request rules), auth (bearer token), store (SQLite job store),
jobs (runner between store and pool), metrics (Prometheus), serve (waitress and the
SIGTERM drain), logs (JSON lines), client (stdlib-only client), cli (console script).
The service process never imports torch.
"""
