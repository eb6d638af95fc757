"""Local mode under stress (issue 9): many terminals on one STIGMER_HOME, a worker killed with
SIGKILL, a full disk, a broken token, file modes, and the CLI's process checks without /proc.
Real subprocesses, a real daemon and workers, the real SDK against fake Messages APIs.

    python -m unittest test_stress -v
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import daemon_client
import daemon_server
import home
import stigmer_pb2 as pb
import stigmer_pb2_grpc as pb_grpc
import worker
from test_runner import CliCase, read
from testsupport import HERE, FakeAnthropic, pid_alive, reap, running, sleep_tag, text_step, tool_step, wait_for
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

TIMEOUT = 180  # seconds a CLI under test may take on a loaded machine before the test fails


def start_cli(args, env, cwd=None):
    """`python runner.py ARGS` in the background, output captured."""
    return subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class ManyTerminalsTest(CliCase):
    """Reproduction 1 and the ten-terminal case: each run has its own fake model (its own secrets and
    ANTHROPIC_BASE_URL), so an execution that ran on another run's worker shows in its final text."""
    slow = True  # among the longest: testsupport_parallel starts it first
    fresh = True  # the terminals race to start the daemon

    def fake_for(self, name, delay=0.0):
        script = [tool_step(("execute", {"command": f"sleep {delay}; echo {name}"})), text_step(f"result {name}")]
        fake = FakeAnthropic(script).start()
        self.addCleanup(fake.stop)
        return dict(self.env, ANTHROPIC_BASE_URL=fake.url)

    def workspace_for(self, name):
        path = os.path.join(self.tmp, name)
        os.makedirs(path)
        return path

    def run_all(self, names, stagger=None, delay=0.0):
        """Start `run NAME` for each name (after STAGGER(i) returns), wait; returns {name: (proc, out, err)}."""
        procs = {}
        for i, name in enumerate(names):
            if stagger:
                stagger(i)
            procs[name] = start_cli(["--json", "run", f"task {name}", "--workspace", self.workspace_for(name)],
                                    self.fake_for(name, delay), cwd=self.tmp)
        results = {}
        for name, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
            results[name] = (proc, out, err)
        return results

    def assertEachOwn(self, results):
        for name, (proc, out, err) in results.items():
            with self.subTest(run=name):
                self.assertEqual(proc.returncode, 0, err)
                self.assertNotIn("Address already in use", err)
                self.assertNotIn("Traceback", err)
                lines = json_lines(out)  # a run object, the events, a summary object
                self.assertEqual((lines[0]["kind"], lines[-1]["kind"]), ("run", "summary"))
                events = lines[1:-1]
                self.assertEqual(events[-1]["phase"], "COMPLETED")
                self.assertEqual(events[-1]["final_text"], f"result {name}")
                self.assertEqual(events, self.logs(events[0]["execution_id"]))
                self.assertContiguous(events)

    def test_second_terminal_while_the_first_runs(self):
        def two_seconds_later(i):  # as in the issue: b starts 2 s after a, while a runs
            if i:
                time.sleep(2)
        self.assertEachOwn(self.run_all(["a", "b"], stagger=two_seconds_later, delay=4))

    def test_two_terminals_at_the_same_moment(self):
        self.assertEachOwn(self.run_all(["a", "b"], delay=2))

    def test_ten_terminals_within_a_second(self):
        self.assertEachOwn(self.run_all([f"t{i}" for i in range(10)], stagger=lambda i: time.sleep(0.1)))
        status = json.loads(self.cli("status", "--json").stdout)
        self.assertEqual(status["executions_by_phase"], {"COMPLETED": 10})


