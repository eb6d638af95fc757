"""The Stigmer Daemon's SQLite store: the schema and its migrations, and the conversions
between rows and protobuf messages. The daemon (daemon.py) owns the transactions and the locking."""
import sqlite3

import stigmer_pb2 as pb


class SchemaError(sqlite3.DatabaseError):
    """The database was written by a newer stigmer."""


# The schema, as a list of migrations; PRAGMA user_version counts those applied. Append only.
MIGRATIONS = [
    """
    CREATE TABLE executions (
        id TEXT PRIMARY KEY, created_at REAL NOT NULL, phase INTEGER NOT NULL,
        spec BLOB NOT NULL,                                  -- serialized ExecutionSpec
        started_at REAL NOT NULL DEFAULT 0, finished_at REAL NOT NULL DEFAULT 0,
        runner_id TEXT NOT NULL DEFAULT '', usage BLOB NOT NULL DEFAULT x'',  -- serialized Usage
        final_text TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '',
        last_seq INTEGER NOT NULL DEFAULT 0, turns INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX executions_by_created ON executions (created_at);
    CREATE INDEX executions_by_phase ON executions (phase, created_at);
    CREATE TABLE events (
        execution_id TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL,
        kind TEXT NOT NULL,       -- phase, text, tool_call, tool_result, usage, error
        payload BLOB NOT NULL,    -- serialized Event
        PRIMARY KEY (execution_id, seq)) WITHOUT ROWID;
    """,
    # A cancel asked for while RUNNING, kept so that a daemon restart still delivers it.
    "ALTER TABLE executions ADD COLUMN cancel_requested_at REAL NOT NULL DEFAULT 0;",
]
EXECUTION_COLUMNS = ("id, created_at, phase, spec, started_at, finished_at, runner_id, usage, "
                     "final_text, error, last_seq, turns")
# Insert or update an execution, leaving the columns it does not carry (cancel_requested_at) alone.
UPSERT_EXECUTION = (f"INSERT INTO executions ({EXECUTION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET " +
                    ", ".join(f"{c} = excluded.{c}" for c in EXECUTION_COLUMNS.split(", ")[1:]))




def open_db(path):
    """Open (creating or migrating) the SQLite store for writing."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 5000")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA cache_size = -32768")  # 32 MiB of page cache for the writer
    db.execute("PRAGMA wal_autocheckpoint = 8192")  # checkpoint per 32 MiB of WAL, not 4: fewer rewrites of hot pages
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        db.close()
        raise SchemaError(f"its schema version {version} is newer than this daemon's "
                          f"({len(MIGRATIONS)}): upgrade stigmer")
    for number in range(version, len(MIGRATIONS)):
        db.executescript(f"BEGIN; {MIGRATIONS[number]}; PRAGMA user_version = {number + 1}; COMMIT;")
    return db


def execution_row(ex):
    return (ex.id, ex.created_at, ex.phase, ex.spec.SerializeToString(), ex.started_at,
            ex.finished_at, ex.runner_id, ex.usage.SerializeToString(), ex.final_text,
            ex.error, ex.last_seq, ex.turns)


def execution_from_row(row):
    (id_, created, phase, spec, started, finished, runner_id, usage, final_text, error,
     last_seq, turns) = row
    return pb.Execution(id=id_, created_at=created, phase=phase, spec=pb.ExecutionSpec.FromString(spec),
                        started_at=started, finished_at=finished, runner_id=runner_id,
                        usage=pb.Usage.FromString(usage), final_text=final_text, error=error,
                        last_seq=last_seq, turns=turns)


def event_row(event):
    return (event.execution_id, event.seq, event.time, event.WhichOneof("payload"),
            event.SerializeToString())
