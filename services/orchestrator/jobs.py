"""The orchestrator's persistent job table: a plain library over stdlib sqlite3, no gRPC.

Why a database and not a dict: a restarted orchestrator must find the jobs it had accepted (and resume the
unfinished ones from their last checkpoint), and a client retrying a submit with the same ``request_id`` must get
the job it already created (AIP-155), even across restarts. SQLite in WAL mode gives both with one file and no
server to run.

One connection is shared by all threads (gRPC handlers run on a thread pool) and guarded by a lock; writes run in
``BEGIN IMMEDIATE`` transactions so that another process on the same file cannot interleave a read-then-write.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # 2: jobs.owner (request_id unique per owner) and jobs.checkpoints (with digests)
MAX_PAGE_SIZE = 1000


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
UNFINISHED: tuple[JobState, ...] = (JobState.QUEUED, JobState.RUNNING)


class JobNotFound(KeyError):
    """No job with that id; a KeyError so mapping-style callers can catch it, but with a readable message."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"job {self.job_id!r} not found"


class RequestIdConflict(ValueError):
    """A request_id was reused with a different spec: retrying must send the same request, or it is a new one."""

    def __init__(self, request_id: str, job_id: str) -> None:
        super().__init__(
            f"request_id {request_id!r} was already used for job {job_id!r} with a different spec; "
            "use a new request_id for a different request"
        )
        self.request_id = request_id
        self.job_id = job_id


class InvalidTransition(ValueError):
    """A state change the lifecycle forbids: terminal states (succeeded, failed, cancelled) are final."""


class SchemaVersionError(RuntimeError):
    """The database was written by a newer build; reading it with this one could silently lose fields."""


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint a scene saved for this job, with the SHA-256 the scene reported: the only checkpoints a job
    resumes from. `final` marks a stage's last one (kept whatever the retention, the next stage starts from it)."""

    stage: str
    step: int
    uri: str
    sha256: str
    final: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "step": self.step, "uri": self.uri, "sha256": self.sha256, "final": self.final}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckpointRef:
        return cls(str(data["stage"]), int(data["step"]), str(data["uri"]), str(data["sha256"]), bool(data.get("final")))


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    request_id: str
    spec: bytes
    spec_digest: str
    state: JobState
    stage: str
    step: int
    total_steps: int
    checkpoint_uri: str
    checkpoint_stage: str
    scene_replica: str
    artifacts: dict[str, str]
    provenance_uri: str
    error: str
    cancel_requested: bool
    attempts: int
    create_time: float
    update_time: float
    owner: str = ""  # the submitting principal; '' for jobs made before ownership existed (admins only)
    checkpoints: tuple[CheckpointRef, ...] = ()

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def stage_checkpoints(self, stage: str) -> list[CheckpointRef]:
        """This stage's recorded checkpoints, newest first."""
        return sorted((c for c in self.checkpoints if c.stage == stage), key=lambda c: (c.final, c.step), reverse=True)

    def final_checkpoint(self, stage: str) -> CheckpointRef | None:
        return next((c for c in self.checkpoints if c.stage == stage and c.final), None)


_SCHEMA = """
CREATE TABLE jobs (
    job_id           TEXT PRIMARY KEY,
    request_id       TEXT NOT NULL DEFAULT '',
    spec             BLOB NOT NULL,
    spec_digest      TEXT NOT NULL,
    state            TEXT NOT NULL,
    stage            TEXT NOT NULL DEFAULT '',
    step             INTEGER NOT NULL DEFAULT 0,
    total_steps      INTEGER NOT NULL DEFAULT 0,
    checkpoint_uri   TEXT NOT NULL DEFAULT '',
    checkpoint_stage TEXT NOT NULL DEFAULT '',
    scene_replica    TEXT NOT NULL DEFAULT '',
    artifacts        TEXT NOT NULL DEFAULT '{}',
    provenance_uri   TEXT NOT NULL DEFAULT '',
    error            TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    create_time      REAL NOT NULL,
    update_time      REAL NOT NULL,
    owner            TEXT NOT NULL DEFAULT '',
    checkpoints      TEXT NOT NULL DEFAULT '[]'
);
CREATE UNIQUE INDEX jobs_owner_request_id ON jobs (owner, request_id) WHERE request_id != '';
CREATE INDEX jobs_newest ON jobs (create_time DESC, job_id DESC);
CREATE INDEX jobs_state ON jobs (state, create_time, job_id);
CREATE INDEX jobs_owner_newest ON jobs (owner, create_time DESC, job_id DESC);
"""

