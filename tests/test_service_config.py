"""executor_service.config: flags over environment over defaults, validated with names."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from executor_service.config import SETTINGS, ConfigError, add_arguments, from_sources, settings_table

FRONT_DOOR_DOC = Path(__file__).resolve().parent.parent / "docs" / "front-door.md"
FRONT_DOOR_SETTINGS = ("host", "port", "threads", "max_body_bytes", "connection_limit", "channel_timeout",
                       "lingering_time")


def parse(argv: list[str], env: dict[str, str] | None = None):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_sources(parser.parse_args(argv), env or {})


def test_defaults_match_the_original_service():
    c = parse([])
    assert (c.host, c.port, c.max_execution_time, c.max_batch_size) == ("127.0.0.1", 8000, 600.0, 10)


def test_front_door_defaults_are_far_from_waitress_defaults():
    c = parse([])  # waitress: 100 connections, 120 s idle timeout, lingering close absent
    assert (c.connection_limit, c.channel_timeout, c.lingering_time) == (10_000, 30, 30.0)


def test_environment_fills_in_and_flags_win():
    env = {"EXECUTOR_PORT": "9000", "EXECUTOR_POOL_SIZE": "3", "EXECUTOR_BACKEND": "xla"}
    c = parse(["--port", "9100"], env)
    assert (c.port, c.pool_size, c.backend) == (9100, 3, "xla")


def test_every_setting_has_an_executor_env_var():
    assert all(s.env.startswith("EXECUTOR_") for s in SETTINGS)
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)


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
    (["--backend", "gpu"], {}, "backend"),
    (["--pool-size", "0"], {}, "pool_size"),
    ([], {"EXECUTOR_MAX_EXECUTION_TIME": "inf"}, "max_execution_time"),
    ([], {"EXECUTOR_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
    ([], {"EXECUTOR_MAX_BODY_BYTES": "ten"}, "EXECUTOR_MAX_BODY_BYTES"),
    (["--default-timeout", "700"], {}, "default_timeout"),
    ([], {"EXECUTOR_ALLOW_UNAUTHENTICATED": "maybe"}, "EXECUTOR_ALLOW_UNAUTHENTICATED"),
    ([], {"EXECUTOR_RETENTION_HOURS": "-1"}, "retention_hours"),
    ([], {"EXECUTOR_CONNECTION_LIMIT": "10"}, "connection_limit"),
    (["--channel-timeout", "0"], {}, "channel_timeout"),
    (["--lingering-time", "-1"], {}, "lingering_time"),
    ([], {"EXECUTOR_LINGERING_TIME": "nan"}, "lingering_time"),
])
def test_bad_values_name_the_setting(argv, env, name):
    with pytest.raises(ConfigError, match=name):
        parse(argv, env)


def test_pool_config_carries_the_limits(tmp_path):
    c = parse(["--work-dir", str(tmp_path), "--max-memory-mb", "512", "--max-queue", "7"])
    pc = c.pool_config()
    assert (pc.max_memory_mb, pc.max_queue, pc.work_dir) == (512, 7, tmp_path)
    assert "EXECUTOR_API_TOKEN" in pc.scrub_env


def test_front_door_doc_shows_its_settings_as_declared():
    text = FRONT_DOOR_DOC.read_text()
    start = text.index("\n", text.index("<!-- settings-table")) + 1
    end = text.index("<!-- /settings-table -->")
    assert text[start:end].strip() == settings_table(FRONT_DOOR_SETTINGS)
