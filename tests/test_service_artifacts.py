"""Realistic scripts through the real service: their results, their artifacts listed,
downloaded (client and CLI) and uploaded to a local S3 stand-in (moto), never a bucket."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import reachable_by_jobs, wait_until
from realistic_scripts import ARTIFACTS, HELPERS, SCRIPTS, write_tiny_cache
from service_fixtures import REPO, Server, free_port, openapi  # noqa: F401

from executor_service.client import ExecutorClient

pytestmark = pytest.mark.timeout(300)

BUCKET = "papers-test-outputs"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"})
    client.create_bucket(Bucket=BUCKET)
    client.endpoint = endpoint
    yield client
    server.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory, s3):
    base = reachable_by_jobs(tmp_path_factory.mktemp("arts"))
    cache = write_tiny_cache(base / "datasets")
    env = {**AWS_ENV, "AWS_ENDPOINT_URL_S3": s3.endpoint}
    srv = Server(reachable_by_jobs(base / "work"), env=env,
                 args=["--datasets-dir", str(cache), "--artifacts-s3-uri", f"s3://{BUCKET}/runs"])
    srv.start()
    srv.cache = cache
    batch = [{"paper_id": name, "code": code} for name, code in SCRIPTS.items()]
    accepted = srv.post("/jobs", {"batch": batch}).json
    srv.batch = srv.wait_batch(accepted["batch_id"], timeout=240)
    yield srv
    srv.close()


def _cold(code: str, job: Path, cache: Path) -> subprocess.CompletedProcess:
    """`python main.py` with the environment the service gives a job (2 workers on 2 cores)."""
    job.mkdir(parents=True)
    (job / "main.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXECUTOR_", "AWS_"))}
    env.update(MPLBACKEND="Agg", DATASET_CACHE_DIR=str(cache), HOME=str(job), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HELPERS), str(REPO)]))
    return subprocess.run([sys.executable, "main.py"], cwd=job, env=env, capture_output=True, text=True,
                          timeout=180, stdin=subprocess.DEVNULL)


def test_a_batch_of_realistic_scripts_succeeds_with_its_artifacts_listed(service, openapi):  # noqa: F811
    results = service.batch["results"]
    assert service.batch["successful"] == len(SCRIPTS), {k: r["stderr"][-500:] for k, r in results.items()}
    for name, result in results.items():
        assert sorted(result["artifacts"]) == sorted(ARTIFACTS[name])
        assert result["artifacts_skipped"] == []
        listing = service.get(f"/jobs/{result['job_id']}/artifacts")
        openapi.validate("GET", "/jobs/{job_id}/artifacts", listing)
        assert {a["name"] for a in listing.json["artifacts"]} == ARTIFACTS[name]
        assert listing.json["total_bytes"] == sum(a["size"] for a in listing.json["artifacts"]) > 0


@pytest.mark.parametrize("name", ["cifar_cnn", "mnist_mlp"])
def test_downloaded_artifacts_and_output_match_a_cold_run(service, tmp_path, name):
    result = service.batch["results"][name]
    cold = _cold(SCRIPTS[name], tmp_path / "cold", service.cache)
    assert cold.returncode == 0, cold.stderr[-2000:]
    assert result["stdout"] == cold.stdout
    saved = ExecutorClient(service.url).download_artifacts(result["job_id"], str(tmp_path / "got"))
    assert len(saved) == len(ARTIFACTS[name])
    for artifact in ARTIFACTS[name]:
        got = (tmp_path / "got" / artifact).read_bytes()
        if not artifact.endswith((".pt", ".pth")):  # checkpoints: compared tensor by tensor elsewhere
            assert got == (tmp_path / "cold" / artifact).read_bytes(), artifact


def test_artifacts_are_served_as_downloads_with_safe_types(service):
    job = service.batch["results"]["cifar_cnn"]["job_id"]
    expected = {"loss_curve.png": "image/png", "metrics.json": "application/json",
                "model.pt": "application/octet-stream"}
    for name, content_type in expected.items():
        resp = service.get(f"/jobs/{job}/artifacts/{name}")
        assert resp.status == 200
        assert resp.headers["content-type"] == content_type
        assert resp.headers["content-disposition"] == f"attachment; filename={name}"
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert "sandbox" in resp.headers["content-security-policy"]
        kept = service.work_dir / "artifacts" / job / name
        assert resp.raw == kept.read_bytes()
    nested = service.batch["results"]["mnist_mlp"]["job_id"]
    assert service.get(f"/jobs/{nested}/artifacts/results/history.csv").headers["content-type"] == \
        "text/csv; charset=utf-8"


def test_html_and_svg_a_job_leaves_are_never_served_as_pages(service):
    code = ("open('page.html', 'w').write('<script>alert(1)</script>')\n"
            "open('figure.svg', 'w').write('<svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script></svg>')\n"
            "open('fake.png', 'w').write('<html><script>alert(1)</script></html>')\n")
    result = service.post("/execute", {"code": code}).json
    assert sorted(result["artifacts"]) == ["fake.png", "figure.svg"]  # *.html is not a pattern
    svg = service.get(f"/jobs/{result['job_id']}/artifacts/figure.svg")
    assert svg.headers["content-type"] == "application/octet-stream"
    fake = service.get(f"/jobs/{result['job_id']}/artifacts/fake.png")
    assert fake.headers["content-disposition"].startswith("attachment")
    assert fake.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["../../jobs.sqlite3", "..%2f..%2fjobs.sqlite3",
                                  "%2e%2e/%2e%2e/jobs.sqlite3", "/etc/passwd", "main.py", "nope.png",
                                  "results/../metrics.json"])
def test_only_listed_artifacts_are_served(service, path):
    job = service.batch["results"]["cifar_cnn"]["job_id"]
    resp = service.get(f"/jobs/{job}/artifacts/{path}")
    if resp.status == 308:  # Werkzeug merges the double slash first; where it points is not served
        resp = service.get(resp.headers["location"].split(str(service.port), 1)[1])
    assert resp.status == 404, resp.raw[:200]
    assert b"sqlite" not in resp.raw.lower() or b"no artifact" in resp.raw


def test_artifacts_of_an_unknown_job_are_404(service, openapi):  # noqa: F811
    resp = service.get("/jobs/no-such-job/artifacts")
    assert resp.status == 404
    openapi.validate("GET", "/jobs/{job_id}/artifacts", resp)


def test_results_and_artifacts_are_uploaded_to_s3(service, s3):
    result = service.batch["results"]["resnet_synthetic"]
    job = result["job_id"]
    def uploaded() -> bool:
        return (service.get(f"/jobs/{job}/artifacts").json["export"] or {}).get("status") == "uploaded"

    wait_until(uploaded, timeout=30)
    prefix = f"runs/resnet_synthetic/{job}/"
    keys = {o["Key"][len(prefix):] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert keys == {"result.json", *(f"artifacts/{n}" for n in ARTIFACTS["resnet_synthetic"])}
    uploaded = json.loads(s3.get_object(Bucket=BUCKET, Key=prefix + "result.json")["Body"].read())
    assert uploaded["stdout"] == result["stdout"] and uploaded["job_id"] == job
    body = s3.get_object(Bucket=BUCKET, Key=prefix + "artifacts/samples.png")
    assert body["ContentType"] == "image/png"
    assert hashlib.sha256(body["Body"].read()).hexdigest() == \
        hashlib.sha256((service.work_dir / "artifacts" / job / "samples.png").read_bytes()).hexdigest()


def test_jobs_never_see_the_services_cloud_credentials(service):
    code = "import os\nprint(sorted(k for k in os.environ if 'AWS' in k))"
    result = service.post("/execute", {"code": code})
    assert result.json["stdout"] == "[]\n"


def test_the_cli_downloads_a_jobs_artifacts(service, tmp_path):
    job = service.batch["results"]["fashion_early_stop"]["job_id"]
    proc = subprocess.run([sys.executable, "-m", "executor_service", "artifacts", job,
                           "-o", str(tmp_path / "out"), "--url", service.url], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == ARTIFACTS["fashion_early_stop"]
    listed = subprocess.run([sys.executable, "-m", "executor_service", "artifacts", job,
                             "--url", service.url], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert {a["name"] for a in json.loads(listed.stdout)["artifacts"]} == ARTIFACTS["fashion_early_stop"]


def test_the_cli_fills_the_data_set_cache_from_another_cache(service, tmp_path):
    dest = tmp_path / "cache"
    source = f"file://{service.cache}"
    proc = subprocess.run([sys.executable, "-m", "executor_service", "datasets", "fetch", "cifar10", "mnist",
                           "--source", source, "--datasets-dir", str(dest)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    for name in ("cifar10/cifar10_pytorch.pt", "mnist/mnist_pytorch.pt"):
        assert (dest / name).read_bytes() == (service.cache / name).read_bytes()
        assert oct((dest / name).stat().st_mode & 0o777) == "0o644"
    missing = subprocess.run([sys.executable, "-m", "executor_service", "datasets", "fetch", "cifar100",
                              "--source", source, "--datasets-dir", str(dest)], cwd=REPO, capture_output=True,
                             text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert missing.returncode == 1 and "cifar100" in missing.stderr


def test_pruned_jobs_take_their_artifacts_with_them(tmp_path):
    from executor_service.config import ServiceConfig
    from executor_service.jobs import JobRunner
    from executor_service.store import JobStore
    from warm_pool import PoolConfig

    config = ServiceConfig(pool=PoolConfig(work_dir=tmp_path))
    store = JobStore(config.store_path)
    store.add_batch("b1", "async", [{"job_id": "j1", "paper_id": "p", "code": "pass"}])
    store.finish("j1", "completed", {"x": 1},
                 [{"name": "a.png", "size": 1, "sha256": "0", "content_type": "x"}])
    (config.pool.artifacts_dir / "j1").mkdir(parents=True)
    (config.pool.artifacts_dir / "j1" / "a.png").write_bytes(b"1")
    (config.pool.artifacts_dir / "orphan").mkdir()
    runner = JobRunner(None, store, config, None)
    runner._sweep_artifacts()
    assert sorted(os.listdir(config.pool.artifacts_dir)) == ["j1"]
    time.sleep(0.01)
    assert store.prune(0.0) == 1 and store.artifacts("j1") == []
    runner._sweep_artifacts()
    assert os.listdir(config.pool.artifacts_dir) == []
