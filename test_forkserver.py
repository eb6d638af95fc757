"""The fork server (forkserver.py): workers forked from a process that has imported the SDKs, each exactly the
process the caller would have started, the server private to its user, and everything falling back to a
plain start when it cannot be used. A real server (its own TMPDIR per class), real runs through the CLI.

    python -m unittest test_forkserver -v
"""
import fcntl
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import unittest

import forkserver
import models
import sandbox
from test_runner import CliCase
from testsupport import FAKE_KEY, HERE, pid_alive, text_step, tool_step, wait_for
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

stigmer_secrets = models.project_secrets()


def parent_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def session_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[3])


def umask_of(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)


def server_pid(path):
    """The pid of the server for PATH, or None: the process whose command line is `forkserver.py PATH` and whose
    parent's is not (the children it forked keep its command line)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[-2:-1] == [path.encode()] and pid_alive(int(entry)):
                        found.add(int(entry))
            except OSError:
                continue
    return next((pid for pid in found if _parent(pid) not in found), None)


class ServerCase(unittest.TestCase):
    """One server for the class, in a TMPDIR of its own (so no other test's server answers)."""
    idle = ""

    def setUp(self):
        self.closed = set()

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="stigmer-fs-")
        cls.env = dict(os.environ, TMPDIR=cls.tmp, STIGMER_FORKSERVER_IDLE=cls.idle)
        cls.env.pop("STIGMER_FORKSERVER", None)
        cls.path = forkserver.socket_path(cls.env)
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        cls.addClassCleanup(cls.stop_server)

    @classmethod
    def stop_server(cls):
        pid = server_pid(cls.path)
        if pid:
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not pid_alive(pid), timeout=30, what="the server gone")

    def up(self):
        """Start the server if none is up (a first spawn does, and is told to start the process itself) and wait
        until a spawn is forked; returns that Child."""
        found = []
        wait_for(lambda: found.append(self.spawn(["--version"])) or found[-1] is not None, timeout=60,
                 what="the fork server up")
        found[-1].wait(30)
        return found[-1]

    def spawn(self, args, env=None, extra=None, pipe=False):
        """forkserver.spawn of `runner.py ARGS` with output to self.log; (child, our end of its stdin)."""
        self.log = os.path.join(self.tmp, "child.log")
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        r, w = os.pipe() if pipe else (os.open(os.devnull, os.O_RDONLY), None)
        try:
            child = forkserver.spawn(args, env or self.env, {0: r, 1: log, 2: log, **(extra or {})})
        finally:
            os.close(r)
            os.close(log)
        if pipe:
            self.addCleanup(self.eof, w)
            return child, w
        return child

    def eof(self, fd):
        """Close our end of a child's stdin, once."""
        if fd not in self.closed:
            self.closed.add(fd)
            os.close(fd)

    def worker(self, home, extra=None):
        """A worker (the endpoint a closed port) spawned as processes.spawn does: its key in a secrets pipe
        at the number STIGMER_SECRETS_FD names; (child, our end of its stdin)."""
        secrets_fd = stigmer_secrets.secrets_pipe({"ANTHROPIC_API_KEY": FAKE_KEY})
        env = dict(self.env, STIGMER_HOME=os.path.join(self.tmp, home), STIGMER_BACKEND_ENDPOINT="127.0.0.1:9",
                   PYTHONUNBUFFERED="1", STIGMER_SECRETS_FD=str(secrets_fd))
        try:
            return self.spawn(["worker", "--exit-with-stdin"], env, extra={secrets_fd: secrets_fd, **(extra or {})},
                              pipe=True)
        finally:
            os.close(secrets_fd)

    def output(self):
        with open(self.log) as f:
            return f.read()


