"""The job store: every accepted job and its result, in SQLite (WAL) under the work dir.

A job is written here, status `queued`, before the request that brought it is
answered; the pool's callbacks move it to `running` and then to a terminal status with
its result. After a crash `recover()` marks what was `running` as `interrupted` (the
process that ran it is gone) and leaves `queued` jobs for the dispatcher to run again.

One connection, shared by the request threads under a lock: SQLite serialises writers
anyway, and the statements are all short.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warm_pool import (
    STATUS_CANCELLED,
    STATUS_INTERRUPTED,
    STATUS_QUEUED,
    STATUS_RUNNING,
    TERMINAL_STATUSES,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id   TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    kind       TEXT NOT NULL,         -- async | sync
    idem_key   TEXT UNIQUE            -- the client's Idempotency-Key, if it sent one
);
CREATE TABLE IF NOT EXISTS jobs (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      TEXT NOT NULL UNIQUE,
    batch_id    TEXT NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
    paper_id    TEXT NOT NULL,
    paper_title TEXT,
    code        TEXT NOT NULL,
    timeout     REAL,
    status      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    worker      TEXT,
    result      TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_batch ON jobs(batch_id);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status);
CREATE TABLE IF NOT EXISTS artifacts (   -- files a job left that were kept (pruned with it)
    job_id       TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
    name         TEXT NOT NULL,           -- relative, '/'-separated (warm_pool.artifacts rules)
    size         INTEGER NOT NULL,
    sha256       TEXT NOT NULL,
    content_type TEXT NOT NULL,           -- what GET /jobs/<id>/artifacts/<name> answers with
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS exports (     -- the upload of a job's result and artifacts (S3)
    job_id     TEXT PRIMARY KEY REFERENCES jobs(job_id) ON DELETE CASCADE,
    uri        TEXT NOT NULL,
    status     TEXT NOT NULL,             -- uploaded | failed
    error      TEXT,
    at         REAL NOT NULL
);
"""


@dataclass(frozen=True)
class JobRow:
    """One job as stored."""

    job_id: str
    batch_id: str
    paper_id: str
    paper_title: str | None
    code: str
    timeout: float | None
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    worker: dict | None
    result: dict | None

    def to_public(self) -> dict[str, Any]:
        """The job as the API shows it: its result when it has one, else its state."""
        base: dict[str, Any] = {"job_id": self.job_id, "batch_id": self.batch_id,
                                "paper_id": self.paper_id, "status": self.status}
        if self.result is not None:
            out = dict(self.result)
            out.update(base)
            return out
        base["worker"] = self.worker
        return base


