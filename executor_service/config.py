"""The service's settings: its own (HTTP, auth, store) and the pool's, each declared once.

`ServiceConfig` declares the HTTP layer's settings with `setting()` and carries the
pool's (`PoolConfig`, declared in warm_pool/config.py) as `pool`. Flags, environment
variables, the bounds check and docs/configuration.md all come from those two
declarations. Precedence: a command-line flag wins over the environment variable, which
wins over the default. `python -m executor_service.config` prints the reference table.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from executor_service import validation
from warm_pool import ConfigError, PoolConfig, settings

setting = settings.setting

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

__all__ = ["ConfigError", "ServiceConfig", "add_arguments", "from_sources", "read_token_file"]


@dataclass(frozen=True)
class ServiceConfig:
    """The validated settings of one service process."""

    host: str = setting("127.0.0.1", "address to listen on (a non-loopback one needs a token)")
    port: int = setting(8000, "TCP port to listen on", minimum=0, maximum=65535)
    max_batch_size: int = setting(10, "most scripts in one batch", minimum=1)
    max_body_bytes: int = setting(
        10 * 1024 * 1024, "largest request body; larger gets 413, refused from its Content-Length "
        "before it is read", unit="bytes", minimum=1024)
    retention_hours: float = setting(
        168.0, "finished jobs older than this are pruned from the store (checked at start and "
        "every 10 minutes)", unit="h", minimum=0, zero="keep forever")
    shutdown_grace: float = setting(
        30.0, "on SIGTERM, running jobs get this long to finish before they are killed "
        "(status interrupted)", unit="s", minimum=0.001)
    threads: int = setting(
        32, "HTTP worker threads; each synchronous /execute request holds one while its jobs run",
        minimum=2)
    connection_limit: int = setting(
        10_000, "most open client connections; beyond it new ones wait in the listen backlog "
        "(lowered to fit the open-files limit, with a warning)", minimum=64)
    channel_timeout: int = setting(
        30, "close a connection that has sent nothing for this long, unless its request is being "
        "served", unit="s", minimum=1)
    lingering_time: float = setting(
        30.0, "after the HTTP server refuses a request itself (413, 431, 400), read and discard what "
        "the client still sends for at most this long, so it reads the answer instead of a reset",
        unit="s", minimum=0, zero="close at once")
    max_streams: int | None = setting(
        None, "event streams (GET /jobs/<id>/events) open at once; each holds an HTTP thread while it "
        "is open, so at most half of threads: the rest always serve the API; beyond it 503 with "
        "Retry-After", minimum=1, none="a quarter of threads (8 of 32), at least 1")
    stream_heartbeat: float = setting(
        15.0, "an open event stream sends a heartbeat event after this long without another, so that "
        "clients and proxies see it alive", unit="s", minimum=0.1, maximum=300)
    api_token: str | None = setting(
        None, "bearer token required on every endpoint but /health (never a flag: it would show "
        "in ps)", flag=False, secret=True)
    api_token_file: Path | None = setting(
        None, "file holding the bearer token (its first line), used when EXECUTOR_API_TOKEN is unset")
    allow_unauthenticated: bool = setting(
        False, "allow listening on a non-loopback address without a token")
    log_level: str = setting("INFO", "log level", choices=LOG_LEVELS)
    deduplicate: bool = setting(
        True, "a request for a paper_id whose identical code is already queued or running gets that "
        "job back (\"deduplicated\": true) instead of a second run")
    profile_jobs: bool = setting(
        False, "capture a Neuron profile of every job whose request does not say (\"profile\": true or "
        "false): on neuron its process starts its runtime with the profiler on (a runtime start more per "
        "job), and the profile becomes the job's artifacts; elsewhere the result says it is unavailable")
    callback_hosts: tuple[str, ...] = setting(
        (), "hosts a callback_url may name, comma-separated: a name or address with an optional :port, "
        "or *.domain for the names below it; other URLs are refused (400), so callers cannot make the "
        "service probe the network", none="none: callback_url is refused")
    callback_secret: str | None = setting(
        None, "key of the X-Signature HMAC-SHA256 on every callback (docs/webhooks.md); needed when "
        "callback_hosts is set (never a flag: it would show in ps)", flag=False, secret=True)
    callback_secret_file: Path | None = setting(
        None, "file holding the callback secret (its first line), used when EXECUTOR_CALLBACK_SECRET "
        "is unset")
    callback_attempts: int = setting(
        8, "delivery attempts of one callback before it is marked failed", minimum=1, maximum=100)
    callback_backoff: float = setting(
        2.0, "wait after a callback's first failed attempt; doubled after each further one, at most "
        "10 minutes", unit="s", minimum=0.01)
    callback_timeout: float = setting(
        10.0, "how long one callback attempt may take (connect, send, answer)", unit="s", minimum=0.1,
        maximum=300)
    ray_address: str | None = setting(
        None, "run the jobs on a Ray cluster: the head's address HOST:PORT (`ray start --head`); the "
        "service then keeps the job store and dispatches to one warm pool per node with neuron_cores, "
        "with the pool settings below (docs/cluster.md)", none="unset: this instance's own pool")
    max_attempts: int = setting(
        2, "on a cluster, how many times a job may be started when the node running it is lost "
        "(Spot reclaim, crash); past it the job ends with error_type node_lost", minimum=1, maximum=10)
    node_start_timeout: float = setting(
        300.0, "on a cluster, how long a node's pool actor may take to start (placed, constructed, "
        "answering); past it the actor is killed and placed again 10 s later, the node listed "
        "under failed_placements", unit="s", minimum=1)
    artifacts_s3_uri: str | None = setting(
        None, "upload each finished job's result.json and artifacts to "
        "s3://bucket/prefix/<paper_id>/<job_id>/ (boto3, default credentials: the instance role)",
        none="no upload")
    sqs_queue_url: str | None = setting(
        None, "also take jobs from this SQS queue: each message body is a POST /execute request; "
        "region and credentials from the standard AWS configuration (the instance role), the endpoint "
        "from AWS_ENDPOINT_URL_SQS when set (docs/operations.md, The queue)", none="HTTP intake only")
    sqs_wait_time: int = setting(
        10, "how long one SQS receive waits for a message (long polling); the service polls only "
        "while a slot is free", unit="s", minimum=1, maximum=20)
    sqs_visibility_timeout: int = setting(
        120, "how long a message the service took stays invisible to other consumers; renewed every "
        "third of it while its job runs, so it is also how soon a message comes back after the service "
        "dies", unit="s", minimum=2, maximum=43200)
    spot_watch: str = setting(
        "auto", "watch the instance metadata service for a Spot interruption notice and a rebalance "
        "recommendation, and drain on one (docs/operations.md, Running on Spot); auto: when the "
        "machine says it is an EC2 instance", choices=("auto", "on", "off"))
    imds_endpoint: str = setting(
        "http://169.254.169.254", "the instance metadata service's base URL (IMDSv2)")
    spot_poll_interval: float = setting(
        5.0, "how often the metadata service is asked for a notice", unit="s", minimum=0.05, maximum=60)
    spot_margin: float = setting(
        15.0, "time kept before a Spot notice's deadline to return unfinished work: jobs still running "
        "then are stopped and recorded interrupted, their SQS messages made visible again", unit="s",
        minimum=0)
    spot_rebalance_window: float = setting(
        120.0, "on a rebalance recommendation (which has no deadline), the window running jobs are "
        "given, counted from its noticeTime; the service stays drained until it is restarted", unit="s",
        minimum=0, zero="rebalance recommendations are ignored (only interruption notices drain)")
    pool: PoolConfig = field(default_factory=PoolConfig)

    def __repr__(self) -> str:  # secrets never reach a log line or a traceback
        secret = {s.name for s in settings.declared(ServiceConfig) if s.spec.secret}
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in secret}
        hidden = ", ".join(f"{name}={'set' if getattr(self, name) else None}" for name in sorted(secret))
        return f"ServiceConfig({shown}, {hidden})"

    @property
    def work_dir(self) -> Path:
        return Path(self.pool.work_dir)

    @property
    def store_path(self) -> Path:
        return self.work_dir / "jobs.sqlite3"

    @property
    def stream_limit(self) -> int:
        """How many event streams may be open at once (max_streams, or its default)."""
        return self.max_streams if self.max_streams is not None else max(1, self.threads // 4)

    def request_rules(self) -> validation.Rules:
        """The limits a request is validated against, over HTTP and from the queue alike."""
        return validation.Rules(self.pool.default_timeout, self.pool.max_timeout, self.max_batch_size,
                                self.callback_hosts, self.profile_jobs)

    def is_loopback(self) -> bool:
        """True when the listen address is reachable only from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def validate(self) -> ServiceConfig:
        """Raise ConfigError naming the first bad setting; return self otherwise."""
        settings.check_all(self)
        self.pool.validate()
        if not self.host:
            raise ConfigError(f"{_label('host')} must not be empty")
        if self.max_streams is not None and self.max_streams > self.threads // 2:
            raise ConfigError(f"{_label('max_streams')} must be at most half "
                              f"of threads ({self.threads}): each open stream holds a thread")
        uri = self.artifacts_s3_uri
        if uri is not None and (not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]):
            raise ConfigError(f"{_label('artifacts_s3_uri')} must look "
                              f"like s3://bucket/prefix, not {uri[:64]!r}")
        if self.sqs_queue_url is not None and not self.sqs_queue_url.startswith(("https://", "http://")):
            raise ConfigError(f"{_label('sqs_queue_url')} must be the queue's "
                              f"URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME), not "
                              f"{validation.echo(self.sqs_queue_url)}")
        if self.sqs_queue_url is not None and self.pool.max_timeout + self.sqs_visibility_timeout > 43200:
            raise ConfigError(f"{settings.label(PoolConfig, 'max_timeout')} plus "
                              "sqs_visibility_timeout must stay under SQS's 12 hours of visibility a message")
        if not self.imds_endpoint.startswith("http://"):
            raise ConfigError(f"{_label('imds_endpoint')} must be an http:// "
                              f"URL, not {validation.echo(self.imds_endpoint)}")
        if self.api_token is not None and not self.api_token.strip():
            raise ConfigError(f"{_label('api_token')} must not be blank")
        if self.callback_hosts and not self.callback_secret:
            raise ConfigError(f"{_label('callback_hosts')} needs a "
                              "callback secret to sign with: set EXECUTOR_CALLBACK_SECRET or "
                              "EXECUTOR_CALLBACK_SECRET_FILE")
        for entry in self.callback_hosts:
            try:
                validation.split_host(entry)
            except ValueError as exc:
                raise ConfigError(f"{_label('callback_hosts')}: {exc}") from None
        if self.ray_address is not None:
            try:
                split_address(self.ray_address)
            except ValueError as exc:
                raise ConfigError(f"{_label('ray_address')} {exc}") from None
        if not self.api_token and not self.is_loopback() and not self.allow_unauthenticated:
            raise ConfigError(f"refusing to listen on non-loopback host {self.host!r} without an API "
                              "token: set EXECUTOR_API_TOKEN or EXECUTOR_API_TOKEN_FILE, or pass "
                              "--allow-unauthenticated")
        return self

    def prepare_work_dir(self) -> None:
        """Create the work dir and prove it is writable; ConfigError naming the setting."""
        where = f"{settings.label(PoolConfig, 'work_dir')} {self.work_dir}"
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            probe = self.work_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"{where} is not a writable directory: {exc.strerror or exc}") from None


