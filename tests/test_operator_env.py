"""Operator-set job environment: --job-env NAME=VALUE (repeated, or `;`-separated in
EXECUTOR_JOB_ENV) and --job-env-file reach every job and its child processes; names the
pool sets are refused at start with an error naming the setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import start_pool
from service_fixtures import REPO, start_server

from warm_pool import ConfigError, PoolConfig

pytestmark = pytest.mark.timeout(240)

# Prints the variables as the job sees them, and as a child interpreter of it does.
SHOW = """
import json, os, subprocess, sys
names = {names!r}
probe = "import json, os; print(json.dumps({{n: os.environ.get(n) for n in " + repr(names) + "}}))"
child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout
print(json.dumps({{"job": {{n: os.environ.get(n) for n in names}}, "child": json.loads(child)}}))
"""


def show(*names: str) -> str:
    return SHOW.format(names=list(names))


def _env_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.env"
    path.write_text("# tokens for the jobs\n\nFROM_FILE=file value with spaces\n"
                    "HF_TOKEN=from-the-file\nNEURON_RETRY_FAILED_COMPILATION=1\n")
    path.chmod(0o600)
    return path


def test_operator_variables_reach_every_job_and_its_children(make_pool, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "the-services-own")  # not passed on: a job's comes from job_env
    pool = make_pool(job_env=("HF_TOKEN=hf_for_jobs", "NEURON_RT_LOG_LEVEL=INFO", "WITH_EQUALS=a=b,c"),
                     job_env_file=_env_file(tmp_path))
    result = pool.run(show("HF_TOKEN", "NEURON_RT_LOG_LEVEL", "WITH_EQUALS", "FROM_FILE",
                           "NEURON_RETRY_FAILED_COMPILATION"))
    assert result.success, result.stderr
    seen = json.loads(result.stdout)
    expected = {"HF_TOKEN": "hf_for_jobs", "NEURON_RT_LOG_LEVEL": "INFO", "WITH_EQUALS": "a=b,c",
                "FROM_FILE": "file value with spaces", "NEURON_RETRY_FAILED_COMPILATION": "1"}
    assert seen == {"job": expected, "child": expected}


def test_libraries_the_template_imports_see_the_operators_variables(make_pool):
    pool = make_pool(job_env=("HF_HUB_OFFLINE=1", "HF_ENDPOINT=http://127.0.0.1:9"))
    result = pool.run("from huggingface_hub import constants\n"
                      "print(constants.HF_HUB_OFFLINE, constants.ENDPOINT)\n")
    assert result.stdout == "True http://127.0.0.1:9\n", result.stderr


def test_the_service_never_shows_the_values_in_its_config():
    config = PoolConfig(job_env=("HF_TOKEN=hf_secret_value",))
    assert "hf_secret_value" not in repr(config)


@pytest.mark.parametrize("entry", ["PATH=/tmp", "HOME=/root", "TMPDIR=/tmp", "DATASET_CACHE_DIR=/d",
                                   "NEURON_RT_VISIBLE_CORES=0", "LD_PRELOAD=/x.so", "LD_LIBRARY_PATH=/x",
                                   "PYTHONPATH=/x", "PYTHONSTARTUP=/x", "EXECUTOR_API_TOKEN=t",
                                   "AWS_SECRET_ACCESS_KEY=k", "HF_HOME=/h", "TRANSFORMERS_CACHE=/c",
                                   "OMP_NUM_THREADS=8", "PJRT_DEVICE=CPU", "USER=root"])
def test_a_name_the_pool_sets_is_refused(entry):
    name = entry.split("=")[0]
    label = r"^job_env \(--job-env / EXECUTOR_JOB_ENV\)"
    with pytest.raises(ConfigError, match=rf"{label} entry 1: {name} is set by the pool"):
        PoolConfig(job_env=(entry,)).validate()


@pytest.mark.parametrize("entry, why", [("NO_EQUALS", "not NAME=VALUE"), ("1ABC=x", "not a variable name"),
                                        ("A-B=x", "not a variable name"), ("=x", "not a variable name"),
                                        ("NEURON_RT_LOG_LEVEL=LOUD", "must be one of")])
def test_an_invalid_entry_is_refused(entry, why):
    with pytest.raises(ConfigError, match=f"job_env .*{why}"):
        PoolConfig(job_env=("OK=1", entry)).validate()


def test_an_error_never_echoes_a_value():
    with pytest.raises(ConfigError) as caught:
        PoolConfig(job_env=("hf_abcdefghijklmnop",)).validate()
    assert "hf_abc" not in str(caught.value)


def test_the_file_form_is_checked_line_by_line(tmp_path):
    bad = tmp_path / "bad.env"
    bad.write_text("GOOD=1\nLD_PRELOAD=/evil.so\n")
    with pytest.raises(ConfigError, match=r"job_env_file .*bad.env line 2: LD_PRELOAD is set by the pool"):
        PoolConfig(job_env_file=bad).validate()
    with pytest.raises(ConfigError, match=r"job_env_file .*missing.env"):
        PoolConfig(job_env_file=tmp_path / "missing.env").validate()


def test_the_flags_entries_win_over_the_files(tmp_path):
    config = PoolConfig(job_env=("HF_TOKEN=from-the-flag",), job_env_file=_env_file(tmp_path))
    assert config.job_environment()["HF_TOKEN"] == "from-the-flag"


def test_a_pool_with_a_refused_name_does_not_start(tmp_path):
    with pytest.raises(ConfigError, match="job_env"):
        start_pool(tmp_path / "w", job_env=("PYTHONHOME=/x",))


# --- through the service -------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    env_file = _env_file(tmp_path_factory.mktemp("env-file"))
    srv = start_server(tmp_path_factory, "svc-env",
                       args=["--job-env", "FIRST=1", "--job-env", "SECOND=two words",
                             "--job-env-file", str(env_file)],
                       env={"EXECUTOR_JOB_ENV": "IGNORED=flags win over the variable"})
    yield srv
    srv.close()


def test_the_service_passes_its_job_env_to_every_job(service):
    code = show("FIRST", "SECOND", "FROM_FILE", "HF_TOKEN", "IGNORED")
    result = service.post("/execute", {"code": code}).json
    assert result["success"], result["stderr"]
    expected = {"FIRST": "1", "SECOND": "two words", "FROM_FILE": "file value with spaces",
                "HF_TOKEN": "from-the-file", "IGNORED": None}
    assert json.loads(result["stdout"]) == {"job": expected, "child": expected}


def test_the_environment_variable_form_separates_entries_with_semicolons(tmp_path_factory):
    srv = start_server(tmp_path_factory, "svc-env-var", env={"EXECUTOR_JOB_ENV": "A=1;B=x,y ; C=z"})
    try:
        result = srv.post("/execute", {"code": show("A", "B", "C")}).json
        assert json.loads(result["stdout"])["job"] == {"A": "1", "B": "x,y", "C": "z"}, result["stderr"]
    finally:
        srv.close()


@pytest.mark.parametrize("argv, env, message", [
    (["--job-env", "PATH=/tmp/evil"], {},
     "job_env (--job-env / EXECUTOR_JOB_ENV) entry 1: PATH is set by the pool"),
    ([], {"EXECUTOR_JOB_ENV": "OK=1;LD_PRELOAD=/x.so"}, "entry 2: LD_PRELOAD is set by the pool"),
])
def test_a_refused_name_stops_the_service_with_a_clear_error(tmp_path, argv, env, message):
    proc = subprocess.run([sys.executable, "-m", "executor_service", "serve", "--work-dir", str(tmp_path),
                           "--backend", "cpu", *argv], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")},
                               **env})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "configuration error: " in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