class ForkTest(ServerCase):

    def test_a_child_is_the_process_the_caller_would_have_started(self):
        self.up()
        server = server_pid(self.path)
        self.assertIsNotNone(server)
        lock_path = os.path.join(self.tmp, "worker.pid")
        lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        workspace = os.path.join(self.tmp, "ws")
        os.mkdir(workspace)
        old_umask = os.umask(0o027)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 200), hard))
        try:
            child, stdin = self.worker("home", extra={lock: lock})
        finally:
            os.umask(old_umask)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(lock)  # the child holds it now, and only the child
        self.assertIsNotNone(child)
        wait_for(lambda: "stigmer worker" in self.output(), what="the worker's banner")
        self.assertIn("endpoint 127.0.0.1:9", self.output())  # the caller's environment, not the server's
        self.assertEqual(parent_of(child.pid), server)  # forked, not started
        self.assertEqual(os.listdir(f"/proc/{server}/task"), [str(server)])  # from a process of one thread
        self.assertEqual(session_of(child.pid), child.pid)  # a session of its own
        self.assertEqual(os.readlink(f"/proc/{child.pid}/cwd"), os.getcwd())
        with open(f"/proc/{server}/environ", "rb") as f:  # the key came in the pipe, and never reached the server
            self.assertNotIn(FAKE_KEY.encode(), f.read())
        self.assertEqual(umask_of(child.pid), 0o027)
        self.assertEqual(resource.prlimit(child.pid, resource.RLIMIT_NOFILE)[0], min(soft, 200))
        fds = {int(n): os.readlink(f"/proc/{child.pid}/fd/{n}") for n in os.listdir(f"/proc/{child.pid}/fd")}
        self.assertEqual(fds[1], self.log)
        self.assertEqual(fds[lock], lock_path)  # at the number it had here
        probe = os.open(lock_path, os.O_RDWR)
        self.addCleanup(os.close, probe)
        with self.assertRaises(BlockingIOError):  # the child's lock, not released by the server's copy
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.assertIsNone(child.poll())
        self.eof(stdin)  # EOF: the worker leaves, as when its CLI goes
        self.assertEqual(child.wait(30), 0)
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once it is gone
        self.assertTrue(pid_alive(server))

    def test_exit_status_signals_and_timeouts_are_popens(self):
        self.up()
        child = self.spawn(["status", "--no-such-flag"])
        self.assertEqual(child.wait(30), 2)  # a usage error
        self.assertIn("unrecognized arguments: --no-such-flag", self.output())
        child, _ = self.worker("h2")
        with self.assertRaises(subprocess.TimeoutExpired):
            child.wait(0.2)
        child.kill()
        self.assertEqual(child.wait(30), -signal.SIGKILL)
        self.assertEqual(child.poll(), -signal.SIGKILL)
        child.terminate()  # after its end: nothing to signal, no error

    def test_a_worker_given_a_key_in_its_environment_moves_it_out_as_when_started(self):
        self.up()
        server = server_pid(self.path)
        env = dict(self.env, STIGMER_HOME=self.tmp + "/h3", STIGMER_BACKEND_ENDPOINT="127.0.0.1:9",
                   ANTHROPIC_API_KEY=FAKE_KEY)
        child, stdin = self.spawn(["worker", "--exit-with-stdin"], env, pipe=True)
        wait_for(lambda: "stigmer worker" in self.output(), what="the worker's banner")
        # It executed itself again (the same pid) as `runner.py worker`, the key in a pipe, not the server again.
        with open(f"/proc/{child.pid}/cmdline", "rb") as f:
            self.assertEqual(f.read().split(b"\0")[1:3], [os.path.join(HERE, "runner.py").encode(), b"worker"])
        for pid in (child.pid, server):
            with open(f"/proc/{pid}/environ", "rb") as f:
                self.assertNotIn(FAKE_KEY.encode(), f.read())
        self.eof(stdin)
        self.assertEqual(child.wait(30), 0)

    def test_a_bad_request_is_refused_and_the_server_serves_on(self):
        self.up()
        for junk in (b"\x00\x00\x00\x05{oops", b"\x7f\xff\xff\xff", json.dumps({"args": []}).encode(), b""):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(10)
                conn.connect(self.path)
                conn.sendall(junk)
                conn.shutdown(socket.SHUT_WR)
                self.assertEqual(conn.recv(100), b"")  # closed, nothing forked
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:  # two fds sent for one number
            conn.settimeout(10)
            conn.connect(self.path)
            body = json.dumps({"args": ["--version"], "env": {}, "cwd": "/", "umask": 0o22, "fds": [1]}).encode()
            socket.send_fds(conn, [forkserver._HEADER.pack(len(body)) + body], [1, 2])
            self.assertEqual(conn.recv(100), b"")
        child = self.spawn(["--version"])
        self.assertEqual(child.wait(30), 0)
        self.assertIn("stigmer", self.output())

    def test_the_markers_are_the_sandboxs(self):  # forkserver imports no module of ours: it names them itself
        self.assertEqual(forkserver.MARKERS, (sandbox.RUN_MARKER, sandbox.EXECUTION_MARKER))

    def test_the_directory_and_socket_are_private(self):
        self.up()
        folder = os.path.dirname(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(folder).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode) & 0o077, 0)


