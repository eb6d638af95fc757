"""End-to-end tests of runner.py: the CLI as a subprocess, a real daemon and worker, the real
anthropic SDK against the fake Messages API on loopback (testsupport.FakeAnthropic).

    python -m unittest test_runner -v
"""
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import commands
import processes
import runner
import stigmer_pb2 as pb
from contract import BackendError
from testsupport import (FAKE_KEY, HERE, FakeAnthropic, assert_one_line, files_containing, free_port, pid_alive, reap,
                         run_cli, run_workers, running, sleep_tag, stop_home, text_step, tool_step, wait_for)
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

KEY_VARS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "OPENAI_API_KEY", "STIGMER_SANDBOX_SECRETS", "MODE", "ENV",
            "STIGMER_MODEL", "SANDBOX_ROOT_DIR", "NO_COLOR", "STIGMER_SANDBOX", "DAYTONA_API_KEY")


class CliCase(unittest.TestCase):
    """A workspace per test; a STIGMER_HOME (with its daemon), a user's HOME, a daemon port and a fake model per
    class, shared by its tests: the fake starts each test over with the test's script, and what a test left
    running is cancelled after it. So a test's runs find the worker the class's previous run left warm, as a
    user's next run does, instead of each paying a cold start. The classes of a module that testsupport_parallel
    runs in one process (share_process: the module's name by default) share that home too. A class whose tests
    need a home, daemon or fake of their own (they break, stop or inspect them) sets `fresh = True`: then each
    test gets all of it; one whose tests only need the class's home to themselves sets `share_home = False`."""

    script = [text_step("nothing to do")]
    fresh = False
    share_home = True  # False: a home of the class's own (its tests count what the home holds, or use its port)
    _process_home = []  # the fixture this process's classes share (one list for all subclasses)

    @classmethod
    def share_process(cls):
        """The key under which testsupport_parallel runs this class in one process with others (their home
        shared), or None."""
        return cls.__module__ if cls.share_home and not cls.fresh else None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if cls.fresh:
            cls.shared = None
        elif cls.share_process() is None:  # a home of the class's own
            cls.shared = cls.fixture()
            cls.addClassCleanup(cls.release, *cls.shared)
        else:  # the home of the classes run in this process (released when the module's tests are done)
            if not CliCase._process_home:
                CliCase._process_home.append(cls.fixture())
                unittest.addModuleCleanup(lambda: cls.release(*CliCase._process_home.pop()))
            cls.shared = CliCase._process_home[0]

    @classmethod
    def fixture(cls):
        """(directory, fake model, environment) of a home, a user's HOME and a daemon port."""
        tmp = tempfile.mkdtemp(prefix="stigmer-test-")
        fake = FakeAnthropic(cls.script).start()
        env = {k: v for k, v in os.environ.items() if k not in KEY_VARS}
        env.update(STIGMER_HOME=os.path.join(tmp, "home"), STIGMER_BACKEND_ENDPOINT=f"127.0.0.1:{free_port()}",
                   ANTHROPIC_BASE_URL=fake.url, ANTHROPIC_API_KEY=FAKE_KEY, STIGMER_MODEL="claude-fake",
                   HOME=os.path.join(tmp, "userhome"))
        return tmp, fake, env

    @staticmethod
    def release(tmp, fake, env):
        stop_home(env)  # cancels what a test left running
        fake.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def setUp(self):
        if self.shared:
            shared_tmp, self.fake, env = self.shared
            self.tmp = tempfile.mkdtemp(prefix="test-", dir=shared_tmp)
            self.fake.reset(self.script)
        else:
            self.tmp, self.fake, env = self.fixture()
        self.home = env["STIGMER_HOME"]
        self.workspace = os.path.join(self.tmp, "ws")
        os.makedirs(self.workspace)
        self.env = dict(env, SANDBOX_ROOT_DIR=self.workspace)

    def tearDown(self):
        if not self.shared:
            self.release(self.tmp, self.fake, self.env)
            return
        self.cancel_leftovers()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def cancel_leftovers(self):
        """Cancel what the test left pending or running on the class's daemon, and wait for the ends; after a
        `start`, stop everything, so that the class's next test finds no worker of `start`."""
        cfg = runner.Config.load(self.env)
        if any(os.path.basename(p).startswith("worker-") for p in processes.pid_files(cfg)):
            stop_home(self.env)  # the test ran `start`: the next one starts without
            return
        try:
            found = processes.find_daemon(cfg)
            if found is None:
                return
            client = found[0]
            try:
                left = [ex for phase in (pb.PENDING, pb.RUNNING) for ex in client.list(phase, 1000)]
                for ex in left:
                    client.cancel(ex.id)
                commands.wait_until_ended(client, left, timeout=30)
            finally:
                client.close()
        except (processes.CliError, BackendError):  # a test broke the home: the next test starts afresh
            stop_home(self.env)

    def cli(self, *args, env=None, timeout=90):
        return run_cli(list(args), env or self.env, timeout=timeout, cwd=self.workspace)

    def run_task(self, *args, env=None):
        """Run a task with --json; returns (CompletedProcess, events): the log's events, without the
        run object that opens the output and the summary object that closes it."""
        proc = self.cli("--json", *args, env=env)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        return proc, [obj for obj in lines if "seq" in obj]

    def logs(self, execution_id):
        """The execution's events (`logs ID --json`), whose exit code must be the execution's."""
        proc = self.cli("logs", execution_id, "--json")
        events = [json.loads(line) for line in proc.stdout.splitlines()]
        phases = [e["phase"] for e in events if e.get("kind") == "phase" and not e.get("subagent")]
        self.assertEqual(proc.returncode, {"FAILED": 1, "CANCELLED": 130}.get(phases[-1] if phases else "", 0),
                         proc.stderr)
        return events

    def assertContiguous(self, events):
        self.assertEqual([e["seq"] for e in events], list(range(1, len(events) + 1)))

    def tool_results(self, request_index):
        """The tool_result blocks the fake received in request REQUEST_INDEX's last user message."""
        return [b for b in self.fake.requests[request_index]["messages"][-1]["content"] if b["type"] == "tool_result"]