class PinningTest(unittest.TestCase):
    """The daemon gives a pinned execution only to its runner, and a private runner only its own."""

    def test_pinned_and_private_runners(self):
        from test_daemon import FakeRunner
        home_dir, workspace = tempfile.mkdtemp(), tempfile.mkdtemp()
        server = daemon_server.serve(home_dir, "127.0.0.1:0", runner_grace=0.5)
        self.addCleanup(server.stop, 0)
        channel = daemon_client.client_channel(server.endpoint)
        self.addCleanup(channel.close)
        stub = pb_grpc.DaemonStub(channel)
        metadata = daemon_client.auth_metadata(daemon_client.read_token(home_dir))
        private = FakeRunner(stub, metadata, hello=False)
        private.send(hello=pb.Hello(runner_id="run-1", capacity=1, mode="local", pinned=True))
        self.addCleanup(private.drop)

        def submit(pin=""):
            spec = pb.ExecutionSpec(prompt="p", workspace=workspace, runner_id=pin)
            return stub.Submit(pb.SubmitRequest(spec=spec), metadata=metadata, timeout=20, wait_for_ready=True)

        shared_job = submit()  # nobody shared is connected: it waits, the private runner does not take it
        pinned_job = submit("run-1")
        self.assertEqual(private.expect("assign").execution.id, pinned_job.id)
        shared = FakeRunner(stub, metadata, runner_id="shared", capacity=2)
        self.addCleanup(shared.drop)
        self.assertEqual(shared.expect("assign").execution.id, shared_job.id)
        other_pin = submit("run-2")  # its runner is not here: it waits, even with a free shared slot
        time.sleep(0.5)
        self.assertTrue(shared.inbox.empty() and private.inbox.empty())
        got = stub.Get(pb.GetRequest(execution_id=other_pin.id), metadata=metadata, timeout=20)
        self.assertEqual(got.phase, pb.PENDING)


class KilledWorkerTest(CliCase):
    """Reproduction 2: SIGKILL a worker mid-command; by pid, nothing of the tool's tree survives."""
    share_home = False  # its daemon starts with a runner grace of its own

    TAG = sleep_tag()  # found on the host by its command line: a confined command's $! is its namespace's pid
    script = [tool_step(("execute", {"command": f"sleep {TAG} & echo $! > sleep.pid; wait"})),
              text_step("never reached")]
    GRACE = 3

    def test_kill_9_of_a_worker_kills_its_commands(self):
        env = dict(self.env, STIGMER_RUNNER_GRACE=str(self.GRACE))
        self.assertEqual(self.cli("start", env=env).returncode, 0)
        submitted = self.cli("run", "--detach", "sleep a while", env=env)
        self.assertEqual(submitted.returncode, 0, submitted.stderr)
        execution_id = submitted.stdout.strip()
        sleep_pid = os.path.join(self.workspace, "sleep.pid")
        wait_for(lambda: os.path.exists(sleep_pid) and read(sleep_pid).strip(), timeout=60)
        pids = running(self.TAG)  # the shell, the sleep (and the bwrap around them)
        worker_pid = int(read(os.path.join(self.home, "logs", "worker-1.pid")).split()[0])
        self.assertTrue(all(pid_alive(p) for p in pids + [worker_pid]))
        os.kill(worker_pid, signal.SIGKILL)
        killed_at = time.monotonic()

        def failed():
            rows = json_lines(self.cli("list", "--json").stdout)
            return [r for r in rows if r["id"] == execution_id and r["phase"] == "FAILED"]
        wait_for(failed, timeout=60)
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=10)  # the sweep's SIGKILLs land
        self.assertEqual([p for p in pids if pid_alive(p)], [])
        self.assertLess(time.monotonic() - killed_at, 30, "the sleep 30 ran its course: nobody killed it")
        events = self.logs(execution_id)
        self.assertContiguous(events)
        self.assertEqual(events[-1]["reason"], "runner lost")


@unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0,
                     "mounting a 2 MB tmpfs for STIGMER_HOME needs root")