# version -> the statements that bring a database of the version before it up to it (a new file gets _SCHEMA).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # Jobs get an owner ('' for the old ones: only admins see them) and request ids become per owner, so one
    # principal's request_id can neither collide with nor reveal another's job; and their recorded checkpoints.
    2: (
        "ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "DROP INDEX IF EXISTS jobs_request_id",
        "CREATE UNIQUE INDEX jobs_owner_request_id ON jobs (owner, request_id) WHERE request_id != ''",
        "CREATE INDEX jobs_owner_newest ON jobs (owner, create_time DESC, job_id DESC)",
        "ALTER TABLE jobs ADD COLUMN checkpoints TEXT NOT NULL DEFAULT '[]'",
    ),
}


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _flag(name: str, value: Any) -> int:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return int(value)


def _state(name: str, value: Any) -> str:
    return JobState(value).value


def _checkpoints(name: str, value: Any) -> str:
    if not all(isinstance(c, CheckpointRef) for c in value):
        raise TypeError(f"{name} must be a sequence of CheckpointRef")
    return json.dumps([c.to_json() for c in value])


def _artifacts(name: str, value: Any) -> str:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError(f"{name} must be a mapping of str to str")
    return json.dumps(dict(value), sort_keys=True)


# The mutable columns and how each is checked and stored; everything else is fixed at create().
_MUTABLE: dict[str, Callable[[str, Any], Any]] = {
    "state": _state,
    "stage": _text,
    "step": _integer,
    "total_steps": _integer,
    "checkpoint_uri": _text,
    "checkpoint_stage": _text,
    "scene_replica": _text,
    "artifacts": _artifacts,
    "provenance_uri": _text,
    "error": _text,
    "cancel_requested": _flag,
    "attempts": _integer,
    "checkpoints": _checkpoints,
}