class MultiTurnTest(CliCase):
    share_home = False  # it lists the home's executions
    script = [
        tool_step(("write_file", {"path": "app/calc.py", "content": "print('sum', 2 + )\n"}), text="Writing it."),
        tool_step(("execute", {"command": "python3 app/calc.py"})),
        tool_step(("edit_file", {"path": "app/calc.py", "old_string": "2 + )", "new_string": "2 + 3)"})),
        tool_step(("execute", {"command": "python3 app/calc.py"})),
        text_step("Fixed calc.py; it prints sum 5."),
    ]

    def test_write_run_fix_run(self):
        proc, events = self.run_task("write calc.py and make it run")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with open(os.path.join(self.workspace, "app", "calc.py")) as f:
            self.assertEqual(f.read(), "print('sum', 2 + 3)\n")
        self.assertEqual(events, self.logs(events[0]["execution_id"]))  # live stream == stored log
        self.assertContiguous(events)
        kinds = [e["kind"] for e in events]
        self.assertEqual([e["phase"] for e in events if e["kind"] == "phase"], ["PENDING", "RUNNING", "COMPLETED"])
        self.assertEqual([e["name"] for e in events if e["kind"] == "tool_call"],
                         ["write_file", "execute", "edit_file", "execute"])
        results = [e for e in events if e["kind"] == "tool_result"]
        self.assertEqual([r["is_error"] for r in results], [False, True, False, False])
        self.assertIn("SyntaxError", results[1]["output"])
        self.assertIn("sum 5", results[3]["output"])
        self.assertEqual(results[3]["exit_code"], 0)
        for call, result in zip([e for e in events if e["kind"] == "tool_call"], results):
            self.assertEqual(call["id"], result["id"])
            self.assertLess(call["seq"], result["seq"])
        self.assertEqual(events[-1]["final_text"], "Fixed calc.py; it prints sum 5.")
        self.assertEqual(events[-1]["turns"], 5)
        self.assertIn("usage", kinds)
        # the model saw the failing run as an error, with its output
        self.assertTrue(self.tool_results(2)[0]["is_error"])
        self.assertIn("SyntaxError", self.tool_results(2)[0]["content"])
        # prompt caching: stable prefix and latest turn marked
        body = self.fake.requests[-1]
        self.assertEqual(body["tools"][-1]["cache_control"], {"type": "ephemeral"})
        self.assertEqual(body["system"][-1]["cache_control"], {"type": "ephemeral"})
        self.assertEqual(body["messages"][-1]["content"][-1]["cache_control"], {"type": "ephemeral"})
        marked = [b for m in body["messages"] for b in m["content"] if isinstance(b, dict) and "cache_control" in b]
        self.assertEqual(len(marked), 1)

        listed = self.cli("list", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        self.assertEqual([r["id"] for r in rows], [events[0]["execution_id"]])
        self.assertEqual(rows[0]["phase"], "COMPLETED")
        self.assertEqual(rows[0]["turns"], 5)
        table = self.cli("list")
        self.assertIn(events[0]["execution_id"], table.stdout)


class ToolErrorTest(CliCase):
    script = [
        tool_step(("read_file", {"path": "missing.txt"})),
        tool_step(("frobnicate", {"x": 1})),
        tool_step(("execute", {"cmd": 5})),
        tool_step(("execute", '{"command": ls}')),  # not JSON at all
        tool_step(("read_file", {"path": "../../etc/passwd"})),
        text_step("All five tools failed, as expected."),
    ]

    def test_tool_failures_reach_the_model_and_the_run_goes_on(self):
        proc, events = self.run_task("try some tools")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        expected = ["missing.txt", "unknown tool 'frobnicate'", "missing required field: command",
                    "not a valid JSON object", "outside the workspace"]
        for i, text in enumerate(expected, start=1):
            (result,) = self.tool_results(i)
            self.assertTrue(result["is_error"], result)
            self.assertIn(text, result["content"])
        results = [e for e in events if e["kind"] == "tool_result"]
        self.assertEqual(len(results), 5)
        self.assertTrue(all(r["is_error"] for r in results))
        self.assertEqual(events[-1]["phase"], "COMPLETED")


class ApiErrorTest(CliCase):
    script = [text_step("hello after a retry", errors=[429])]

    def test_429_once_is_retried_by_the_sdk(self):
        proc, events = self.run_task("say hello")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.fake.statuses, [(0, 429), (0, 200)])
        self.assertEqual("".join(e["text"] for e in events if e["kind"] == "text"), "hello after a retry")

    def test_401_is_a_clear_failure(self):
        env = dict(self.env, ANTHROPIC_API_KEY="sk-ant-wrong.key.0000000000")
        proc, events = self.run_task("say hello", env=env)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("ANTHROPIC_API_KEY", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertEqual(events[-1]["phase"], "FAILED")
        self.assertEqual([e["code"] for e in events if e["kind"] == "error"], ["auth"])
        self.assertNotIn("sk-ant-wrong.key.0000000000", proc.stdout + proc.stderr)


class ContextWindowTest(CliCase):
    script = [text_step("never", errors=[(400, "prompt is too long: 250000 tokens > 200000 maximum")])]

    def test_context_window_exceeded_fails_clearly(self):
        proc, events = self.run_task("a big task")
        self.assertEqual(proc.returncode, 1)
        self.assertIn("context window", events[-1]["reason"])


class LimitsTest(CliCase):
    script = [tool_step(("execute", {"command": f"echo turn {i}"})) for i in range(10)]

    def test_max_turns(self):
        proc, events = self.run_task("loop forever", "--max-turns", "3")
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(len(self.fake.requests), 3)
        self.assertEqual(events[-1]["phase"], "FAILED")
        self.assertIn("turn limit (3 turns)", events[-1]["reason"])
        self.assertIn("turn limit", proc.stderr)

    def test_max_tokens_total(self):
        proc, events = self.run_task("loop forever", "--max-tokens-total", "250")
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(len(self.fake.requests), 3)  # 120 tokens a turn: over 250 after the third
        self.assertIn("token limit", events[-1]["reason"])


class RefusalTest(CliCase):
    script = [tool_step(("execute", {"command": "touch should-not-exist"}), stop="refusal")]

    def test_refusal_runs_no_tools(self):
        proc, events = self.run_task("something bad")
        self.assertEqual(proc.returncode, 1)
        self.assertFalse(os.path.exists(os.path.join(self.workspace, "should-not-exist")))
        self.assertEqual([e for e in events if e["kind"] == "tool_result"], [])
        self.assertIn("refused", events[-1]["reason"])


def read(path):
    with open(path) as f:
        return f.read()


def rest_of_output(proc, timeout):
    """(stdout, stderr) of PROC from where its readers are to its exit: communicate() reads the pipes
    underneath the text wrappers and would lose what readline() has already buffered."""
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        err = []
        reader = threading.Thread(target=lambda: err.append(proc.stderr.read()))
        reader.start()
        out = proc.stdout.read()
        reader.join()
        proc.wait()
        return out, err[0]
    finally:
        killer.cancel()
        proc.stdout.close()
        proc.stderr.close()


class CancelTest(CliCase):
    TAG = sleep_tag()  # found on the host by its command line: a confined command's $! is its namespace's pid
    script = [tool_step(("execute", {"command": f"sleep {TAG} & echo $! > sleep.pid; wait"})),
              text_step("never reached")]

    def test_sigint_cancels_and_leaves_no_process(self):
        self.interrupt(signal.SIGINT)

    def test_sigterm_cancels_too(self):
        self.interrupt(signal.SIGTERM)

    def test_ctrl_c_before_the_agent_starts(self):
        # A worker started afresh (not forked: that takes a tenth of a second) is still importing the SDK
        # when the first event comes: the window this test needs.
        env = dict(self.env, STIGMER_FORKSERVER="0")
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "--json", "quick"], env=env,
                                cwd=self.workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
        try:
            self.assertEqual(json.loads(proc.stdout.readline())["kind"], "run")
            first = json.loads(proc.stdout.readline())  # PENDING: the worker is still importing the SDK
            proc.send_signal(signal.SIGINT)
            out, err = rest_of_output(proc, timeout=30)
        finally:
            reap(proc)
        self.assertEqual(first["phase"], "PENDING")
        self.assertEqual(proc.returncode, 130, err)
        events = [first] + [json.loads(line) for line in out.splitlines()][:-1]  # minus the summary
        self.assertEqual(events[-1]["phase"], "CANCELLED")
        self.assertContiguous(events)
        self.assertEqual(self.fake.requests, [])  # the model was never asked

    def interrupt(self, sig):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "--json", "sleep a while"],
                                env=self.env, cwd=self.workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
        try:
            sleep_pid_file = os.path.join(self.workspace, "sleep.pid")
            wait_for(lambda: os.path.exists(sleep_pid_file) and read(sleep_pid_file).strip())
            pids = running(self.TAG)  # the shell, the sleep (and the bwrap around them)
            workers = run_workers(self.home)  # the run's own worker
            self.assertEqual(len(workers), 1)
            self.assertTrue(all(pid_alive(p) for p in pids + workers))
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        self.assertEqual(proc.returncode, 130, err)
        events = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(events[-1]["phase"], "CANCELLED")
        for pid in pids + workers:
            self.assertFalse(pid_alive(pid), f"pid {pid} is still alive")
        stored = self.logs(events[0]["execution_id"])
        self.assertEqual(stored[-1]["phase"], "CANCELLED")
        self.assertContiguous(stored)