class DiskFullTest(CliCase):
    """Reproduction 3: STIGMER_HOME on a 2 MB tmpfs, a chatty task fills it."""
    slow = True  # among the longest: testsupport_parallel starts it first
    fresh = True  # STIGMER_HOME is a small tmpfs

    script = [tool_step(("execute", {"command": "head -c 40000 /dev/zero | tr '\\\\0' x; echo"}))
              for _ in range(12)] + [text_step("chatty done")]

    def setUp(self):
        super().setUp()
        os.makedirs(self.home)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", self.home],
                                 capture_output=True, text=True)
        if mounted.returncode:
            self.skipTest(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(subprocess.run, ["umount", "-l", self.home], capture_output=True)
        self.env["STIGMER_RUNNER_GRACE"] = "2"
        # The daemon's own log goes outside the full disk, so the test can count its lines.
        self.daemon_log = open(os.path.join(self.tmp, "daemon.err"), "w+")
        self.addCleanup(self.daemon_log.close)
        self.daemon = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "daemon"], env=self.env,
                                       stdout=self.daemon_log, stderr=self.daemon_log, stdin=subprocess.DEVNULL)
        self.addCleanup(reap, self.daemon)
        wait_for(lambda: self.cli("status").returncode == 0, timeout=60)
        self.ballast = os.path.join(self.home, "ballast")
        with open(self.ballast, "wb") as f:  # fill the disk, then leave 200 KB for the run to start
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        os.truncate(self.ballast, max(0, os.path.getsize(self.ballast) - 200_000))

    def run_until_full(self):
        """A foreground run of the chatty task, until its stderr says the disk is full: (proc, stderr lines).
        Its stdout (big tool results) goes to a file, so that it never blocks on a pipe nobody reads."""
        self.out = open(os.path.join(self.tmp, "run.out"), "w+")
        self.addCleanup(self.out.close)
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "--json", "chatter"],
                                env=self.env, cwd=self.workspace, stdout=self.out, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
        self.addCleanup(reap, proc)
        lines = []
        while True:
            line = proc.stderr.readline()
            self.assertTrue(line, f"the CLI ended without saying the disk is full: {''.join(lines)}")
            lines.append(line)
            if "disk full" in line:
                return proc, lines

    def finish(self, proc):
        """(stdout, the rest of stderr) once the run exits."""
        err = proc.communicate(timeout=TIMEOUT)[1]
        self.out.seek(0)
        return self.out.read(), err

    def daemon_lines(self):
        self.daemon_log.seek(0)
        return self.daemon_log.read()

    def test_space_comes_back_and_the_run_completes(self):
        space_back = threading.Event()  # the last reply waits for it, so that the run ends after space is back
        self.fake.script = [*self.script[:-1], dict(self.script[-1], gate=space_back)]
        proc, lines = self.run_until_full()
        self.assertIn(self.home, lines[-1])
        self.assertEqual(self.cli("list").returncode, 0)  # reads keep working on a full disk
        os.unlink(self.ballast)
        space_back.set()
        out, err = self.finish(proc)
        err = "".join(lines) + err
        self.assertEqual(proc.returncode, 0, err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(err.count("disk full"), 1, err)
        events = [e for e in json_lines(out) if "seq" in e]  # the events, without the run and summary objects
        self.assertEqual(events[-1]["final_text"], "chatty done")
        self.assertContiguous(events)
        self.assertEqual(events, self.logs(events[0]["execution_id"]))
        self.assertEqual(len([e for e in events if e["kind"] == "tool_result"]), 12)
        log = self.daemon_lines()
        self.assertNotIn("Traceback", log)
        self.assertEqual(log.count("disk full"), 1, log)

    def test_disk_stays_full_until_the_run_ends(self):
        proc, lines = self.run_until_full()
        out, err = self.finish(proc)
        err = "".join(lines) + err
        self.assertEqual(proc.returncode, 1, err)
        self.assertNotIn("Traceback", err)
        self.assertIn("disk full", err.splitlines()[-1])
        self.assertIn(self.home, err.splitlines()[-1])
        execution_id = json_lines(out)[0]["execution_id"]
        self.assertEqual(self.cli("status").returncode, 0)  # reads keep working
        # The run has ended, though its end is not stored: the daemon says how it ended, not "running"
        row = [r for r in json_lines(self.cli("list", "--json").stdout) if r["id"] == execution_id][0]
        self.assertTrue(row["not_stored"], row)
        self.assertIn(row["phase"], ("COMPLETED", "FAILED", "CANCELLED"))
        self.assertIn("not stored yet", self.cli("list").stdout)
        status = json.loads(self.cli("status", "--json").stdout)
        self.assertNotIn("RUNNING", status["executions_by_phase"])
        self.assertEqual(self.cli("logs", execution_id).returncode, {"COMPLETED": 0, "FAILED": 1}.get(row["phase"], 130))
        os.unlink(self.ballast)

        def failed():
            rows = json_lines(self.cli("list", "--json").stdout)
            return [r for r in rows if r["id"] == execution_id and r["phase"] == "FAILED"]
        wait_for(failed, timeout=60)
        events = self.logs(execution_id)
        self.assertContiguous(events)
        self.assertEqual(events[-1]["phase"], "FAILED")
        self.assertIn("disk full", events[-1]["reason"])
        self.assertTrue([e for e in events if e["kind"] == "error" and e["code"] == "disk_full"])
        log = self.daemon_lines()
        self.assertNotIn("Traceback", log)
        self.assertEqual(log.count("disk full"), 1, log)


    def test_submit_on_a_full_disk_is_one_line(self):
        worker_log = open(os.path.join(self.tmp, "worker.err"), "w")  # a shared worker: detach only submits
        self.addCleanup(worker_log.close)
        shared = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "worker"], env=self.env,
                                  stdout=worker_log, stderr=worker_log, stdin=subprocess.DEVNULL)
        self.addCleanup(reap, shared)
        wait_for(lambda: json.loads(self.cli("status", "--json").stdout).get("connected_runners") == 1, timeout=60)
        fd = os.open(self.ballast, os.O_WRONLY | os.O_APPEND)  # not even the 200 KB left
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        submitted = self.cli("run", "--detach", "one more")
        self.assertEqual(submitted.returncode, 1, submitted.stderr)
        self.assertEqual(len(submitted.stderr.strip().splitlines()), 1, submitted.stderr)
        self.assertIn("disk full", submitted.stderr)
        self.assertIn(self.home, submitted.stderr)
        self.assertNotIn("Exception calling application", submitted.stderr)
        self.assertEqual(self.cli("list").returncode, 0)
        os.unlink(self.ballast)
        submitted = self.cli("run", "--detach", "once there is room")
        self.assertEqual(submitted.returncode, 0, submitted.stderr)


