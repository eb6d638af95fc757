"""Tests of the worker's event outbox and its Connect stream against a real daemon.

    python -m unittest test_worker -v
"""
import os
import shutil
import tempfile
import threading
import time
import unittest
from unittest import mock

import grpc

import daemon
import daemon_client
import stigmer_pb2 as pb
import stigmer_pb2_grpc as pb_grpc
import worker
from runner import stigmer_secrets


def ack(execution_id, seq):
    return pb.DaemonMessage(ack=pb.Ack(execution_id=execution_id, seq=seq))


class OutboxTest(unittest.TestCase):
    """The worker's buffering, without a daemon: events wait in outboxes until acknowledged."""

    def setUp(self):
        self.w = worker.Worker("127.0.0.1:1", tempfile.gettempdir(), capacity=1)
        self.w.outboxes["ex-1"] = worker.Outbox("ex-1", last_seq=2)  # the daemon wrote PENDING and RUNNING
        self.redactor = stigmer_secrets.Redactor({"GITHUB_TOKEN": "ghp_supersecret_value"})

    def emit(self, **payload):
        self.w.emit("ex-1", self.redactor, **payload)

    def test_text_deltas_coalesce_and_seqs_stay_contiguous(self):
        for piece in ("Hel", "lo ", "world"):
            self.emit(text=pb.TextDelta(text=piece))
        self.emit(tool_call=pb.ToolCall(id="t1", name="ls", input_json="{}"))
        self.emit(text=pb.TextDelta(text="after"))
        batch = self.w._take_batch()
        self.assertEqual([e.seq for e in batch], [3, 4, 5])
        self.assertEqual(batch[0].text.text, "Hello world")
        self.assertEqual(batch[1].WhichOneof("payload"), "tool_call")
        self.assertEqual(batch[2].text.text, "after")
        self.assertEqual(self.w._take_batch(), [])  # sent once per stream

    def test_a_secret_split_across_deltas_is_redacted(self):
        for piece in ("token: ghp_super", "secret_val", "ue done"):
            self.emit(text=pb.TextDelta(text=piece))
        self.emit(usage=pb.Usage(input_tokens=1))
        text = "".join(e.text.text for e in self.w._take_batch() if e.WhichOneof("payload") == "text")
        self.assertEqual(text, "token: [REDACTED:GITHUB_TOKEN] done")

    def test_acks_free_events_and_the_agent_pauses_when_the_buffer_is_full(self):
        with mock.patch.object(worker, "MAX_BUFFERED_EVENTS", 5):
            for n in range(5):
                self.emit(usage=pb.Usage(input_tokens=n))
            blocked = threading.Thread(target=self.emit, kwargs={"usage": pb.Usage(input_tokens=99)})
            blocked.start()
            blocked.join(0.5)
            self.assertTrue(blocked.is_alive(), "emit should wait while 5 events are unacknowledged")
            self.assertEqual(len(self.w.outboxes["ex-1"].events), 5)  # nothing dropped, nothing added
            self.w._handle(ack("ex-1", 4))  # seqs 3 and 4 stored
            blocked.join(5)
            self.assertFalse(blocked.is_alive())
        box = self.w.outboxes["ex-1"]
        self.assertEqual([e.seq for e in box.events], [5, 6, 7, 8])
        self.assertEqual(box.events[-1].usage.input_tokens, 99)
        self.assertEqual(self.w.buffered, 4)

    def test_gap_reject_resends_after_the_daemons_seq(self):
        for n in range(4):
            self.emit(usage=pb.Usage(input_tokens=n))
        self.assertEqual(len(self.w._take_batch()), 4)  # seqs 3..6 sent
        self.w._handle(pb.DaemonMessage(reject=pb.Reject(
            execution_id="ex-1", code=grpc.StatusCode.FAILED_PRECONDITION.value[0], ack_seq=4)))
        self.assertEqual([e.seq for e in self.w._take_batch()], [5, 6])

    def test_permission_denied_drops_the_execution(self):
        self.emit(usage=pb.Usage(input_tokens=1))
        self.w._handle(pb.DaemonMessage(reject=pb.Reject(
            execution_id="ex-1", code=grpc.StatusCode.PERMISSION_DENIED.value[0], ack_seq=2)))
        self.assertNotIn("ex-1", self.w.outboxes)
        self.assertEqual(self.w.buffered, 0)

    def test_cancel_before_the_agent_exists_still_ends_cancelled(self):
        self.w._handle(pb.DaemonMessage(cancel=pb.CancelExecution(execution_id="ex-1")))
        self.assertIn("ex-1", self.w.outboxes)  # kept: its CANCELLED event must still reach the daemon
        spec = pb.ExecutionSpec(prompt="p", workspace=tempfile.gettempdir())
        self.w._run_execution(pb.Execution(id="ex-1", spec=spec, last_seq=2))  # the SDK is never ready here
        (event,) = self.w._take_batch()
        self.assertEqual((event.seq, event.phase.phase), (3, pb.CANCELLED))

    def test_a_cancel_after_the_end_keeps_the_unacknowledged_tail(self):
        self.emit(usage=pb.Usage(input_tokens=1))
        self.emit(phase=pb.PhaseChange(phase=pb.COMPLETED))
        self.w._handle(pb.DaemonMessage(cancel=pb.CancelExecution(execution_id="ex-1")))
        self.assertEqual([e.seq for e in self.w._take_batch()], [3, 4])  # COMPLETED still goes out

    def test_an_emit_waiting_for_room_gives_up_when_the_execution_is_dropped(self):
        with mock.patch.object(worker, "MAX_BUFFERED_EVENTS", 1):
            self.emit(usage=pb.Usage(input_tokens=1))
            waiting = threading.Thread(target=self.emit, kwargs={"usage": pb.Usage(input_tokens=2)})
            waiting.start()
            time.sleep(0.2)
            with self.w.cond:
                self.w._drop("ex-1")
                self.w.cond.notify_all()
            waiting.join(5)
        self.assertFalse(waiting.is_alive())
        self.assertEqual(self.w.buffered, 0)

    def test_emit_after_the_daemon_dropped_the_execution_is_ignored(self):
        self.w._handle(pb.DaemonMessage(reject=pb.Reject(
            execution_id="ex-1", code=grpc.StatusCode.PERMISSION_DENIED.value[0])))
        self.emit(usage=pb.Usage(input_tokens=1))  # no KeyError, nothing kept
        self.assertEqual(self.w.buffered, 0)

    def test_batches_are_capped_in_bytes(self):
        big = "x" * (worker.BATCH_BYTES // 3)
        for _ in range(4):
            self.emit(tool_result=pb.ToolResult(id="t", output=big))
        self.assertEqual([len(self.w._take_batch()) for _ in range(3)], [2, 2, 0])

    def test_finished_execution_is_forgotten_once_acknowledged(self):
        self.emit(phase=pb.PhaseChange(phase=pb.COMPLETED))
        self.w._take_batch()
        self.w._handle(ack("ex-1", 2))
        self.assertIn("ex-1", self.w.outboxes)  # seq 3 not yet stored
        self.w._handle(ack("ex-1", 3))
        self.assertNotIn("ex-1", self.w.outboxes)


class StreamTest(unittest.TestCase):
    """The worker's Connect stream against a real daemon: events buffered while it is away arrive once."""

    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="stigmer-worker-")
        self.workspace = tempfile.mkdtemp(prefix="stigmer-ws-")
        self.server = daemon.serve(self.home, "127.0.0.1:0", runner_grace=30)
        self.endpoint = self.server.endpoint

    def tearDown(self):
        self.server.stop()
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.workspace, ignore_errors=True)

    def stub(self):
        channel = daemon_client.client_channel(self.endpoint)
        self.addCleanup(channel.close)
        return pb_grpc.DaemonStub(channel), daemon_client.auth_metadata(daemon_client.read_token(self.home))

    def wait(self, predicate, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        self.fail("timed out")

    def test_reconnecting_to_a_dead_daemon_leaks_no_threads(self):
        w = worker.Worker("127.0.0.1:1", self.home, capacity=1)  # nothing listens on port 1
        before = threading.active_count()
        with mock.patch.object(worker, "BACKOFF_CAP", 0.01):
            thread = threading.Thread(target=w.run, daemon=True)
            thread.start()
            time.sleep(1.5)  # dozens of attempts
            during = threading.active_count()
            w.stopping.set()
            thread.join(5)
        self.assertFalse(thread.is_alive())
        self.assertLessEqual(during - before, 4)

    def test_events_emitted_while_the_daemon_is_down_arrive_exactly_once(self):
        stub, md = self.stub()
        ex = stub.Submit(pb.SubmitRequest(spec=pb.ExecutionSpec(prompt="p", workspace=self.workspace)), metadata=md)
        w = worker.Worker(self.endpoint, self.home, capacity=1, runner_id="r-test")
        redactor = stigmer_secrets.Redactor({})
        # take the assignment ourselves instead of running an agent: the outbox is what is under test
        with mock.patch.object(w, "_start", lambda execution: w.outboxes.setdefault(
                execution.id, worker.Outbox(execution.id, execution.last_seq))):
            thread = threading.Thread(target=w.run, daemon=True)
            thread.start()
            self.addCleanup(w.stopping.set)
            self.wait(lambda: ex.id in w.outboxes)
            for n in range(50):
                w.emit(ex.id, redactor, usage=pb.Usage(input_tokens=n))
            self.wait(lambda: w.outboxes[ex.id].acked == 52)
            port = self.server.port
            self.server.stop()  # the daemon goes away; the worker keeps its events
            for n in range(50, 100):
                w.emit(ex.id, redactor, usage=pb.Usage(input_tokens=n))
            w.emit(ex.id, redactor, phase=pb.PhaseChange(phase=pb.COMPLETED, final_text="ok"))
            self.assertEqual(len(w.outboxes[ex.id].events), 51)
            self.server = daemon.serve(self.home, f"127.0.0.1:{port}", runner_grace=30)  # new token
            self.wait(lambda: ex.id not in w.outboxes)  # all acknowledged, then forgotten
        stub, md = self.stub()
        events = list(stub.Watch(pb.WatchRequest(execution_id=ex.id), metadata=md, timeout=10))
        self.assertEqual([e.seq for e in events], list(range(1, 104)))
        self.assertEqual([e.usage.input_tokens for e in events if e.HasField("usage")], list(range(100)))
        self.assertEqual(stub.Get(pb.GetRequest(execution_id=ex.id), metadata=md).phase, pb.COMPLETED)


if __name__ == "__main__":
    unittest.main()
