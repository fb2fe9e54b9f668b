"""The service's settings: declared once, each with its flag, environment variable,
default and unit; built from CLI flags over environment over defaults, validated at
start with a message that names the setting.

Precedence: a command-line flag wins over the environment variable, which wins over
the default. `SETTINGS` is the single table the CLI, the docs and the tests read.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from warm_pool.config import BACKENDS, ConfigError, PoolConfig


@dataclass(frozen=True)
class Setting:
    """One setting: attribute name, flag, env var, type, default and what it means."""

    name: str
    env: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "EXECUTOR_HOST", str, "127.0.0.1", "address to listen on"),
    Setting("port", "EXECUTOR_PORT", int, 8000, "TCP port to listen on"),
    Setting("backend", "EXECUTOR_BACKEND", str, "auto", "pool backend", BACKENDS),
    Setting("pool_size", "EXECUTOR_POOL_SIZE", int, None,
            "workers in the pool (default: NeuronCores on neuron, else 2)"),
    Setting("work_dir", "EXECUTOR_WORK_DIR", Path, Path("/var/lib/trainium-jobs"),
            "job directories and the job store (jobs.sqlite3) live here"),
    Setting("max_memory_mb", "EXECUTOR_MAX_MEMORY_MB", int, None,
            "kill a job whose process tree exceeds this resident memory (MiB; 0 or unset: no limit)"),
    Setting("max_execution_time", "EXECUTOR_MAX_EXECUTION_TIME", float, 600.0,
            "largest per-job timeout a request may ask for, and the default (seconds)"),
    Setting("default_timeout", "EXECUTOR_DEFAULT_TIMEOUT", float, None,
            "timeout of a job whose request names none (seconds; default: max_execution_time)"),
    Setting("max_batch_size", "EXECUTOR_MAX_BATCH_SIZE", int, 10, "most scripts in one batch"),
    Setting("max_body_bytes", "EXECUTOR_MAX_BODY_BYTES", int, 10 * 1024 * 1024,
            "largest request body; larger gets 413, refused from its Content-Length before it is read "
            "(bytes)"),
    Setting("max_queue", "EXECUTOR_MAX_QUEUE", int, 100,
            "most accepted jobs waiting for a worker; beyond it 503 with Retry-After"),
    Setting("max_output_bytes", "EXECUTOR_MAX_OUTPUT_BYTES", int, 1_000_000,
            "captured output kept per stream per job (head and tail kept, bytes)"),
    Setting("retention_hours", "EXECUTOR_RETENTION_HOURS", float, 168.0,
            "finished jobs older than this are pruned from the store (hours; 0: keep forever)"),
    Setting("shutdown_grace", "EXECUTOR_SHUTDOWN_GRACE", float, 30.0,
            "on SIGTERM, running jobs get this long to finish before they are killed (seconds)"),
    Setting("max_jobs_per_worker", "EXECUTOR_MAX_JOBS_PER_WORKER", int, 100,
            "recycle a worker after this many jobs even if it looks clean (0: never)"),
    Setting("kill_grace", "EXECUTOR_KILL_GRACE", float, 2.0,
            "after a timeout or cancel: SIGINT, then SIGKILL of the job's process group this much later (s)"),
    Setting("threads_per_worker", "EXECUTOR_THREADS_PER_WORKER", int, None,
            "intra-op threads per worker (default: cores / pool size, or OMP_NUM_THREADS if set; "
            "0: torch's default)"),
    Setting("neuron_cache_max_mb", "EXECUTOR_NEURON_CACHE_MAX_MB", int, 50_000,
            "Neuron compile cache cap; oldest compiled modules pruned at start beyond it (MiB; 0: no cap)"),
    Setting("threads", "EXECUTOR_THREADS", int, 32,
            "HTTP worker threads (each synchronous request holds one while its jobs run)"),
    Setting("connection_limit", "EXECUTOR_CONNECTION_LIMIT", int, 10_000,
            "most open client connections; beyond it new ones wait in the listen backlog "
            "(lowered to fit the open-files limit, with a warning)"),
    Setting("channel_timeout", "EXECUTOR_CHANNEL_TIMEOUT", int, 30,
            "close a connection that has sent nothing for this long, unless its request is being "
            "served (seconds)"),
    Setting("lingering_time", "EXECUTOR_LINGERING_TIME", float, 30.0,
            "after the HTTP server refuses a request itself (413, 431, 400), read and discard what the "
            "client still sends for at most this long, so it reads the answer instead of a reset "
            "(seconds; 0: close at once)"),
    Setting("api_token", "EXECUTOR_API_TOKEN", str, None,
            "bearer token required on every endpoint but /health"),
    Setting("api_token_file", "EXECUTOR_API_TOKEN_FILE", Path, None,
            "file holding the bearer token (first line; used when EXECUTOR_API_TOKEN is unset)"),
    Setting("allow_unauthenticated", "EXECUTOR_ALLOW_UNAUTHENTICATED", bool, False,
            "allow listening on a non-loopback address without a token"),
    Setting("log_level", "EXECUTOR_LOG_LEVEL", str, "INFO", "log level",
            ("DEBUG", "INFO", "WARNING", "ERROR")),
)


@dataclass(frozen=True)
class ServiceConfig:
    """The validated settings of one service process (see SETTINGS for meanings)."""

    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "auto"
    pool_size: int | None = None
    work_dir: Path = Path("/var/lib/trainium-jobs")
    max_memory_mb: int | None = None
    max_execution_time: float = 600.0
    default_timeout: float | None = None
    max_batch_size: int = 10
    max_body_bytes: int = 10 * 1024 * 1024
    max_queue: int = 100
    max_output_bytes: int = 1_000_000
    retention_hours: float = 168.0
    shutdown_grace: float = 30.0
    max_jobs_per_worker: int = 100
    kill_grace: float = 2.0
    threads_per_worker: int | None = None
    neuron_cache_max_mb: int = 50_000
    threads: int = 32
    connection_limit: int = 10_000
    channel_timeout: int = 30
    lingering_time: float = 30.0
    api_token: str | None = field(default=None, repr=False)
    api_token_file: Path | None = None
    allow_unauthenticated: bool = False
    log_level: str = "INFO"

    @property
    def job_timeout_default(self) -> float:
        """Timeout for a job whose request names none."""
        return self.default_timeout if self.default_timeout is not None else self.max_execution_time

    @property
    def store_path(self) -> Path:
        return Path(self.work_dir) / "jobs.sqlite3"

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
        if not self.host:
            raise ConfigError("host (--host / EXECUTOR_HOST) must not be empty")
        if not (0 <= self.port <= 65535):
            raise ConfigError(f"port (--port / EXECUTOR_PORT) must be 0..65535, not {self.port}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend (--backend / EXECUTOR_BACKEND) must be one of {', '.join(BACKENDS)}, "
                              f"not {self.backend!r}")
        if self.pool_size is not None and not (1 <= self.pool_size <= 64):
            raise ConfigError("pool_size (--pool-size / EXECUTOR_POOL_SIZE) must be 1..64, "
                              f"not {self.pool_size}")
        if self.max_memory_mb is not None and self.max_memory_mb < 0:
            raise ConfigError("max_memory_mb (--max-memory-mb / EXECUTOR_MAX_MEMORY_MB) must be >= 0")
        for name in ("max_execution_time", "shutdown_grace", "kill_grace"):
            _positive(name, getattr(self, name))
        if self.default_timeout is not None:
            _positive("default_timeout", self.default_timeout)
            if self.default_timeout > self.max_execution_time:
                raise ConfigError("default_timeout (--default-timeout / EXECUTOR_DEFAULT_TIMEOUT) "
                                  "must not exceed max_execution_time "
                                  "(--max-execution-time / EXECUTOR_MAX_EXECUTION_TIME)")
        for name, low in (("max_batch_size", 1), ("max_body_bytes", 1024), ("max_queue", 1),
                          ("max_output_bytes", 1024), ("threads", 2), ("max_jobs_per_worker", 0),
                          ("neuron_cache_max_mb", 0), ("threads_per_worker", 0),
                          ("connection_limit", 64), ("channel_timeout", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name} ({_env(name)}) must be at least {low}, not {value}")
        if not math.isfinite(self.lingering_time) or self.lingering_time < 0:
            raise ConfigError(f"lingering_time ({_env('lingering_time')}) must be >= 0, "
                              f"not {self.lingering_time!r}")
        if not math.isfinite(self.retention_hours) or self.retention_hours < 0:
            raise ConfigError("retention_hours (--retention-hours / EXECUTOR_RETENTION_HOURS) must be >= 0")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("log_level (--log-level / EXECUTOR_LOG_LEVEL) must be DEBUG, INFO, "
                              "WARNING or ERROR")
        if self.api_token is not None and not self.api_token.strip():
            raise ConfigError("api_token (EXECUTOR_API_TOKEN) must not be blank")
        if not self.api_token and not self.is_loopback() and not self.allow_unauthenticated:
            raise ConfigError(f"refusing to listen on non-loopback host {self.host!r} without an API "
                              "token: set EXECUTOR_API_TOKEN or EXECUTOR_API_TOKEN_FILE, or pass "
                              "--allow-unauthenticated")
        return self

    def prepare_work_dir(self) -> None:
        """Create the work dir and prove it is writable; ConfigError naming the setting."""
        where = f"work_dir ({_env('work_dir')}) {self.work_dir}"
        try:
            Path(self.work_dir).mkdir(parents=True, exist_ok=True)
            probe = Path(self.work_dir) / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"{where} is not a writable directory: {exc.strerror or exc}") from None

    def pool_config(self) -> PoolConfig:
        """The warm pool's settings derived from ours."""
        return PoolConfig(
            backend=self.backend,
            size=self.pool_size,
            work_dir=Path(self.work_dir),
            max_memory_mb=self.max_memory_mb or None,
            default_timeout_s=self.job_timeout_default,
            max_timeout_s=max(self.max_execution_time, self.job_timeout_default),
            max_output_bytes=self.max_output_bytes,
            max_queue=self.max_queue,
            max_jobs_per_worker=self.max_jobs_per_worker,
            kill_grace_s=self.kill_grace,
            threads_per_worker=self.threads_per_worker,
            neuron_cache_max_mb=self.neuron_cache_max_mb,
        ).validate()