class BrokenTokenTest(CliCase):
    """Reproduction 4: an empty, or foreign, daemon.token."""
    fresh = True  # it breaks the token

    def write_token(self, text):
        os.makedirs(self.home, mode=0o700, exist_ok=True)
        with open(os.path.join(self.home, "daemon.token"), "w") as f:
            f.write(text)

    def test_empty_token_with_no_daemon_is_replaced(self):
        self.write_token("")
        proc, events = self.run_task("hi")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(events[-1]["phase"], "COMPLETED")
        self.cli("stop")
        self.write_token("")
        started = self.cli("start")
        self.assertEqual(started.returncode, 0, started.stderr)
        self.assertEqual(self.cli("status").returncode, 0)

    def test_foreign_token_with_no_daemon_is_replaced(self):
        self.write_token("not-the-token-of-any-daemon")
        started = self.cli("start")
        self.assertEqual(started.returncode, 0, started.stderr)
        self.assertEqual(self.cli("status").returncode, 0)

    def test_broken_token_with_a_daemon_names_the_fix(self):
        self.assertEqual(self.cli("start").returncode, 0)
        for broken in ("", "someone-elses-token"):
            with self.subTest(token=broken):
                self.write_token(broken)
                for args in (["status"], ["start"], ["run", "hi"]):
                    proc = self.cli(*args)
                    self.assertEqual(proc.returncode, 1, proc.stderr)
                    self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
                    self.assertIn("python runner.py stop", proc.stderr)
                    self.assertIn("empty" if not broken else "refused", proc.stderr)
        self.assertEqual(self.cli("stop").returncode, 0)
        proc, events = self.run_task("hi")  # the one command fixed it
        self.assertEqual(proc.returncode, 0, proc.stderr)


