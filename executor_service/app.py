"""The Flask application: thin handlers that validate, call the runner, and answer JSON.

`app_for(service)` builds the app around a started `service.Service` (the pool, the job
store, the runner, ...), handing each group of routes what it uses; `create_app(config,
pool=None)` starts the service first. Errors become responses through one table
(`ERRORS`), never an isinstance chain in the handlers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request, send_file
from werkzeug.exceptions import HTTPException

from executor_service import artifacts, auth, dashboard, jobs, streaming, validation
from executor_service.config import ServiceConfig
from executor_service.jobs import RETRY_AFTER_S, Accepted, JobRunner, batch_response
from executor_service.metrics import CONTENT_TYPE, Metrics
from executor_service.service import Service
from executor_service.store import JobStore
from executor_service.validation import ApiError
from warm_pool import Pool, PoolBroken, PoolClosed, PoolStats, utc_iso
from warm_pool import QueueFull as PoolQueueFull

log = logging.getLogger("executor_service.app")

_RETRY = {"Retry-After": str(RETRY_AFTER_S)}

# What the runner and the pool refuse → (HTTP status, message, headers). The message is
# the exception's own unless given; an exception's `detail` adds fields to the answer.
ERRORS: dict[type[BaseException], tuple[int, str, dict[str, str]]] = {
    jobs.QueueFull: (503, "{exc}", _RETRY),
    jobs.Closing: (503, "{exc}", _RETRY),
    jobs.Unavailable: (503, "{exc}", _RETRY),  # a broken pool keeps trying to start again
    jobs.UnknownJob: (404, "{exc}", {}),
    jobs.UnknownBatch: (404, "{exc}", {}),
    jobs.AlreadyFinished: (409, "{exc}", {}),
    PoolQueueFull: (503, "queue is full; retry later", _RETRY),
    PoolClosed: (503, "service is shutting down; retry later", _RETRY),
    PoolBroken: (503, "pool is broken: {exc}", _RETRY),
}

# HTTP errors → our stable messages: Werkzeug's, and those the WSGI server raises before
# Flask sees the request (http_server.JsonErrorTask), with the input they echo cut short.
HTTP_MESSAGES = {
    400: "bad request",
    404: "not found",
    405: "method not allowed",
    413: "request body too large (limit {limit} bytes)",
    431: "request header fields too large (limit {limit} bytes)",
    500: "internal error",
    501: "not implemented",
}

# What an unauthenticated GET /health shows of the pool: what a probe needs, no more.
PUBLIC_POOL_FIELDS = ("size", "idle", "busy", "state")


def public_cluster(cluster: dict[str, Any]) -> dict[str, Any]:
    """What anyone may see of a cluster: its nodes and their pools' counts (no addresses,
    pids or tracebacks: those are /health?verbose=1's, with the token)."""
    return {"engine": cluster["engine"],
            "nodes": [{"node_id": n["node_id"], "neuron_cores": n["neuron_cores"], "alive": n["alive"],
                       "pool": {k: (n["pool"] or {}).get(k) for k in PUBLIC_POOL_FIELDS}}
                      for n in cluster["nodes"]]}


def server_error_message(status: int, detail: str, max_body: int, max_header: int) -> str:
    """The message of an error the WSGI server raised itself, before Flask saw the request."""
    message = HTTP_MESSAGES.get(status, "error")
    if status in (413, 431):
        return message.format(limit=max_body if status == 413 else max_header)
    if status == 500:  # its detail may be a traceback: never shown
        return message
    return f"{message}: {validation.cut(detail)}"


def create_app(config: ServiceConfig, pool: Pool | None = None) -> Flask:
    """Start the service's parts (`Service.start`) and the app around them."""
    return app_for(Service.start(config, pool))


def app_for(service: Service) -> Flask:
    """The service's WSGI app, its routes given the parts they use."""
    config, runner = service.config, service.runner
    app = Flask("executor_service", static_folder=None)  # no /static route: nothing to serve
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False
    _register_hooks(app, config, service.metrics)
    _register_errors(app, config)
    _register_submissions(app, config, runner, service.store)
    _register_health(app, service)
    _register_jobs(app, config, runner, service.store)
    streaming.register(app, config, runner)
    dashboard.register(app)
    return app