def _env(name: str) -> str:
    """How a setting is spelled for a human: its flag and its environment variable."""
    s = next(s for s in SETTINGS if s.name == name)
    return f"{s.flag} / {s.env}"


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} ({_env(name)}) must be a positive number, not {value!r}")


def _convert(setting: Setting, raw: str | None, source: str) -> Any:
    """Turn a flag or env string into the setting's type, naming it on failure."""
    if raw is None:
        return setting.default
    if setting.kind is bool:
        if isinstance(raw, bool):
            return raw
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{setting.name} ({source}) must be true or false, not {raw!r}")
    if raw == "" and setting.default is None:
        return None
    try:
        value = setting.kind(raw)
    except (TypeError, ValueError):
        kind = {int: "a whole number", float: "a number"}.get(setting.kind, setting.kind.__name__)
        raise ConfigError(f"{setting.name} ({source}) must be {kind}, not {raw!r}") from None
    if setting.choices and str(value).lower() not in [c.lower() for c in setting.choices]:
        raise ConfigError(f"{setting.name} ({source}) must be one of {', '.join(setting.choices)}, "
                          f"not {raw!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; defaults stay None so the environment can fill in."""
    for s in SETTINGS:
        if s.kind is bool:
            parser.add_argument(s.flag, action="store_true", default=None,
                                help=f"{s.help} [env {s.env}]")
        elif s.name == "api_token":
            continue  # never on a command line: it would show in `ps`
        else:
            parser.add_argument(s.flag, default=None, metavar=s.name.upper(),
                                help=f"{s.help} [env {s.env}, default {s.default}]")


def settings_table(names: tuple[str, ...] | None = None) -> str:
    """The settings (all, or those named) as a Markdown table, for the docs."""
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        if names is None or s.name in names:
            flag = "(environment only)" if s.name == "api_token" else f"`{s.flag}`"
            default = "unset" if s.default is None else f"`{s.default}`"
            rows.append(f"| {flag} | `{s.env}` | {default} | {s.help} |")
    return "\n".join(rows)


def from_sources(args: argparse.Namespace | None = None,
                 environ: dict[str, str] | None = None) -> ServiceConfig:
    """Build and validate the config from parsed flags, then environment, then defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in SETTINGS:
        flag_value = getattr(args, s.name, None) if args is not None else None
        if flag_value is not None:
            values[s.name] = _convert(s, flag_value, s.flag)
        elif s.env in environ:
            values[s.name] = _convert(s, environ[s.env], s.env)
        else:
            values[s.name] = s.default
    if not values["api_token"] and values["api_token_file"]:
        values["api_token"] = read_token_file(Path(values["api_token_file"]))
    values["log_level"] = str(values["log_level"]).upper()
    known = {f.name for f in fields(ServiceConfig)}
    return ServiceConfig(**{k: v for k, v in values.items() if k in known}).validate()


def read_token_file(path: Path) -> str:
    """The token in a file (its first line, stripped); ConfigError if unreadable or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"api_token_file (--api-token-file / EXECUTOR_API_TOKEN_FILE) {path}: "
                          f"{exc}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ConfigError(f"api_token_file (--api-token-file / EXECUTOR_API_TOKEN_FILE) {path} is empty")
    return token
