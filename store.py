"""The Stigmer Daemon's SQLite store: the schema and its migrations, every SQL statement the
daemon runs, as named functions taking the connection, and the conversions between rows and
protobuf messages. The daemon (daemon.py) owns the locking and decides what goes in one
transaction (one call to `write`).

    db = open_db("/tmp/st/stigmer.db")            # creates or migrates; SchemaError if newer
    write(db, [event_row(event)], [execution])    # events and executions, one transaction
    list_executions(db, phase=pb.RUNNING, limit=20)
    events_after(open_reader(path), execution_id, after=0, limit=1000)   # a watcher's own connection

    python -m unittest test_store -v
"""
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
# A stored (execution_id, seq) is never replaced: storing it again is a no-op.
INSERT_EVENT = ("INSERT INTO events (execution_id, seq, time, kind, payload) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (execution_id, seq) DO NOTHING")
BUSY_TIMEOUT_MS = 5000  # how long a statement waits for another connection's lock


def damaged(db_path, error):
    """The one line for a database that cannot be read: which file, and what to do."""
    error = " ".join(str(error).split())  # quick_check's report spans lines
    return (f"the database {db_path} cannot be read ({error}): stop the daemon (`python runner.py stop`), then "
            "`python runner.py recover` moves it aside and keeps what can still be read")


def open_db(path):
    """Open (creating or migrating) the SQLite store for writing."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
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


def open_reader(path):
    """A connection of its own for one watcher, so that a stalled watcher blocks only itself."""
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return db


# ---- writing (the daemon holds its lock) ----

def write(db, event_rows, executions):
    """Insert event rows (see event_row) and insert or update executions, in one transaction."""
    db.execute("BEGIN")
    try:
        db.executemany(INSERT_EVENT, event_rows)
        db.executemany(UPSERT_EXECUTION, [execution_row(ex) for ex in executions])
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # a COMMIT that failed (disk full) leaves it open
            db.execute("ROLLBACK")
        raise


def request_cancel(db, execution_id, when):
    """Record that a cancel was asked for at `when`, so that a restarted daemon still delivers it."""
    db.execute("UPDATE executions SET cancel_requested_at = ? WHERE id = ?", (when, execution_id))


# ---- reading ----

def get_execution(db, execution_id):
    """The execution with this id, or None."""
    row = db.execute(f"SELECT {EXECUTION_COLUMNS} FROM executions WHERE id = ?", (execution_id,)).fetchone()
    return execution_from_row(row) if row else None


def execution_exists(db, execution_id):
    """Whether an execution with this id was ever stored."""
    return db.execute("SELECT 1 FROM executions WHERE id = ?", (execution_id,)).fetchone() is not None


def last_seq(db, execution_id):
    """The seq of the execution's last stored event; 0 for an unknown execution."""
    row = db.execute("SELECT last_seq FROM executions WHERE id = ?", (execution_id,)).fetchone()
    return row[0] if row else 0


def list_executions(db, phase=0, limit=50, after=None):
    """Executions newest first, at most `limit`; only those in `phase` unless it is 0; AFTER: (created_at, id)
    of the last one a previous page held, from parse_page_token."""
    conditions, args = (["phase = ?"], [phase]) if phase else ([], [])
    if after is not None:
        conditions.append("(created_at < ? OR (created_at = ? AND id < ?))")
        args += [after[0], after[0], after[1]]
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = db.execute(f"SELECT {EXECUTION_COLUMNS} FROM executions {where} "
                      "ORDER BY created_at DESC, id DESC LIMIT ?", (*args, limit)).fetchall()
    return [execution_from_row(row) for row in rows]


def page_token(execution):
    """List's next_page_token after EXECUTION: where the next page starts."""
    return f"{execution.created_at!r} {execution.id}"


def parse_page_token(token):
    """(created_at, id) from page_token(), or None for an empty TOKEN; raises ValueError for anything else."""
    if not token:
        return None
    created_at, _, execution_id = token.partition(" ")
    if not execution_id:
        raise ValueError(token)
    return float(created_at), execution_id


def active_executions(db):
    """The PENDING and RUNNING executions, oldest first: what a starting daemon takes over."""
    rows = db.execute(f"SELECT {EXECUTION_COLUMNS} FROM executions WHERE phase IN (?, ?) "
                      "ORDER BY created_at, id", (pb.PENDING, pb.RUNNING)).fetchall()
    return [execution_from_row(row) for row in rows]