class PrivateHomeTest(CliCase):
    """Reproduction 5: `start` as the first command, with a permissive umask."""
    fresh = True  # it checks how the home is created

    def test_files_are_private_whoever_creates_them(self):
        proc = subprocess.run([sys.executable, os.path.join(HERE, "runner.py"), "start"], env=self.env,
                              capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                              preexec_fn=lambda: os.umask(0o022))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        # a --secret the started worker lacks: the run brings its own worker (and its run-worker.log)
        run, _ = self.run_task("--secret", "EXTRA_TOKEN", "hi", env=dict(self.env, EXTRA_TOKEN="x"))
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertEqual(stat.S_IMODE(os.stat(self.home).st_mode), 0o700)
        names = ["stigmer.db", "stigmer.db-wal", "stigmer.db-shm", "daemon.token", "daemon.lock",
                 "logs/daemon.log", "logs/daemon.pid", "logs/worker-1.log", "logs/worker-1.pid", "logs/run-worker.log"]
        for name in names:
            with self.subTest(file=name):
                self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.home, name)).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.home, "logs")).st_mode), 0o700)

    def test_an_open_home_gets_a_warning(self):
        os.makedirs(self.home)
        os.chmod(self.home, 0o755)
        proc = self.cli("start")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("readable by other users", proc.stderr)
        self.assertIn(f"chmod 700 {self.home}", proc.stderr)


# Runs runner.main with /proc unreadable: open, os.open, listdir, scandir and stat all fail for it.
NO_PROC = """
import builtins, io, os, sys
sys.path.insert(0, {here!r})
def hidden(path):
    try:
        path = os.fsdecode(path) if not isinstance(path, int) else ""
    except TypeError:
        return False
    return path == "/proc" or path.startswith("/proc/")
def guard(real):
    def call(path, *args, **kwargs):
        if hidden(path):
            raise FileNotFoundError(2, "No such file or directory (hidden by the test)", path)
        return real(path, *args, **kwargs)
    return call
builtins.open = io.open = guard(builtins.open)
for name in ("open", "listdir", "scandir", "stat", "lstat", "access"):
    setattr(os, name, guard(getattr(os, name)))
import sandbox
sandbox.PROC_ROOT = "/nonexistent-proc"
import runner
sys.exit(runner.main(sys.argv[1:]))
"""


class WithoutProcTest(CliCase):
    """The portability promise: start, status and stop work with no /proc (as on macOS)."""
    share_home = False  # it counts what `stop` stops

    def no_proc(self, *args):
        return subprocess.run([sys.executable, "-c", NO_PROC.format(here=HERE), *args], env=self.env,
                              capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                              cwd=self.workspace)

    def test_start_status_stop_without_proc(self):
        started = self.no_proc("start", "--workers", "2")
        self.assertEqual(started.returncode, 0, started.stderr)
        pids = [int(read(os.path.join(self.home, "logs", n)).split()[0])
                for n in ("daemon.pid", "worker-1.pid", "worker-2.pid")]
        status = self.no_proc("status", "--json")
        self.assertEqual(status.returncode, 0, status.stderr)
        processes = json.loads(status.stdout)["processes"]
        self.assertEqual(sorted(map(str, processes.values())), sorted(map(str, pids)))
        again = self.no_proc("start", "--workers", "2")
        self.assertIn("0 started", again.stdout)
        stopped = self.no_proc("stop")
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        self.assertIn("stopped 3", stopped.stdout)
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=30)

    def test_a_dead_process_is_not_live_even_if_its_pid_is_reused(self):
        path = os.path.join(self.tmp, "x.pid")
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")  # a live pid, but nobody holds the file's lock
        self.assertIsNone(home.live_pid(path, wait=0))
        fd = home.lock(path)
        home.write_record(fd, os.getpid())
        try:
            self.assertEqual(home.live_pid(path, wait=0), os.getpid())
        finally:
            os.close(fd)


