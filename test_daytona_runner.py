"""The Daytona sandbox wired into the worker and the CLI: one sandbox per execution, deleted
however the execution ends, swept when left over, and the change back as a patch.

    python -m unittest test_daytona_runner -v

Everything runs for real except Daytona's service: the real `daytona` SDK talks to the loopback
stand-in in testsupport_daytona.py (which runs the commands in a temporary directory per
sandbox), and the real `anthropic` SDK to the fake Messages API in testsupport.py.
"""
import json
import os
import shutil
import subprocess
import tempfile
import threading
import unittest
from unittest import mock
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

try:
    import daytona
except ImportError:
    daytona = None

import daytona_sandbox
import processes
import runner
import sandbox
import stigmer_pb2 as pb
import worker
from test_runner import CliCase
from test_worker import drain
from testsupport import FAKE_KEY, FakeAnthropic, text_step, tool_step, wait_for
from testsupport_daytona import FakeDaytona

KEY = "dtn_fake.not.a.real.daytona.key"
GITHUB = "ghp_fakeGithubTokenForTheClone42"
SKIP = unittest.skipIf(daytona is None, "the daytona SDK is not installed: pip install -e '.[cloud]'")


def git(*args, cwd=None):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                                   GIT_COMMITTER_EMAIL="t@t", GIT_CONFIG_GLOBAL="/dev/null")).stdout


def bare_repo(tmp):
    """A bare git repository (branch main) holding calc.py and notes.txt; returns its path."""
    src, bare = os.path.join(tmp, "src"), os.path.join(tmp, "repo.git")
    os.makedirs(src)
    git("init", "-q", "-b", "main", cwd=src)
    with open(os.path.join(src, "calc.py"), "w") as f:
        f.write("print('sum', 2 + )\n")
    with open(os.path.join(src, "notes.txt"), "w") as f:
        f.write("keep me\n")
    git("add", "-A", cwd=src)
    git("commit", "-qm", "first", cwd=src)
    git("clone", "-q", "--bare", src, bare)
    return bare