def damage(path, first_page, pages):
    """Overwrite PAGES pages of the SQLite file at PATH from page FIRST_PAGE (1-based) with random bytes."""
    with open(path, "r+b") as f:
        f.seek((first_page - 1) * 4096)
        f.write(os.urandom(4096 * pages))


class DamagedDatabaseTest(CliCase):
    script = [text_step("stored")]
    fresh = True  # it damages the database
    assertOneLine = assert_one_line

    def assert_damaged_line(self, proc):
        self.assertOneLine(proc, 1, os.path.join(self.home, "stigmer.db"), "cannot be read", "runner.py recover")

    def test_a_database_damaged_under_a_running_daemon_is_one_line_not_an_empty_answer(self):
        done = self.cli("store something")
        self.assertEqual(done.returncode, 0, done.stderr)
        execution_id = json.loads(self.cli("list", "--json").stdout.splitlines()[0])["id"]
        db = os.path.join(self.home, "stigmer.db")
        with contextlib.closing(sqlite3.connect(db)) as c:  # the log's pages into the main file, then damage them
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        damage(db, 2, 3)
        self.assert_damaged_line(self.cli("list"))
        self.assert_damaged_line(self.cli("logs", execution_id))
        listed = self.cli("list", "--json")
        self.assert_damaged_line(listed)
        self.assertEqual(json.loads(listed.stdout)["kind"], "error")
        status = self.cli("status")  # it answers from what still reads, or says the same one line
        self.assertNotIn("Traceback", status.stderr)
        self.assertLessEqual(len(status.stderr.strip().splitlines()), 1, status.stderr)
        self.assertEqual(self.cli("stop").returncode, 0)
        self.assert_damaged_line(self.cli("start"))
        self.assertOneLine(self.cli("status"), 1, "no daemon answers")  # none was started on it

    def test_recover_moves_the_file_aside_and_keeps_what_reads(self):
        import store
        os.makedirs(self.home, mode=0o700)
        db_path = os.path.join(self.home, "stigmer.db")
        db = store.open_db(db_path)
        for n in range(40):
            ex = pb.Execution(id=f"ex-{n:04d}", created_at=1000.0 + n, phase=pb.COMPLETED, last_seq=20,
                              spec=pb.ExecutionSpec(prompt=f"task {n}", workspace=self.workspace))
            events = [pb.Event(execution_id=ex.id, seq=seq, time=1000.0 + n,
                               tool_result=pb.ToolResult(id=f"t{seq}", output="x" * 900)) for seq in range(1, 21)]
            store.write(db, [store.event_row(e) for e in events], [ex])
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        pages = os.path.getsize(db_path) // 4096
        damage(db_path, pages // 2, 2)  # two pages in the middle of the events
        proc = self.cli("recover", "--json")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        report = json.loads(proc.stdout)
        self.assertTrue(os.path.exists(report["damaged_copy"]))  # kept, with a timestamp in its name
        self.assertRegex(report["damaged_copy"], r"stigmer\.db\.damaged-\d{8}-\d{6}$")
        self.assertGreater(report["executions"], 30)  # what reads is kept ...
        self.assertGreater(report["events"], 0)
        self.assertLess(report["events"], 800)  # ... and what was damaged is not invented
        with contextlib.closing(sqlite3.connect(db_path)) as c:
            self.assertEqual(c.execute("PRAGMA quick_check").fetchone()[0], "ok")
            self.assertEqual(c.execute("SELECT count(*) FROM events").fetchone()[0], report["events"])
            self.assertEqual(c.execute("SELECT count(*) FROM executions").fetchone()[0], report["executions"])
        listed = [json.loads(line) for line in self.cli("list", "--json", "--limit", "100").stdout.splitlines()]
        self.assertEqual(len(listed), report["executions"])
        self.assertEqual(self.cli("stop").returncode, 0)
        again = self.cli("recover", "--json")  # on a good file: a fresh copy of everything
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual([json.loads(again.stdout)[k] for k in ("executions", "events")],
                         [report["executions"], report["events"]])


class ForegroundDaemonLostTest(CliCase):
    script = [tool_step(("execute", {"command": "sleep 2; echo slept"})), text_step("done though the daemon died")]

    def test_a_foreground_run_starts_its_daemon_again_and_ends_with_the_real_outcome(self):
        run = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "--json", "sleep a little"],
                               env=self.env, cwd=self.workspace, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        self.addCleanup(reap, run)
        wait_for(lambda: self.fake.requests, what="the first model request")  # the sleep is under way
        daemon_pid = int(read(os.path.join(self.home, "logs", "daemon.pid")).split()[0])
        os.kill(daemon_pid, signal.SIGKILL)
        out, err = run.communicate(timeout=120)
        self.assertEqual(run.returncode, 0, err)
        self.assertIn("reconnected", err)
        self.assertNotEqual(int(read(os.path.join(self.home, "logs", "daemon.pid")).split()[0]), daemon_pid)
        summary = json.loads(out.splitlines()[-1])
        self.assertEqual((summary["kind"], summary["phase"]), ("summary", "COMPLETED"))
        events = self.logs(summary["execution_id"])
        self.assertContiguous(events)
        self.assertEqual(events[-1]["phase"], "COMPLETED")
        self.assertIn("slept", [e for e in events if e["kind"] == "tool_result"][0]["output"])


