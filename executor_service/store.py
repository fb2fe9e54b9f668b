"""The job store: every accepted job and its result, in SQLite (WAL) under the work dir.

A job is written here, status `queued`, before the request that brought it is
answered; the pool's callbacks move it to `running` and then to a terminal status with
its result. After a crash `recover()` marks what was `running` as `interrupted` (the
process that ran it is gone) and leaves `queued` jobs for the dispatcher to run again.

A batch lists its jobs in `batch_jobs`, in request order: the jobs it created, and
jobs it joined because the same paper's identical code was already queued or running
(`deduplicated`). A job belongs to the batch that created it (`jobs.batch_id`).
Callbacks (webhooks) live in `callbacks`, one row per URL to tell, with its delivery
state, so that deliveries survive a restart.

One connection, shared by the request threads under a lock: SQLite serialises writers
anyway, and the statements are all short.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warm_pool import (
    STATUS_CANCELLED,
    STATUS_INTERRUPTED,
    STATUS_QUEUED,
    STATUS_RUNNING,
    TERMINAL_STATUSES,
    utc_iso,
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

# Schema changes after the first release, applied in order to old and new stores alike
# (PRAGMA user_version counts how many are applied).
_MIGRATIONS = (
    """
    ALTER TABLE jobs ADD COLUMN code_sha256 TEXT;          -- what de-duplication compares
    ALTER TABLE jobs ADD COLUMN timeout_clamped_from REAL; -- the timeout asked for, above the cap
    ALTER TABLE jobs ADD COLUMN fields TEXT;               -- the caller's own fields (JSON)
    CREATE INDEX jobs_by_paper ON jobs(paper_id, seq);
    CREATE TABLE batch_jobs (
        batch_id     TEXT NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
        position     INTEGER NOT NULL,
        job_id       TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
        deduplicated INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (batch_id, position)
    );
    CREATE INDEX batch_jobs_by_job ON batch_jobs(job_id);
    INSERT INTO batch_jobs(batch_id, position, job_id) SELECT batch_id, seq, job_id FROM jobs;
    CREATE TABLE callbacks (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        batch_id     TEXT NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
        job_id       TEXT REFERENCES jobs(job_id) ON DELETE CASCADE,  -- NULL: the whole batch
        url          TEXT NOT NULL,
        state        TEXT NOT NULL,   -- waiting | pending | delivered | failed
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_at      REAL,            -- when the next attempt is due (pending)
        last_status  INTEGER,
        last_error   TEXT,
        created_at   REAL NOT NULL,
        delivered_at REAL
    );
    CREATE INDEX callbacks_by_state ON callbacks(state, next_at);
    CREATE INDEX callbacks_by_job ON callbacks(job_id);
    CREATE INDEX callbacks_by_batch ON callbacks(batch_id);
    """,
    """
    ALTER TABLE jobs ADD COLUMN profile INTEGER NOT NULL DEFAULT 0;  -- capture a Neuron profile
    """,
    """
    CREATE TABLE queue_messages (   -- which job an SQS message brought (a redelivery: the same id)
        message_id  TEXT NOT NULL,
        job_id      TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
        received_at REAL NOT NULL,
        PRIMARY KEY (message_id, job_id)
    );
    CREATE INDEX queue_messages_by_job ON queue_messages(job_id);
    CREATE TABLE queue_rejects (    -- messages that were not a valid request (deleted from the queue)
        message_id  TEXT PRIMARY KEY,
        received_at REAL NOT NULL,
        body_bytes  INTEGER NOT NULL,
        body_sha256 TEXT NOT NULL,
        error       TEXT NOT NULL
    );
    """,
)

ACTIVE_STATUSES = (STATUS_QUEUED, STATUS_RUNNING)
# Where a job's or a batch's document lists its callbacks' delivery state (the runner adds it).
CALLBACKS_FIELD = "callbacks"
CALLBACK_WAITING, CALLBACK_PENDING = "waiting", "pending"
CALLBACK_DELIVERED, CALLBACK_FAILED = "delivered", "failed"
_TERMINAL_SQL = ",".join(f"'{s}'" for s in TERMINAL_STATUSES)


def code_sha256(code: str) -> str:
    """What de-duplication compares: the script's exact text."""
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class JobRow:
    """One job as stored (`deduplicated`: as seen from a batch that joined it)."""

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
    timeout_clamped_from: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    deduplicated: bool = False
    profile: bool = False

    def to_public(self) -> dict[str, Any]:
        """The job as the API shows it: its result when it has one, else its state.

        The service's fields and the caller's own come last, so that no metric a script
        prints can stand in for them.
        """
        base: dict[str, Any] = {"job_id": self.job_id, "batch_id": self.batch_id,
                                "paper_id": self.paper_id, "status": self.status}
        base.update(self.fields)
        base["timeout_clamped_from"] = self.timeout_clamped_from
        if self.deduplicated:
            base["deduplicated"] = True
        if self.result is not None:
            out = dict(self.result)
            out.update(base)
            return out
        base["worker"] = self.worker
        return base

    def summary(self) -> dict[str, Any]:
        """The job in a list: its state and outcome, not its output."""
        res = self.result or {}
        out = {"job_id": self.job_id, "batch_id": self.batch_id, "paper_id": self.paper_id,
               "status": self.status, "submitted_at": utc_iso(self.created_at),
               "started_at": utc_iso(self.started_at) if self.started_at else None,
               "finished_at": utc_iso(self.finished_at) if self.finished_at else None,
               # json_extract gives a JSON boolean as 0 or 1 (see list_jobs)
               "success": None if res.get("success") is None else bool(res["success"]),
               "error_type": res.get("error_type"),
               "execution_time": res.get("execution_time"),
               "timeout_clamped_from": self.timeout_clamped_from}
        out.update(self.fields)
        out["job_url"] = f"/jobs/{self.job_id}"
        return out