def _register_hooks(app: Flask, config: ServiceConfig, metrics: Metrics) -> None:
    @app.before_request
    def authenticate():
        g.started = time.monotonic()
        if auth.is_public(request.path, request.args):
            return None
        if not auth.check_bearer(request.headers.get("Authorization"), config.api_token):
            resp = jsonify(error="unauthorized: send Authorization: Bearer <token>")
            resp.status_code = 401
            resp.headers["WWW-Authenticate"] = 'Bearer realm="trainium-executor"'
            return resp
        return None

    @app.after_request
    def no_sniffing(resp: Response) -> Response:
        # Every answer is JSON or Prometheus text; never let a browser guess otherwise.
        resp.headers["X-Content-Type-Options"] = "nosniff"
        return resp

    @app.after_request
    def count(resp: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(endpoint=rule, status=str(resp.status_code)).inc()
        if resp.status_code >= 500 or request.path not in ("/health", "/metrics", "/status"):
            log.info("request", extra={"method": request.method, "path": request.path,
                                       "status": resp.status_code,
                                       "ms": round((time.monotonic() - g.get("started", 0)) * 1000, 1)})
        return resp


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra) -> Response:
    resp = jsonify(error=message, **extra)
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _register_errors(app: Flask, config: ServiceConfig) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return _error(exc.status, exc.message, exc.headers, **exc.extra)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = HTTP_MESSAGES.get(exc.code or 500, exc.description or "error")
        if exc.code == 413:
            message = message.format(limit=config.max_body_bytes)
        elif exc.code == 404:
            message = f"not found: {validation.echo(request.path)}"
        elif exc.code == 405:
            message = (f"method {validation.echo(request.method)} not allowed on "
                       f"{validation.echo(request.path)}")
        methods = getattr(exc, "valid_methods", None)
        headers = {"Allow": ", ".join(methods)} if exc.code == 405 and methods else None
        return _error(exc.code or 500, message, headers)

    @app.errorhandler(Exception)
    def other_error(exc: Exception):
        for cls in type(exc).__mro__:
            if cls in ERRORS:
                status, message, headers = ERRORS[cls]
                return _error(status, message.format(exc=exc), headers, **getattr(exc, "detail", {}))
        log.exception("unhandled error", extra={"path": request.path})
        return _error(500, f"internal error: {type(exc).__name__}")


def _register_submissions(app: Flask, config: ServiceConfig, runner: JobRunner, store: JobStore) -> None:
    """POST /execute, /execute_batch (the seed's, waiting for results unless asked not
    to) and /jobs (fire-and-forget)."""
    rules = config.request_rules()

    def body() -> dict[str, Any]:
        return validation.parse_json_object(request.get_data(cache=False))

    def prefer() -> str:
        return ", ".join(request.headers.getlist("Prefer"))

    def idempotency_key() -> str | None:
        return validation.parse_idempotency_key(request.headers.get("Idempotency-Key"))

    def accepted(done: Accepted, single: bool, preferred: bool = False) -> Response:
        """202 with the batch (and, for one script, the job) to poll: POST /jobs's answer."""
        rows = store.get_batch(done.batch_id) or []
        payload: dict[str, Any] = {"batch_id": done.batch_id, "job_ids": dict(done.ids),
                                   "status": jobs.batch_status(rows) if rows else "queued",
                                   "batch_url": f"/batches/{done.batch_id}",
                                   "deduplicated": bool(done.deduplicated),
                                   "deduplicated_papers": list(done.deduplicated)}
        if single:
            paper_id, job_id = done.ids[0]
            payload.update(job_id=job_id, job_url=f"/jobs/{job_id}", paper_url=f"/papers/{paper_id}")
            if rows:
                payload["timeout_clamped_from"] = rows[0].timeout_clamped_from
        resp = jsonify(payload)
        resp.status_code = 202
        resp.headers["Location"] = f"/batches/{done.batch_id}"
        if preferred:
            resp.headers["Preference-Applied"] = "respond-async"
        return resp

    def run(req: validation.Request) -> Response:
        """/execute and /execute_batch: 202 at once when asked (Prefer or "async"), else the
        results when the jobs are done. A client that hangs up stops only the waiting: the
        jobs run on and their results are stored (GET /papers/<paper_id>)."""
        key = idempotency_key()
        if req.respond_async:
            return accepted(runner.accept(req, "async", key), not req.is_batch,
                            validation.prefers_async(prefer()))
        done = runner.accept(req, "sync", key)
        # Bound: every job of the queue ahead could take its full timeout on one worker.
        bound = config.pool.max_timeout * (config.pool.max_queue + len(done.ids)) + 60
        gone = request.environ.get("waitress.client_disconnected")
        if not runner.wait(done.job_ids, bound, gone):
            if gone is not None and gone():
                log.info("client hung up; its jobs run on", extra={"batch_id": done.batch_id,
                                                                   "job_ids": dict(done.ids)})
                return accepted(done, not req.is_batch)  # nobody reads it
            raise ApiError(503, "service stopped before the jobs finished; fetch them later",
                           _RETRY, batch_id=done.batch_id, job_ids=dict(done.ids))
        rows = store.get_batch(done.batch_id) or []
        if not req.is_batch:
            return jsonify(rows[0].to_public())
        return jsonify(batch_response({r.paper_id: r.to_public() for r in rows}))

    @app.post("/execute")
    def execute():
        return run(validation.parse_single(body(), "test", rules, prefer()))

    @app.post("/execute_batch")
    def execute_batch():
        return run(validation.parse_batch(body(), rules, prefer()))

    @app.post("/jobs")
    def submit_jobs():
        req = validation.parse_jobs(body(), "job", rules)
        return accepted(runner.accept(req, "async", idempotency_key()), not req.is_batch)