class BackgroundServicesTest(CliCase):
    share_home = False  # it counts the home's executions
    script = [tool_step(("execute", {"command": "sleep 3; echo slept"})),
              tool_step(("execute", {"command": "echo second"})),
              text_step("done after the restart")]

    def test_daemon_restart_mid_run_loses_nothing(self):
        started = self.cli("start", "--workers", "1")
        self.assertEqual(started.returncode, 0, started.stderr + started.stdout)
        daemon_pid = int(read(os.path.join(self.home, "logs", "daemon.pid")).split()[0])
        submitted = self.cli("run", "--detach", "slow task")
        self.assertEqual(submitted.returncode, 0, submitted.stderr)
        execution_id = submitted.stdout.strip()
        follower = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "logs", execution_id, "-f",
                                     "--json"], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True)
        self.addCleanup(reap, follower)
        first = follower.stdout.readline()  # the follower is connected (it has shown the first event)...
        wait_for(lambda: self.fake.requests)  # ... and the model has been asked: the sleep is under way
        os.kill(daemon_pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(daemon_pid))
        restarted = self.cli("start", "--workers", "1")
        self.assertEqual(restarted.returncode, 0, restarted.stderr)
        self.assertIn("0 started", restarted.stdout)  # the worker survived and reconnects
        deadline = threading.Timer(90, follower.kill)  # a follower that never ends fails the test, not hangs it
        deadline.start()
        self.addCleanup(deadline.cancel)
        out = follower.stdout.read()  # to its end (communicate() would skip what readline buffered)
        err = follower.stderr.read()
        follower.stdout.close()
        follower.stderr.close()
        follower.wait(timeout=60)  # it lived through the restart
        self.assertEqual(follower.returncode, 0, err)
        self.assertIn("reconnected", err)
        self.assertEqual([json.loads(line) for line in (first + out).splitlines()], self.logs(execution_id))
        events = self.logs(execution_id)
        self.assertContiguous(events)
        self.assertEqual(events[-1]["phase"], "COMPLETED")
        self.assertEqual(len({(e["seq"]) for e in events}), len(events))
        self.assertIn("slept", [e for e in events if e["kind"] == "tool_result"][0]["output"])
        status = self.cli("status", "--json")
        self.assertEqual(json.loads(status.stdout)["executions_by_phase"]["COMPLETED"], 1)
        stopped = self.cli("stop")
        self.assertIn("stopped 2", stopped.stdout)
        self.assertFalse(pid_alive(daemon_pid))