@dataclass(frozen=True)
class CallbackRow:
    """One callback: where to POST which document, and how its delivery went."""

    id: int
    batch_id: str
    job_id: str | None
    url: str
    state: str
    attempts: int
    next_at: float | None
    last_status: int | None
    last_error: str | None
    created_at: float
    delivered_at: float | None

    def to_public(self) -> dict[str, Any]:
        return {"url": self.url, "state": self.state, "attempts": self.attempts,
                "last_status": self.last_status, "last_error": self.last_error,
                "next_attempt_at": utc_iso(self.next_at) if self.state == CALLBACK_PENDING
                and self.next_at else None,
                "delivered_at": utc_iso(self.delivered_at) if self.delivered_at else None}


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
        # accepting transaction (add_batch) is synced to disk (FULL, or `sync()` after
        # it), so a job we answered for survives power loss too, without paying an
        # fsync on each running/finished update (~1 ms each on this kind of machine).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._wal_path = f"{path}-wal"  # SQLite's name for the WAL of `path`
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            # executescript commits first; one script, then its version, in one transaction.
            self._db.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")

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

    def _all(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    # writing ---------------------------------------------------------------------------

    def add_batch(self, batch_id: str, kind: str, jobs: list[dict[str, Any]],
                  idem_key: str | None = None, callbacks: Iterable[tuple[str | None, str]] = (),
                  message_id: str | None = None, synced: bool = True) -> None:
        """Persist a batch, its new jobs (all `queued`) and its callbacks in one transaction.

        `jobs` is in request order; an entry with `"deduplicated": True` names a job that
        already exists (the batch joins it). `callbacks` are (job_id or None for the
        whole batch, url). `message_id`: the SQS message that brought the batch, linked
        to its jobs in the same transaction. `synced`: on disk when this returns
        (synchronous=FULL); with False only committed (a crash of the service keeps it,
        power loss may not), and the caller calls `sync()` before acknowledging it.
        """
        now = time.time()

        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO batches(batch_id, created_at, kind, idem_key) VALUES (?,?,?,?)",
                       (batch_id, now, kind, idem_key))
            new = [j for j in jobs if not j.get("deduplicated")]
            db.executemany(
                "INSERT INTO jobs(job_id, batch_id, paper_id, paper_title, code, timeout, status,"
                " created_at, code_sha256, timeout_clamped_from, fields, profile)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [(j["job_id"], batch_id, j["paper_id"], j.get("fields", {}).get("paper_title"), j["code"],
                  j.get("timeout"), STATUS_QUEUED, now, code_sha256(j["code"]),
                  j.get("timeout_clamped_from"), json.dumps(j.get("fields") or {}),
                  int(bool(j.get("profile")))) for j in new])
            db.executemany("INSERT INTO batch_jobs(batch_id, position, job_id, deduplicated)"
                           " VALUES (?,?,?,?)",
                           [(batch_id, i, j["job_id"], int(bool(j.get("deduplicated"))))
                            for i, j in enumerate(jobs)])
            db.executemany("INSERT INTO callbacks(batch_id, job_id, url, state, created_at)"
                           " VALUES (?,?,?,?,?)",
                           [(batch_id, job_id, url, CALLBACK_WAITING, now) for job_id, url in callbacks])
            if message_id is not None:
                db.executemany("INSERT OR IGNORE INTO queue_messages(message_id, job_id, received_at)"
                               " VALUES (?,?,?)", [(message_id, j["job_id"], now) for j in jobs])

        self._tx(insert, durable=synced)

    def sync(self) -> None:
        """Put every transaction committed so far on disk: fdatasync of the WAL, the very
        sync that synchronous=FULL makes at each commit (frames are only ever appended to
        the WAL, or copied from it into the database by a checkpoint, which syncs both
        files itself). It runs without the store's lock, so the pool's updates and other
        requests go on while the disk works. Raises OSError if the disk fails."""
        try:
            fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # no WAL (never while the connection is open): the database file
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def mark_running(self, job_id: str, worker: dict | None) -> None:
        """A worker took the job (only a queued job can become running). A running job
        started again (on a cluster, after its node was lost) gets its new worker; its
        started_at stays the first start's."""
        self._tx(lambda db: db.execute(
            "UPDATE jobs SET status=?, started_at=COALESCE(started_at, ?), worker=? WHERE job_id=?"
            " AND status IN (?,?)",
            (STATUS_RUNNING, time.time(), json.dumps(worker), job_id, *ACTIVE_STATUSES)))

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

    # reading ---------------------------------------------------------------------------

    def batch_for_key(self, idem_key: str) -> str | None:
        """The batch created with this Idempotency-Key, if any."""
        rows = self._all("SELECT batch_id FROM batches WHERE idem_key=?", (idem_key,))
        return rows[0][0] if rows else None

    def active_job(self, paper_id: str, code: str, profile: bool = False) -> JobRow | None:
        """The newest queued or running job of this paper with exactly this code (and, when
        `profile`, capturing a profile: a request for one never joins a job without)."""
        # Through the status index: the queued and running jobs are few (the queue's
        # bound and the pool's size), a paper's history may be thousands of rows (SQLite
        # would otherwise walk it by jobs_by_paper, on every request).
        rows = self._all("SELECT * FROM jobs INDEXED BY jobs_by_status WHERE status IN (?,?) AND paper_id=?"
                         " AND code_sha256=? AND profile >= ? ORDER BY seq DESC LIMIT 1",
                         (*ACTIVE_STATUSES, paper_id, code_sha256(code), int(profile)))
        return _row(rows[0]) if rows else None

    def get_job(self, job_id: str) -> JobRow | None:
        rows = self._all("SELECT * FROM jobs WHERE job_id=?", (job_id,))
        return _row(rows[0]) if rows else None

    def get_batch(self, batch_id: str) -> list[JobRow] | None:
        """The batch's jobs in request order, or None if there is no such batch."""
        with self._lock:
            if not self._db.execute("SELECT 1 FROM batches WHERE batch_id=?", (batch_id,)).fetchone():
                return None
            rows = self._db.execute(
                "SELECT jobs.*, batch_jobs.deduplicated AS dedup FROM batch_jobs JOIN jobs USING (job_id) "
                "WHERE batch_jobs.batch_id=? ORDER BY batch_jobs.position", (batch_id,)).fetchall()
        return [_row(r) for r in rows]

    def list_jobs(self, paper_id: str | None = None, statuses: Iterable[str] = (),
                  before_seq: int | None = None, limit: int = 50) -> list[JobRow]:
        """Jobs newest first, of one paper and in the given statuses if named, below a cursor.

        The rows carry their results' outcome but not their output (see JobRow.summary).
        """
        where, args = [], []
        if paper_id is not None:
            where.append("paper_id=?")
            args.append(paper_id)
        statuses = tuple(statuses)
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        if before_seq is not None:
            where.append("seq<?")
            args.append(before_seq)
        sql = ("SELECT seq, job_id, batch_id, paper_id, paper_title, '' AS code, timeout, status, created_at,"
               " started_at, finished_at, worker, timeout_clamped_from, fields,"
               " CASE WHEN result IS NULL THEN NULL ELSE json_object("
               "'success', json_extract(result, '$.success'),"
               " 'error_type', json_extract(result, '$.error_type'),"
               " 'execution_time', json_extract(result, '$.execution_time')) END AS result FROM jobs"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC LIMIT ?")
        return [_row(r) for r in self._all(sql, (*args, limit))]

    def paper(self, paper_id: str) -> tuple[int, JobRow | None, JobRow | None]:
        """(how many jobs the paper has, its newest job, its newest job with a result)."""
        with self._lock:
            count = self._db.execute("SELECT COUNT(*) FROM jobs WHERE paper_id=?", (paper_id,)).fetchone()[0]
            latest = self._db.execute("SELECT * FROM jobs WHERE paper_id=? ORDER BY seq DESC LIMIT 1",
                                      (paper_id,)).fetchone()
            done = self._db.execute(f"SELECT * FROM jobs WHERE paper_id=? AND status IN ({_TERMINAL_SQL}) "
                                    "ORDER BY seq DESC LIMIT 1", (paper_id,)).fetchone()
        return count, _row(latest) if latest else None, _row(done) if done else None

    def queued(self, limit: int = 1000) -> list[JobRow]:
        """Queued jobs, oldest first."""
        rows = self._all("SELECT * FROM jobs WHERE status=? ORDER BY seq LIMIT ?", (STATUS_QUEUED, limit))
        return [_row(r) for r in rows]

    def in_status(self, statuses: Iterable[str]) -> list[JobRow]:
        """Every job in these statuses, oldest first."""
        statuses = tuple(statuses)
        rows = self._all(f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(statuses))}) ORDER BY seq",
                         statuses)
        return [_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs by status (a walk over every job: not for each request)."""
        return {r[0]: r[1] for r in self._all("SELECT status, COUNT(*) FROM jobs GROUP BY status")}

    def count(self, status: str) -> int:
        """Number of jobs in one status, through the status index (cheap for the few active ones)."""
        return self._all("SELECT COUNT(*) FROM jobs WHERE status=?", (status,))[0][0]

    # queue messages ----------------------------------------------------------------------

    def message_job(self, message_id: str) -> JobRow | None:
        """The newest job that this SQS message brought, if any."""
        rows = self._all("SELECT jobs.* FROM queue_messages JOIN jobs USING (job_id) WHERE message_id=?"
                         " ORDER BY queue_messages.received_at DESC, jobs.seq DESC LIMIT 1", (message_id,))
        return _row(rows[0]) if rows else None

    def record_reject(self, message_id: str, body: bytes, error: str) -> None:
        """A message that was not a valid request: what was wrong, its size and digest."""
        self._tx(lambda db: db.execute(
            "INSERT OR REPLACE INTO queue_rejects(message_id, received_at, body_bytes, body_sha256, error)"
            " VALUES (?,?,?,?,?)", (message_id, time.time(), len(body), hashlib.sha256(body).hexdigest(),
                                    error)))

    def rejects(self, limit: int = 10) -> list[dict[str, Any]]:
        """The newest rejected messages."""
        rows = self._all("SELECT * FROM queue_rejects ORDER BY received_at DESC LIMIT ?", (limit,))
        return [{**dict(r), "received_at": utc_iso(r["received_at"])} for r in rows]

    # recovery, cancelling, pruning -------------------------------------------------------

    def recover(self, interrupted_result) -> tuple[int, int]:
        """After a restart: running -> interrupted (result from `interrupted_result(row)`),
        and so are queued jobs that an SQS message brought: the service held that message
        only while it lived, so the job runs again when the message is delivered again,
        never from the store (whoever receives it first runs it).

        Returns (jobs marked interrupted, jobs still queued).
        """
        rows = self._all("SELECT * FROM jobs WHERE status=? OR (status=? AND job_id IN"
                         " (SELECT job_id FROM queue_messages))", (STATUS_RUNNING, STATUS_QUEUED))
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
        """Delete batches whose every job finished more than `older_than_s` ago.

        A batch's jobs go with it, so a batch whose jobs another batch joined waits until
        that batch's jobs are old too (one level: a longer chain of joins is not followed).
        """
        cutoff = time.time() - older_than_s
        recent = f"(j.status NOT IN ({_TERMINAL_SQL}) OR j.finished_at >= :cutoff)"

        def delete(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "DELETE FROM batches WHERE created_at < :cutoff"
                " AND NOT EXISTS (SELECT 1 FROM batch_jobs bj JOIN jobs j ON j.job_id = bj.job_id"
                f" WHERE bj.batch_id = batches.batch_id AND {recent})"
                " AND NOT EXISTS (SELECT 1 FROM jobs mine JOIN batch_jobs link ON link.job_id = mine.job_id"
                " JOIN batch_jobs sib ON sib.batch_id = link.batch_id JOIN jobs j ON j.job_id = sib.job_id"
                f" WHERE mine.batch_id = batches.batch_id AND {recent})", {"cutoff": cutoff})
            db.execute("DELETE FROM queue_rejects WHERE received_at < ?", (cutoff,))
            return cur.rowcount

        return self._tx(delete)

    # callbacks -------------------------------------------------------------------------

    def callbacks(self, batch_id: str | None = None, job_id: str | None = None) -> list[CallbackRow]:
        """A job's callbacks (job_id), or a batch's own (batch_id: those for the whole batch)."""
        if job_id is not None:
            rows = self._all("SELECT * FROM callbacks WHERE job_id=? ORDER BY id", (job_id,))
        else:
            rows = self._all("SELECT * FROM callbacks WHERE batch_id=? AND job_id IS NULL ORDER BY id",
                             (batch_id,))
        return [CallbackRow(**dict(r)) for r in rows]

    def promote_callbacks(self, now: float) -> int:
        """Waiting callbacks whose job (or every job of whose batch) is terminal become due."""
        return self._tx(lambda db: db.execute(
            "UPDATE callbacks SET state=?, next_at=? WHERE state=? AND ("
            f"(job_id IS NOT NULL AND (SELECT status FROM jobs WHERE jobs.job_id = callbacks.job_id)"
            f" IN ({_TERMINAL_SQL})) OR (job_id IS NULL AND NOT EXISTS (SELECT 1 FROM batch_jobs bj"
            f" JOIN jobs j ON j.job_id = bj.job_id WHERE bj.batch_id = callbacks.batch_id"
            f" AND j.status NOT IN ({_TERMINAL_SQL}))))",
            (CALLBACK_PENDING, now, CALLBACK_WAITING))).rowcount

    def callback_jobs(self) -> set[str]:
        """The jobs whose end a waiting callback waits for: its job, or every job of its batch."""
        rows = self._all("SELECT job_id FROM callbacks WHERE state=? AND job_id IS NOT NULL UNION"
                         " SELECT bj.job_id FROM callbacks c JOIN batch_jobs bj ON bj.batch_id = c.batch_id"
                         " WHERE c.state=? AND c.job_id IS NULL", (CALLBACK_WAITING, CALLBACK_WAITING))
        return {r[0] for r in rows}

    def due_callbacks(self, now: float, limit: int) -> list[CallbackRow]:
        """Pending callbacks whose next attempt is due, the most overdue first."""
        rows = self._all("SELECT * FROM callbacks WHERE state=? AND next_at<=? ORDER BY next_at LIMIT ?",
                         (CALLBACK_PENDING, now, limit))
        return [CallbackRow(**dict(r)) for r in rows]

    def record_attempt(self, callback_id: int, state: str, status: int | None, error: str | None,
                       next_at: float | None) -> None:
        """One delivery attempt's outcome: delivered, failed for good, or pending again at next_at."""
        now = time.time()
        self._tx(lambda db: db.execute(
            "UPDATE callbacks SET state=?, attempts=attempts+1, last_status=?, last_error=?, next_at=?,"
            " delivered_at=? WHERE id=?",
            (state, status, error, next_at, now if state == CALLBACK_DELIVERED else None, callback_id)))


def activity(path: Path) -> tuple[dict[str, int], float | None]:
    """(jobs queued and running, the latest time a job was accepted, started or finished),
    read from a store file without writing it (idle-stop runs beside the service)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        counts = dict(db.execute("SELECT status, COUNT(*) FROM jobs WHERE status IN (?,?) GROUP BY status",
                                 ACTIVE_STATUSES).fetchall())
        last = db.execute("SELECT MAX(COALESCE(MAX(created_at), 0), COALESCE(MAX(started_at), 0),"
                          " COALESCE(MAX(finished_at), 0)) FROM jobs").fetchone()[0]
    finally:
        db.close()
    return {s: counts.get(s, 0) for s in ACTIVE_STATUSES}, (last or None)


def _row(r: sqlite3.Row) -> JobRow:
    keys = r.keys()
    fields = json.loads(r["fields"]) if "fields" in keys and r["fields"] else {}
    if not fields and r["paper_title"] is not None:  # a job stored before the fields column
        fields = {"paper_title": r["paper_title"]}
    return JobRow(
        job_id=r["job_id"], batch_id=r["batch_id"], paper_id=r["paper_id"],
        paper_title=r["paper_title"], code=r["code"], timeout=r["timeout"], status=r["status"],
        created_at=r["created_at"], started_at=r["started_at"], finished_at=r["finished_at"],
        worker=json.loads(r["worker"]) if r["worker"] else None,
        result=json.loads(r["result"]) if r["result"] else None,
        timeout_clamped_from=r["timeout_clamped_from"] if "timeout_clamped_from" in keys else None,
        fields=fields, seq=r["seq"] if "seq" in keys else 0,
        deduplicated=bool(r["dedup"]) if "dedup" in keys else False,
        profile=bool(r["profile"]) if "profile" in keys else False,
    )