def _label(name: str) -> str:
    return settings.label(ServiceConfig, name)


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) as (host, port); ValueError when it is not that."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT, not {validation.echo(address)}")
    return host.strip("[]"), int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of the service and of the pool."""
    settings.add_arguments(parser, (ServiceConfig, PoolConfig))


def from_sources(args: argparse.Namespace | None = None,
                 environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """Build and validate the config from parsed flags, then environment, then defaults."""
    environ = os.environ if environ is None else environ
    pool = PoolConfig(**settings.from_sources(PoolConfig, args, environ))
    values = settings.from_sources(ServiceConfig, args, environ, pool=pool)
    if not values.get("api_token") and values.get("api_token_file"):
        values["api_token"] = read_token_file(Path(values["api_token_file"]))
    if not values.get("callback_secret") and values.get("callback_secret_file"):
        values["callback_secret"] = read_token_file(Path(values["callback_secret_file"]),
                                                    "callback_secret_file")
    if "log_level" in values:
        values["log_level"] = str(values["log_level"]).upper()
    return ServiceConfig(**values).validate()


def read_token_file(path: Path, name: str = "api_token_file") -> str:
    """The secret in a file (its first line, stripped); ConfigError naming setting `name`
    if unreadable or empty."""
    where = f"{_label(name)} {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ConfigError(f"{where} is empty")
    return token


def reference_markdown(names: tuple[str, ...] | None = None) -> str:
    """The settings table of docs/configuration.md (all settings, or those named), from
    the two declarations."""
    return settings.markdown_table((ServiceConfig, PoolConfig), names)


_BEGIN, _END = "<!-- settings:begin -->\n", "<!-- settings:end -->"


def write_reference(path: Path) -> None:
    """Replace the generated table between the markers in `path` (make docs)."""
    text = path.read_text(encoding="utf-8")
    head, _, rest = text.partition(_BEGIN)
    _, _, tail = rest.partition(_END)
    path.write_text(head + _BEGIN + reference_markdown() + _END + tail, encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_reference(Path(sys.argv[2]))
    else:
        sys.stdout.write(reference_markdown())