RAW = """
import json, os, socket, sys
import forkserver
path, go, out = sys.argv[1:4]
log = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
body = json.dumps({"args": ["--version"], "env": {"PATH": "/usr/bin:/bin"}, "cwd": "/", "umask": 0o22,
                   "fds": [1, 2]}).encode()
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
    conn.settimeout(20)
    conn.connect(path)
    socket.send_fds(conn, [forkserver._HEADER.pack(len(body)) + body], [log, log])
    try:
        reply, fds, _, _ = socket.recv_fds(conn, 4096, 1)
    except ConnectionResetError:  # closed with the request unread
        reply = b""
    if not reply:
        print("refused")
    else:
        print("forked", json.loads(reply)["pid"], flush=True)
        if go == "go":
            conn.sendall(forkserver.GO)
            conn.recv(100)  # its exit status
"""


class CallerTest(ServerCase):
    """Who may have a child forked: not a confined process (it would get out of its confinement), not an agent's
    command (its sweep could not find what it starts), and no twin for a caller that gave up."""

    def raw(self, go="go", env=None, wrap=()):
        out = tempfile.mktemp(prefix=f"raw-{go}-", dir=self.tmp)
        done = subprocess.run([*wrap, sys.executable, "-c", RAW, self.path, go, out], env=env or self.env, cwd=HERE,
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)

        def output():  # what the child wrote, read when asked
            with open(out) as f:
                return f.read()
        return done.stdout.split(), output

    def test_a_plain_caller_gets_its_child_and_one_that_leaves_gets_none(self):
        self.up()
        reply, output = self.raw("go")
        self.assertEqual(reply[0], "forked")
        self.assertIn("stigmer", output())  # the control: the same request, from a plain process, runs
        reply, output = self.raw("leave")  # it has the pid, and says no go
        self.assertEqual(reply[0], "forked")
        wait_for(lambda: not pid_alive(int(reply[1])), what="the child that got no go gone")
        self.assertEqual(output(), "")  # it never ran

    def test_an_agents_command_is_refused(self):
        self.up()
        reply, output = self.raw(env=dict(self.env, STIGMER_SANDBOX_RUN="0123456789abcdef"))
        self.assertEqual((reply, output()), (["refused"], ""))

    def test_a_confined_process_is_refused(self):
        if sandbox.confinement_problem():
            self.skipTest(f"bwrap cannot run here: {sandbox.confinement_problem()}")
        self.up()
        wrap = sandbox.bwrap_argv(self.tmp, "workspace-write", ["true"])[:-1]  # its socket is in the workspace
        reply, output = self.raw(wrap=wrap)
        self.assertEqual((reply, output()), (["refused"], ""))


class FallbackTest(ServerCase):
    """When the server cannot be used, spawn says so (None) and the caller starts the process as before."""

    def test_off_unsafe_or_stale_means_none_and_a_stale_socket_is_replaced(self):
        self.assertIsNone(self.spawn(["--version"], dict(self.env, STIGMER_FORKSERVER="0")))
        self.assertEqual(os.listdir(os.path.dirname(self.path)), [])  # off: no server started
        unsafe = tempfile.mkdtemp(prefix="stigmer-fs-unsafe-")
        self.addCleanup(shutil.rmtree, unsafe)
        folder = os.path.join(unsafe, f"stigmer-{os.getuid()}")
        os.mkdir(folder, 0o755)
        os.chmod(folder, 0o755)
        self.assertIsNone(forkserver.socket_path(dict(self.env, TMPDIR=unsafe)))
        self.assertIsNone(self.spawn(["--version"], dict(self.env, TMPDIR=unsafe)))
        self.assertEqual(os.listdir(folder), [])  # nothing started there
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:  # a socket file nobody listens on
            dead.bind(self.path)
        child = self.up()  # refused at first: a server is started, replaces it, and forks
        self.assertEqual(child.returncode, 0)
        self.assertIn("stigmer", self.output())


OUT_OF_DATE = """
import json, os, sys, time
import forkserver
env = dict(os.environ)
def up():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        child = forkserver.spawn(["--version"], env, {0: 0, 1: 2, 2: 2})
        if child is not None:
            return child.wait(30)
        time.sleep(0.05)
first = up()
path = forkserver.socket_path(env)
os.utime(os.path.join(os.path.dirname(forkserver.__file__), "secrets.py"), ns=(1, 1))
refused = forkserver.spawn(["--version"], env, {0: 0, 1: 2, 2: 2})
gone = not os.path.exists(path)
print(json.dumps({"first": first, "refused": refused is None, "gone": gone, "again": up()}))
"""