def _encode_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check names and types before any SQL runs, so a typo fails loudly instead of being dropped."""
    unknown = sorted(set(fields) - set(_MUTABLE))
    if unknown:
        raise TypeError(f"unknown or immutable job fields: {', '.join(unknown)}")
    return {name: _MUTABLE[name](name, value) for name, value in fields.items()}


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        request_id=row["request_id"],
        spec=bytes(row["spec"]),
        spec_digest=row["spec_digest"],
        state=JobState(row["state"]),
        stage=row["stage"],
        step=row["step"],
        total_steps=row["total_steps"],
        checkpoint_uri=row["checkpoint_uri"],
        checkpoint_stage=row["checkpoint_stage"],
        scene_replica=row["scene_replica"],
        artifacts=json.loads(row["artifacts"]),
        provenance_uri=row["provenance_uri"],
        error=row["error"],
        cancel_requested=bool(row["cancel_requested"]),
        attempts=row["attempts"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        owner=row["owner"],
        checkpoints=tuple(CheckpointRef.from_json(c) for c in json.loads(row["checkpoints"])),
    )


def new_job_id() -> str:
    """Random (uuid4) rather than sequential, so ids leak nothing and stay unique across stores and restarts."""
    return "job-" + uuid.uuid4().hex[:16]


def spec_digest(spec: bytes) -> str:
    return hashlib.sha256(spec).hexdigest()


def _state_filter(states: set[JobState] | None) -> list[str]:
    """Sorted state values; empty means every state (like an empty repeated filter field in a request)."""
    return sorted(JobState(s).value for s in states) if states else []


def _encode_token(row: JobRecord, states: list[str]) -> str:
    """The next page starts strictly after this row; the filter travels along so it cannot change mid-listing."""
    payload = {"t": row.create_time, "id": row.job_id, "s": states}
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()


def _decode_token(token: str, states: list[str]) -> tuple[float, str]:
    """Any token not made by _encode_token for this same filter is rejected, never half-interpreted."""
    try:
        payload = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        create_time, job_id, token_states = payload["t"], payload["id"], payload["s"]
    except (binascii.Error, UnicodeError, ValueError, TypeError, KeyError) as exc:
        raise ValueError("invalid page_token") from exc
    valid = (
        isinstance(create_time, (int, float))
        and not isinstance(create_time, bool)
        and isinstance(job_id, str)
        and token_states == states
    )
    if not valid:
        raise ValueError("invalid page_token")
    return float(create_time), job_id


class JobStore:
    """The job table. Thread-safe; open one per process and share it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = str(path)
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        try:
            self._configure()
            self._migrate()
            self._last_create = self._max_create_time()
        except BaseException:
            self._conn.close()
            raise

    def _configure(self) -> None:
        """WAL lets readers run during a write; NORMAL sync in WAL survives process crashes (the restart case)."""
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")

    def _migrate(self) -> None:
        """Create the schema on a new file; refuse one written by a newer build rather than misread it."""
        with self._tx() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0]
            if version is None:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[target]:
                        conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"job store {self._path!r} has schema version {version}, newer than the {SCHEMA_VERSION} "
                    "this orchestrator understands; run a newer orchestrator or use another database file"
                )

    def _max_create_time(self) -> float:
        row = self._conn.execute("SELECT MAX(create_time) FROM jobs").fetchone()
        return row[0] if row[0] is not None else 0.0

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front, so read-check-write is atomic."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _next_create_time(self) -> float:
        """Strictly increasing within this store, so 'newest first' and queue order never depend on a random id."""
        now = max(time.time(), self._last_create + 1e-6)
        self._last_create = now
        return now

    def create(self, spec: bytes, request_id: str = "", owner: str = "") -> tuple[JobRecord, bool]:
        """A new QUEUED job owned by `owner`, or the one this owner's request_id already made (created=False) if
        the spec is the same."""
        spec = bytes(spec)
        _text("request_id", request_id)
        _text("owner", owner)
        digest = spec_digest(spec)
        with self._tx() as conn:
            if request_id:
                row = conn.execute(
                    "SELECT * FROM jobs WHERE owner = ? AND request_id = ?", (owner, request_id)
                ).fetchone()
                if row is not None:
                    return self._existing(row, request_id, digest), False
            job_id = new_job_id()
            now = self._next_create_time()
            conn.execute(
                "INSERT INTO jobs (job_id, request_id, spec, spec_digest, state, create_time, update_time, owner)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, request_id, spec, digest, JobState.QUEUED.value, now, now, owner),
            )
            return _record(conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()), True

    @staticmethod
    def _existing(row: sqlite3.Row, request_id: str, digest: str) -> JobRecord:
        if row["spec_digest"] != digest:
            raise RequestIdConflict(request_id, row["job_id"])
        return _record(row)

    def find_by_request_id(self, request_id: str, spec: bytes, owner: str = "") -> JobRecord | None:
        """The job an earlier submit by `owner` with this request_id created, or None; RequestIdConflict if it
        was made from a different spec. Lets a server answer a retried submit before re-validating it."""
        if not request_id:
            return None
        rows = self._query("SELECT * FROM jobs WHERE owner = ? AND request_id = ?", (owner, request_id))
        return self._existing(rows[0], request_id, spec_digest(bytes(spec))) if rows else None

    def get(self, job_id: str) -> JobRecord:
        rows = self._query("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        if not rows:
            raise JobNotFound(job_id)
        return _record(rows[0])

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set mutable fields. A `state` here obeys the same rule as transition(): a terminal state is final."""
        encoded = _encode_fields(fields)
        with self._tx() as conn:
            current = self._locked_get(conn, job_id)
            new_state = encoded.get("state", current.state.value)
            if current.terminal and new_state != current.state.value:
                raise InvalidTransition(f"job {job_id!r} is {current.state.value}; it cannot become {new_state}")
            return self._write(conn, job_id, encoded)

    def transition(self, job_id: str, to: JobState, **fields: Any) -> JobRecord:
        """Move to `to` (and set `fields`) atomically; a job in a terminal state cannot transition at all."""
        if "state" in fields:
            raise TypeError("pass the new state as `to`, not as a field")
        encoded = _encode_fields({**fields, "state": JobState(to)})
        with self._tx() as conn:
            current = self._locked_get(conn, job_id)
            if current.terminal:
                raise InvalidTransition(
                    f"job {job_id!r} is {current.state.value}, a final state; it cannot move to {JobState(to).value}"
                )
            return self._write(conn, job_id, encoded)

    @staticmethod
    def _locked_get(conn: sqlite3.Connection, job_id: str) -> JobRecord:
        row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return _record(row)

    @staticmethod
    def _write(conn: sqlite3.Connection, job_id: str, encoded: dict[str, Any]) -> JobRecord:
        """Column names come only from _MUTABLE (checked in _encode_fields), never from the caller's strings."""
        columns = [*encoded, "update_time"]
        assignments = ", ".join(f"{name} = ?" for name in columns)
        params = (*encoded.values(), time.time(), job_id)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", params)  # noqa: S608
        return _record(conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone())

    def list(
        self, page_size: int = 50, page_token: str = "", states: set[JobState] | None = None,
        owner: str | None = None,
    ) -> tuple[list[JobRecord], str]:
        """Newest first, keyset-paginated: pages stay consistent while jobs are created or deleted meanwhile.
        `owner`: only that principal's jobs (None: everyone's)."""
        size = min(max(int(page_size), 1), MAX_PAGE_SIZE)
        wanted = _state_filter(states)
        where, params = self._list_filter(wanted, page_token, owner)
        rows = self._query(
            f"SELECT * FROM jobs {where} ORDER BY create_time DESC, job_id DESC LIMIT ?",  # noqa: S608
            (*params, size + 1),
        )
        records = [_record(row) for row in rows[:size]]
        token = _encode_token(records[-1], wanted) if len(rows) > size else ""
        return records, token

    @staticmethod
    def _list_filter(wanted: list[str], page_token: str, owner: str | None = None) -> tuple[str, tuple[Any, ...]]:
        clauses: list[str] = []
        params: list[Any] = []
        if owner is not None:
            clauses.append("owner = ?")
            params.append(_text("owner", owner))
        if wanted:
            clauses.append(f"state IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        if page_token:
            after_time, after_id = _decode_token(page_token, wanted)
            clauses.append("(create_time < ? OR (create_time = ? AND job_id < ?))")
            params.extend((after_time, after_time, after_id))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return where, tuple(params)

    def delete(self, job_id: str) -> None:
        with self._tx() as conn:
            if conn.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,)).rowcount == 0:
                raise JobNotFound(job_id)

    def unfinished(self) -> list[JobRecord]:
        """QUEUED and RUNNING jobs, oldest first: what a restarted orchestrator resumes, in submission order."""
        rows = self._query(
            "SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY create_time ASC, job_id ASC",
            tuple(s.value for s in UNFINISHED),
        )
        return [_record(row) for row in rows]

    def counts(self) -> dict[JobState, int]:
        """Jobs per state, every state present (zeros included) so metrics gauges never go missing."""
        found = {row[0]: row[1] for row in self._query("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
        return {state: found.get(state.value, 0) for state in JobState}

    def queue_position(self, job_id: str) -> int:
        """How many QUEUED jobs are ahead of this one (0 = next); ValueError if the job is no longer queued."""
        with self._lock:
            job = self.get(job_id)
            if job.state is not JobState.QUEUED:
                raise ValueError(f"job {job_id!r} is {job.state.value}, not queued")
            rows = self._query(
                "SELECT COUNT(*) FROM jobs WHERE state = ? AND (create_time < ? OR (create_time = ? AND job_id < ?))",
                (JobState.QUEUED.value, job.create_time, job.create_time, job.job_id),
            )
        return int(rows[0][0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