def cancels_requested(db):
    """Ids of the RUNNING executions with a cancel asked for and not yet confirmed."""
    return [execution_id for (execution_id,) in db.execute(
        "SELECT id FROM executions WHERE phase = ? AND cancel_requested_at > 0", (pb.RUNNING,))]


def count_by_phase(db):
    """{phase: number of executions} for each phase that has any."""
    return dict(db.execute("SELECT phase, COUNT(*) FROM executions GROUP BY phase"))


def approval_events(db, execution_id):
    """The approval_request, approval and tool_result events of EXECUTION_ID, as pb.Event, in seq order."""
    rows = db.execute("SELECT payload FROM events WHERE execution_id = ? AND kind IN "
                      "('approval_request', 'approval', 'tool_result') ORDER BY seq", (execution_id,)).fetchall()
    return [pb.Event.FromString(payload) for (payload,) in rows]


def events_after(db, execution_id, after, limit):
    """Up to `limit` stored events with seq > after, in seq order, as (payload, seq, kind) rows:
    payload is the serialized Event, sent to watchers as it is."""
    return db.execute("SELECT payload, seq, kind FROM events WHERE execution_id = ? AND seq > ? "
                      "ORDER BY seq LIMIT ?", (execution_id, after, limit)).fetchall()


# ---- rows and messages ----

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
    """The events row of an Event (the daemon's batch path builds the same tuple inline)."""
    return (event.execution_id, event.seq, event.time, event.WhichOneof("payload"),
            event.SerializeToString())


# ---- recovery of a damaged file ----

RECOVER_PAGE = 500  # rows read at a time from a damaged file; a page that fails is read row by row


def recover(damaged_path, db):
    """Copy into DB (a fresh store from open_db) what SQLite can still read of the database at DAMAGED_PATH:
    executions in rowid order, then each one's events in seq order, reading past what fails a page at a time,
    then row by row. Returns (executions, events) kept."""
    old = sqlite3.connect(f"file:{damaged_path}?mode=ro", uri=True)
    try:
        columns = EXECUTION_COLUMNS + ", cancel_requested_at"
        kept_ids = []
        last, misses = 0, 0
        while misses < 4:  # past this many unreadable spans of rowids in a row, the table is over (or gone)
            try:
                rows = old.execute(f"SELECT rowid, {columns} FROM executions WHERE rowid > ? ORDER BY rowid "
                                   "LIMIT ?", (last, RECOVER_PAGE)).fetchall()
            except sqlite3.DatabaseError:
                rows = _row_by_row(old, f"SELECT rowid, {columns} FROM executions WHERE rowid = ?", last)
                if not rows:
                    last, misses = last + RECOVER_PAGE, misses + 1
                    continue
            if not rows:
                break
            misses = 0
            for row in rows:
                db.execute(f"INSERT OR IGNORE INTO executions ({columns}) VALUES ({', '.join('?' * 13)})", row[1:])
                kept_ids.append(row[1])
            last = rows[-1][0]
        events = 0
        for execution_id in kept_ids:
            events += _recover_events(old, db, execution_id)
        return len(kept_ids), events
    finally:
        old.close()


def _row_by_row(old, query, last, span=RECOVER_PAGE):
    """The rows of QUERY (by rowid) from LAST + 1 on that can still be read, up to SPAN of them."""
    found = []
    for rowid in range(last + 1, last + 1 + span):
        try:
            found += old.execute(query, (rowid,)).fetchall()
        except sqlite3.DatabaseError:
            continue
    return found


def _recover_events(old, db, execution_id):
    """Copy the readable events of EXECUTION_ID; returns how many."""
    copied, after = 0, 0
    try:
        top = old.execute("SELECT last_seq FROM executions WHERE id = ?", (execution_id,)).fetchone()[0]
    except (sqlite3.DatabaseError, TypeError):
        top = 0
    while True:
        try:
            rows = old.execute("SELECT execution_id, seq, time, kind, payload FROM events WHERE execution_id = ? "
                               "AND seq > ? ORDER BY seq LIMIT ?", (execution_id, after, RECOVER_PAGE)).fetchall()
        except sqlite3.DatabaseError:
            rows = []
            for seq in range(after + 1, max(top, after) + 1):
                try:
                    rows += old.execute("SELECT execution_id, seq, time, kind, payload FROM events WHERE "
                                        "execution_id = ? AND seq = ?", (execution_id, seq)).fetchall()
                except sqlite3.DatabaseError:
                    continue
            after = max(top, after)
            db.executemany(INSERT_EVENT, rows)
            return copied + len(rows)
        if not rows:
            return copied
        db.executemany(INSERT_EVENT, rows)
        copied += len(rows)
        after = rows[-1][1]
