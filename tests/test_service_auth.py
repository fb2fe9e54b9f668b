"""Bearer-token auth end to end, the loopback rule, and the token kept from job code."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml
from service_fixtures import OPENAPI, REPO, openapi, start_server  # noqa: F401

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-token-\u00e9-value"[:13] + "abc123XYZ"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    srv = start_server(tmp_path_factory, "auth", env={"EXECUTOR_API_TOKEN": TOKEN}, token=TOKEN)
    yield srv
    srv.close()


def _documented() -> set[tuple[str, str]]:
    """Every (method, path template) that openapi.yaml documents."""
    doc = yaml.safe_load(OPENAPI.read_text())
    return {(method.upper(), path) for path, ops in doc["paths"].items()
            for method in ops if method in ("get", "post", "put", "patch", "delete")}


# Every endpoint but GET /health and the dashboard's page, plus /health's verbose form:
# each needs the token (/dashboard/{name} is tried with a name it does not serve).
PUBLIC = {("GET", "/health"), ("GET", "/")}
PROTECTED = sorted((m, p) for m, p in _documented() if (m, p) not in PUBLIC) + [
    ("GET", "/health?verbose=1"), ("GET", "/health?verbose=0")]


def test_openapi_documents_every_route_the_app_serves(tmp_path):
    from executor_service.app import app_for
    from executor_service.config import ServiceConfig
    from executor_service.service import Service
    from warm_pool import PoolConfig, WarmPool

    config = ServiceConfig(pool=PoolConfig(work_dir=tmp_path, backend="cpu"))
    service = Service.start(config, WarmPool(config.pool))  # the pool never started: routes only
    try:
        served = {(method, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule))
                  for rule in app_for(service).url_map.iter_rules()
                  for method in rule.methods - {"HEAD", "OPTIONS"}}
    finally:
        service.runner.shutdown(grace=1)
    assert served == _documented()


def test_health_needs_no_token(secured, openapi):  # noqa: F811
    resp = secured.get("/health", token=None)
    assert resp.status == 200 and set(resp.json["pool"]) == {"size", "idle", "busy", "state"}
    openapi.validate("GET", "/health", resp)


@pytest.mark.parametrize("method,path", PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}"], ids=["none", "wrong", "basic"])
def test_every_endpoint_but_health_needs_the_token(secured, openapi, method, path, header):  # noqa: F811
    template = path.split("?")[0]
    path = re.sub(r"\{\w+\}", "x", path)
    body = {"code": "print(1)"} if method == "POST" else None
    resp = secured.request(method, path, body, token=None,
                           headers={"Authorization": header} if header else None)
    assert resp.status == 401 and "unauthorized" in resp.json["error"]
    assert resp.headers["www-authenticate"].startswith("Bearer")
    openapi.validate(method, template, resp)


def test_verbose_health_with_the_token_shows_the_workers(secured, openapi):  # noqa: F811
    resp = secured.get("/health?verbose=1")
    assert resp.status == 200 and resp.json["pool"]["workers"]
    openapi.validate("GET", "/health", resp)


@pytest.mark.parametrize("header", ["Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer ",
                                    "Bearer \u00e9\u00e9"])
def test_wrong_credentials_are_refused(secured, header):
    resp = secured.post("/execute", {"code": "print(1)"}, token=None, headers={"Authorization": header})
    assert resp.status == 401


def test_posts_are_refused_before_validation(secured):
    assert secured.post("/execute", raw=b"{bad", token=None).status == 401


def test_the_right_token_is_accepted(secured):
    assert secured.get("/status").status == 200
    resp = secured.post("/execute", {"code": "print('authorized')"})
    assert resp.status == 200 and resp.json["stdout"] == "authorized\n"


def test_job_code_never_sees_the_token(secured):
    code = ("import os, pathlib\n"
            "print(sorted(os.environ.items()))\n"
            "print(pathlib.Path('/proc/self/environ').read_bytes())\n"
            "try:\n    print(pathlib.Path(f'/proc/{os.getppid()}/environ').read_bytes())\n"
            "except PermissionError:\n    print('parent environ: denied')\n")
    body = secured.post("/execute", {"code": code}).json
    assert body["success"], body["stderr"]
    assert TOKEN not in body["stdout"] and "EXECUTOR_API_TOKEN" not in body["stdout"]


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "executor_service", "serve", *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=30)


def test_refuses_non_loopback_bind_without_a_token():
    proc = _serve("--host", "0.0.0.0", "--port", "1")
    assert proc.returncode == 2
    assert "EXECUTOR_API_TOKEN" in proc.stderr and "--allow-unauthenticated" in proc.stderr


def test_bad_settings_are_refused_with_their_name():
    proc = _serve("--pool-size", "0")
    assert proc.returncode == 2 and "pool_size (--pool-size / EXECUTOR_POOL_SIZE)" in proc.stderr
    proc = _serve(env={"EXECUTOR_PORT": "eighty"})
    assert proc.returncode == 2 and "EXECUTOR_PORT" in proc.stderr
    proc = _serve("--work-dir", "/proc/no-such-dir")
    assert proc.returncode == 2 and "EXECUTOR_WORK_DIR" in proc.stderr and "writable" in proc.stderr
