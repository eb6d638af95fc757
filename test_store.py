"""Tests for store.py on real SQLite files in a temporary directory: the migration path, the
refusal of a newer schema, and each function the daemon calls.

    python -m unittest test_store -v
"""
import os
import sqlite3
import tempfile
import unittest

import stigmer_pb2 as pb
import store
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)


def execution(execution_id, created_at, phase=pb.PENDING, **fields):
    """An Execution as the store gives it back (usage is always present there)."""
    fields.setdefault("usage", pb.Usage())
    return pb.Execution(id=execution_id, created_at=created_at, phase=phase,
                        spec=pb.ExecutionSpec(prompt=f"task {execution_id}", workspace="/tmp/ws"), **fields)


def text(execution_id, seq, body="x"):
    return pb.Event(execution_id=execution_id, seq=seq, time=1000.0 + seq, text=pb.TextDelta(text=body))


def columns(db, table):
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


class StoreCase(unittest.TestCase):
    def setUp(self):
        directory = tempfile.TemporaryDirectory(prefix="stigmer-store-")
        self.addCleanup(directory.cleanup)
        self.path = os.path.join(directory.name, "stigmer.db")

    def open(self):
        db = store.open_db(self.path)
        self.addCleanup(db.close)
        return db

    def user_version(self):
        with sqlite3.connect(self.path) as db:
            return db.execute("PRAGMA user_version").fetchone()[0]