@SKIP
class WorkerLifecycleTest(unittest.TestCase):
    """A worker with the Daytona factory from Config, driven as a link drives it."""
    slow = True  # among the longest: testsupport_parallel starts it first

    script = [tool_step(("execute", {"command": "pwd; echo key=[$DAYTONA_API_KEY] gh=$GITHUB_TOKEN"})),
              tool_step(("write_file", {"path": "calc.py", "content": "print('sum', 2 + 3)\n"})),
              text_step("all done")]

    def setUp(self):
        self.fake = FakeDaytona(api_key=KEY)
        self.addCleanup(self.fake.close)
        self.model = FakeAnthropic(self.script).start()
        self.addCleanup(self.model.stop)
        env = mock.patch.dict(os.environ, {"ANTHROPIC_API_KEY": FAKE_KEY, "ANTHROPIC_BASE_URL": self.model.url,
                                           "DAYTONA_API_KEY": KEY, "GITHUB_TOKEN": GITHUB})
        env.start()
        self.addCleanup(env.stop)
        backoff = mock.patch.object(daytona_sandbox, "BACKOFF", 0.01)
        backoff.start()
        self.addCleanup(backoff.stop)
        self.tmp = tempfile.mkdtemp(prefix="stigmer-dayint-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.terminal = set()  # executions the "log" says have ended
        self.w = self.make_worker(KEY)

    def make_worker(self, key):
        cfg = runner.Config.load({"STIGMER_SANDBOX": "daytona", "DAYTONA_API_KEY": key,
                                  "DAYTONA_API_URL": self.fake.api_url, "DAYTONA_TARGET": "local"})
        make_sandbox, sweep = worker.sandbox_factory(cfg, "r-test", self.terminal.__contains__)
        w = worker.Worker(environ=os.environ, capacity=2, model="claude-fake", runner_id="r-test", make_sandbox=make_sandbox, sweep=sweep,
                          sandbox="daytona")
        self.addCleanup(w.stop, flush=0)
        return w

    def assign(self, execution_id="ex-d", w=None, **spec):
        spec.setdefault("prompt", "fix calc.py")
        spec.setdefault("workspace", self.tmp)
        (w or self.w).assigned(pb.Execution(id=execution_id, spec=pb.ExecutionSpec(**spec), last_seq=2))
        return execution_id

    def artifacts(self, events, kind):
        return [e.artifact for e in events if e.HasField("artifact") and e.artifact.type == kind]

    def test_completed_one_sandbox_created_labelled_and_deleted(self):
        events = drain(self.w, self.assign(secret_names=["GITHUB_TOKEN"]))
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED)
        self.assertEqual(len(self.fake.created), 1)
        self.assertEqual(self.fake.deleted, self.fake.created)  # deleted once, before the terminal event
        (made,) = self.artifacts(events, "sandbox")
        self.assertEqual(made.name, self.fake.created[0])
        self.assertGreater(made.created_in, 0)
        self.assertIn("an empty workspace", made.notes)
        self.assertEqual(events[0].WhichOneof("payload"), "artifact")  # made before the agent's first turn
        output = next(e.tool_result.output for e in events if e.HasField("tool_result"))
        root = os.path.join(self.fake.tmp, made.name, "workspace")
        self.assertIn(root, output)  # the command ran in the sandbox's workspace, not in spec.workspace
        self.assertIn("key=[]", output)  # the Daytona key is kept out of the agent's shell
        self.assertIn("gh=[REDACTED:GITHUB_TOKEN]", output)  # a named secret reaches it, redacted
        self.assertEqual(os.listdir(self.tmp), [])  # the host workspace was not touched
        self.assertEqual(self.artifacts(events, "patch"), [])  # not a git checkout: no patch
        self.assertNotIn(KEY, str(events))

    def test_the_sandbox_mode_is_recorded_and_changes_nothing_in_daytona(self):
        with mock.patch.dict(sandbox._CONFINEMENT, {"problem": "commands cannot be confined here"}):
            events = drain(self.w, self.assign("ex-ro", sandbox_mode="read-only", network=False))
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED, events[-1].phase.reason)
        results = [e.tool_result for e in events if e.HasField("tool_result")]
        self.assertEqual([r.is_error for r in results], [False, False])  # write_file worked: not read-only
        self.assertNotIn("Read-only", str(results))

    def test_failed_cancelled_and_stopped_executions_delete_their_sandbox(self):
        events = drain(self.w, self.assign("ex-fail", max_turns=1))  # the turn limit fails it
        self.assertEqual(events[-1].phase.phase, pb.FAILED)
        self.assertEqual((len(self.fake.created), self.fake.deleted), (1, self.fake.created))

        self.model.script[1]["delay"] = 2.0  # the second turn is slow: the cancel lands mid-run
        ex = self.assign("ex-cancel")
        wait_for(lambda: len(self.model.requests) >= 3, what="the second turn")
        self.w.cancel_requested(ex)
        events = drain(self.w, ex)
        self.assertEqual(events[-1].phase.phase, pb.CANCELLED)
        self.assertEqual((len(self.fake.created), self.fake.deleted), (2, self.fake.created))

        ex = self.assign("ex-stop")
        wait_for(lambda: len(self.model.requests) >= 5, what="the second turn")
        self.w.stop(flush=0)  # the worker stops mid-run: its sandbox goes too
        self.assertEqual((len(self.fake.created), self.fake.deleted), (3, self.fake.created))
        self.assertEqual(self.fake.sandboxes, {})
        self.assertEqual(self.w.next_batch(0)[-1].phase.phase, pb.CANCELLED)

    def test_a_cancel_while_the_sandbox_is_being_made_deletes_it(self):
        self.fake.stall("POST", "^/api/sandbox$", 1.0)
        ex = self.assign()
        wait_for(lambda: ("POST", "/api/sandbox") in self.fake.calls, what="the create call")
        self.w.cancel_requested(ex)
        events = drain(self.w, ex)
        self.assertEqual(events[-1].phase.phase, pb.CANCELLED)
        self.assertEqual((len(self.fake.created), self.fake.deleted), (1, self.fake.created))
        self.assertEqual(self.model.requests, [])  # the agent never started

    def test_429_on_create_backs_off_and_succeeds(self):
        self.fake.fail("POST", "^/api/sandbox$", 429, times=2)
        events = drain(self.w, self.assign())
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED)
        self.assertEqual(self.fake.calls.count(("POST", "/api/sandbox")), 3)
        self.assertEqual((len(self.fake.created), self.fake.deleted), (1, self.fake.created))

    def test_daytona_unavailable_fails_the_execution_with_the_reason(self):
        w = self.make_worker("dtn_wrong_key_for_this_test")
        events = drain(w, self.assign(w=w))
        self.assertEqual(events[-1].phase.phase, pb.FAILED)
        self.assertIn("Daytona refused the API key", events[-1].phase.reason)
        self.assertIn("DAYTONA_API_KEY", events[-1].phase.reason)
        self.assertEqual([e.error.code for e in events if e.HasField("error")], ["sandbox_auth"])
        self.assertEqual((self.fake.created, self.model.requests), ([], []))

        self.fake.fail("POST", "^/api/sandbox$", 500, times=daytona_sandbox.CREATE_ATTEMPTS)
        events = drain(self.w, self.assign("ex-500"))
        self.assertEqual(events[-1].phase.phase, pb.FAILED)
        self.assertIn("Daytona failed to create a sandbox", events[-1].phase.reason)

    def test_the_sweep_deletes_leftovers_of_ended_executions_only(self):
        ended = self.fake.add_sandbox({"stigmer": "1", "stigmer.execution": "ex-old", "stigmer.runner": "r-dead"})
        running = self.fake.add_sandbox({"stigmer": "1", "stigmer.execution": "ex-now", "stigmer.runner": "r-b"})
        kept = self.fake.add_sandbox({"stigmer": "1", "stigmer.execution": "ex-kept", "stigmer.keep": "1"})
        self.terminal.update({"ex-old", "ex-kept"})
        with mock.patch.object(worker, "SWEEP_EVERY", 0.05):  # not every 10 minutes
            sweeper = threading.Thread(target=self.w.sweep_sandboxes, daemon=True)  # serve() starts this
            sweeper.start()
            wait_for(lambda: ended in self.fake.deleted, what="the sweep at start")
            self.assertEqual(sorted(self.fake.sandboxes), sorted([running, kept]))
            self.terminal.add("ex-now")  # it ends elsewhere and its runner dies: a later sweep deletes it
            wait_for(lambda: running in self.fake.deleted, what="a later sweep")
            self.w.stopping.set()
            sweeper.join(10)
        self.assertFalse(sweeper.is_alive())
        self.assertEqual(list(self.fake.sandboxes), [kept])

    def test_keep_sandbox_leaves_it_running_and_the_sweep_leaves_it_alone(self):
        events = drain(self.w, self.assign(keep_sandbox=True))
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED)
        made, kept = self.artifacts(events, "sandbox")
        self.assertEqual(kept.name, made.name)
        self.assertIn("kept running", kept.notes)
        self.assertEqual((self.fake.deleted, list(self.fake.sandboxes)), ([], [made.name]))
        self.terminal.add("ex-d")
        self.assertEqual(self.w.sweep(), [])

    def test_a_cloned_repo_comes_back_as_a_redacted_patch(self):
        bare = bare_repo(self.tmp)
        self.model.script[1] = tool_step(("write_file", {"path": "calc.py", "content": f"print('{GITHUB}')\n"}))
        events = drain(self.w, self.assign(repo="file://" + bare, ref="main", secret_names=["GITHUB_TOKEN"]))
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED)
        (patch,) = self.artifacts(events, "patch")
        seqs = [e.seq for e in events if e.HasField("artifact") and e.artifact.type == "patch"]
        self.assertEqual(seqs, [events[-1].seq - 1])  # recorded last, just before the terminal event
        self.assertEqual(patch.name, "change.patch")
        self.assertIn("+print('[REDACTED:GITHUB_TOKEN]')", patch.text)
        self.assertNotIn(GITHUB, str(events))
        self.assertIn("[REDACTED:NAME]", patch.notes)
        self.assertEqual(self.fake.deleted, self.fake.created)


    def test_a_runner_of_the_other_kind_fails_the_execution_instead_of_running_it(self):
        host = worker.Worker(environ=os.environ, capacity=1, model="claude-fake", runner_id="r-host")
        self.addCleanup(host.stop, flush=0)
        events = drain(host, self.assign("ex-here", w=host, sandbox="daytona"))
        self.assertEqual(events[-1].phase.phase, pb.FAILED)
        self.assertIn("asked for a daytona sandbox, but runner r-host makes filesystem ones", events[-1].phase.reason)
        self.assertEqual((self.model.requests, os.listdir(self.tmp)), ([], []))
        events = drain(self.w, self.assign("ex-there", sandbox="filesystem"))
        self.assertIn("STIGMER_SANDBOX=filesystem", events[-1].phase.reason)
        self.assertEqual(self.fake.created, [])


