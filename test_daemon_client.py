"""Tests for daemon_client.Client, the CLI's backend: a real daemon on a free loopback port with a
temporary STIGMER_HOME; every method returns stigmer_pb2 messages or raises BackendError.

    python -m unittest test_daemon_client -v
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import daemon

import daemon_server
import stigmer_pb2 as pb
from daemon_client import TOKEN_FILE, BackendError, BackendUnavailable, Client
from testsupport import (FAKE_KEY, HERE, Squatter, assert_one_line, free_port, private_hosts_argv, private_hosts_problem, run_cli,
                         wait_for)
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

RUNNER = os.path.join(HERE, "runner.py")


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
        with self.assertRaises(BackendUnavailable) as caught:  # not where this home's daemon listens: no call at all
            Client(self.home, f"127.0.0.1:{free_port()}")
        self.assertIn(f"it listens at {self.server.endpoint}", str(caught.exception))
        with self.assertRaises(BackendUnavailable) as caught:
            Client(tempfile.mkdtemp(prefix="stigmer-empty-"), self.server.endpoint)  # no token: no daemon
        self.assertIn(TOKEN_FILE, str(caught.exception))
        gone = tempfile.mkdtemp(prefix="stigmer-gone-")
        self.addCleanup(shutil.rmtree, gone, True)
        daemon_server.serve(gone, "127.0.0.1:0").stop(0)
        with open(os.path.join(gone, TOKEN_FILE), "w") as f:  # a token left behind by a daemon that died
            f.write("stale\n")
        with self.assertRaises(BackendUnavailable) as caught:
            Client(gone, self.server.endpoint)
        self.assertIn("python runner.py start", str(caught.exception))

    def test_the_local_transport_is_the_homes_socket(self):
        sock = os.path.join(self.home, "daemon.sock")
        self.assertEqual((self.server.socket, self.client.target), (sock, f"unix:{sock}"))
        self.assertEqual(Client(self.home, self.server.endpoint.replace("127.0.0.1", "localhost")).target,
                         f"unix:{sock}")
        self.server.stop(0)
        self.assertFalse(os.path.exists(sock))

    def test_a_wrong_token_says_which_settings_to_check(self):
        with open(os.path.join(self.home, TOKEN_FILE), "w") as f:  # overwritten while the daemon runs
            f.write("not-the-token\n")
        stranger = Client(self.home, self.server.endpoint)
        self.addCleanup(stranger.close)
        with self.assertRaises(BackendError) as caught:
            stranger.list()
        self.assertNotIsInstance(caught.exception, BackendUnavailable)
        self.assertIn("STIGMER_HOME", str(caught.exception))


class SquatterTest(unittest.TestCase):
    """Issue 28, item 1: another local user listening where the client might dial the daemon gets no token."""
    slow = True  # among the longest: testsupport_parallel starts it first

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="stigmer-squat-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.home = os.path.join(self.tmp, "home")
        self.port = free_port()
        self.env = {"PATH": os.environ["PATH"], "HOME": self.tmp, "STIGMER_HOME": self.home,
                    "STIGMER_BACKEND_ENDPOINT": f"localhost:{self.port}", "ANTHROPIC_API_KEY": FAKE_KEY,
                    "ANTHROPIC_BASE_URL": "http://127.0.0.1:9", "SANDBOX_ROOT_DIR": self.tmp}

    def squat(self, address):
        squatter = Squatter(address)
        self.addCleanup(squatter.stop)
        return squatter

    def worker_until(self, argv, connected):
        """Run `runner.py worker` (wrapped by ARGV) until CONNECTED() is true, then stop it."""
        log_path = os.path.join(self.tmp, "worker.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([*argv, sys.executable, RUNNER, "worker", "--capacity", "1"], env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            wait_for(connected, what="the worker to connect, or to say it cannot")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        with open(log_path) as f:
            return f.read()

    def test_localhost_on_ipv6_reaches_a_squatter_not_the_daemon(self):
        hosts = os.path.join(self.tmp, "hosts")
        with open(hosts, "w") as f:
            f.write("::1 localhost\n")
        problem = private_hosts_problem(hosts)
        if problem:
            self.skipTest(problem)
        server = daemon_server.serve(self.home, f"localhost:{self.port}")  # binds 127.0.0.1 only
        self.addCleanup(server.stop, 0)
        squatter = self.squat(f"[::1]:{self.port}")
        ns = private_hosts_argv(hosts, [])
        control = subprocess.run([*ns, sys.executable, "-c", PROBE, f"localhost:{self.port}"], capture_output=True,
                                 text=True, timeout=60, env=self.env)
        self.assertEqual(control.returncode, 0, control.stderr)
        self.assertEqual([md.get("probe") for _, md in squatter.calls], ["1"])  # `localhost` is the squatter's there
        status = subprocess.run([*ns, sys.executable, RUNNER, "status", "--json"], capture_output=True, text=True,
                                timeout=60, env=self.env)
        self.assertEqual(status.returncode, 0, status.stderr)
        self.assertEqual(json.loads(status.stdout)["pid"], os.getpid())  # the real daemon answered
        listed = subprocess.run([*ns, sys.executable, RUNNER, "list"], capture_output=True, text=True, timeout=60,
                                env=self.env)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        client = Client(self.home, server.endpoint)
        self.addCleanup(client.close)
        self.worker_until(ns, lambda: client.status().connected_runners == 1)
        self.assertEqual(squatter.tokens(), [])
        self.assertEqual(len(squatter.calls), 1)  # the probe only

    def test_the_port_of_a_killed_daemon_gets_no_token(self):
        daemon = subprocess.Popen([sys.executable, RUNNER, "daemon", "--endpoint", f"127.0.0.1:{self.port}"],
                                  env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.assertIn("listening", daemon.stdout.readline())
        daemon.kill()  # kill -9: its token file stays behind
        daemon.wait()
        daemon.stdout.close()
        self.assertTrue(os.path.exists(os.path.join(self.home, TOKEN_FILE)))
        squatter = self.squat(f"127.0.0.1:{self.port}")
        log = self.worker_until([], lambda: "cannot reach the daemon" in read(os.path.join(self.tmp, "worker.log")))
        self.assertIn("no daemon answers", log)
        with self.assertRaises(BackendUnavailable):
            Client(self.home, f"127.0.0.1:{self.port}")
        for endpoint in (f"localhost:{self.port}", f"127.0.0.1:{self.port}"):
            env = dict(self.env, STIGMER_BACKEND_ENDPOINT=endpoint)
            status = run_cli(["status"], env)
            self.assertEqual(status.returncode, 1)
            self.assertIn("no daemon answers", status.stderr)
            self.assertEqual(run_cli(["cancel", "ex-1"], env).returncode, 1)
        self.assertEqual(run_cli(["list"], self.env).returncode, 0)  # from the log, by an embedded daemon
        self.assertEqual(squatter.calls, [])  # nothing at all was sent there


class CallLimitTest(unittest.TestCase):
    """Issue 28, item 8: with every RPC slot held by follow streams, the CLI says so, not "a token another
    process overwrote", and works again once they end."""

    def test_at_the_call_limit_the_cli_names_it(self):
        home = tempfile.mkdtemp(prefix="stigmer-home-")
        self.addCleanup(shutil.rmtree, home, True)
        server = daemon_server.serve(home, "127.0.0.1:0")
        self.addCleanup(server.stop, 0)
        client = Client(home, server.endpoint)
        self.addCleanup(client.close)
        ex = client.submit(pb.ExecutionSpec(prompt="wait", workspace=home))
        watches = []
        for _ in range(daemon_server.MAX_CONCURRENT_RPCS):  # 128 `logs -f`
            watch = client.watch(ex.id)
            events = iter(watch)
            next(events)  # the stream is open and holds its slot
            watches.append(watch)
        env = {"PATH": os.environ["PATH"], "HOME": home, "STIGMER_HOME": home,
               "STIGMER_BACKEND_ENDPOINT": server.endpoint}
        listed = run_cli(["list"], env)
        assert_one_line(self, listed, 1, "as many calls at once as it can", "end some of them")
        self.assertNotIn("token", listed.stderr)
        for watch in watches:
            watch.cancel()
        wait_for(lambda: run_cli(["list"], env).returncode == 0, what="list to work once the streams end")


PROBE = """import sys
import grpc
import stigmer_pb2 as pb
import stigmer_pb2_grpc as pb_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:  # what dialling the name reaches, with no token
    try:
        pb_grpc.DaemonStub(channel).Status(pb.StatusRequest(), metadata=(("probe", "1"),), timeout=10)
    except grpc.RpcError:
        pass
"""


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


if __name__ == "__main__":
    unittest.main()
