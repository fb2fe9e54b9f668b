"""Settings: flags over environment over defaults, validated with names, documented once."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from executor_service.config import ServiceConfig, add_arguments, from_sources, reference_markdown
from warm_pool import ConfigError, PoolConfig, settings

DOCS = Path(__file__).resolve().parent.parent / "docs"
FRONT_DOOR_SETTINGS = ("host", "port", "threads", "max_body_bytes", "connection_limit", "channel_timeout",
                       "lingering_time")


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServiceConfig:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_arguments(parser)
    return from_sources(parser.parse_args(argv), env or {})


def test_defaults_match_the_original_service():
    c = parse([])
    assert (c.host, c.port, c.pool.default_timeout, c.max_batch_size) == ("127.0.0.1", 8000, 600.0, 10)


def test_the_maximum_timeout_covers_what_the_callers_ask_for():
    assert parse([]).pool.max_timeout >= 2 * 3600  # their Lambda sends "timeout": 3600


def test_front_door_defaults_are_far_from_waitress_defaults():
    c = parse([])  # waitress: 100 connections, 120 s idle timeout, lingering close absent
    assert (c.connection_limit, c.channel_timeout, c.lingering_time) == (10_000, 30, 30.0)


def test_environment_fills_in_and_flags_win():
    env = {"EXECUTOR_PORT": "9000", "EXECUTOR_POOL_SIZE": "3", "EXECUTOR_BACKEND": "xla"}
    c = parse(["--port", "9100"], env)
    assert (c.port, c.pool.pool_size, c.pool.backend) == (9100, 3, "xla")


def test_boolean_flags_turn_settings_on_and_off():
    assert parse(["--keep-job-dirs"]).pool.keep_job_dirs is True
    assert parse(["--no-neuron-retry-failed-compilation"]).pool.neuron_retry_failed_compilation is False
    assert parse([], {"EXECUTOR_KEEP_JOB_DIRS": "yes"}).pool.keep_job_dirs is True


def test_lists_are_comma_separated():
    assert parse(["--neuron-cores", "0, 1"]).pool.neuron_cores == (0, 1)


def test_every_setting_has_its_own_flag_and_variable():
    every = settings.declared(ServiceConfig) + settings.declared(PoolConfig)
    assert all(s.env.startswith("EXECUTOR_") for s in every)
    assert len({s.env for s in every}) == len(every)
    assert len({s.flag for s in every}) == len(every)
    assert all(s.spec.help for s in every)


def test_the_token_is_never_a_flag():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--api-token", "x"])


def test_the_token_never_shows_in_the_config_repr():
    assert "sekrit" not in repr(parse([], {"EXECUTOR_API_TOKEN": "sekrit"}))


def test_token_comes_from_a_file(tmp_path):
    f = tmp_path / "token"
    f.write_text("abc123\n")
    assert parse([], {"EXECUTOR_API_TOKEN_FILE": str(f)}).api_token == "abc123"


def test_empty_token_file_is_an_error(tmp_path):
    f = tmp_path / "token"
    f.write_text("\n")
    with pytest.raises(ConfigError, match="EXECUTOR_API_TOKEN_FILE"):
        parse(["--api-token-file", str(f)])


def test_non_loopback_needs_a_token_or_explicit_opt_out():
    with pytest.raises(ConfigError, match="--allow-unauthenticated"):
        parse(["--host", "0.0.0.0"])
    assert parse(["--host", "0.0.0.0", "--allow-unauthenticated"]).allow_unauthenticated
    assert parse(["--host", "0.0.0.0"], {"EXECUTOR_API_TOKEN": "t"}).api_token == "t"
    assert parse(["--host", "::1"]).host == "::1"


@pytest.mark.parametrize("argv,env,name", [
    (["--backend", "gpu"], {}, r"backend \(--backend / EXECUTOR_BACKEND\)"),
    (["--pool-size", "0"], {}, r"pool_size \(--pool-size / EXECUTOR_POOL_SIZE\) must be between 1 and 64"),
    ([], {"EXECUTOR_MAX_TIMEOUT": "inf"}, "max_timeout"),
    ([], {"EXECUTOR_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
    ([], {"EXECUTOR_MAX_BODY_BYTES": "ten"}, "EXECUTOR_MAX_BODY_BYTES"),
    (["--default-timeout", "7300"], {}, "default_timeout"),
    (["--default-timeout", "700", "--max-timeout", "600"], {}, "default_timeout"),
    ([], {"EXECUTOR_ALLOW_UNAUTHENTICATED": "maybe"}, "EXECUTOR_ALLOW_UNAUTHENTICATED"),
    ([], {"EXECUTOR_RETENTION_HOURS": "-1"}, "retention_hours"),
    ([], {"EXECUTOR_LOG_LEVEL": "LOUD"}, "log_level"),
    (["--neuron-cores", "0,x"], {}, "neuron_cores"),
    ([], {"EXECUTOR_CONNECTION_LIMIT": "10"}, "connection_limit"),
    (["--channel-timeout", "0"], {}, "channel_timeout"),
    (["--lingering-time", "-1"], {}, "lingering_time"),
    ([], {"EXECUTOR_LINGERING_TIME": "nan"}, "lingering_time"),
])
def test_bad_values_name_the_setting(argv, env, name):
    with pytest.raises(ConfigError, match=name):
        parse(argv, env)


def test_pool_settings_reach_the_pool(tmp_path):
    c = parse(["--work-dir", str(tmp_path), "--max-memory-mb", "512", "--max-queue", "7"])
    assert (c.pool.max_memory_mb, c.pool.max_queue, c.pool.work_dir) == (512, 7, tmp_path)
    assert c.store_path == tmp_path / "jobs.sqlite3"


def test_the_docs_table_is_generated_from_the_declaration():
    text = (DOCS / "configuration.md").read_text()
    assert reference_markdown() in text, "docs/configuration.md is stale: run `make docs`"


def test_front_door_doc_shows_its_settings_as_declared():
    text = (DOCS / "front-door.md").read_text()
    start = text.index("\n", text.index("<!-- settings-table")) + 1
    end = text.index("<!-- /settings-table -->")
    assert text[start:end].strip() == reference_markdown(FRONT_DOOR_SETTINGS).strip()


def test_a_cluster_is_asked_for_with_its_address_and_one_instance_is_the_default():
    assert (parse([]).ray_address, parse([]).max_attempts) == (None, 2)
    c = parse(["--ray-address", "10.0.0.5:6379"], {"EXECUTOR_MAX_ATTEMPTS": "3"})
    assert (c.ray_address, c.max_attempts) == ("10.0.0.5:6379", 3)
    assert parse([], {"EXECUTOR_RAY_ADDRESS": "head.internal:6379"}).ray_address == "head.internal:6379"


@pytest.mark.parametrize("argv, named", [(["--ray-address", "10.0.0.5"], "ray_address"),
                                         (["--ray-address", "10.0.0.5:99999"], "ray_address"),
                                         (["--max-attempts", "0"], "max_attempts")])
def test_cluster_settings_are_checked(argv, named):
    with pytest.raises(ConfigError, match=named):
        parse(argv)


def test_a_cluster_address_where_nothing_answers_stops_the_service_with_a_clear_message(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "executor_service", "serve", "--work-dir", str(tmp_path),
                           "--ray-address", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2, proc.stderr
    assert "configuration error: ray_address" in proc.stderr and "ray start --head" in proc.stderr