class JobStore:
    """Jobs and batches in one SQLite file; thread-safe."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: every commit survives kill -9 of the service; only the
        # accepting transaction (add_batch) is synced to disk (FULL), so a job we
        # answered 202 for survives power loss too, without paying an fsync on each
        # running/finished update (~1 ms each on this kind of machine).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, fn, durable: bool = False):
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous=NORMAL")
            return out

    def add_batch(self, batch_id: str, kind: str, jobs: list[dict[str, Any]],
                  idem_key: str | None = None) -> None:
        """Persist a batch and its jobs (all `queued`) in one transaction."""
        now = time.time()

        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO batches(batch_id, created_at, kind, idem_key) VALUES (?,?,?,?)",
                       (batch_id, now, kind, idem_key))
            db.executemany(
                "INSERT INTO jobs(job_id, batch_id, paper_id, paper_title, code, timeout, status,"
                " created_at) VALUES (?,?,?,?,?,?,?,?)",
                [(j["job_id"], batch_id, j["paper_id"], j.get("paper_title"), j["code"],
                  j.get("timeout"), STATUS_QUEUED, now) for j in jobs])

        self._tx(insert, durable=True)

    def mark_running(self, job_id: str, worker: dict | None) -> None:
        """A worker took the job (only a queued job can become running)."""
        self._tx(lambda db: db.execute(
            "UPDATE jobs SET status=?, started_at=?, worker=? WHERE job_id=? AND status=?",
            (STATUS_RUNNING, time.time(), json.dumps(worker), job_id, STATUS_QUEUED)))

    def finish(self, job_id: str, status: str, result: dict[str, Any],
               artifacts: list[dict[str, Any]] | None = None) -> bool:
        """Record a terminal status and result, and the artifacts kept (name, size, sha256,
        content_type); False if the job was already terminal."""
        assert status in TERMINAL_STATUSES, status

        def update(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "UPDATE jobs SET status=?, finished_at=?, result=? WHERE job_id=? AND status IN (?,?)",
                (status, time.time(), json.dumps(result), job_id, STATUS_QUEUED, STATUS_RUNNING))
            if cur.rowcount == 1 and artifacts:
                db.executemany("INSERT OR REPLACE INTO artifacts(job_id, name, size, sha256, content_type) "
                               "VALUES (?,?,?,?,?)", [(job_id, a["name"], a["size"], a["sha256"],
                                                       a["content_type"]) for a in artifacts])
            return cur.rowcount

        return self._tx(update) == 1

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """A job's kept artifacts, by name."""
        with self._lock:
            rows = self._db.execute("SELECT name, size, sha256, content_type FROM artifacts WHERE job_id=? "
                                    "ORDER BY name", (job_id,)).fetchall()
        return [dict(r) for r in rows]

    def artifact(self, job_id: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT name, size, sha256, content_type FROM artifacts WHERE job_id=? "
                                   "AND name=?", (job_id, name)).fetchone()
        return dict(row) if row else None

    def known_jobs(self, job_ids: list[str]) -> set[str]:
        """Which of these job ids the store holds."""
        found: set[str] = set()
        with self._lock:
            for i in range(0, len(job_ids), 500):
                chunk = job_ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT job_id FROM jobs WHERE job_id IN ({marks})",
                                        chunk).fetchall()
                found.update(r[0] for r in rows)
        return found

    def record_export(self, job_id: str, uri: str, status: str, error: str | None) -> None:
        self._tx(lambda db: db.execute(
            "INSERT OR REPLACE INTO exports(job_id, uri, status, error, at) SELECT ?,?,?,?,? "
            "WHERE EXISTS (SELECT 1 FROM jobs WHERE job_id=?)",
            (job_id, uri, status, error, time.time(), job_id)))

    def export(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT uri, status, error FROM exports WHERE job_id=?",
                                   (job_id,)).fetchone()
        return dict(row) if row else None

    def not_exported(self, limit: int = 1000) -> list[JobRow]:
        """Finished jobs whose upload was never tried (the service stopped first)."""
        placeholders = ",".join("?" * len(TERMINAL_STATUSES))
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE status IN ({placeholders}) AND NOT EXISTS (SELECT 1 FROM exports "
                f"WHERE exports.job_id = jobs.job_id) ORDER BY seq LIMIT ?",
                (*TERMINAL_STATUSES, limit)).fetchall()
        return [_row(r) for r in rows]

    def batch_for_key(self, idem_key: str) -> str | None:
        """The batch created with this Idempotency-Key, if any."""
        with self._lock:
            row = self._db.execute("SELECT batch_id FROM batches WHERE idem_key=?", (idem_key,)).fetchone()
        return row[0] if row else None

    def get_job(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return _row(row) if row else None

    def get_batch(self, batch_id: str) -> list[JobRow] | None:
        """The batch's jobs in submission order, or None if there is no such batch."""
        with self._lock:
            if not self._db.execute("SELECT 1 FROM batches WHERE batch_id=?", (batch_id,)).fetchone():
                return None
            rows = self._db.execute("SELECT * FROM jobs WHERE batch_id=? ORDER BY seq",
                                    (batch_id,)).fetchall()
        return [_row(r) for r in rows]

    def queued(self, limit: int = 1000) -> list[JobRow]:
        """Queued jobs, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status=? ORDER BY seq LIMIT ?",
                                    (STATUS_QUEUED, limit)).fetchall()
        return [_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs by status."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {r[0]: r[1] for r in rows}

    def recover(self, interrupted_result) -> tuple[int, int]:
        """After a restart: running -> interrupted (result from `interrupted_result(row)`).

        Returns (jobs marked interrupted, jobs still queued).
        """
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status=?", (STATUS_RUNNING,)).fetchall()
        for r in rows:
            row = _row(r)
            self.finish(row.job_id, STATUS_INTERRUPTED, interrupted_result(row))
        return len(rows), self.counts().get(STATUS_QUEUED, 0)

    def cancel_queued(self, job_id: str, result: dict[str, Any]) -> bool:
        """Cancel a job that no worker has taken; False if it is not queued."""
        cur = self._tx(lambda db: db.execute(
            "UPDATE jobs SET status=?, finished_at=?, result=? WHERE job_id=? AND status=?",
            (STATUS_CANCELLED, time.time(), json.dumps(result), job_id, STATUS_QUEUED)))
        return cur.rowcount == 1

    def prune(self, older_than_s: float) -> int:
        """Delete batches whose every job finished more than `older_than_s` ago."""
        cutoff = time.time() - older_than_s
        placeholders = ",".join("?" * len(TERMINAL_STATUSES))

        def delete(db: sqlite3.Connection) -> int:
            cur = db.execute(
                f"DELETE FROM batches WHERE created_at < ? AND NOT EXISTS (SELECT 1 FROM jobs WHERE "
                f"jobs.batch_id = batches.batch_id AND (status NOT IN ({placeholders}) "
                f"OR finished_at >= ?))",
                (cutoff, *TERMINAL_STATUSES, cutoff))
            return cur.rowcount

        return self._tx(delete)


def _row(r: sqlite3.Row) -> JobRow:
    return JobRow(
        job_id=r["job_id"], batch_id=r["batch_id"], paper_id=r["paper_id"],
        paper_title=r["paper_title"], code=r["code"], timeout=r["timeout"], status=r["status"],
        created_at=r["created_at"], started_at=r["started_at"], finished_at=r["finished_at"],
        worker=json.loads(r["worker"]) if r["worker"] else None,
        result=json.loads(r["result"]) if r["result"] else None,
    )