class IdleDaemonTest(unittest.TestCase):
    def test_a_run_started_daemon_idles_out_but_not_while_watched(self):
        home_dir = tempfile.mkdtemp()
        server = daemon_server.serve(home_dir, "127.0.0.1:0")
        self.addCleanup(server.stop, 0)
        channel = daemon_client.client_channel(server.endpoint)
        self.addCleanup(channel.close)
        stub = pb_grpc.DaemonStub(channel)
        metadata = daemon_client.auth_metadata(daemon_client.read_token(home_dir))
        ex = stub.Submit(pb.SubmitRequest(spec=pb.ExecutionSpec(prompt="p", workspace=home_dir)),
                         metadata=metadata, timeout=20)
        server.stop_when_idle(0.5)
        watch = stub.Watch(pb.WatchRequest(execution_id=ex.id, follow=True), metadata=metadata)
        self.assertEqual(next(watch).phase.phase, pb.PENDING)
        time.sleep(2)  # a PENDING execution and a follower: it stays
        self.assertFalse(server._stopped.is_set())
        stub.Cancel(pb.CancelRequest(execution_id=ex.id), metadata=metadata, timeout=20)
        self.assertEqual(next(watch).phase.phase, pb.CANCELLED)
        self.assertTrue(server._stopped.wait(30), "the idle daemon did not stop")
        self.assertIsNone(home.lock_holder(os.path.join(home_dir, daemon_server.LOCK_FILE)))

    def test_one_daemon_per_home(self):
        home_dir = tempfile.mkdtemp()
        server = daemon_server.serve(home_dir, "127.0.0.1:0")
        self.addCleanup(server.stop, 0)
        with self.assertRaises(daemon_server.DaemonRunning) as caught:
            daemon_server.serve(home_dir, "127.0.0.1:0")
        self.assertIn(str(os.getpid()), str(caught.exception))
        self.assertEqual(home.lock_holder(os.path.join(home_dir, daemon_server.LOCK_FILE)), os.getpid())


class LogFullWorkerTest(unittest.TestCase):
    """The worker keeps refused events, backs off, resends them, and gives up after its patience."""

    def test_refused_for_a_full_disk_kept_and_resent(self):
        w = worker.Worker(environ=os.environ, capacity=1)
        w.outboxes["ex-1"] = box = worker.Outbox("ex-1", 0)
        for n in range(3):
            box.append(text=pb.TextDelta(text=str(n)))
        w.buffered = 3
        self.assertEqual([e.seq for e in w.next_batch(0.1)], [1, 2, 3])
        w.log_full("ex-1", 0, "disk full")
        self.assertEqual(w.next_batch(0.05), [])  # backing off
        deadline = time.monotonic() + 10
        batch = []
        while not batch and time.monotonic() < deadline:
            batch = w.next_batch(0.1)
        self.assertEqual([e.seq for e in batch], [1, 2, 3])  # nothing lost
        w.acked("ex-1", 3)
        self.assertIsNone(box.full_since)
        self.assertEqual(w.buffered, 0)

    def test_patience_runs_out(self):
        w = worker.Worker(environ=os.environ, capacity=1)
        w.log_full_patience = 0
        w.outboxes["ex-1"] = worker.Outbox("ex-1", 0)
        w.log_full("ex-1", 0, "disk full: STIGMER_HOME")
        self.assertEqual(w.abandoned, {"ex-1": "disk full: STIGMER_HOME"})
        self.assertIn("ex-1", w.cancels)


if __name__ == "__main__":
    unittest.main()