class CancelAfterRestartTest(CliCase):
    script = [tool_step(("execute", {"command": "sleep 60"})), text_step("never")]

    def test_ctrl_c_after_the_daemon_restarted_still_cancels(self):
        self.assertEqual(self.cli("start").returncode, 0)
        daemon_pid = int(read(os.path.join(self.home, "logs", "daemon.pid")).split()[0])
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "--json", "wait"], env=self.env,
                                cwd=self.workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
        self.addCleanup(reap, proc)
        wait_for(lambda: self.fake.requests)  # the sleep is under way
        os.kill(daemon_pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(daemon_pid))
        self.assertEqual(self.cli("start").returncode, 0)  # a new daemon, with a new token
        line = ""
        while "reconnected" not in line:
            line = proc.stderr.readline()
            self.assertTrue(line, "the CLI never reconnected")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 130, err)
        self.assertNotIn("could not cancel", err)
        self.assertEqual(json.loads(out.splitlines()[-1])["phase"], "CANCELLED")


class SecretsTest(CliCase):
    GITHUB = "ghp_thisIsAFakeGithubToken123"
    script = [tool_step(("execute", {"command": "echo key=[$ANTHROPIC_API_KEY] gh=$GITHUB_TOKEN; sleep 1"})),
              text_step("done")]

    def test_keys_appear_nowhere(self):
        env = dict(self.env, GITHUB_TOKEN=self.GITHUB)
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "--json", "--secret", "GITHUB_TOKEN",
                                 "print the env"], env=env, cwd=self.workspace, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        argv_hits = []
        while proc.poll() is None:  # while it runs, no process carries a secret in its argv
            for entry in os.listdir("/proc"):
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        cmdline = f.read()
                except OSError:
                    continue
                if FAKE_KEY.encode() in cmdline or self.GITHUB.encode() in cmdline:
                    argv_hits.append(entry)
            time.sleep(0.05)
        out, err = proc.communicate()
        self.assertEqual(proc.returncode, 0, err)
        self.assertEqual(argv_hits, [])
        (result,) = [json.loads(line) for line in out.splitlines() if '"tool_result"' in line]
        self.assertIn("key=[]", result["output"])  # the model key is not in the agent's shell
        self.assertIn("gh=[REDACTED:GITHUB_TOKEN]", result["output"])  # the named secret is, redacted
        self.assertIn("[REDACTED:GITHUB_TOKEN]", self.tool_results(1)[0]["content"])  # the model saw it redacted
        for secret in (FAKE_KEY, self.GITHUB):
            self.assertNotIn(secret, out + err)
            self.assertNotIn(secret, json.dumps(self.fake.requests))
            self.assertEqual(files_containing(secret, self.home, self.workspace, os.path.join(self.tmp, "userhome")), [])