def _register_health(app: Flask, service: Service) -> None:
    """GET /health (public: a probe's fields; the rest with the token), /status, /metrics."""
    config, runner, store, intake, watcher = (service.config, service.runner, service.store, service.intake,
                                              service.watcher)
    default_t = config.pool.default_timeout

    @app.get("/health")
    def health():
        # Anyone may ask; ?verbose=1 (token required, see auth.is_public) shows everything.
        verbose = validation.parse_flag(request.args.get("verbose"), "verbose")
        try:
            stats = service.pool.stats()
        except Exception as exc:  # noqa: BLE001 - health must answer whatever happens
            stats = PoolStats.unknown(repr(exc))
        ok = stats.healthy
        pool = stats.to_json()
        payload = {
            "status": "healthy" if ok else "unhealthy",
            "timestamp": utc_iso(time.time()),
            "neuron_available": stats.backend == "neuron" and ok,
            "working_dir": str(config.work_dir),
            "max_execution_time": default_t,
            "pool": pool if verbose else {k: pool[k] for k in PUBLIC_POOL_FIELDS},
            **({"isolation": stats.isolation} if verbose else {}),
        }
        if stats.cluster is not None:
            payload["cluster"] = stats.cluster if verbose else public_cluster(stats.cluster)
        if intake is not None:
            payload["queue"] = intake.stats().to_public()
            if verbose:
                payload["queue"].update(url=intake.url, rejected_recent=store.rejects())
        notice = watcher.notice if watcher is not None else None
        if notice is not None:
            ok = False
            payload["status"] = "unhealthy"
            payload["interruption"] = {**notice.to_public(), "jobs_interrupted": len(watcher.interrupted)}
            payload["reason"] = runner.refusal or "the instance is being reclaimed"
        if not ok and "reason" not in payload:
            if stats.state == "broken":
                payload["reason"] = ("pool is broken: " + str(stats.broken_reason) if verbose
                                     else "pool is broken (GET /health?verbose=1 with the token says why)")
            elif stats.state in ("closing", "closed"):
                payload["reason"] = "pool is shutting down"
            elif stats.cluster is not None and not stats.cluster["nodes"]:
                payload["reason"] = "no node with neuron_cores has joined the cluster yet"
            else:
                payload["reason"] = "no worker is ready yet (starting)"
        return jsonify(payload), (200 if ok else 503)

    @app.get("/status")
    def status():
        return jsonify(runner.status())

    @app.get("/metrics")
    def prometheus():
        return Response(service.metrics.render(), content_type=CONTENT_TYPE)


def _register_jobs(app: Flask, config: ServiceConfig, runner: JobRunner, store: JobStore) -> None:
    """Reading jobs, papers, batches and artifacts; cancelling a job."""

    @app.get("/jobs")
    def list_jobs():
        return jsonify(runner.list_jobs(validation.parse_job_query(request.args)))

    @app.get("/papers/<paper_id>")
    def get_paper(paper_id: str):
        return jsonify(runner.paper_document(validation.parse_paper_id(paper_id)))

    @app.get("/jobs/<job_id>")
    def get_job(job_id: str):
        return jsonify(runner.job_document(job_id))

    def job_row(job_id: str):
        row = store.get_job(job_id)
        if row is None:
            raise jobs.UnknownJob(f"no job {validation.echo(job_id)}")
        return row

    @app.get("/jobs/<job_id>/artifacts")
    def list_artifacts(job_id: str):
        row = job_row(job_id)
        kept = store.artifacts(job_id)
        for item in kept:
            item["url"] = f"/jobs/{job_id}/artifacts/{item['name']}"
        skipped = (row.result or {}).get("artifacts_skipped", [])
        return jsonify(job_id=job_id, status=row.status, artifacts=kept,
                       total_bytes=sum(a["size"] for a in kept), skipped=skipped,
                       export=store.export(job_id))

    @app.get("/jobs/<job_id>/artifacts/<path:name>")
    def get_artifact(job_id: str, name: str):
        job_row(job_id)
        found = store.artifact(job_id, name)
        if found is None:  # only names the store holds are served: no path ever comes from the URL
            raise ApiError(404, f"job {validation.echo(job_id)} has no artifact {validation.echo(name)}")
        path = config.pool.artifacts_dir / job_id / found["name"]
        resp = send_file(path, mimetype=artifacts.DEFAULT_TYPE, as_attachment=True,
                         download_name=found["name"].rsplit("/", 1)[-1], etag=found["sha256"],
                         conditional=True, max_age=0)
        resp.headers["Content-Type"] = found["content_type"]  # as is: send_file would add a charset
        resp.headers.update(artifacts.HEADERS)
        return resp

    @app.delete("/jobs/<job_id>")
    def cancel_job(job_id: str):
        return jsonify(runner.cancel(job_id).to_public())

    @app.get("/batches/<batch_id>")
    def get_batch(batch_id: str):
        return jsonify(runner.batch_document(batch_id))