class OutOfDateTest(unittest.TestCase):
    """The server imported this checkout's secrets.py with the SDKs (it shadows the standard module, as in every
    worker): once that file changes, it forks no more, and a new server takes over."""

    def test_a_changed_module_retires_the_server(self):
        copy = tempfile.mkdtemp(prefix="stigmer-fs-copy-")
        self.addCleanup(shutil.rmtree, copy, ignore_errors=True)
        for name in os.listdir(HERE):
            if name.endswith(".py"):
                shutil.copy2(os.path.join(HERE, name), copy)
        env = dict(os.environ, TMPDIR=copy)
        env.pop("STIGMER_FORKSERVER", None)
        self.addCleanup(lambda: [os.kill(p, signal.SIGTERM) for p in map(server_pid, self.paths(copy)) if p])
        out = subprocess.run([sys.executable, "-c", OUT_OF_DATE], cwd=copy, env=env, capture_output=True, text=True,
                             timeout=180)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout), {"first": 0, "refused": True, "gone": True, "again": 0})

    @staticmethod
    def paths(copy):
        folder = os.path.join(copy, f"stigmer-{os.getuid()}")
        return [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".sock")] \
            if os.path.isdir(folder) else []


class IdleTest(ServerCase):
    idle = "3"

    def test_it_leaves_when_idle_but_not_while_a_child_lives(self):
        self.up()
        server = server_pid(self.path)
        child, stdin = self.worker("h")
        wait_for(lambda: "stigmer worker" in self.output(), what="the worker up")
        deadline = time.monotonic() + 4  # past the idle period: the server stays for its child
        wait_for(lambda: time.monotonic() > deadline or not pid_alive(server), what="the idle period over")
        self.assertTrue(pid_alive(server))
        self.eof(stdin)
        self.assertEqual(child.wait(30), 0)  # and it still reports the exit
        wait_for(lambda: not pid_alive(server), timeout=30, what="the idle server gone")
        self.assertFalse(os.path.exists(self.path))


class RunTest(CliCase):
    """Through the CLI: a run's worker is forked once the server is up, gets its secret through the pipe, and
    no process's environment block holds it."""
    share_home = False
    SECRET = "ghp_forkedworkersecret0123456789"
    script = [tool_step(("execute", {"command": "echo \"${#GH_TOKEN}\"; touch started; "
                                                "while [ ! -e go ]; do sleep 0.05; done"})), text_step("Done.")] * 3

    def test_a_runs_worker_is_forked_and_gets_its_secret(self):
        tmp = tempfile.mkdtemp(prefix="stigmer-fs-")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        env = dict(self.env, TMPDIR=tmp, STIGMER_KEEP_WARM="0", GH_TOKEN=self.SECRET)
        path = forkserver.socket_path(env)
        self.addCleanup(lambda: server_pid(path) and os.kill(server_pid(path), signal.SIGTERM))
        open(os.path.join(self.workspace, "go"), "w").close()
        first = self.cli("--sandbox-mode", "full-access", "start the server", env=env)
        self.assertEqual(first.returncode, 0, first.stderr)
        wait_for(lambda: server_pid(path), timeout=60, what="the server started by the first run")
        wait_for(lambda: os.path.exists(path), timeout=60, what="the server listening")
        for name in ("started", "go"):
            os.remove(os.path.join(self.workspace, name))
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "--json", "--secret", "GH_TOKEN",
                                 "--sandbox-mode", "full-access", "count it"], env=env, cwd=self.workspace,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(proc.kill)
        wait_for(lambda: os.path.exists(os.path.join(self.workspace, "started")), what="the command running")
        server = server_pid(path)
        kids = [int(e) for e in os.listdir("/proc") if e.isdigit() and pid_alive(int(e)) and
                _parent(int(e)) == server]
        self.assertEqual(len(kids), 1)  # the run's worker, forked
        for pid in (server, kids[0]):
            with open(f"/proc/{pid}/environ", "rb") as f:
                self.assertNotIn(self.SECRET.encode(), f.read())
        open(os.path.join(self.workspace, "go"), "w").close()
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0, err)
        results = [json.loads(line) for line in out.splitlines() if '"tool_result"' in line]
        self.assertEqual(results[0]["output"].split()[0], str(len(self.SECRET)))  # the secret reached its shell


def _parent(pid):
    try:
        return parent_of(pid)
    except OSError:
        return None


if __name__ == "__main__":
    unittest.main()
