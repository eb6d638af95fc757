"""Tests for daemon_client.Client, the CLI's backend: a real daemon on a free loopback port with a
temporary STIGMER_HOME; every method returns stigmer_pb2 messages or raises BackendError.

    python -m unittest test_daemon_client -v
"""
import os
import shutil
import tempfile
import unittest
from unittest import mock

import daemon

import daemon_server
import stigmer_pb2 as pb
from daemon_client import TOKEN_FILE, BackendError, BackendUnavailable, Client
from testsupport import free_port


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="stigmer-home-")
        self.addCleanup(shutil.rmtree, self.home, True)
        self.workspace = tempfile.mkdtemp(prefix="stigmer-ws-")
        self.addCleanup(shutil.rmtree, self.workspace, True)
        self.server = daemon_server.serve(self.home, "127.0.0.1:0", runner_grace=0.5)
        self.addCleanup(self.server.stop, 0)
        self.client = Client(self.home, self.server.endpoint)
        self.addCleanup(self.client.close)

    def submit(self, prompt="fix the failing test"):
        return self.client.submit(pb.ExecutionSpec(prompt=prompt, workspace=self.workspace))

    def test_submit_get_list_status_cancel_and_watch(self):
        self.assertEqual(self.client.endpoint, self.server.endpoint)
        first, second = self.submit("first"), self.submit("second")
        self.assertIsInstance(first, pb.Execution)
        self.assertEqual((first.phase, first.spec.prompt), (pb.PENDING, "first"))
        got = self.client.get(first.id)
        self.assertIsInstance(got, pb.Execution)
        self.assertEqual((got.id, got.spec.workspace), (first.id, self.workspace))

        listed = self.client.list()
        self.assertIsInstance(listed, list)
        self.assertEqual([ex.id for ex in listed], [second.id, first.id])  # newest first
        self.assertEqual([ex.id for ex in self.client.list(limit=1)], [second.id])
        self.assertEqual(self.client.list(phase=pb.COMPLETED), [])

        status = self.client.status()
        self.assertIsInstance(status, pb.DaemonStatus)
        self.assertEqual((status.queue_depth, status.pid, status.connected_runners), (2, os.getpid(), 0))

        cancelled = self.client.cancel(first.id)
        self.assertIsInstance(cancelled, pb.Execution)
        self.assertEqual(cancelled.phase, pb.CANCELLED)  # pending: cancelled at once
        self.assertEqual([ex.id for ex in self.client.list(phase=pb.CANCELLED)], [first.id])

        events = list(self.client.watch(first.id))  # follows until the terminal event, then ends
        self.assertTrue(all(isinstance(ev, pb.Event) for ev in events))
        self.assertEqual([ev.seq for ev in events], [1, 2])
        self.assertEqual([ev.phase.phase for ev in events], [pb.PENDING, pb.CANCELLED])
        self.assertEqual([ev.seq for ev in self.client.watch(first.id, after_seq=1)], [2])

    def test_a_watch_ends_quietly_when_cancelled(self):
        ex = self.submit()
        stream = self.client.watch(ex.id, follow=True)
        events = iter(stream)
        self.assertEqual(next(events).phase.phase, pb.PENDING)
        stream.cancel()  # it was waiting for more: still pending
        self.assertEqual(list(events), [])
        self.assertEqual(list(self.client.watch(ex.id, follow=False))[0].seq, 1)  # replay only, then the end

    def stream_events(self, ex, count):
        """Assign EX to a runner on a Connect stream and store COUNT text events and COMPLETED."""
        import queue
        import daemon_client
        import stigmer_pb2_grpc as pb_grpc
        outbox = queue.Queue()
        outbox.put(pb.RunnerMessage(hello=pb.Hello(runner_id="r", capacity=1, mode="local")))
        channel = daemon_client.client_channel(self.server.endpoint)
        self.addCleanup(channel.close)
        md = daemon_client.auth_metadata(self.server.token)
        replies = pb_grpc.DaemonStub(channel).Connect(iter(outbox.get, None), metadata=md, timeout=60)
        self.addCleanup(outbox.put, None)
        self.assertEqual(next(replies).assign.execution.id, ex.id)
        last = count + 2
        outbox.put(pb.RunnerMessage(events=pb.EventBatch(events=[
            pb.Event(execution_id=ex.id, seq=seq, text=pb.TextDelta(text=str(seq))) for seq in range(3, last + 1)]
            + [pb.Event(execution_id=ex.id, seq=last + 1, phase=pb.PhaseChange(phase=pb.COMPLETED))])))
        for reply in replies:
            if reply.ack.seq == last + 1:
                return last + 1

    def restart(self, **patches):
        """A new daemon over the same home whose Daemon methods are replaced by PATCHES (the handlers are
        bound when the server starts), and a client of it."""
        self.server.stop(0)
        with mock.patch.multiple(daemon.Daemon, **patches):
            self.server = daemon_server.serve(self.home, "127.0.0.1:0", runner_grace=0.5)
        self.addCleanup(self.server.stop, 0)
        self.client = Client(self.home, self.server.endpoint)
        self.addCleanup(self.client.close)

    def test_watch_reads_batches_and_yields_single_events(self):
        def per_event(self, request, context):
            context.abort(daemon.Code.INTERNAL, "the per-event Watch was called")

        self.restart(Watch=per_event)
        ex = self.submit()
        last = self.stream_events(ex, 1200)
        events = list(self.client.watch(ex.id))
        self.assertTrue(all(isinstance(ev, pb.Event) for ev in events))
        self.assertEqual([ev.seq for ev in events], list(range(1, last + 1)))
        self.assertEqual(events[5].text.text, "6")
        self.assertEqual([ev.seq for ev in self.client.watch(ex.id, after_seq=1000)], list(range(1001, last + 1)))

    def test_a_daemon_without_batches_is_watched_event_by_event(self):
        def unimplemented(self, request, context):
            context.abort(daemon.Code.UNIMPLEMENTED, "Method not implemented!")  # what an older daemon says

        self.restart(WatchBatches=unimplemented)
        ex = self.submit()
        last = self.stream_events(ex, 700)
        self.assertEqual([ev.seq for ev in self.client.watch(ex.id)], list(range(1, last + 1)))
        self.assertEqual([ev.seq for ev in self.client.watch(ex.id, after_seq=650)], list(range(651, last + 1)))

    def test_unknown_ids_are_backend_errors_not_unavailable(self):
        for call in (self.client.get, self.client.cancel, lambda i: list(self.client.watch(i))):
            with self.assertRaises(BackendError) as caught:
                call("ex-nope")
            self.assertNotIsInstance(caught.exception, BackendUnavailable)
            self.assertIn("ex-nope", str(caught.exception))
        with self.assertRaises(BackendError):
            self.submit("")  # the daemon refuses an empty prompt

    def test_a_dead_endpoint_is_unavailable(self):
        dead = Client(self.home, f"127.0.0.1:{free_port()}")
        self.addCleanup(dead.close)
        with self.assertRaises(BackendUnavailable) as caught:
            dead.status(timeout=2)
        self.assertIn("python runner.py start", str(caught.exception))
        with self.assertRaises(BackendUnavailable):
            list(dead.watch("ex-any"))
        with self.assertRaises(BackendUnavailable) as caught:
            Client(tempfile.mkdtemp(prefix="stigmer-empty-"), self.server.endpoint)  # no token: no daemon
        self.assertIn(TOKEN_FILE, str(caught.exception))

    def test_a_wrong_token_says_which_settings_to_check(self):
        other = tempfile.mkdtemp(prefix="stigmer-other-")
        self.addCleanup(shutil.rmtree, other, True)
        with open(os.path.join(other, TOKEN_FILE), "w") as f:
            f.write("not-the-token\n")
        stranger = Client(other, self.server.endpoint)
        self.addCleanup(stranger.close)
        with self.assertRaises(BackendError) as caught:
            stranger.list()
        self.assertNotIsInstance(caught.exception, BackendUnavailable)
        self.assertIn("STIGMER_HOME", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
