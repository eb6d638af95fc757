"""The CLI as Claude Code and Codex users expect it (issue 10), each case through `python runner.py`
as a subprocess: typo refusals, stdin prompts, text when piped and JSON with --json, the agent's
environment, STIGMER_MODE / STIGMER_ENV, `stop` and `status` telling the truth, and the fixed messages.

    python -m unittest test_cli -v
"""
import fcntl
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import threading
import unittest

import processes
import runner
import sandbox
from test_runner import CliCase, read
from testsupport import (FAKE_KEY, HERE, PongServer, assert_one_line, files_containing, pid_alive, reap, run_cli,
                         run_workers, text_step, tool_step, wait_for)
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

RUNNER = os.path.join(HERE, "runner.py")


def first_prompt(fake):
    """The text of the first user message the fake model received."""
    return fake.requests[0]["messages"][0]["content"][0]["text"]


class Pty:
    """A child on a pseudo-terminal (its controlling terminal too); collects what it writes."""

    def __init__(self, args, env, cwd):
        self.main_fd, sub_fd = pty.openpty()

        def controlling_terminal():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen([sys.executable, RUNNER, *args], env=env, cwd=cwd, stdin=sub_fd, stdout=sub_fd,
                                     stderr=sub_fd, preexec_fn=controlling_terminal)
        os.close(sub_fd)
        self.chunks = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            try:
                data = os.read(self.main_fd, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            with self.lock:
                self.chunks.append(data)

    @property
    def screen(self):
        with self.lock:
            return b"".join(self.chunks).decode("utf-8", "replace")

    def type(self, text):
        os.write(self.main_fd, text.encode())

    def wait(self, timeout=90):
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        os.close(self.main_fd)
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()


class TypoTest(CliCase):
    script = [text_step("ran it on purpose")]

    def test_near_miss_of_a_command_is_refused_before_any_key_prompt_or_model_call(self):
        untouched = os.path.join(self.tmp, "untouched-home")  # nothing may be stored, nor the home made
        no_key = {k: v for k, v in self.env.items() if k != "ANTHROPIC_API_KEY"}
        no_key["STIGMER_HOME"] = untouched
        for args, command in ((["stauts"], "status"), (["lst", "--json"], "list"), (["--json", "lst"], "list"),
                              (["stat"], "status"), (["cancle"], "cancel")):
            proc = self.cli(*args, env=no_key)
            self.assertEqual(proc.returncode, 2, (args, proc.stderr))
            self.assertIn(f"did you mean `{command}`?", proc.stderr)
            self.assertNotIn("ANTHROPIC_API_KEY", proc.stderr)  # refused before the key was looked for
            self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
        self.assertEqual(self.fake.requests, [])
        self.assertFalse(os.path.exists(os.path.join(untouched, "stigmer.db")))  # nothing was submitted

    def test_run_word_or_double_dash_runs_it_on_purpose(self):
        for args in (["run", "stauts"], ["--", "stauts"]):
            proc = self.cli(*args)
            self.assertEqual(proc.returncode, 0, (args, proc.stderr))
            self.assertIn("ran it on purpose", proc.stdout)
        self.assertEqual([body["messages"][0]["content"][0]["text"] for body in self.fake.requests],
                         ["stauts", "stauts"])

    def test_ordinary_one_word_tasks_still_run(self):
        proc = self.cli("refactor")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(first_prompt(self.fake), "refactor")

    def test_a_command_after_a_flag_is_still_the_command(self):
        proc = self.cli("--json", "list")  # as `list --json`: the executions, or "no executions yet" as a JSON error
        rows = [json.loads(line) for line in proc.stdout.splitlines()]
        if proc.returncode == 1:
            self.assertEqual([row["kind"] for row in rows], ["error"])
            self.assertIn("no executions yet", rows[0]["message"])
        else:
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertTrue(all(row["id"].startswith("ex-") for row in rows), rows)
        first = json.loads(self.cli("--json", "hello").stdout.splitlines()[0])["execution_id"]
        proc = self.cli("--json", "resume", first, "and more")  # not a task "resume ex-… and more"
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(json.loads(proc.stdout.splitlines()[0])["prompt"], "and more")
        proc = self.cli("--model", "claude-fake", "list")  # an option with a value first: say where it goes
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertIn("it is a command: put it before its options", proc.stderr)
        self.assertEqual(len(self.fake.requests), 2)

    def test_near_miss(self):
        self.assertEqual(runner.near_miss("stauts"), "status")
        self.assertEqual(runner.near_miss("lst"), "list")
        self.assertEqual(runner.near_miss("st"), "status")  # a prefix
        self.assertIsNone(runner.near_miss("refactor"))
        self.assertIsNone(runner.near_miss("-"))


class StdinPromptTest(CliCase):
    script = [text_step("read it")]

    def test_prompt_from_piped_stdin(self):
        proc = self.cli(input="summarise the project\n")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(first_prompt(self.fake), "summarise the project")

    def test_dash_reads_stdin(self):
        proc = run_cli(["-", "--max-turns", "3"], self.env, cwd=self.workspace, input="fix the test\n", timeout=90)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(first_prompt(self.fake), "fix the test")

    def test_task_with_piped_stdin_gets_it_as_context(self):
        proc = self.cli("explain this log", input="ERROR: disk full\n")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(first_prompt(self.fake), "explain this log\n\nERROR: disk full")

    def test_empty_prompt_is_a_usage_error(self):
        for args, stdin in (([], "  \n"), (["-"], ""), ([""], None)):
            proc = self.cli(*args, input=stdin) if stdin is not None else self.cli(*args)
            self.assertEqual(proc.returncode, 2, (args, proc.stderr))
            self.assertIn("the prompt is empty", proc.stderr)
        self.assertEqual(self.fake.requests, [])

    def cli(self, *args, env=None, timeout=90, input=None):
        return run_cli(list(args), env or self.env, timeout=timeout, cwd=self.workspace, input=input)


class OutputTest(CliCase):
    script = [tool_step(("execute", {"command": "echo hello"}), text="Checking."), text_step("All done.")]

    def test_text_when_piped(self):
        proc = self.cli("say hello")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn('"kind"', proc.stdout)
        for text in ("Checking.", "execute", "echo hello", "All done.", "completed", "2 turns"):
            self.assertIn(text, proc.stdout + proc.stderr)
        self.assertNotIn("\033[", proc.stdout + proc.stderr)  # no colour and no spinner in a file or pipe
        self.assertNotIn("working…", proc.stderr)
        execution_id = proc.stderr.split("· ")[-1].strip()
        self.assertTrue(execution_id.startswith("ex-"), proc.stderr)
        logs = self.cli("logs", execution_id)
        self.assertEqual(logs.returncode, 0, logs.stderr)
        self.assertIn("All done.", logs.stdout)
        self.assertNotIn('"kind"', logs.stdout)
        self.assertIn("✓ completed", logs.stdout)  # a replay ends as the live view did
        self.assertRegex(logs.stdout, r"2 turns · .* · " + execution_id)
        listed = self.cli("list")
        self.assertIn(execution_id, listed.stdout)
        self.assertNotIn("{", listed.stdout)

    def test_json_starts_with_the_run_and_ends_with_a_summary(self):
        proc = self.cli("--json", "say hello")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        run, summary, events = lines[0], lines[-1], lines[1:-1]
        self.assertEqual(run["kind"], "run")
        self.assertEqual((run["model"], run["workspace"], run["mode"]),
                         ("anthropic/claude-fake", self.workspace, "local"))  # the record names the provider
        self.assertEqual(run["execution_id"], events[0]["execution_id"])
        self.assertEqual(summary["kind"], "summary")
        self.assertEqual((summary["phase"], summary["turns"], summary["final_text"], summary["error"]),
                         ("COMPLETED", 2, "All done.", ""))
        self.assertEqual(summary["usage"]["output_tokens"], 40)
        self.assertGreater(summary["duration_s"], 0)
        self.assertTrue(all("seq" in e for e in events))
        self.assertEqual(events, self.logs(run["execution_id"]))  # between them: exactly the log

    def test_listing_commands_have_json(self):
        self.assertEqual(self.cli("say hello").returncode, 0)
        rows = [json.loads(line) for line in self.cli("list", "--json").stdout.splitlines()]
        self.assertEqual(rows[0]["phase"], "COMPLETED")
        events = [json.loads(line) for line in self.cli("logs", rows[0]["id"], "--json").stdout.splitlines()]
        self.assertEqual(events[-1]["phase"], "COMPLETED")
        self.assertEqual(self.cli("start").returncode, 0)
        text = self.cli("status")
        self.assertIn("runners connected", text.stdout)
        status = json.loads(self.cli("status", "--json").stdout)
        self.assertEqual(status["started_by"], "foreground run")  # `start` found the daemon "say hello" started


class LiveOutputTest(CliCase):
    script = [tool_step(("execute", {"command": "echo first; echo token=$LIVE_TOKEN; echo oops >&2; "
                                                "while [ ! -e release ]; do sleep 0.05; done; echo second"})),
              text_step("Released.")]
    TOKEN = "live-output-secret-6f1d2a"

    def test_a_commands_output_arrives_while_it_still_runs(self):
        run = subprocess.Popen([sys.executable, RUNNER, "--json", "--secret", "LIVE_TOKEN", "wait for the release"],
                               env=dict(self.env, LIVE_TOKEN=self.TOKEN),
                               cwd=self.workspace, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        self.addCleanup(reap, run)
        seen = []
        while not any(e.get("kind") == "output" and e["stream"] == "stdout" for e in seen):
            line = run.stdout.readline()
            self.assertTrue(line, "the run ended before any output event")
            seen.append(json.loads(line))
        self.assertEqual([e for e in seen if e.get("kind") == "tool_result"], [])  # the command still runs
        self.assertIn("first", [e for e in seen if e.get("kind") == "output"][0]["text"])
        open(os.path.join(self.workspace, "release"), "w").close()
        deadline = threading.Timer(90, run.kill)  # a run that never ends fails the test, not hangs it
        deadline.start()
        self.addCleanup(deadline.cancel)
        out = run.stdout.read()  # to its end (communicate() would skip what readline buffered)
        err = run.stderr.read()
        run.stdout.close()
        run.stderr.close()
        self.assertEqual(run.wait(timeout=60), 0, err)
        events = seen + [json.loads(line) for line in out.splitlines()]
        call_id = next(e["id"] for e in events if e.get("kind") == "tool_call")
        live = [e for e in events if e.get("kind") == "output"]
        self.assertEqual({e["call_id"] for e in live}, {call_id})
        self.assertEqual("".join(e["text"] for e in live if e["stream"] == "stdout"),
                         "first\ntoken=[REDACTED:LIVE_TOKEN]\nsecond\n")  # redacted like every event
        self.assertNotIn(self.TOKEN, json.dumps(events))
        self.assertEqual("".join(e["text"] for e in live if e["stream"] == "stderr"), "oops\n")
        result = next(e for e in events if e.get("kind") == "tool_result")
        self.assertIn("second", result["output"])  # what the model sees is the whole output, as before
        # every watcher follows them: the log holds them, and the text replay shows them under the tool line
        self.assertEqual([e for e in self.logs(result["execution_id"]) if e["kind"] == "output"], live)
        replay = self.cli("logs", result["execution_id"])
        self.assertIn("│ first", replay.stdout)
        self.assertIn("│ second", replay.stdout)


class FullOutputTest(CliCase):
    script = [tool_step(("execute", {"command": "seq 1 10 | sed 's/^/line /'"})), text_step("Counted.")]

    def test_full_and_verbose_show_tool_output_whole(self):
        proc = self.cli("count to ten")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("… 6 more lines", proc.stdout)
        self.assertNotIn("line 10", proc.stdout)
        execution_id = proc.stderr.split("· ")[-1].strip()
        short, full = self.cli("logs", execution_id), self.cli("logs", execution_id, "--full")
        self.assertIn("… 6 more lines", short.stdout)
        self.assertIn("line 10", full.stdout)
        self.assertNotIn("more lines", full.stdout)
        verbose = self.cli("run", "--verbose", "count again")
        self.assertIn("line 10", verbose.stdout)


@unittest.skipUnless(shutil.which("git"), "git is not installed")
class LocalPatchTest(CliCase):
    script = [tool_step(("execute", {"command": "echo changed >> README && printf 'new\\n' > added.txt"})),
              text_step("Changed two files.")]

    def git(self, *args, cwd=None):
        done = subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
                              cwd=cwd or self.workspace, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def test_a_local_run_in_a_git_checkout_records_its_patch(self):
        with open(os.path.join(self.workspace, "README"), "w") as f:
            f.write("the project\n")
        self.git("init", "-q")
        self.git("add", "README")
        self.git("commit", "-qm", "start")
        with open(os.path.join(self.workspace, "mine.txt"), "w") as f:
            f.write("the user's own change, from before the run\n")
        proc = self.cli("change two files")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("⎘ patch", proc.stdout + proc.stderr)
        execution_id = proc.stderr.split("· ")[-1].strip()
        patch = self.cli("logs", execution_id, "--patch")
        self.assertEqual(patch.returncode, 0, patch.stderr)
        self.assertIn("+changed", patch.stdout)
        self.assertIn("added.txt", patch.stdout)
        self.assertNotIn("mine.txt", patch.stdout)  # what the run changed, not what was there before it
        self.assertEqual(self.git("status", "--short"), " M README\n?? added.txt\n?? mine.txt\n")  # index untouched
        clone = os.path.join(self.tmp, "clone")
        self.git("clone", "-q", self.workspace, clone, cwd=self.tmp)
        with open(os.path.join(self.tmp, "change.patch"), "w") as f:
            f.write(patch.stdout)
        self.git("apply", os.path.join(self.tmp, "change.patch"), cwd=clone)
        with open(os.path.join(clone, "README")) as f:
            self.assertEqual(f.read(), "the project\nchanged\n")
        skipped = self.cli("run", "--no-patch", "change two files again")
        self.assertEqual(skipped.returncode, 0, skipped.stderr)
        none = self.cli("logs", skipped.stderr.split("· ")[-1].strip(), "--patch")
        self.assertEqual(none.returncode, 1)
        self.assertIn("--no-patch", none.stderr)


class EnvironmentTest(CliCase):
    GITHUB = "ghp_fakeTokenForTheFilterTest42"
    PASSWORD = "hunter2-but-longer"
    script = [tool_step(("execute", {"command": "echo gh=[$GITHUB_TOKEN] pw=[$db_password] home=[$PLAIN_SETTING]; "
                                                "cat leaked.txt"})),
              text_step("done")]

    def run_env(self, *args, env=None):
        with open(os.path.join(self.workspace, "leaked.txt"), "w") as f:
            f.write(f"from a file: {self.GITHUB} {self.PASSWORD}\n")
        env = dict(env or self.env, GITHUB_TOKEN=self.GITHUB, db_password=self.PASSWORD, PLAIN_SETTING="visible")
        proc, events = self.run_task(*args, "print the env", env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        (result,) = [e for e in events if e["kind"] == "tool_result"]
        seen = self.tool_results(1)[0]["content"]
        for secret in (self.GITHUB, self.PASSWORD):
            self.assertNotIn(secret, proc.stdout + proc.stderr)
            self.assertNotIn(secret, json.dumps(self.fake.requests))
        return result["output"], seen

    def test_secret_looking_variables_stay_out_of_the_shell_and_are_redacted(self):
        output, seen = self.run_env()
        self.assertIn("gh=[] pw=[] home=[visible]", output)
        self.assertIn("from a file: [REDACTED:GITHUB_TOKEN] [REDACTED:db_password]", output)  # passed in or not
        self.assertIn("gh=[] pw=[]", seen)
        self.assertIn("[REDACTED:GITHUB_TOKEN]", seen)

    def test_secret_passes_only_the_named_variable(self):
        output, _ = self.run_env("--secret", "GITHUB_TOKEN")
        self.assertIn("gh=[[REDACTED:GITHUB_TOKEN]] pw=[] ", output)

    def test_inherit_env_lets_them_through_still_redacted(self):
        output, _ = self.run_env("--inherit-env")
        self.assertIn("gh=[[REDACTED:GITHUB_TOKEN]] pw=[[REDACTED:db_password]] ", output)

    def test_inherit_env_variable(self):
        output, _ = self.run_env(env=dict(self.env, STIGMER_INHERIT_ENV="1"))
        self.assertIn("gh=[[REDACTED:GITHUB_TOKEN]] pw=[[REDACTED:db_password]] ", output)


class ConfinedCase(CliCase):
    """HOME and STIGMER_HOME outside /tmp, so that only the confinement can hide them from a command (the
    sandbox's own /tmp is private), a fake ~/.ssh/id_rsa, and real bwrap (skipped, saying why, without it)."""
    share_home = False  # each test has a home of its own, on the class's port

    KEY = "-----BEGIN OPENSSH PRIVATE KEY----- fake key of the cli test"

    def setUp(self):
        problem = sandbox.confinement_problem()
        if problem:
            self.skipTest(f"bwrap cannot run here, so confinement is not tested: {problem}")
        super().setUp()
        self.outer = tempfile.mkdtemp(prefix="stigmer-confined-", dir="/var/tmp")
        self.addCleanup(shutil.rmtree, self.outer, ignore_errors=True)  # after tearDown's `stop --force`
        self.home, self.user_home = os.path.join(self.outer, "home"), os.path.join(self.outer, "user")
        os.makedirs(os.path.join(self.user_home, ".ssh"))
        with open(os.path.join(self.user_home, ".ssh", "id_rsa"), "w") as f:
            f.write(self.KEY)
        self.env.update(STIGMER_HOME=self.home, HOME=self.user_home)

    def token(self):
        return read(os.path.join(self.home, "daemon.token")).strip()

    def json_lines(self, proc):
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return [json.loads(line) for line in proc.stdout.splitlines()]


class ConfinedByDefaultTest(ConfinedCase):
    script = [tool_step(("execute", {"command": 'cat "$STIGMER_HOME/daemon.token"; cat ~/.ssh/id_rsa; '
                                                "echo planted > ~/planted.txt; echo made > made.txt"})),
              text_step("tried")]

    def test_a_run_is_confined_in_workspace_write_and_says_so(self):
        lines = self.json_lines(self.cli("--json", "try to reach out"))
        run, events, summary = lines[0], lines[1:-1], lines[-1]
        self.assertEqual((run["sandbox_mode"], run["network"]), ("workspace-write", False))
        self.assertEqual((summary["sandbox_mode"], summary["network"]), ("workspace-write", False))
        self.assertEqual((events[0]["phase"], events[0]["sandbox_mode"]), ("PENDING", "workspace-write"))
        (result,) = [e["output"] for e in events if e["kind"] == "tool_result"]
        self.assertNotIn(self.token(), result)  # the token, as the user who tried it first saw it: hidden
        self.assertNotIn("fake key", result)
        self.assertIn("Read-only file system", result)
        self.assertFalse(os.path.exists(os.path.join(self.user_home, "planted.txt")))
        self.assertEqual(read(os.path.join(self.workspace, "made.txt")), "made\n")  # the workspace is writable
        (row,) = [json.loads(line) for line in self.cli("list", "--json").stdout.splitlines()]
        self.assertEqual((row["spec"]["sandbox_mode"], row["spec"]["network"]), ("workspace-write", False))
        status = self.cli("status")
        self.assertIn("commands: workspace-write by default", status.stdout)
        self.assertEqual(json.loads(self.cli("status", "--json").stdout)["sandbox"]["mode"], "workspace-write")


class FullAccessTest(ConfinedCase):
    script = [tool_step(("execute", {"command": 'cat "$STIGMER_HOME/daemon.token"; ls -A ~/.ssh'})),
              text_step("first"), tool_step(("execute", {"command": "echo planted > ~/planted.txt"})),
              text_step("second")]

    def test_full_access_is_unconfined_redacts_the_token_and_a_resume_keeps_it(self):
        proc = self.cli("--sandbox-mode", "full-access", "look around")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("full-access (not confined)", proc.stderr)  # the summary line
        execution_id = proc.stderr.split("· ")[-1].strip()
        (result,) = [e["output"] for e in self.logs(execution_id) if e["kind"] == "tool_result"]
        self.assertIn("[REDACTED:STIGMER_DAEMON_TOKEN]", result)
        self.assertNotIn(self.token(), result + json.dumps(self.fake.requests))
        self.assertIn("id_rsa", result)  # nothing is hidden in full-access
        lines = self.json_lines(self.cli("resume", "--json", execution_id, "now plant a file"))
        self.assertEqual((lines[0]["sandbox_mode"], lines[-1]["phase"]), ("full-access", "COMPLETED"))
        self.assertEqual(read(os.path.join(self.user_home, "planted.txt")), "planted\n")


class NetworkSwitchTest(ConfinedCase):
    AGENT = ("apiVersion: agentic.stigmer.ai/v1\nkind: Agent\nmetadata:\n  name: fetcher\nspec:\n"
             "  instructions: You fetch what the task names from the network.\n  config:\n    network: true\n")

    def setUp(self):
        super().setUp()
        self.server = PongServer()
        self.addCleanup(self.server.close)
        self.fake.script[:] = [tool_step(("execute", {"command": self.server.fetch_command()})), text_step("fetched")]
        os.makedirs(os.path.join(self.workspace, ".stigmer", "agents"))
        with open(os.path.join(self.workspace, ".stigmer", "agents", "fetcher.yaml"), "w") as f:
            f.write(self.AGENT)

    def fetched(self, *args):
        lines = self.json_lines(self.cli("--json", *args, "fetch the page"))
        (result,) = [e["output"] for e in lines if e.get("kind") == "tool_result"]
        return lines[0]["network"], result

    def test_the_network_is_off_unless_the_run_or_its_agent_allows_it(self):
        network, result = self.fetched()
        self.assertFalse(network)
        self.assertNotIn("pong", result)
        self.assertIn("the network is off", result)  # the model can tell the user instead of retrying
        self.assertIn("--network", result)
        self.assertEqual(self.fetched("--network"), (True, "pong"))
        self.assertEqual(self.fetched("--agent", "fetcher"), (True, "pong"))


class NoConfinementTest(CliCase):
    """Without bwrap on PATH, a run that would be confined stops before anything starts; full-access runs."""

    def test_one_line_with_the_fix_and_exit_2_unless_full_access_was_chosen(self):
        empty = os.path.join(self.tmp, "empty-path")
        os.makedirs(empty)
        env = dict(self.env, PATH=empty)
        assert_one_line(self, self.cli("do something", env=env), 2, "stigmer: commands cannot be confined",
                        "apt install bubblewrap", "--sandbox-mode full-access")
        self.assertEqual(self.fake.requests, [])  # no model call, no worker
        for how in (["--sandbox-mode", "full-access"], []):
            proc = self.cli(*how, "do something", env=dict(env, STIGMER_SANDBOX_MODE="" if how else "full-access"))
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertIn("full-access (not confined)", proc.stderr)


class ConfigNamesTest(CliCase):
    def test_unknown_env_is_a_one_line_warning(self):
        proc = self.cli("run", "hi", env=dict(self.env, ENV="prod"))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
        self.assertEqual(len(warnings), 1, proc.stderr)
        self.assertIn("ENV='prod' is not one of development, staging, production: logging as development",
                      warnings[0])

    def test_stigmer_env_and_mode_win(self):
        env = dict(self.env, ENV="prod", STIGMER_ENV="production", MODE="banana", STIGMER_MODE="local")
        proc = self.cli("run", "hi", env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("warning", proc.stderr)
        cfg = runner.Config.load({"ENV": "prod", "STIGMER_ENV": "staging", "MODE": "cloud", "STIGMER_MODE": "local"})
        self.assertEqual((cfg.env, cfg.mode, cfg.warnings), ("staging", "local", ()))

    def test_json_errors_are_json_on_stdout_too(self):
        for args in (("list", "--json"), ("--json", "say hello")):
            proc = self.cli(*args, env=dict(self.env, MODE="bogus"))
            self.assertEqual(proc.returncode, 2, proc.stderr)
            error = json.loads(proc.stdout)
            self.assertEqual((error["kind"], error["exit_code"]), ("error", 2))
            self.assertIn("MODE='bogus' is not a mode", error["message"])
            self.assertIn(error["message"], proc.stderr)  # and the same one line for a person
        self.assertEqual(self.cli("list", env=dict(self.env, MODE="bogus")).stdout, "")  # without --json: stderr only

    def test_unknown_mode_stays_an_error(self):
        for env, name in ((dict(self.env, MODE="banana"), "MODE='banana'"),
                          (dict(self.env, STIGMER_MODE="banana", MODE="local"), "STIGMER_MODE='banana'")):
            proc = self.cli("list", env=env)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertIn(name, proc.stderr)


class WarmRunTest(CliCase):
    fresh = True  # it counts the workers of the home
    script = [text_step("warm")]

    def newest_spec(self):
        return json.loads(self.cli("list", "--json", "--limit", "1").stdout.splitlines()[0])["spec"]

    def test_a_run_after_start_takes_the_started_worker_when_it_fits(self):
        self.assertEqual(self.cli("start").returncode, 0)
        proc, events = self.run_task("hello")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(events[-1]["final_text"], "warm")
        self.assertEqual(self.newest_spec().get("runner_id", ""), "")  # not pinned: the warm worker took it
        self.assertFalse(os.path.exists(os.path.join(self.home, "logs", "run-worker.log")))  # none was spawned
        # A follow-up (-c, a session's next line) fits it too: the parent's secrets are the worker's
        proc, events = self.run_task("-c", "and again")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.newest_spec().get("runner_id", ""), "")
        self.assertTrue(self.newest_spec()["parent_id"])
        self.assertFalse(os.path.exists(os.path.join(self.home, "logs", "run-worker.log")))
        # A --secret the started worker was not given: this run needs its own worker, with that secret.
        proc, events = self.run_task("--secret", "EXTRA_TOKEN", "hello", env=dict(self.env, EXTRA_TOKEN="x"))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertTrue(self.newest_spec()["runner_id"].startswith("run-"))

    def test_another_provider_or_a_missing_secret_does_not_fit(self):
        self.assertEqual(self.cli("start", "--secret", "EXTRA_TOKEN", env=dict(self.env, EXTRA_TOKEN="x")).returncode, 0)
        cfg = runner.Config.load(self.env)

        def fits(model, names):
            return processes.fitting_worker(cfg, model, names, "-", shared_free=True)
        self.assertEqual(fits("anthropic/claude-fake", ["EXTRA_TOKEN"]), "")
        self.assertEqual(fits("anthropic/claude-other", []), "")
        self.assertIsNone(fits("openai/gpt-fake", []))
        self.assertIsNone(fits("anthropic/claude-fake", ["EXTRA_TOKEN", "OTHER"]))
        self.assertEqual(self.cli("stop", "--force").returncode, 0)
        self.assertIsNone(fits("anthropic/claude-fake", []))  # none alive


class WarmFollowUpTest(CliCase):
    """A completed foreground run's worker stays warm for the next run that fits it (processes.keep_warm)."""
    fresh = True  # it counts the warm workers of the home
    script = [tool_step(("execute", {"command": 'echo "extra=${EXTRA_TOKEN:-unset}"'})), text_step("done")]

    def spec(self, execution_id):
        return json.loads(self.cli("list", "--json").stdout.splitlines()[0])["spec"] if execution_id is None else \
            next(json.loads(line)["spec"] for line in self.cli("list", "--json").stdout.splitlines()
                 if json.loads(line)["id"] == execution_id)

    def warm_files(self):
        logs = os.path.join(self.home, "logs")
        return sorted(n for n in os.listdir(logs) if n.startswith("warm-")) if os.path.isdir(logs) else []

    def warm_pid(self):
        files = self.warm_files()
        self.assertEqual(len(files), 1, files)
        return int(read(os.path.join(self.home, "logs", files[0])).split()[0])

    def run_id(self, proc):
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return json.loads(proc.stdout.splitlines()[0])["execution_id"]

    def command_output(self, events):
        return "".join(e.get("output", "") for e in events if e.get("kind") == "tool_result")

    def test_the_next_run_takes_the_warm_worker_and_gets_only_its_own_secrets(self):
        env = dict(self.env, EXTRA_TOKEN="tok-first-run-secret")
        proc, events = self.run_task("--secret", "EXTRA_TOKEN", "show it", env=env)
        first = self.run_id(proc)
        self.assertIn("[REDACTED:EXTRA_TOKEN]", json.dumps(events))
        pid = self.warm_pid()
        self.assertTrue(pid_alive(pid))
        own = self.spec(first)["runner_id"]
        self.assertTrue(own.startswith("run-"))
        # A new task with the same environment, naming no secret: the warm worker takes it, pinned to it, and its
        # shell does not get the first run's secret.
        proc, events = self.run_task("show it again", env=env)
        self.assertEqual(self.spec(self.run_id(proc))["runner_id"], own)
        self.assertIn("extra=unset", json.dumps(events))
        # A follow-up of the first run, which names the secret again (its parent's): the worker holds it.
        proc = self.cli("resume", first, "and again", "--json", env=env)
        follow_up = self.spec(self.run_id(proc))
        self.assertEqual((follow_up["runner_id"], follow_up["secret_names"]), (own, ["EXTRA_TOKEN"]))
        self.assertEqual(self.warm_pid(), pid)  # still the one warm worker, idle again

    def test_a_run_that_needs_more_brings_its_own_worker(self):
        first = self.run_id(self.run_task("hello")[0])
        own = self.spec(first)["runner_id"]
        self.warm_pid()
        # A secret it was never given: never taken by the warm worker, whose shell could not pass it.
        env = dict(self.env, EXTRA_TOKEN="tok-second-secret")
        proc, events = self.run_task("--secret", "EXTRA_TOKEN", "hello", env=env)
        second = self.spec(self.run_id(proc))["runner_id"]
        self.assertNotEqual(second, own)
        self.assertIn("[REDACTED:EXTRA_TOKEN]", json.dumps(events))
        # Another environment (a variable the agent's shell would see): its own worker too.
        proc, _ = self.run_task("hello", env=dict(self.env, PROJECT_STAGE="beta"))
        self.assertNotIn(self.spec(self.run_id(proc))["runner_id"], (own, ""))
        # Another key in the environment: never the old one (here the new key is wrong, and the run says so).
        proc = self.cli("--json", "hello", env=dict(self.env, ANTHROPIC_API_KEY="sk-ant-another-key-5678"))
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("401", proc.stdout + proc.stderr)
        # No key in the environment at all: the warm worker holds one (as if typed at the prompt).
        no_key = {k: v for k, v in self.env.items() if k != "ANTHROPIC_API_KEY"}
        proc, _ = self.run_task("hello", env=no_key)
        self.assertIn(self.spec(self.run_id(proc))["runner_id"], (own, second))  # both hold the key, idle

    def test_stop_and_the_idle_period_end_it_and_a_failed_run_leaves_none(self):
        self.run_id(self.run_task("hello")[0])
        pid = self.warm_pid()
        self.assertEqual(self.cli("stop").returncode, 0)
        wait_for(lambda: not pid_alive(pid), what="the warm worker to exit after stop")
        self.assertEqual(self.warm_files(), [])
        # A short idle period: it leaves by itself, and so does its pid file.
        own = self.spec(self.run_id(self.run_task("hello", env=dict(self.env, STIGMER_KEEP_WARM="0.5"))[0]))["runner_id"]
        self.assertTrue(own.startswith("run-"))
        wait_for(lambda: not run_workers(self.home), what="the warm worker to leave after its idle period")
        self.assertEqual(self.warm_files(), [])
        # A run that fails (here a wrong key) keeps no worker: the next run must not meet that key again.
        proc = self.cli("--json", "hello", env=dict(self.env, ANTHROPIC_API_KEY="sk-ant-wrong-key-1234"))
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertEqual(self.warm_files(), [], proc.stdout + proc.stderr)
        # STIGMER_KEEP_WARM=0: the worker exits with its run.
        self.run_id(self.run_task("hello", env=dict(self.env, STIGMER_KEEP_WARM="0"))[0])
        self.assertEqual(self.warm_files(), [])


class StopTest(CliCase):
    script = [tool_step(("execute", {"command": "sleep 60"})), text_step("never")]

    def test_stop_refuses_without_force_while_a_run_is_live(self):
        self.assertEqual(self.cli("start").returncode, 0)
        daemon_pid = int(read(os.path.join(self.home, "logs", "daemon.pid")).split()[0])
        submitted = self.cli("run", "--detach", "sleep for a minute")
        execution_id = submitted.stdout.strip()
        wait_for(lambda: self.fake.requests)  # it is running
        refused = self.cli("stop")
        self.assertEqual(refused.returncode, 2, refused.stderr)
        self.assertIn(execution_id, refused.stderr)
        self.assertIn('"sleep for a minute"', refused.stderr)
        self.assertIn("stop --force", refused.stderr)
        self.assertTrue(os.path.exists(f"/proc/{daemon_pid}"))
        forced = self.cli("stop", "--force")
        self.assertEqual(forced.returncode, 0, forced.stderr)
        self.assertIn(f"cancelled {execution_id}", forced.stdout)
        self.assertIn("stopped 2 process(es)", forced.stdout)
        self.assertEqual(self.logs(execution_id)[-1]["phase"], "CANCELLED")

    def test_stop_asks_on_a_terminal(self):
        self.assertEqual(self.cli("start").returncode, 0)
        execution_id = self.cli("run", "--detach", "sleep for a minute").stdout.strip()
        wait_for(lambda: self.fake.requests)
        term = Pty(["stop"], self.env, self.workspace)
        try:
            wait_for(lambda: "[y/N]" in term.screen)
            term.type("n\n")
            code = term.wait()
        finally:
            term.kill()
        self.assertEqual(code, 1, term.screen)
        self.assertIn(execution_id, term.screen)
        self.assertIn("nothing stopped", term.screen)
        self.assertEqual(json.loads(self.cli("status", "--json").stdout)["running"][0]["id"], execution_id)

    def test_status_and_stop_see_a_foreground_runs_daemon(self):
        run = subprocess.Popen([sys.executable, RUNNER, "sleep in the foreground"], env=self.env, cwd=self.workspace,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(reap, run)
        wait_for(lambda: self.fake.requests)
        status = self.cli("status")
        self.assertEqual(status.returncode, 0, status.stderr)
        self.assertIn("sleep in the foreground", status.stdout)  # the shared daemon a foreground run started
        self.assertIn("started by a foreground run", status.stdout)
        self.assertEqual(json.loads(self.cli("status", "--json").stdout)["started_by"], "foreground run")
        self.assertEqual(self.cli("stop").returncode, 2)  # a script needs --force: a usage error
        forced = self.cli("stop", "--force")
        self.assertEqual(forced.returncode, 0, forced.stderr)
        self.assertIn("cancelled ex-", forced.stdout)
        self.assertIn("foreground", forced.stdout)
        self.assertNotIn("nothing was running", forced.stdout)
        out, err = run.communicate(timeout=60)
        self.assertEqual(run.returncode, 130, err)


class MessagesTest(CliCase):
    fresh = True  # it takes the daemon's port, types a key at the prompt, makes the home
    def test_port_in_use_names_the_variable_not_a_missing_flag(self):
        host, port = self.env["STIGMER_BACKEND_ENDPOINT"].split(":")
        with socket.socket() as s:
            s.bind((host, int(port)))
            s.listen()
            proc = self.cli("hello there")
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("already in use", proc.stderr)
        self.assertIn("STIGMER_BACKEND_ENDPOINT=", proc.stderr)
        self.assertNotIn("--endpoint", proc.stderr)

    def test_odd_key_warning_says_warning_once(self):
        env = {k: v for k, v in self.env.items() if k != "ANTHROPIC_API_KEY"}
        term = Pty(["hello there"], env, self.workspace)
        try:
            wait_for(lambda: "(ANTHROPIC_API_KEY)" in term.screen)
            term.type("not-an-anthropic-looking-key\n")
            term.wait()
        finally:
            term.kill()
        self.assertIn("warning: ANTHROPIC_API_KEY does not start with 'sk-ant-'", term.screen)
        self.assertNotIn("warning: warning", term.screen)
        self.assertNotIn("not-an-anthropic-looking-key", term.screen)

    def test_worker_that_never_connected_does_not_say_lost(self):
        os.makedirs(self.home)
        with open(os.path.join(self.home, "daemon.token"), "w") as f:
            f.write("no-daemon-behind-this")
        log_path = os.path.join(self.tmp, "worker.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, RUNNER, "worker"], env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log)
        try:
            wait_for(lambda: "the daemon at" in read(log_path))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        self.assertIn("cannot reach the daemon at", read(log_path))
        self.assertNotIn("lost the daemon", read(log_path))


class SharedMessagesTest(CliCase):
    """Messages that need no home of their own."""

    def test_list_phase_with_no_match(self):
        self.assertEqual(self.cli("hello there").returncode, 0)
        proc = self.cli("list", "--phase", "pending")  # none: what a test leaves pending is cancelled after it
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("no pending executions", proc.stdout)
        self.assertNotIn("no executions yet", proc.stdout)

    def test_bad_limits_blame_one_flag(self):
        proc = self.cli("run", "x", "--max-turns", "0")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("--max-turns must be at least 1", proc.stderr)
        self.assertNotIn("--max-tokens-total", proc.stderr)
        proc = self.cli("run", "x", "--max-tokens-total", "-5")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("--max-tokens-total", proc.stderr)
        self.assertNotIn("--max-turns", proc.stderr)

    def test_one_turn(self):
        proc = self.cli("hello there")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("1 turn ·", proc.stdout)
        self.assertNotIn("1 turns", proc.stdout)


class TurnLimitOfOneTest(CliCase):
    script = [tool_step(("execute", {"command": "true"})), text_step("never")]

    def test_limit_of_one_turn(self):
        proc, events = self.run_task("keep going", "--max-turns", "1")
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("reached the turn limit (1 turn)", events[-1]["reason"], proc.stdout + proc.stderr)


class ApiMessagesTest(CliCase):
    script = [text_step("never", errors=[(500, "the upstream model server crashed")] * 3)]

    def test_500_shows_the_providers_message(self):
        proc, events = self.run_task("say hello")
        self.assertEqual(proc.returncode, 1)
        self.assertIn("the model API failed (500): the upstream model server crashed", events[-1]["reason"])
        self.assertNotIn("{'type'", proc.stderr + json.dumps(events))
        # a replay of the failed run ends with the same ✗ line and exits 1, so `logs ID -f && deploy` stops
        for follow in ((), ("-f",)):
            logs = self.cli("logs", events[0]["execution_id"], *follow)
            self.assertEqual(logs.returncode, 1, logs.stderr)
            # each retry is a dim line, the error is said once, and the summary counts no turn (none was answered)
            self.assertEqual(logs.stderr.count("↻ retrying in 0.05 s"), 2, logs.stderr)
            self.assertEqual(logs.stderr.count("the upstream model server crashed"), 3, logs.stderr)
            self.assertIn("\n✗ failed\n", logs.stderr)
            self.assertIn("0 turns · 0 in / 0 out", logs.stdout)
        logs = self.cli("logs", events[0]["execution_id"], "--json")
        self.assertEqual(logs.returncode, 1, logs.stderr)
        self.assertTrue(all("seq" in json.loads(line) for line in logs.stdout.splitlines()))  # the events only


class NotFoundTest(CliCase):
    script = [text_step("never", errors=[(404, "model: claude-nope")])]

    def test_404_suggests_checking_the_model_name(self):
        proc, events = self.run_task("say hello", "--model", "claude-nope")
        self.assertEqual(proc.returncode, 1)
        self.assertIn("model: claude-nope", events[-1]["reason"])
        self.assertIn("check the model name (STIGMER_MODEL or --model)", events[-1]["reason"])
        self.assertIn("check the model name", proc.stderr)


class CancelWhileThinkingTest(CliCase):
    """Ctrl-C while the model has not answered yet (its first byte would come in 10 minutes) cancels at once."""
    share_home = False  # it looks for the logs of the home's workers
    script = [text_step("far too late", delay=600)]

    def interrupt_run(self, *args):
        run = subprocess.Popen([sys.executable, RUNNER, "--json", *args, "think hard"], env=self.env,
                               cwd=self.workspace, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        self.addCleanup(reap, run)
        wait_for(lambda: self.fake.requests, what="the model request")
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)  # far less than the model's 600 s: the request was abandoned
        self.assertEqual(run.returncode, 130, err)
        summary = json.loads(out.splitlines()[-1])
        self.assertEqual((summary["kind"], summary["phase"]), ("summary", "CANCELLED"))
        self.assertEqual(self.logs(summary["execution_id"])[-1]["phase"], "CANCELLED")
        self.assertEqual(len(self.fake.requests), 1)

    def test_a_foreground_run_with_its_own_worker(self):
        self.interrupt_run()

    def test_a_foreground_run_on_a_worker_of_start(self):
        self.assertEqual(self.cli("start").returncode, 0)
        self.interrupt_run()
        self.assertFalse(os.path.exists(os.path.join(self.home, "logs", "run-worker.log")))  # start's worker ran it


class SessionTest(CliCase):
    script = [text_step("first answer"), text_step("second answer")]

    def test_two_turns_continue_one_conversation_and_ctrl_d_leaves(self):
        term = Pty([], self.env, self.workspace)  # the CLI alone on a terminal opens a session
        try:
            wait_for(lambda: "› " in term.screen, what="the session's prompt")
            term.type("say something\n")
            wait_for(lambda: "first answer" in term.screen and term.screen.count("› ") >= 2, what="the first turn")
            term.type("and again\n")
            wait_for(lambda: "second answer" in term.screen and term.screen.count("› ") >= 3, what="the second turn")
            term.type("\x04")  # Ctrl-D
            code = term.wait()
        finally:
            term.kill()
        self.assertEqual(code, 0, term.screen)
        second = self.fake.requests[1]["messages"]  # the second turn continued the first's conversation
        self.assertEqual([m["role"] for m in second], ["user", "assistant", "user"])
        self.assertIn("say something", json.dumps(second[0]))
        rows = [json.loads(line) for line in self.cli("list", "--json").stdout.splitlines()]
        self.assertEqual(rows[0]["spec"]["parent_id"], rows[1]["id"])  # every turn is an execution in the log


class SessionCancelTest(CliCase):
    script = [text_step("far too late", delay=600)]

    def test_ctrl_c_cancels_the_turn_and_comes_back_to_the_prompt(self):
        term = Pty(["chat"], self.env, self.workspace)
        try:
            wait_for(lambda: "› " in term.screen, what="the session's prompt")
            term.type("think hard\n")
            wait_for(lambda: self.fake.requests, what="the model request")
            term.proc.send_signal(signal.SIGINT)
            wait_for(lambda: term.screen.count("› ") >= 2, timeout=60, what="the prompt again")  # not the 600 s
            self.assertIsNone(term.proc.poll())  # the session goes on
            term.type("/exit\n")
            code = term.wait()
        finally:
            term.kill()
        self.assertEqual(code, 0, term.screen)
        self.assertIn("cancelled", term.screen)
        rows = [json.loads(line) for line in self.cli("list", "--json").stdout.splitlines()]
        self.assertEqual(rows[0]["phase"], "CANCELLED")


class WatcherInterruptTest(CliCase):
    script = [tool_step(("execute", {"command": "sleep 60"})), text_step("never")]

    def test_ctrl_c_on_a_watcher_clears_the_spinner_and_says_the_run_goes_on(self):
        self.assertEqual(self.cli("start").returncode, 0)
        execution_id = self.cli("run", "--detach", "sleep for a minute").stdout.strip()
        wait_for(lambda: self.fake.requests)
        term = Pty(["logs", execution_id, "-f"], self.env, self.workspace)
        try:
            wait_for(lambda: "working…" in term.screen)
            wait_for(lambda: re.search(r"working… [1-9]\d* s", term.screen), what="the spinner's elapsed seconds")
            term.proc.send_signal(signal.SIGINT)
            code = term.wait()
        finally:
            term.kill()
        screen = term.screen
        self.assertEqual(code, 130, screen)
        after = screen[screen.rindex("working…"):]
        self.assertIn("\r\033[K", after)  # the spinner line was wiped before the message
        self.assertIn(f"{execution_id} keeps running", after)
        self.assertIn(f"logs {execution_id} -f", after)
        self.assertEqual(json.loads(self.cli("status", "--json").stdout)["running"][0]["id"], execution_id)


class SecretsAtRestTest(CliCase):
    """Issue 28, item 4: secrets typed into the prompt or piped on stdin are never stored raw (the database,
    `run --json`'s header, `list --json`); the model gets them redacted too, and the user is told."""
    GITHUB = "ghp_aFakeTokenTypedIntoThePrompt"
    PASSWORD = 'pw"with\\quote-and-backslash'

    def test_a_secret_in_the_prompt_or_stdin_is_stored_redacted(self):
        env = dict(self.env, GITHUB_TOKEN=self.GITHUB, DB_PASSWORD=self.PASSWORD)
        proc = run_cli(["--json", f"push with {self.GITHUB}"], env, cwd=self.workspace,
                       input=f"password: {self.PASSWORD}\nkey: {FAKE_KEY}\n")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        header = json.loads(proc.stdout.splitlines()[0])
        self.assertEqual(header["kind"], "run")
        self.assertIn("push with [REDACTED:GITHUB_TOKEN]", json.dumps(header))
        self.assertIn("the prompt held the value of ANTHROPIC_API_KEY, DB_PASSWORD, GITHUB_TOKEN", proc.stderr)
        self.assertIn("password: [REDACTED:DB_PASSWORD]\nkey: [REDACTED:ANTHROPIC_API_KEY]", first_prompt(self.fake))
        listed = self.cli("list", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        for secret in (self.GITHUB, self.PASSWORD, FAKE_KEY):
            for form in (secret, json.dumps(secret)[1:-1]):
                self.assertNotIn(form, proc.stdout + listed.stdout)
            self.assertEqual(files_containing(secret, self.home), [])  # stigmer.db, its WAL, the logs


class InputLimitTest(CliCase):
    """Issue 28, item 8: 16 MiB of stdin is refused clearly, while the worker, `list` and an unrelated
    execution running on that worker carry on."""
    share_home = False  # it lists the home's executions
    script = [tool_step(("execute", {"command": "while [ ! -e release ]; do sleep 0.05; done; echo released"})),
              text_step("finished")]

    def test_16_mib_of_stdin_is_refused_and_nothing_else_notices(self):
        self.assertEqual(self.cli("start").returncode, 0)
        running = self.cli("run", "--detach", "wait for the release file").stdout.strip()
        wait_for(lambda: any(e.get("kind") == "tool_call" for e in self.logs(running)), what="the command to run")
        big = "x" * (16 << 20)
        for args in (["summarise this"], ["run", "--detach", "summarise this"], ["-"]):
            with self.subTest(args=args):
                refused = run_cli(args, self.env, cwd=self.workspace, input=big)
                assert_one_line(self, refused, 2, "the prompt is 16.0 MiB", "over the limit of 1 MiB",
                                "put the input in a file in the workspace")
        listed = self.cli("list", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertEqual([(r["id"], r["phase"]) for r in map(json.loads, listed.stdout.splitlines())],
                         [(running, "RUNNING")])  # nothing else was submitted
        open(os.path.join(self.workspace, "release"), "w").close()
        followed = self.cli("logs", running, "-f", "--json")
        self.assertEqual(followed.returncode, 0, followed.stderr)
        last = json.loads(followed.stdout.splitlines()[-1])
        self.assertEqual((last["phase"], last["final_text"]), ("COMPLETED", "finished"))


@unittest.skipUnless(os.path.exists("/proc/self/environ"), "reads /proc/PID/environ (Linux)")
class ParentEnvironTest(CliCase):
    """Issue 28, item 6: a command the agent runs reads its parent's environment block, the worker's: no
    provider key, token or credential is there, whichever way the worker was started."""
    fresh = True  # it inspects the processes of the home
    GITHUB = "ghp_aFakeTokenTheShellMustNotRead"
    script = [tool_step(("execute", {"command": "tr '\\0' '\\n' < /proc/$PPID/environ > parent.env; "
                                                "tr '\\0' ' ' < /proc/$PPID/cmdline > parent.cmd; echo copied"})),
              text_step("done")]

    def parent_env(self):
        with open(os.path.join(self.workspace, "parent.env")) as f:
            return f.read()

    def setUp(self):
        super().setUp()
        # Unconfined, so that $PPID is the worker itself: OS confinement (a PID namespace) is a second line,
        # and this checks the first one, the worker's own environment block.
        self.env["STIGMER_SANDBOX_MODE"] = "full-access"
        # Workers started afresh, their own blocks (a forked worker's is the fork server's: test_forkserver.RunTest).
        self.env["STIGMER_FORKSERVER"] = "0"

    def assert_no_secret(self, block, command=None):
        """BLOCK, a worker's environment block (COMMAND its command line: by default the one the agent's
        command saw), holds no key or secret."""
        if command is None:
            with open(os.path.join(self.workspace, "parent.cmd")) as f:
                command = f.read()
        if "forkserver.py" in command:  # forked: the block is the fork server's, which never held a secret
            self.assertIn("PYTHONUNBUFFERED=1", block)
        else:  # started: a worker's own block, its secrets in a pipe
            self.assertIn("runner.py worker", command)
            self.assertIn("STIGMER_SECRETS_FD=", block)
        for needle in (FAKE_KEY, self.GITHUB, "ANTHROPIC_API_KEY=", "GITHUB_TOKEN="):
            self.assertNotIn(needle, block)

    def test_a_runs_own_worker_and_a_started_one_hold_no_key_in_their_environment(self):
        env = dict(self.env, GITHUB_TOKEN=self.GITHUB)
        proc = run_cli(["copy the parent environment"], env, cwd=self.workspace)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assert_no_secret(self.parent_env())
        os.unlink(os.path.join(self.workspace, "parent.env"))
        self.assertEqual(self.cli("start", env=env).returncode, 0)
        self.fake.requests.clear()
        proc = run_cli(["copy it again"], env, cwd=self.workspace)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assert_no_secret(self.parent_env())

    def test_a_worker_started_by_hand_moves_its_keys_out_at_once(self):
        env = dict(self.env, GITHUB_TOKEN=self.GITHUB)
        log_path = os.path.join(self.tmp, "worker.log")
        self.assertEqual(self.cli("start", "--workers", "0").returncode, 0)  # the daemon only
        with open(log_path, "w") as log:
            worker = subprocess.Popen([sys.executable, RUNNER, "worker", "--capacity", "1"], env=env,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            wait_for(lambda: json.loads(self.cli("status", "--json").stdout).get("connected_runners") == 1,
                     what="the worker to connect")
            with open(f"/proc/{worker.pid}/environ", "rb") as f:
                block = f.read().decode(errors="replace").replace("\0", "\n")
            with open(f"/proc/{worker.pid}/cmdline", "rb") as f:
                self.assert_no_secret(block, f.read().decode().replace("\0", " "))
            detached = self.cli("run", "--detach", "copy the parent environment")
            self.assertEqual(detached.returncode, 0, detached.stderr)
            followed = self.cli("logs", detached.stdout.strip(), "-f")
            self.assertEqual(followed.returncode, 0, followed.stderr)
            self.assert_no_secret(self.parent_env())
        finally:
            worker.terminate()
            worker.wait(timeout=30)


if __name__ == "__main__":
    unittest.main()
