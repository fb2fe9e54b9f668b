"""The dashboard: one static page (`GET /`), its script and its style sheet.

The files hold no data: the page fetches everything from the API with the bearer token
the operator types once (kept in sessionStorage), so serving them without the token
shows nothing but the login form. They are served with a strict Content-Security-Policy
(this origin only; figures as blob: URLs), no framing and no caching.
"""

from __future__ import annotations

from importlib import resources

from flask import Flask, Response

from executor_service.validation import ApiError, echo

# The only files served (name in the URL → file, type): no path ever comes from the URL.
FILES = {
    "index.html": ("index.html", "text/html; charset=utf-8"),
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "style.css": ("style.css", "text/css; charset=utf-8"),
}
PUBLIC_PATHS = frozenset({"/", *(f"/dashboard/{name}" for name in FILES if name != "index.html")})

HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "connect-src 'self'; img-src 'self' blob:; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _file(name: str) -> Response:
    filename, content_type = FILES[name]
    body = resources.files("executor_service").joinpath("dashboard", filename).read_bytes()
    resp = Response(body, content_type=content_type)
    resp.headers.update(HEADERS)
    return resp


def register(app: Flask) -> None:
    """Add `GET /` and `GET /dashboard/<name>` (app.js, style.css)."""

    @app.get("/")
    def dashboard_page():
        return _file("index.html")

    @app.get("/dashboard/<name>")
    def dashboard_file(name: str):
        if name not in FILES or name == "index.html":
            raise ApiError(404, f"not found: /dashboard/{echo(name)}")
        return _file(name)