class TerminalTest(CliCase):
    script = [tool_step(("execute", {"command": "printf 'one\\ntwo\\nthree\\nfour\\nfive\\nsix\\n'"}),
                        text="Listing things."),
              text_step("All done here.", usage={"cache_read": 300, "input": 100})]

    def run_on_pty(self, env):
        """Run a task with stdout and stderr on a pseudo-terminal; returns (exit code, what the terminal got)."""
        import pty
        main_fd, sub_fd = pty.openpty()
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "show me"], env=env,
                                cwd=self.workspace, stdin=subprocess.DEVNULL, stdout=sub_fd, stderr=sub_fd)
        os.close(sub_fd)
        chunks = []
        while True:
            try:
                data = os.read(main_fd, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        os.close(main_fd)
        return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")

    def test_live_view_and_summary(self):
        code, screen = self.run_on_pty(self.env)
        self.assertEqual(code, 0, screen)
        for text in ("Listing things.", "execute", "one", "four", "2 more lines", "All done here.", "completed",
                     "2 turns", "cache 300 read (60% of input)"):
            self.assertIn(text, screen)
        self.assertNotIn("    five", screen)  # the preview shows 4 lines
        self.assertNotIn('"kind"', screen)  # a terminal gets the live view, not JSON
        self.assertIn("\033[", screen)

    def test_no_color(self):
        code, screen = self.run_on_pty(dict(self.env, NO_COLOR="1"))
        self.assertEqual(code, 0, screen)
        self.assertIn("completed", screen)
        self.assertNotIn("\033[", screen)


class CliErrorTest(CliCase):
    share_home = False  # it makes and breaks the home
    assertOneLine = assert_one_line

    def test_missing_workspace(self):
        self.assertOneLine(self.cli("run", "x", "--workspace", "/nonexistent/dir"), 2, "/nonexistent/dir")

    def test_missing_key_without_terminal(self):
        env = {k: v for k, v in self.env.items() if k != "ANTHROPIC_API_KEY"}
        proc = subprocess.run([sys.executable, os.path.join(HERE, "runner.py"), "do it"], env=env, cwd=self.workspace,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                              start_new_session=True)  # no controlling terminal at all
        self.assertOneLine(proc, 2, "ANTHROPIC_API_KEY")

    def test_dead_daemon(self):
        os.makedirs(self.home)
        with open(os.path.join(self.home, "daemon.token"), "w") as f:
            f.write("stale")
        self.assertOneLine(self.cli("status"), 1, "no daemon answers", self.env["STIGMER_BACKEND_ENDPOINT"])
        self.assertOneLine(self.cli("cancel", "ex-123"), 1, "no daemon answers")

    def test_unknown_execution(self):
        self.cli("start")
        self.assertOneLine(self.cli("logs", "ex-does-not-exist"), 1, "ex-does-not-exist")
        self.assertOneLine(self.cli("cancel", "ex-does-not-exist"), 1, "ex-does-not-exist")

    def test_modes(self):
        self.assertOneLine(self.cli("x", env=dict(self.env, MODE="cloud")), 2, "MODE=cloud needs REDIS_URL")
        self.assertOneLine(self.cli("list", env=dict(self.env, MODE="banana")), 2, "MODE='banana'")

    def test_local_mode_needs_no_cloud_settings(self):
        env = {k: v for k, v in self.env.items() if not k.startswith(("REDIS", "DAYTONA"))}
        proc, events = self.run_task("hi", env=dict(env, MODE="local", ENV="production"))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("REDIS", proc.stderr + proc.stdout)
        self.assertNotIn("DAYTONA", proc.stderr + proc.stdout)

    def test_help_and_version(self):
        proc = self.cli("--help")
        self.assertEqual(proc.returncode, 0)
        self.assertIn('python runner.py "make the failing test pass"', proc.stdout)
        self.assertIn("logs", proc.stdout)
        self.assertEqual(self.cli("--version").stdout.strip(), f"stigmer {runner.VERSION}")
        self.assertEqual(self.cli("run", "--max-turns", "many", "x").returncode, 2)


class ConfigTest(unittest.TestCase):
    """Config read from an environment."""


if __name__ == "__main__":
    unittest.main()
