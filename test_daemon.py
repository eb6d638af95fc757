"""Tests for daemon.py: a real daemon on a free loopback port, a temporary STIGMER_HOME,
the generated client stubs, and a fake runner speaking the Connect stream.

    python -m unittest test_daemon -v
"""
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import grpc

import daemon

import daemon_server
import daemon_client
import stigmer_pb2 as pb
import stigmer_pb2_grpc as pb_grpc
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 20  # seconds any single RPC or expected message may take before the test fails
GRACE = 0.5  # runner_grace (and cancel grace) for the daemons under test


def text(execution_id, seq, body="x"):
    return pb.Event(execution_id=execution_id, seq=seq, time=time.time(), text=pb.TextDelta(text=body))


def phase(execution_id, seq, value, **fields):
    return pb.Event(execution_id=execution_id, seq=seq, time=time.time(),
                    phase=pb.PhaseChange(phase=value, **fields))


class FakeRunner:
    """A runner's side of Connect: a request generator fed from a queue, responses pumped into another."""

    def __init__(self, stub, metadata, runner_id="runner-1", capacity=1, in_flight=(), hello=True):
        self.outbox, self.inbox = queue.Queue(), queue.Queue()
        if hello:
            self.send(hello=pb.Hello(runner_id=runner_id, capacity=capacity, mode="local",
                                     in_flight=[pb.InFlight(execution_id=e, last_seq=s) for e, s in in_flight]))
        self.call = stub.Connect(iter(self.outbox.get, None), metadata=metadata, timeout=60,
                                 wait_for_ready=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        try:
            for message in self.call:
                self.inbox.put(message)
            self.inbox.put("end")
        except grpc.RpcError as e:
            self.inbox.put(e)

    def send(self, **message):
        self.outbox.put(pb.RunnerMessage(**message))

    def batch(self, *events):
        self.send(events=pb.EventBatch(events=events))

    def next(self):
        return self.inbox.get(timeout=TIMEOUT)

    def expect(self, kind):
        """The next message from the daemon, which must be of this kind (assign, ack, cancel, reject)."""
        message = self.next()
        if not isinstance(message, pb.DaemonMessage) or message.WhichOneof("msg") != kind:
            raise AssertionError(f"expected {kind}, got {message!r}")
        return getattr(message, kind)

    def expect_ack(self, execution_id, seq):
        ack = self.expect("ack")
        if (ack.execution_id, ack.seq) != (execution_id, seq):
            raise AssertionError(f"expected ack {execution_id}@{seq}, got {ack}")

    def close(self):
        self.outbox.put(None)

    def drop(self):
        """Vanish without a goodbye, as a crashed worker would."""
        self.call.cancel()
        self.outbox.put(None)


class DaemonCase(unittest.TestCase):
    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="stigmer-home-")
        self.workspace = tempfile.mkdtemp(prefix="stigmer-ws-")
        self.start()
        self.runners = []
        self.addCleanup(lambda: [r.drop() for r in self.runners])

    def start(self):
        self.server = daemon_server.serve(self.home, "127.0.0.1:0", runner_grace=GRACE)
        self.addCleanup(self.server.stop, 0)
        self.channel = daemon_client.client_channel(self.server.endpoint)
        self.addCleanup(self.channel.close)
        self.stub = pb_grpc.DaemonStub(self.channel)
        self.metadata = daemon_client.auth_metadata(daemon_client.read_token(self.home))

    def rpc(self, name, request, metadata=None):
        return getattr(self.stub, name)(request, metadata=self.metadata if metadata is None else metadata,
                                        timeout=TIMEOUT, wait_for_ready=True)

    def submit(self, prompt="fix the failing test"):
        return self.rpc("Submit", pb.SubmitRequest(spec=pb.ExecutionSpec(prompt=prompt, workspace=self.workspace)))

    def get(self, execution_id):
        return self.rpc("Get", pb.GetRequest(execution_id=execution_id))

    def watch(self, execution_id, after_seq=0, follow=False):
        return self.stub.Watch(pb.WatchRequest(execution_id=execution_id, after_seq=after_seq, follow=follow),
                               metadata=self.metadata, timeout=60, wait_for_ready=True)

    def log(self, execution_id, after_seq=0, follow=False):
        return list(self.watch(execution_id, after_seq, follow))

    def runner(self, **kwargs):
        runner = FakeRunner(self.stub, self.metadata, **kwargs)
        self.runners.append(runner)
        return runner

    def assert_status(self, code, call, *args):
        with self.assertRaises(grpc.RpcError) as caught:
            result = call(*args)
            if hasattr(result, "__next__"):
                next(result)
        self.assertEqual(caught.exception.code(), code, caught.exception.details())
        return caught.exception.details()

    def assigned(self, runner):
        """Wait for an Assign and return its execution."""
        return runner.expect("assign").execution

    def stream_many(self, runner, execution_id, last=10_002):
        """The runner sends text events 3..LAST in batches of 500, each acknowledged at once (the runner is
        never held up by watchers), then COMPLETED as LAST + 1; returns LAST."""
        for start in range(3, last + 1, 500):
            end = min(start + 499, last)
            runner.batch(*[text(execution_id, seq, "y" * 100) for seq in range(start, end + 1)])
            runner.expect_ack(execution_id, end)
        runner.batch(phase(execution_id, last + 1, pb.COMPLETED))
        runner.expect_ack(execution_id, last + 1)
        return last