@SKIP
class CloneCredentialsTest(unittest.TestCase):
    def test_a_github_token_answers_https_prompts_without_being_on_the_command_line(self):
        options = daytona_sandbox._clone_credentials("https://github.com/me/app", {"GITHUB_TOKEN": GITHUB})
        self.assertNotIn(GITHUB, options)
        self.assertIn("GITHUB_TOKEN", options)
        self.assertEqual(daytona_sandbox._clone_credentials("file:///repo.git", {"GITHUB_TOKEN": GITHUB}), "")
        self.assertEqual(daytona_sandbox._clone_credentials("https://github.com/me/app", {}), "")
        helper = options.split("credential.helper=", 1)[1].rstrip("'")
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(["git", "-c", f"credential.helper={helper}", "credential", "fill"], cwd=tmp,
                                  input="protocol=https\nhost=github.com\n\n", capture_output=True, text=True,
                                  env=dict(os.environ, GITHUB_TOKEN=GITHUB, GIT_CONFIG_GLOBAL="/dev/null",
                                           GIT_TERMINAL_PROMPT="0"), timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"password={GITHUB}\n", done.stdout)
        self.assertIn("username=x-access-token\n", done.stdout)


@SKIP
class CliTest(CliCase):
    """`STIGMER_SANDBOX=daytona` in local mode, end to end: CLI, daemon and worker processes."""
    slow = True  # among the longest: testsupport_parallel starts it first

    script = [
        tool_step(("read_file", {"path": "calc.py"})),
        tool_step(("edit_file", {"path": "calc.py", "old_string": "2 + )", "new_string": "2 + 3)"})),
        tool_step(("write_file", {"path": "docs/usage.md", "content": "Run: python3 calc.py\n"})),
        tool_step(("execute", {"command": "python3 calc.py && rm notes.txt && git status --short"})),
        text_step("Fixed calc.py; it prints sum 5."),
    ]

    def setUp(self):
        super().setUp()
        self.daytona = FakeDaytona(api_key=KEY)
        self.addCleanup(self.daytona.close)
        self.bare = bare_repo(self.tmp)
        self.env.update(STIGMER_SANDBOX="daytona", DAYTONA_API_KEY=KEY, DAYTONA_API_URL=self.daytona.api_url,
                        DAYTONA_TARGET="local")

    def cli(self, *args, env=None, timeout=180):  # a busy machine imports two SDKs in the worker
        return super().cli(*args, env=env, timeout=timeout)

    def test_a_task_on_a_cloned_repo_and_its_patch_applies_to_a_fresh_clone(self):
        proc, events = self.run_task("fix calc.py", "--repo", "file://" + self.bare, "--ref", "main")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(events[-1]["phase"], "COMPLETED")
        self.assertContiguous(events)
        ran = [e for e in events if e["kind"] == "tool_result"][-1]["output"]
        self.assertEqual(ran, "sum 5\n M calc.py\n D notes.txt\n?? docs/")
        (sandbox,) = [e for e in events if e["kind"] == "artifact" and e["type"] == "sandbox"]
        self.assertEqual(self.daytona.created, [sandbox["name"]])
        self.assertEqual(self.daytona.deleted, self.daytona.created)
        (patch,) = [e for e in events if e["kind"] == "artifact" and e["type"] == "patch"]
        self.assertIsInstance(patch["size"], int)  # a number in JSON, not proto3's int64 string
        self.assertNotIn(self.workspace, ran)
        self.assertEqual(os.listdir(self.workspace), [])  # the host workspace was not touched
        self.assertNotIn(KEY, proc.stdout + proc.stderr)
        for folder, _, files in os.walk(self.home):  # database, logs: no Daytona key anywhere
            for name in files:
                if not os.path.isfile(os.path.join(folder, name)):
                    continue  # the daemon's socket
                with open(os.path.join(folder, name), "rb") as f:
                    self.assertNotIn(KEY.encode(), f.read(), name)

        logs = self.cli("logs", events[0]["execution_id"], "--patch")
        self.assertEqual(logs.returncode, 0, logs.stderr)
        self.assertEqual(logs.stdout, patch["text"])
        fresh = os.path.join(self.tmp, "fresh")
        git("clone", "-q", self.bare, fresh)
        with open(os.path.join(self.tmp, "change.patch"), "w") as f:
            f.write(logs.stdout)
        git("apply", os.path.join(self.tmp, "change.patch"), cwd=fresh)
        with open(os.path.join(fresh, "calc.py")) as f:
            self.assertEqual(f.read(), "print('sum', 2 + 3)\n")
        with open(os.path.join(fresh, "docs", "usage.md")) as f:
            self.assertEqual(f.read(), "Run: python3 calc.py\n")
        self.assertFalse(os.path.exists(os.path.join(fresh, "notes.txt")))

    def test_skills_are_uploaded_offered_by_their_sandbox_path_read_run_and_read_only(self):
        from test_skills_run import make_skill
        user_skills = os.path.join(self.env["HOME"], ".agents", "skills")
        self.addCleanup(shutil.rmtree, user_skills, True)
        make_skill(user_skills, "pdf", "Fill in PDF forms.", "# Filling PDF forms\n",
                   script="#!/bin/sh\necho \"filled $1\"\n")
        skill_md = "../.agents/skills/pdf/SKILL.md"  # beside the workspace, under the sandbox user's home
        self.fake.reset([
            tool_step(("read_file", {"path": skill_md}),
                      ("execute", {"command": "../.agents/skills/pdf/scripts/fill.sh form-b"}),
                      ("write_file", {"path": skill_md, "content": "gone"}),
                      ("execute", {"command": "touch ../.agents/skills/pdf/new || echo refused"})),
            text_step("Filled."),
        ])
        proc, events = self.run_task("fill form-b")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        (sandbox_id,) = self.daytona.created
        system = self.fake.requests[0]["system"][0]["text"]
        self.assertIn(f"\n- pdf: Fill in PDF forms. ({self.daytona.tmp}/{sandbox_id}/.agents/skills/pdf/SKILL.md)",
                      system)
        self.assertNotIn(user_skills, system)  # the host's path is not the agent's
        results = [e for e in events if e["kind"] == "tool_result"]
        self.assertIn("Filling PDF forms", results[0]["output"])
        self.assertEqual(results[1]["output"], "filled form-b")  # its run bits kept
        self.assertTrue(results[2]["is_error"])
        self.assertIn("which is read-only", results[2]["output"])
        if os.geteuid() != 0:  # root writes anywhere
            self.assertIn("refused", results[3]["output"])
        (used,) = [e for e in events if e["kind"] == "skill"]
        self.assertEqual(used["name"], "pdf")
        row = json.loads(self.cli("list", "--json").stdout.splitlines()[0])
        self.assertEqual(row["skills_used"], ["pdf"])
        (listed,) = row["spec"]["skills"]
        self.assertEqual(sorted(f["path"] for f in listed["files"]), ["SKILL.md", "scripts/fill.sh"])
        self.assertTrue(all("data" not in f or not f["data"] for f in listed["files"]))  # names, not contents

    def test_a_stdio_mcp_server_is_refused_with_what_works(self):
        path = os.path.join(self.tmp, "mcp.json")
        with open(path, "w") as f:
            json.dump({"mcpServers": {"t": {"command": "python3", "args": ["-c", "pass"]}}}, f)
        proc = self.cli("--mcp-config", path, "go")
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("MCP server t is a stdio server, which needs the filesystem sandbox", proc.stderr)
        self.assertIn("HTTP servers work with any sandbox", proc.stderr)
        self.assertEqual(self.fake.requests, [])

    def test_keep_sandbox_prints_its_id_and_leaves_it_running(self):
        self.fake.script[:] = [text_step("nothing to change")]
        proc = self.cli("run", "look around", "--keep-sandbox")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        (kept,) = self.daytona.created
        self.assertIn(f"stigmer: sandbox {kept} kept running", proc.stderr)
        self.assertIn(f"▣ sandbox {kept}", proc.stdout)  # the artifact events' lines (text, even when piped)
        self.assertEqual((self.daytona.deleted, list(self.daytona.sandboxes)), ([], [kept]))
        execution_id = json.loads(self.cli("list", "--json").stdout.splitlines()[0])["id"]
        nopatch = self.cli("logs", execution_id, "--patch")  # an empty workspace is not a git checkout
        self.assertEqual(nopatch.returncode, 1)
        self.assertIn("has no patch", nopatch.stderr)

    def test_clear_errors(self):
        def one_line(proc, code, *needles):
            self.assertEqual(proc.returncode, code, proc.stderr)
            self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
            for needle in needles:
                self.assertIn(needle, proc.stderr)
        no_key = {k: v for k, v in self.env.items() if k != "DAYTONA_API_KEY"}
        one_line(self.cli("run", "x", env=no_key), 2, "STIGMER_SANDBOX=daytona", "DAYTONA_API_KEY")
        one_line(self.cli("start", env=no_key), 2, "DAYTONA_API_KEY")
        host = dict(self.env, STIGMER_SANDBOX="filesystem")
        one_line(self.cli("run", "x", "--repo", "file://" + self.bare, env=host), 2, "STIGMER_SANDBOX=daytona")
        one_line(self.cli("run", "x", "--repo", "https://me:ghp_secret@github.com/me/app"), 2, "--secret GITHUB_TOKEN")
        one_line(self.cli("x", env=dict(self.env, STIGMER_SANDBOX="docker")), 2, "STIGMER_SANDBOX='docker'")
        proc, events = self.run_task("fix it", "--repo", "file:///nonexistent/repo.git")
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(events[-1]["phase"], "FAILED")
        self.assertIn("git clone of file:///nonexistent/repo.git failed", events[-1]["reason"])
        self.assertEqual(self.daytona.deleted, self.daytona.created)
        self.assertEqual(self.fake.requests, [])  # the model was never asked


if __name__ == "__main__":
    unittest.main()
