"""`trainium-executor serve | submit FILE... | logs JOB_ID | health | status | artifacts JOB_ID
| datasets fetch NAME... | idle-stop` (also `python -m executor_service`).

serve      run the service (every flag also from its EXECUTOR_* environment variable)
submit     send scripts as one async batch, wait for it, print the batch response as JSON
           (--follow: print each job's output as it comes, prefixed by paper id when several)
logs       print a job's output so far (-f: follow it until the job ends)
health     print GET /health (exit 0 when healthy, 1 otherwise)
status     print GET /status
idle-stop  run a command (shutdown -h now) when no job has been queued or running for
           --after MINUTES, judged from the job store (the idle-stop systemd timer runs it)
artifacts  list a job's artifacts, or download them all with -o DIR
datasets   fill the data set cache jobs read (datasets fetch NAME... --source URL|s3://...|torchvision)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from executor_service import config as cfg


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainium-executor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service", allow_abbrev=False)
    cfg.add_arguments(serve)

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("EXECUTOR_URL", "http://127.0.0.1:8000"),
                       help="service URL [env EXECUTOR_URL, default http://127.0.0.1:8000]")
        p.add_argument("--token-file", default=None,
                       help="file with the API token [default: env EXECUTOR_API_TOKEN]")

    submit = sub.add_parser("submit", help="run scripts as one batch and print the results")
    client_args(submit)
    submit.add_argument("files", nargs="+", type=Path)
    submit.add_argument("--timeout", type=float, default=None, help="per-script timeout (s)")
    submit.add_argument("--deadline", type=float, default=None, help="give up waiting after (s)")
    submit.add_argument("--no-wait", action="store_true", help="print the batch id and return")
    submit.add_argument("--callback-url", default=None, help="POST the batch's results there when done")
    submit.add_argument("-f", "--follow", action="store_true",
                        help="print each job's output as it comes (prefixed by paper id when several)")
    logs = sub.add_parser("logs", help="print a job's output (-f: follow it until the job ends)")
    client_args(logs)
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true", help="follow the output until the job ends")
    for name in ("health", "status"):
        client_args(sub.add_parser(name, help=f"print GET /{name}"))
    from executor_service import idle
    from warm_pool import PoolConfig

    idle.add_arguments(sub.add_parser("idle-stop", help="stop the instance when it has been idle"),
                       os.environ.get("EXECUTOR_WORK_DIR") or str(PoolConfig().work_dir))
    arts = sub.add_parser("artifacts", help="list a job's artifacts, or download them (-o DIR)")
    client_args(arts)
    arts.add_argument("job_id")
    arts.add_argument("-o", "--output", type=Path, default=None, help="download every artifact into DIR")
    datasets = sub.add_parser("datasets", help="fill the data set cache (on the instance, as root)")
    dsub = datasets.add_subparsers(dest="datasets_command", required=True)
    fetch = dsub.add_parser("fetch", help="copy or download data sets into the cache")
    fetch.add_argument("names", nargs="+", help="cifar10 cifar100 mnist fashion_mnist imdb wikitext2")
    fetch.add_argument("--source", required=True,
                       help="http(s)://, file:// or s3://bucket/prefix holding <name>/<file> (a copy of "
                            "another cache); torchvision (image sets); huggingface (imdb, wikitext2)")
    fetch.add_argument("--datasets-dir", type=Path, default=None,
                       help="the cache [env EXECUTOR_DATASETS_DIR, default <work_dir>/datasets]")
    return parser


def _client(args: argparse.Namespace):
    from executor_service.client import ExecutorClient

    token = os.environ.get("EXECUTOR_API_TOKEN") or None
    if args.token_file:
        token = cfg.read_token_file(Path(args.token_file))
    return ExecutorClient(args.url, token=token)


def _paper_id(path: Path, seen: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:120] or "script"
    name, n = base, 1
    while name in seen:
        n += 1
        name = f"{base}-{n}"
    seen.add(name)
    return name


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        try:
            config = cfg.from_sources(args)
            config.prepare_work_dir()
        except cfg.ConfigError as exc:
            print(f"trainium-executor: configuration error: {exc}", file=sys.stderr)
            return 2
        from executor_service.serve import serve

        try:
            return serve(config)
        except cfg.ConfigError as exc:  # found only when starting: the pool's dirs and uids, the cluster
            print(f"trainium-executor: configuration error: {exc}", file=sys.stderr)
            return 2
    if args.command == "idle-stop":
        from executor_service import idle

        return idle.main(args)
    if args.command == "datasets":
        return _fetch_datasets(args)

    from executor_service.client import ExecutorError

    client = _client(args)
    try:
        if args.command == "health":
            body = client.health()
            print(json.dumps(body, indent=2))
            return 0 if body.get("status") == "healthy" else 1
        if args.command == "status":
            print(json.dumps(client.status(), indent=2))
            return 0
        if args.command == "artifacts":
            if args.output is None:
                print(json.dumps(client.list_artifacts(args.job_id), indent=2))
            else:
                for path in client.download_artifacts(args.job_id, str(args.output)):
                    print(path)
            return 0
        if args.command == "logs":
            from executor_service import follow

            return follow.logs(client, args.job_id, args.follow)
        seen: set[str] = set()
        batch = [{"paper_id": _paper_id(f, seen), "code": f.read_text(encoding="utf-8")}
                 for f in args.files]
        if args.no_wait:
            print(json.dumps(client.submit_batch(batch, timeout=args.timeout, callback_url=args.callback_url),
                             indent=2))
            return 0
        if args.follow:
            from executor_service import follow

            result = follow.run_batch(client, batch, args.timeout, args.deadline, args.callback_url)
        else:
            result = client.run_batch(batch, timeout=args.timeout, deadline_s=args.deadline,
                                      callback_url=args.callback_url)
        print(json.dumps(result, indent=2))
        return 0 if result.get("failed") == 0 else 1
    except (ExecutorError, OSError) as exc:
        print(f"trainium-executor: {exc}", file=sys.stderr)
        return 1


def _fetch_datasets(args: argparse.Namespace) -> int:
    """Run the shipped dataset_loader's fetch (it alone knows the cache format) into the
    cache, then make what it wrote readable by every job uid."""
    from warm_pool import JOB_HELPERS_DIR, PoolConfig, settings

    if args.datasets_dir is not None:
        dest = args.datasets_dir
    else:
        dest = PoolConfig(**settings.from_sources(PoolConfig, None, os.environ)).datasets_path
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(JOB_HELPERS_DIR / "dataset_loader.py"), "fetch", *args.names,
                           "--dest", str(dest), "--source", args.source], check=False)
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