class MigrationTest(StoreCase):
    def test_an_empty_database_gets_the_current_schema(self):
        self.assertEqual(self.user_version(), 0)
        db = self.open()
        self.assertEqual(self.user_version(), len(store.MIGRATIONS))
        self.assertIn("cancel_requested_at", columns(db, "executions"))
        self.assertEqual(columns(db, "events"), ["execution_id", "seq", "time", "kind", "payload"])
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        db.close()
        self.assertEqual(self.open().execute("SELECT COUNT(*) FROM executions").fetchone()[0], 0)
        self.assertEqual(self.user_version(), len(store.MIGRATIONS))  # opening again migrates nothing

    def test_a_version_1_database_migrates_keeping_its_rows(self):
        old = sqlite3.connect(self.path, isolation_level=None)
        old.executescript(f"BEGIN; {store.MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;")
        ex = execution("ex-old", 5.0, pb.RUNNING, runner_id="r1", last_seq=1, turns=2, final_text="so far")
        old.execute(f"INSERT INTO executions ({store.EXECUTION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    store.execution_row(ex))
        old.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", store.event_row(text("ex-old", 1, "kept")))
        self.assertNotIn("cancel_requested_at", columns(old, "executions"))
        old.close()

        db = self.open()
        self.assertEqual(self.user_version(), len(store.MIGRATIONS))
        self.assertEqual(store.get_execution(db, "ex-old"), ex)
        self.assertEqual(db.execute("SELECT cancel_requested_at FROM executions").fetchall(), [(0,)])
        self.assertEqual(store.cancels_requested(db), [])
        store.request_cancel(db, "ex-old", 7.0)  # the new column works
        self.assertEqual(store.cancels_requested(db), ["ex-old"])
        [(payload, seq, kind)] = store.events_after(db, "ex-old", 0, 10)
        self.assertEqual((pb.Event.FromString(payload).text.text, seq, kind), ("kept", 1, "text"))

    def test_a_newer_schema_is_refused_and_left_alone(self):
        with sqlite3.connect(self.path) as db:
            db.execute("CREATE TABLE future (x)")
            db.execute(f"PRAGMA user_version = {len(store.MIGRATIONS) + 1}")
        with self.assertRaises(store.SchemaError) as caught:
            store.open_db(self.path)
        message = str(caught.exception)
        self.assertIn(f"version {len(store.MIGRATIONS) + 1} is newer", message)
        self.assertIn("upgrade stigmer", message)
        self.assertIsInstance(caught.exception, sqlite3.DatabaseError)  # the daemon's `except sqlite3.Error`
        self.assertEqual(self.user_version(), len(store.MIGRATIONS) + 1)
        with sqlite3.connect(self.path) as db:
            self.assertEqual(db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall(),
                             [("future",)])


class ExecutionsTest(StoreCase):
    def test_write_then_get_round_trips_every_field(self):
        db = self.open()
        ex = execution("ex-1", 10.5, pb.COMPLETED, started_at=11.0, finished_at=12.0, runner_id="r1",
                       usage=pb.Usage(input_tokens=7, output_tokens=3), final_text="done", error="",
                       last_seq=4, turns=2)
        store.write(db, [], [ex])
        self.assertEqual(store.get_execution(db, "ex-1"), ex)
        self.assertIsNone(store.get_execution(db, "ex-2"))
        self.assertTrue(store.execution_exists(db, "ex-1"))
        self.assertFalse(store.execution_exists(db, "ex-2"))
        self.assertEqual(store.last_seq(db, "ex-1"), 4)
        self.assertEqual(store.last_seq(db, "ex-2"), 0)

    def test_write_updates_an_execution_and_keeps_its_cancel_request(self):
        db = self.open()
        ex = execution("ex-1", 1.0, pb.RUNNING, runner_id="r1")
        store.write(db, [], [ex])
        store.request_cancel(db, "ex-1", 50.0)
        ex.last_seq, ex.turns = 9, 3
        store.write(db, [], [ex])
        self.assertEqual(store.get_execution(db, "ex-1"), ex)
        self.assertEqual(db.execute("SELECT COUNT(*) FROM executions").fetchone()[0], 1)
        self.assertEqual(db.execute("SELECT cancel_requested_at FROM executions WHERE id = 'ex-1'").fetchone()[0],
                         50.0)
        self.assertEqual(store.cancels_requested(db), ["ex-1"])

    def test_list_is_newest_first_by_phase_and_limited(self):
        db = self.open()
        phases = [pb.PENDING, pb.RUNNING, pb.COMPLETED, pb.RUNNING, pb.FAILED, pb.RUNNING]
        store.write(db, [], [execution(f"ex-{i}", 100.0 + i, p) for i, p in enumerate(phases)])
        store.write(db, [], [execution("ex-tie-b", 103.0, pb.CANCELLED), execution("ex-tie-a", 103.0, pb.CANCELLED)])
        ids = lambda executions: [ex.id for ex in executions]
        self.assertEqual(ids(store.list_executions(db)),
                         ["ex-5", "ex-4", "ex-tie-b", "ex-tie-a", "ex-3", "ex-2", "ex-1", "ex-0"])
        self.assertEqual(ids(store.list_executions(db, limit=3)), ["ex-5", "ex-4", "ex-tie-b"])
        self.assertEqual(ids(store.list_executions(db, phase=pb.RUNNING)), ["ex-5", "ex-3", "ex-1"])
        self.assertEqual(ids(store.list_executions(db, phase=pb.RUNNING, limit=2)), ["ex-5", "ex-3"])
        self.assertEqual(ids(store.list_executions(db, phase=pb.CANCELLED)), ["ex-tie-b", "ex-tie-a"])
        self.assertEqual(store.list_executions(db, phase=pb.PENDING), [execution("ex-0", 100.0, pb.PENDING)])

    def test_active_executions_are_pending_and_running_oldest_first(self):
        db = self.open()
        store.write(db, [], [execution("ex-c", 3.0, pb.PENDING), execution("ex-a", 1.0, pb.RUNNING),
                             execution("ex-b", 2.0, pb.COMPLETED), execution("ex-d", 0.5, pb.FAILED),
                             execution("ex-e", 4.0, pb.CANCELLED), execution("ex-f", 0.1, pb.PENDING)])
        active = store.active_executions(db)
        self.assertEqual([(ex.id, ex.phase) for ex in active],
                         [("ex-f", pb.PENDING), ("ex-a", pb.RUNNING), ("ex-c", pb.PENDING)])
        self.assertEqual(active[1], execution("ex-a", 1.0, pb.RUNNING))

    def test_count_by_phase(self):
        db = self.open()
        self.assertEqual(store.count_by_phase(db), {})
        store.write(db, [], [execution("ex-1", 1.0, pb.RUNNING), execution("ex-2", 2.0, pb.RUNNING),
                             execution("ex-3", 3.0, pb.COMPLETED)])
        self.assertEqual(store.count_by_phase(db), {pb.RUNNING: 2, pb.COMPLETED: 1})

    def test_a_cancel_request_persists_for_running_executions_only(self):
        db = self.open()
        store.write(db, [], [execution("ex-run", 1.0, pb.RUNNING), execution("ex-other", 2.0, pb.RUNNING),
                             execution("ex-done", 3.0, pb.RUNNING)])
        store.request_cancel(db, "ex-run", 20.0)
        store.request_cancel(db, "ex-done", 21.0)
        store.request_cancel(db, "ex-missing", 22.0)  # no such row: nothing happens
        store.write(db, [], [execution("ex-done", 3.0, pb.CANCELLED)])  # confirmed: no longer pending
        db.close()
        reopened = self.open()  # as a restarted daemon sees it
        self.assertEqual(store.cancels_requested(reopened), ["ex-run"])
        self.assertEqual(store.get_execution(reopened, "ex-run").phase, pb.RUNNING)


class EventsTest(StoreCase):
    def test_events_append_and_read_after_a_seq_in_order(self):
        db = self.open()
        store.write(db, [store.event_row(text("ex-1", seq, f"t{seq}")) for seq in (3, 1, 2, 4, 5)], [])
        store.write(db, [store.event_row(text("ex-2", 1, "other"))], [])
        rows = store.events_after(db, "ex-1", 0, 100)
        self.assertEqual([(seq, kind) for _, seq, kind in rows], [(s, "text") for s in range(1, 6)])
        self.assertEqual([pb.Event.FromString(payload) for payload, _, _ in rows],
                         [text("ex-1", seq, f"t{seq}") for seq in range(1, 6)])
        self.assertEqual([seq for _, seq, _ in store.events_after(db, "ex-1", 2, 100)], [3, 4, 5])
        self.assertEqual([seq for _, seq, _ in store.events_after(db, "ex-1", 1, 2)], [2, 3])
        self.assertEqual(store.events_after(db, "ex-1", 5, 100), [])
        self.assertEqual(store.events_after(db, "ex-3", 0, 100), [])
        self.assertEqual([seq for _, seq, _ in store.events_after(db, "ex-2", 0, 100)], [1])

    def test_the_payload_is_the_serialized_event_byte_for_byte(self):
        db = self.open()
        event = pb.Event(execution_id="ex-1", seq=1, time=3.5, phase=pb.PhaseChange(phase=pb.COMPLETED, turns=2))
        store.write(db, [store.event_row(event)], [])
        reader = store.open_reader(self.path)
        self.addCleanup(reader.close)
        [(payload, seq, kind)] = store.events_after(reader, "ex-1", 0, 10)
        self.assertEqual((payload, seq, kind), (event.SerializeToString(), 1, "phase"))

    def test_storing_an_event_again_is_a_no_op(self):
        db = self.open()
        store.write(db, [store.event_row(text("ex-1", 1, "first")), store.event_row(text("ex-1", 2, "second"))], [])
        store.write(db, [store.event_row(text("ex-1", 2, "resent")), store.event_row(text("ex-1", 3, "third"))],
                    [execution("ex-1", 1.0, pb.RUNNING, last_seq=3)])
        bodies = [pb.Event.FromString(p).text.text for p, _, _ in store.events_after(db, "ex-1", 0, 10)]
        self.assertEqual(bodies, ["first", "second", "third"])
        self.assertEqual(store.last_seq(db, "ex-1"), 3)

    def test_a_failed_write_stores_nothing(self):
        db = self.open()
        bad = ("ex-1", 2, 1.0, "text", None)  # payload NOT NULL
        with self.assertRaises(sqlite3.IntegrityError):
            store.write(db, [store.event_row(text("ex-1", 1)), bad], [execution("ex-1", 1.0, last_seq=2)])
        self.assertEqual(store.events_after(db, "ex-1", 0, 10), [])
        self.assertIsNone(store.get_execution(db, "ex-1"))
        self.assertFalse(db.in_transaction)
        store.write(db, [store.event_row(text("ex-1", 1))], [])  # the connection is still usable
        self.assertEqual(len(store.events_after(db, "ex-1", 0, 10)), 1)

    def test_a_reader_sees_what_the_writer_committed(self):
        db = self.open()
        reader = store.open_reader(self.path)
        self.addCleanup(reader.close)
        self.assertEqual(store.events_after(reader, "ex-1", 0, 10), [])
        store.write(db, [store.event_row(text("ex-1", 1))], [])
        self.assertEqual([seq for _, seq, _ in store.events_after(reader, "ex-1", 0, 10)], [1])


if __name__ == "__main__":
    unittest.main()