class AuthAndInputTest(DaemonCase):
    def test_token_file_is_private(self):
        path = os.path.join(self.home, "daemon.token")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(daemon_client.read_token(self.home), self.server.token)

    def test_every_kind_of_rpc_needs_the_token(self):
        ex = self.submit()
        for metadata in ((), daemon_client.auth_metadata("wrong"), (("authorization", self.server.token),)):
            with self.subTest(metadata=metadata):
                details = self.assert_status(grpc.StatusCode.UNAUTHENTICATED, self.rpc, "Status",
                                             pb.StatusRequest(), metadata)
                self.assertIn("daemon.token", details)
                self.assert_status(grpc.StatusCode.UNAUTHENTICATED, self.rpc, "Submit",
                                   pb.SubmitRequest(spec=pb.ExecutionSpec(prompt="p", workspace=self.workspace)),
                                   metadata)
                watch = self.stub.Watch(pb.WatchRequest(execution_id=ex.id), metadata=metadata, timeout=TIMEOUT)
                self.assert_status(grpc.StatusCode.UNAUTHENTICATED, list, watch)
                runner = FakeRunner(self.stub, metadata)
                error = runner.next()
                self.assertIsInstance(error, grpc.RpcError)
                self.assertEqual(error.code(), grpc.StatusCode.UNAUTHENTICATED)
                runner.close()
        self.assertEqual(self.get(ex.id).phase, pb.PENDING)  # nothing unauthenticated got through
        self.assertEqual(self.rpc("Status", pb.StatusRequest()).queue_depth, 1)

    def test_submit_validation_names_the_problem(self):
        missing = os.path.join(self.workspace, "does-not-exist")
        for spec, reason in ((pb.ExecutionSpec(prompt="", workspace=self.workspace), "prompt"),
                             (pb.ExecutionSpec(prompt="task"), "missing"),
                             (pb.ExecutionSpec(prompt="task", workspace="relative/dir"), "relative"),
                             (pb.ExecutionSpec(prompt="task", workspace=missing), "not an existing directory")):
            with self.subTest(reason=reason):
                details = self.assert_status(grpc.StatusCode.INVALID_ARGUMENT, self.rpc, "Submit",
                                             pb.SubmitRequest(spec=spec))
                self.assertIn(reason, details)
        self.assertEqual(len(self.rpc("List", pb.ListRequest()).executions), 0)

    def test_unknown_ids_are_not_found(self):
        self.assert_status(grpc.StatusCode.NOT_FOUND, self.get, "ex-nope")
        self.assert_status(grpc.StatusCode.NOT_FOUND, self.rpc, "Cancel", pb.CancelRequest(execution_id="ex-nope"))
        self.assert_status(grpc.StatusCode.NOT_FOUND, self.log, "ex-nope")

    def test_oversize_message_is_refused_and_the_daemon_survives(self):
        with grpc.insecure_channel(self.server.endpoint) as unlimited:  # no client-side send limit
            stub = pb_grpc.DaemonStub(unlimited)
            huge = pb.SubmitRequest(spec=pb.ExecutionSpec(prompt="x" * (17 * 1024 * 1024), workspace=self.workspace))
            self.assert_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               lambda: stub.Submit(huge, timeout=TIMEOUT, metadata=self.metadata))
        self.assertEqual(self.rpc("Status", pb.StatusRequest()).version, daemon_client.VERSION)
        self.assertEqual(self.get(self.submit().id).phase, pb.PENDING)

    def test_a_prompt_over_the_limit_is_refused_clearly(self):
        big = "y" * (daemon_client.MAX_PROMPT_BYTES + 1)
        details = self.assert_status(grpc.StatusCode.INVALID_ARGUMENT, self.rpc, "Submit",
                                     pb.SubmitRequest(spec=pb.ExecutionSpec(prompt=big, workspace=self.workspace)))
        self.assertIn("over the limit of 1 MiB", details)
        self.assertEqual(len(self.rpc("List", pb.ListRequest()).executions), 0)
        self.assertEqual(self.get(self.submit("y" * daemon_client.MAX_PROMPT_BYTES).id).phase, pb.PENDING)

    def test_list_pages_its_answer_so_big_executions_never_break_it(self):
        with mock.patch.object(daemon, "prompt_problem", lambda prompt: None):  # as stored before the limit
            big = [self.submit(f"{n}" + "z" * (9 << 20)) for n in range(2)]
        small = [self.submit(f"small {n}") for n in range(3)]
        pages, token = [], ""
        while not pages or token:
            page = self.rpc("List", pb.ListRequest(page_token=token))
            pages.append([e.id for e in page.executions])
            token = page.next_page_token
        self.assertEqual(pages, [[e.id for e in reversed(small)], [big[1].id], [big[0].id]])  # one 9 MB run a page
        client = daemon_client.Client(self.home, self.server.endpoint)
        self.addCleanup(client.close)
        self.assertEqual([e.id for e in client.list(limit=0)], [e.id for e in reversed(big + small)])
        self.assertEqual([e.id for e in client.list(limit=4)], [e.id for e in reversed(small)] + [big[1].id])
        self.assertEqual([e.id for e in client.list(pb.PENDING, limit=2)], [small[2].id, small[1].id])
        self.assert_status(grpc.StatusCode.INVALID_ARGUMENT, self.rpc, "List", pb.ListRequest(page_token="nope"))

    def test_connect_must_open_with_hello(self):
        runner = self.runner(hello=False)
        runner.batch(text("ex-anything", 1))
        error = runner.next()
        self.assertIsInstance(error, grpc.RpcError)
        self.assertEqual(error.code(), grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn("Hello", error.details())

    def test_list_and_status(self):
        first, second, third = self.submit("one"), self.submit("two"), self.submit("three")
        listed = self.rpc("List", pb.ListRequest()).executions
        self.assertEqual([e.id for e in listed], [third.id, second.id, first.id])
        self.assertEqual(len(self.rpc("List", pb.ListRequest(limit=2)).executions), 2)
        runner = self.runner(capacity=2)
        self.assertEqual(self.assigned(runner).id, first.id)
        self.assertEqual(self.assigned(runner).id, second.id)
        running = self.rpc("List", pb.ListRequest(phase=pb.RUNNING)).executions
        self.assertEqual([e.id for e in running], [second.id, first.id])
        status = self.rpc("Status", pb.StatusRequest())
        self.assertEqual((status.connected_runners, status.queue_depth, status.free_capacity), (1, 1, 0))
        self.assertEqual(dict(status.executions_by_phase), {"PENDING": 1, "RUNNING": 2})
        self.assertEqual(status.pid, os.getpid())


class RunnerStreamTest(DaemonCase):
    def test_fifo_assignment_batches_and_acks(self):
        first, second = self.submit("one"), self.submit("two")
        runner = self.runner(capacity=1)
        got = self.assigned(runner)
        self.assertEqual((got.id, got.phase, got.last_seq, got.runner_id), (first.id, pb.RUNNING, 2, "runner-1"))
        runner.batch(text(first.id, 3, "hel"), text(first.id, 4, "lo"),
                     pb.Event(execution_id=first.id, seq=5, usage=pb.Usage(input_tokens=10, output_tokens=3)))
        runner.expect_ack(first.id, 5)
        self.assertEqual(self.get(second.id).phase, pb.PENDING)  # capacity 1: the second waits
        runner.batch(phase(first.id, 6, pb.COMPLETED, final_text="hello", turns=2))
        runner.expect_ack(first.id, 6)
        self.assertEqual(self.assigned(runner).id, second.id)  # the freed slot takes the next
        done = self.get(first.id)
        self.assertEqual((done.phase, done.final_text, done.turns, done.last_seq), (pb.COMPLETED, "hello", 2, 6))
        self.assertEqual((done.usage.input_tokens, done.usage.output_tokens), (10, 3))
        self.assertGreater(done.finished_at, 0)
        kinds = [(e.seq, e.WhichOneof("payload")) for e in self.log(first.id)]
        self.assertEqual(kinds, [(1, "phase"), (2, "phase"), (3, "text"), (4, "text"), (5, "usage"), (6, "phase")])

    def test_duplicates_are_stored_once(self):
        ex = self.submit()
        runner = self.runner()
        self.assigned(runner)
        runner.batch(text(ex.id, 3, "a"), text(ex.id, 4, "b"))
        runner.expect_ack(ex.id, 4)
        runner.batch(text(ex.id, 3, "a"), text(ex.id, 4, "b"), text(ex.id, 5, "c"))  # a resend plus one new
        runner.expect_ack(ex.id, 5)
        runner.batch(text(ex.id, 5, "c"))
        runner.expect_ack(ex.id, 5)
        events = self.log(ex.id)
        self.assertEqual([e.seq for e in events], [1, 2, 3, 4, 5])
        self.assertEqual([e.text.text for e in events[2:]], ["a", "b", "c"])

    def test_a_gap_is_rejected_and_nothing_after_it_stored(self):
        ex = self.submit()
        runner = self.runner()
        self.assigned(runner)
        runner.batch(text(ex.id, 3), text(ex.id, 5), text(ex.id, 6))
        runner.expect_ack(ex.id, 3)
        reject = runner.expect("reject")
        self.assertEqual((reject.execution_id, reject.code, reject.ack_seq),
                         (ex.id, grpc.StatusCode.FAILED_PRECONDITION.value[0], 3))
        self.assertIn("gap", reject.message)
        self.assertEqual([e.seq for e in self.log(ex.id)], [1, 2, 3])
        self.assertEqual(self.get(ex.id).last_seq, 3)
        runner.batch(text(ex.id, 4), text(ex.id, 5), text(ex.id, 6))  # the resend after ack_seq fills it
        runner.expect_ack(ex.id, 6)
        self.assertEqual([e.seq for e in self.log(ex.id)], [1, 2, 3, 4, 5, 6])

    def test_events_for_an_execution_not_assigned_to_the_runner(self):
        mine, theirs = self.submit("mine"), self.submit("theirs")
        runner = self.runner(runner_id="a")
        self.assertEqual(self.assigned(runner).id, mine.id)
        runner.batch(text(theirs.id, 2), text("ex-unknown", 1))
        for expected in (theirs.id, "ex-unknown"):
            reject = runner.expect("reject")
            self.assertEqual((reject.execution_id, reject.code), (expected, grpc.StatusCode.PERMISSION_DENIED.value[0]))
        self.assertEqual([e.seq for e in self.log(theirs.id)], [1])
        other = self.runner(runner_id="b")
        self.assertEqual(self.assigned(other).id, theirs.id)
        runner.batch(text(theirs.id, 3))  # assigned now, but to b
        self.assertEqual(runner.expect("reject").code, grpc.StatusCode.PERMISSION_DENIED.value[0])
        self.assertEqual(self.get(theirs.id).last_seq, 2)

    def test_cancel_reaches_the_runner_which_confirms(self):
        ex = self.submit()
        runner = self.runner()
        self.assigned(runner)
        self.assertEqual(self.rpc("Cancel", pb.CancelRequest(execution_id=ex.id)).phase, pb.RUNNING)
        self.assertEqual(runner.expect("cancel").execution_id, ex.id)
        runner.batch(phase(ex.id, 3, pb.CANCELLED, reason="cancelled by user"))
        runner.expect_ack(ex.id, 3)
        done = self.get(ex.id)
        self.assertEqual((done.phase, done.error), (pb.CANCELLED, "cancelled by user"))
        self.assertEqual([e.seq for e in self.log(ex.id)], [1, 2, 3])
        time.sleep(GRACE * 2)  # the cancel timer must not add a second terminal event
        self.assertEqual([e.seq for e in self.log(ex.id)], [1, 2, 3])

    def test_unconfirmed_cancel_is_marked_by_the_daemon(self):
        ex, queued = self.submit("one"), self.submit("two")
        runner = self.runner()
        self.assigned(runner)
        self.rpc("Cancel", pb.CancelRequest(execution_id=ex.id))
        self.assertEqual(runner.expect("cancel").execution_id, ex.id)
        last = self.log(ex.id, follow=True)[-1]  # follow ends at the daemon's terminal event
        self.assertEqual((last.seq, last.phase.phase), (3, pb.CANCELLED))
        self.assertIn("did not confirm", self.get(ex.id).error)
        self.assertEqual(self.assigned(runner).id, queued.id)  # the slot was freed
        runner.batch(text(ex.id, 3))  # too late
        self.assertEqual(runner.expect("reject").code, grpc.StatusCode.PERMISSION_DENIED.value[0])

    def test_cancel_pending_is_immediate(self):
        ex = self.submit()
        cancelled = self.rpc("Cancel", pb.CancelRequest(execution_id=ex.id))
        self.assertEqual(cancelled.phase, pb.CANCELLED)
        self.assertEqual([(e.seq, e.phase.phase) for e in self.log(ex.id)], [(1, pb.PENDING), (2, pb.CANCELLED)])
        self.assertEqual(self.rpc("Status", pb.StatusRequest()).queue_depth, 0)
        runner = self.runner()
        other = self.submit()
        self.assertEqual(self.assigned(runner).id, other.id)  # the cancelled one is never assigned

    def test_lost_runner_fails_its_execution(self):
        ex = self.submit()
        runner = self.runner()
        self.assigned(runner)
        runner.batch(text(ex.id, 3))
        runner.expect_ack(ex.id, 3)
        runner.drop()
        events = self.log(ex.id, follow=True)
        self.assertEqual([e.seq for e in events], [1, 2, 3, 4, 5])
        self.assertEqual((events[3].error.code, events[4].phase.phase, events[4].phase.reason),
                         ("runner_lost", pb.FAILED, "runner lost"))
        self.assertEqual((self.get(ex.id).phase, self.get(ex.id).error), (pb.FAILED, "runner lost"))

    def test_runner_reconnecting_in_time_keeps_its_execution(self):
        ex = self.submit()
        runner = self.runner(runner_id="w")
        self.assigned(runner)
        runner.batch(text(ex.id, 3), text(ex.id, 4))
        runner.expect_ack(ex.id, 4)
        runner.drop()
        back = self.runner(runner_id="w", in_flight=[(ex.id, 6), ("ex-forgotten", 9)])
        back.expect_ack(ex.id, 4)
        self.assertEqual(back.expect("cancel").execution_id, "ex-forgotten")
        time.sleep(GRACE * 2)  # past the grace period: the lost-runner timer must be off
        back.batch(text(ex.id, 5), text(ex.id, 6), phase(ex.id, 7, pb.COMPLETED, final_text="ok"))
        back.expect_ack(ex.id, 7)
        self.assertEqual(self.get(ex.id).phase, pb.COMPLETED)
        self.assertEqual([e.seq for e in self.log(ex.id)], list(range(1, 8)))

    def test_restart_mid_execution(self):
        ex = self.submit()
        runner = self.runner(runner_id="w")
        self.assigned(runner)
        runner.batch(*[text(ex.id, seq, f"t{seq}") for seq in range(3, 11)])
        runner.expect_ack(ex.id, 10)
        old_token = self.server.token
        self.server.stop()
        self.assertIsInstance(runner.next(), (grpc.RpcError, str))  # its stream ended
        self.start()  # same STIGMER_HOME, new port, new token
        self.assertNotEqual(self.server.token, old_token)
        self.assertEqual(self.get(ex.id).phase, pb.RUNNING)
        back = self.runner(runner_id="w", in_flight=[(ex.id, 15)])
        back.expect_ack(ex.id, 10)
        back.batch(*[text(ex.id, seq, f"t{seq}") for seq in range(9, 16)])  # overlaps what is stored
        back.expect_ack(ex.id, 15)
        back.batch(phase(ex.id, 16, pb.COMPLETED, final_text="done"))
        back.expect_ack(ex.id, 16)
        events = self.log(ex.id)
        self.assertEqual([e.seq for e in events], list(range(1, 17)))
        self.assertEqual([e.text.text for e in events[2:15]], [f"t{seq}" for seq in range(3, 16)])
        self.assertEqual(self.get(ex.id).final_text, "done")

    def test_an_assignment_lost_with_the_stream_is_sent_again(self):
        ex = self.submit()
        runner = self.runner(runner_id="w")
        self.assigned(runner)
        runner.drop()  # say the Assign never reached it: it reconnects holding nothing
        self.rpc("Cancel", pb.CancelRequest(execution_id=ex.id))  # while it is away
        back = self.runner(runner_id="w", in_flight=[])
        again = back.expect("assign").execution
        self.assertEqual((again.id, again.last_seq, again.phase), (ex.id, 2, pb.RUNNING))
        self.assertEqual(back.expect("cancel").execution_id, ex.id)  # the cancel follows the re-sent Assign
        back.batch(phase(ex.id, 3, pb.COMPLETED, final_text="done"))
        back.expect_ack(ex.id, 3)
        self.assertEqual(self.get(ex.id).phase, pb.COMPLETED)

    def test_a_cancel_survives_a_restart(self):
        ex = self.submit()
        runner = self.runner(runner_id="w")
        self.assigned(runner)
        self.rpc("Cancel", pb.CancelRequest(execution_id=ex.id))
        self.assertEqual(runner.expect("cancel").execution_id, ex.id)
        runner.batch(text(ex.id, 3, "still busy"))  # an event stored after the cancel must not erase it
        runner.expect_ack(ex.id, 3)
        runner.drop()
        self.server.stop()
        self.start()
        back = self.runner(runner_id="w", in_flight=[(ex.id, 3)])
        back.expect_ack(ex.id, 3)
        self.assertEqual(back.expect("cancel").execution_id, ex.id)  # still delivered after the restart
        back.batch(phase(ex.id, 4, pb.CANCELLED, reason="cancelled by the user"))
        back.expect_ack(ex.id, 4)
        self.assertEqual(self.get(ex.id).phase, pb.CANCELLED)

    def test_running_executions_found_at_boot_get_the_grace_period(self):
        ex = self.submit()
        runner = self.runner(runner_id="w")
        self.assigned(runner)
        self.server.stop()
        self.start()
        events = self.log(ex.id, follow=True)  # nobody reconnects: it fails after the grace
        self.assertEqual((events[-2].error.code, events[-1].phase.phase), ("runner_lost", pb.FAILED))


class IdleTest(DaemonCase):
    """A daemon started by a foreground run idles out (daemon_server.stop_when_idle asks Daemon.idle): a run's
    own worker kept warm for the next run (pinned, holding nothing) does not keep it up; any other runner does."""

    def connected(self, n):
        deadline = time.monotonic() + TIMEOUT
        while self.rpc("Status", pb.StatusRequest()).connected_runners != n:
            self.assertLess(time.monotonic(), deadline, f"waiting for {n} runner(s) to connect")
            time.sleep(0.02)

    def test_a_warm_run_worker_does_not_keep_the_daemon_up_but_its_run_and_a_shared_runner_do(self):
        idle = self.server._daemon.idle
        self.assertTrue(idle())
        warm = self.runner(hello=False)
        warm.send(hello=pb.Hello(runner_id="run-1-abc", capacity=1, mode="local", pinned=True))
        self.connected(1)
        self.assertTrue(idle())
        ex = self.rpc("Submit", pb.SubmitRequest(spec=pb.ExecutionSpec(prompt="p", workspace=self.workspace,
                                                                       runner_id="run-1-abc")))
        self.assertEqual(self.assigned(warm).id, ex.id)
        self.assertFalse(idle())  # its run
        warm.batch(phase(ex.id, 3, pb.COMPLETED))
        warm.expect_ack(ex.id, 3)
        self.assertTrue(idle())
        self.runner(runner_id="shared-1")  # a worker of `start`
        self.connected(2)
        self.assertFalse(idle())


class WatchTest(DaemonCase):
    slow = True  # among the longest: testsupport_parallel starts it first
    def run_execution(self):
        """Submit one execution and assign it to a fake runner; returns (id, runner)."""
        ex = self.submit()
        runner = self.runner()
        self.assigned(runner)
        return ex.id, runner

    def stream(self, runner, execution_id, first, last, batch=500):
        for start in range(first, last + 1, batch):
            runner.batch(*[text(execution_id, seq, f"e{seq}") for seq in range(start, min(start + batch, last + 1))])
        runner.batch(phase(execution_id, last + 1, pb.COMPLETED, final_text="end"))

    def test_replay_from_zero_and_from_the_middle(self):
        execution_id, runner = self.run_execution()
        self.stream(runner, execution_id, 3, 2500, batch=700)
        self.log(execution_id, follow=True)
        everything = self.log(execution_id)
        self.assertEqual([e.seq for e in everything], list(range(1, 2502)))
        middle = self.log(execution_id, after_seq=1200)
        self.assertEqual([e.seq for e in middle], list(range(1201, 2502)))
        self.assertEqual(middle, everything[1200:])
        self.assertEqual(self.log(execution_id, after_seq=2501, follow=True), [])  # nothing after the end

    def test_live_follow_ends_after_the_terminal_event(self):
        ex = self.submit()
        received = queue.Queue()
        watch = self.watch(ex.id, follow=True)
        threading.Thread(target=lambda: [received.put(e) for e in watch] + [received.put("end")],
                         daemon=True).start()
        self.assertEqual(received.get(timeout=TIMEOUT).phase.phase, pb.PENDING)
        runner = self.runner()
        self.assigned(runner)
        self.assertEqual(received.get(timeout=TIMEOUT).phase.phase, pb.RUNNING)
        runner.batch(text(ex.id, 3, "live"))
        self.assertEqual(received.get(timeout=TIMEOUT).text.text, "live")
        runner.batch(phase(ex.id, 4, pb.COMPLETED))
        self.assertEqual(received.get(timeout=TIMEOUT).phase.phase, pb.COMPLETED)
        self.assertEqual(received.get(timeout=TIMEOUT), "end")

    def test_twenty_watchers_get_the_identical_sequence(self):
        execution_id, runner = self.run_execution()
        results = [None] * 20

        def follow(i):
            results[i] = [e.SerializeToString() for e in self.watch(execution_id, follow=True)]

        threads = [threading.Thread(target=follow, args=(i,)) for i in range(20)]
        for thread in threads:
            thread.start()
        self.stream(runner, execution_id, 3, 3000, batch=250)
        for thread in threads:
            thread.join(TIMEOUT * 3)
        expected = [e.SerializeToString() for e in self.log(execution_id)]
        self.assertEqual(len(expected), 3001)
        for i, result in enumerate(results):
            self.assertEqual(result, expected, f"watcher {i}")

    def test_a_stalled_watcher_blocks_nobody_and_misses_nothing(self):
        execution_id, runner = self.run_execution()
        stalled = self.watch(execution_id, follow=True)  # opened, never read until the end
        others = [None] * 3
        threads = [threading.Thread(target=lambda i=i: others.__setitem__(
            i, [e.seq for e in self.watch(execution_id, follow=True)])) for i in range(3)]
        for thread in threads:
            thread.start()
        last = self.stream_many(runner, execution_id)
        for thread in threads:
            thread.join(TIMEOUT * 3)
        for seqs in others:
            self.assertEqual(seqs, list(range(1, last + 2)))
        self.assertEqual([e.seq for e in stalled], list(range(1, last + 2)))


class WatchBatchesTest(DaemonCase):
    """WatchBatches: the same log as Watch (tested above, unchanged), grouped into EventBatches."""
    run_execution, stream = WatchTest.run_execution, WatchTest.stream

    def batches(self, execution_id, after_seq=0, follow=False):
        return self.stub.WatchBatches(pb.WatchRequest(execution_id=execution_id, after_seq=after_seq, follow=follow),
                                      metadata=self.metadata, timeout=60, wait_for_ready=True)

    def test_batch_bytes_are_the_protobuf_encoding_of_an_event_batch(self):
        sizes = (0, 1, 100, 127, 128, 300, 16_383, 16_384, 200_000)  # lengths of one, two and three varint bytes
        events = [text("ex-1", seq, "z" * size) for seq, size in enumerate(sizes, start=1)]
        payloads = [e.SerializeToString() for e in events]
        (whole,) = daemon.batch_bytes(payloads)
        self.assertEqual(pb.EventBatch.FromString(whole), pb.EventBatch(events=events))
        self.assertEqual(whole, pb.EventBatch(events=events).SerializeToString())
        self.assertEqual(list(daemon.batch_bytes([])), [])

    def test_batches_split_at_the_event_and_byte_limits(self):
        many = [text("ex-1", seq).SerializeToString() for seq in range(1, 2 * daemon.WATCH_BATCH_EVENTS + 2)]
        counts = [len(pb.EventBatch.FromString(b).events) for b in daemon.batch_bytes(many)]
        self.assertEqual(counts, [daemon.WATCH_BATCH_EVENTS, daemon.WATCH_BATCH_EVENTS, 1])
        third = daemon.WATCH_BATCH_BYTES // 3
        big = [text("ex-1", seq, "b" * third).SerializeToString() for seq in range(1, 6)]
        split = [pb.EventBatch.FromString(b).events for b in daemon.batch_bytes(big)]
        self.assertEqual([[e.seq for e in batch] for batch in split], [[1, 2], [3, 4], [5]])
        huge = text("ex-1", 1, "h" * (daemon.WATCH_BATCH_BYTES + 10)).SerializeToString()
        self.assertEqual([pb.EventBatch.FromString(b).events[0].seq for b in daemon.batch_bytes([huge, many[1]])],
                         [1, 2])  # bigger than the limit: it travels alone

    def test_replay_then_follow_in_batches(self):
        execution_id, runner = self.run_execution()
        for start in range(3, 2003, 500):  # 2000 stored before anyone watches
            runner.batch(*[text(execution_id, seq, f"e{seq}") for seq in range(start, start + 500)])
        runner.expect_ack(execution_id, 502)
        runner.expect_ack(execution_id, 1002)
        runner.expect_ack(execution_id, 1502)
        runner.expect_ack(execution_id, 2002)
        received = queue.Queue()
        watch = self.batches(execution_id, follow=True)
        threading.Thread(target=lambda: [received.put(b) for b in watch] + [received.put("end")],
                         daemon=True).start()
        replayed = []
        while len(replayed) < 2002:
            batch = received.get(timeout=TIMEOUT)
            self.assertLessEqual(len(batch.events), daemon.WATCH_BATCH_EVENTS)
            replayed += batch.events
        self.assertEqual([e.seq for e in replayed], list(range(1, 2003)))
        self.stream(runner, execution_id, 2003, 3000, batch=300)
        followed = []
        while (batch := received.get(timeout=TIMEOUT)) != "end":
            followed += batch.events
        self.assertEqual([e.seq for e in followed], list(range(2003, 3002)))
        self.assertEqual(followed[-1].phase.phase, pb.COMPLETED)
        everything = [e.SerializeToString() for e in self.log(execution_id)]  # the per-event Watch
        self.assertEqual([e.SerializeToString() for e in replayed + followed], everything)
        from_middle = [e.seq for b in self.batches(execution_id, after_seq=1234) for e in b.events]
        self.assertEqual(from_middle, list(range(1235, 3002)))
        self.assertEqual(list(self.batches(execution_id, after_seq=3001, follow=True)), [])

    def test_a_live_follower_gets_each_event_before_the_next_is_appended(self):
        execution_id, runner = self.run_execution()
        received = queue.Queue()
        watch = self.batches(execution_id, follow=True)
        threading.Thread(target=lambda: [received.put(b) for b in watch] + [received.put("end")],
                         daemon=True).start()
        self.assertEqual([e.seq for e in received.get(timeout=TIMEOUT).events], [1, 2])  # PENDING, RUNNING
        for seq in range(3, 53):  # append one, read one: each arrives alone and in order, nothing waits for more
            runner.batch(text(execution_id, seq, f"live {seq}"))
            batch = received.get(timeout=TIMEOUT)
            self.assertEqual([(e.seq, e.text.text) for e in batch.events], [(seq, f"live {seq}")])
        runner.batch(phase(execution_id, 53, pb.COMPLETED))
        self.assertEqual(received.get(timeout=TIMEOUT).events[0].phase.phase, pb.COMPLETED)
        self.assertEqual(received.get(timeout=TIMEOUT), "end")

    def test_a_stalled_batched_watcher_blocks_nobody_and_misses_nothing(self):
        execution_id, runner = self.run_execution()
        stalled = self.batches(execution_id, follow=True)  # opened, never read until the end
        stalled_events = self.watch(execution_id, follow=True)  # a per-event one, stalled too
        others = [None] * 4

        def follow(i):
            if i % 2:
                others[i] = [e.seq for e in self.watch(execution_id, follow=True)]
            else:
                others[i] = [e.seq for b in self.batches(execution_id, follow=True) for e in b.events]

        threads = [threading.Thread(target=follow, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        last = self.stream_many(runner, execution_id)
        for thread in threads:
            thread.join(TIMEOUT * 3)
        for seqs in others:
            self.assertEqual(seqs, list(range(1, last + 2)))
        self.assertEqual([e.seq for b in stalled for e in b.events], list(range(1, last + 2)))
        self.assertEqual([e.seq for e in stalled_events], list(range(1, last + 2)))

    def test_batched_watch_needs_the_token_and_a_known_execution(self):
        ex = self.submit()
        watch = self.stub.WatchBatches(pb.WatchRequest(execution_id=ex.id), timeout=TIMEOUT)
        self.assert_status(grpc.StatusCode.UNAUTHENTICATED, list, watch)
        self.assert_status(grpc.StatusCode.NOT_FOUND, list, self.batches("ex-nope"))


class CommandLineTest(unittest.TestCase):
    def run_daemon(self, *args, home=None):
        env = dict(os.environ, STIGMER_HOME=home or tempfile.mkdtemp(prefix="stigmer-home-"))
        process = subprocess.Popen([sys.executable, os.path.join(HERE, "daemon.py"), *args], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.stdout.close)
        return process

    def test_foreground_daemon_answers_and_exits_cleanly_on_sigterm(self):
        home = tempfile.mkdtemp(prefix="stigmer-home-")
        process = self.run_daemon("--endpoint", "127.0.0.1:0", home=home)
        self.addCleanup(process.kill)
        line = process.stdout.readline()
        self.assertIn("stigmer daemon listening on 127.0.0.1:", line)
        endpoint = line.split()[4]
        self.assertEqual(os.stat(os.path.join(home, "daemon.token")).st_mode & 0o777, 0o600)
        with daemon_client.client_channel(endpoint) as channel:
            status = pb_grpc.DaemonStub(channel).Status(
                pb.StatusRequest(), metadata=daemon_client.auth_metadata(daemon_client.read_token(home)),
                timeout=TIMEOUT, wait_for_ready=True)
        self.assertEqual((status.version, status.pid), (daemon_client.VERSION, process.pid))
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(TIMEOUT), 0, process.stderr.read())
        self.assertFalse(os.path.exists(os.path.join(home, "daemon.token")))

    def test_port_in_use_is_a_one_line_error(self):
        home = tempfile.mkdtemp(prefix="stigmer-home-")
        server = daemon_server.serve(home, "127.0.0.1:0")
        self.addCleanup(server.stop, 0)
        process = self.run_daemon("--endpoint", f"127.0.0.1:{server.port}")
        out, err = process.communicate(timeout=TIMEOUT)
        self.assertEqual(process.returncode, 1)
        self.assertIn(f"port {server.port} is already in use", err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_non_loopback_endpoint_needs_the_flag(self):
        process = self.run_daemon("--endpoint", "0.0.0.0:0")
        out, err = process.communicate(timeout=TIMEOUT)
        self.assertEqual(process.returncode, 1)
        self.assertIn("--allow-remote", err)
        self.assertNotIn("Traceback", err)
        with self.assertRaises(daemon_client.DaemonError):
            daemon_server.serve(tempfile.mkdtemp(), "192.0.2.1:0")

    def test_read_token_without_a_daemon_says_what_to_do(self):
        with self.assertRaises(daemon_client.DaemonError) as caught:
            daemon_client.read_token(tempfile.mkdtemp())
        self.assertIn("python runner.py start", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
