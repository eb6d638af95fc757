"""Tests of sub-agents (subagents.py, the task tool): in-process against the fake Messages API (one sub-agent, two
at once, depth 2, failures, cancel, resume), agent files that declare and refer to sub-agents (agents.py), the
live view, and end to end through the CLI with a real daemon and worker (local) and with workers on a real
redis-server (cloud): two sub-agents whose commands overlap, a referenced agent file, a failing sub-agent, the
log contiguous with the nesting fields right, resume, and cancel during a sub-agent's command.

The fake routes each conversation to a script of its own by a marker in its first user message (the task
call's description), so the parent and every sub-agent get their own replies.

    python -m unittest test_subagents -v
"""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest

import agent
import agents
import models
import stigmer_pb2 as pb
import subagents
import terminal
from sandbox import FilesystemSandbox
from test_agent import anthropic_model
from test_cloud import CloudCase
from test_resume import dumps, plain
from test_runner import CliCase
from testsupport import HERE, FakeAnthropic, reap, running, sleep_tag, text_step, tool_step, wait_for
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

GP = subagents.GENERAL_PURPOSE


def task(name, description):
    """A task tool call of a script step."""
    return ("task", {"subagent_type": name, "description": description})


def meet(me, other):
    """A command that prints its start time, waits (up to 60 s) until OTHER has started, prints its end time:
    two of them can only both finish quickly when they run at the same time."""
    return ("execute", {"command": f"date +%s.%N; touch {me}.started; i=0; "
                                   f"while [ ! -f {other}.started ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); "
                                   f"done; date +%s.%N"})


def interval(output):
    """(start, end) of a meet() command's output."""
    start, end = output.split()[:2]
    return float(start), float(end)


def slow(tag, started="sleep.pid"):
    """A command that sleeps until killed, found on the host by TAG (a sleep_tag(): a confined command's $! is a
    pid of its own namespace), and writes the file STARTED once started."""
    return ("execute", {"command": f"sleep {tag} & echo $! > {started}; wait; echo ok"})


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


class InProcess:
    """Agents run in this process against one fake (with routes) and one workspace; events as pb.Event."""

    def __init__(self, test, script, routes=None, **fake):
        self.test = test
        self.fake = FakeAnthropic(script, routes=routes, **fake).start()
        test.addCleanup(self.fake.stop)
        self.workspace = tempfile.mkdtemp(prefix="stigmer-sub-")
        test.addCleanup(shutil.rmtree, self.workspace, True)
        self.events = []

    def make(self, team=None, **kwargs):
        emit = lambda **payload: self.events.append(pb.Event(seq=len(self.events) + 1, **payload))  # noqa: E731
        self.agent = agent.Agent(anthropic_model(self.test, self.fake.url), FilesystemSandbox(self.workspace), emit,
                                 team=team if team is not None else subagents.Team(), **kwargs)
        return self.agent

    def run(self, prompt="do the task", history=(), **kwargs):
        """(phase, reason, final_text) of one run."""
        return self.make(**kwargs).run(prompt, self.workspace, history)

    def requests(self, marker=None):
        """The requests of the conversation routed by MARKER (None: the parent's)."""
        return [r for r in self.fake.requests if self.fake.route(r) == marker]

    def of(self, kind, depth=None):
        return [e for e in self.events if e.WhichOneof("payload") == kind and (depth is None or e.depth == depth)]


def system(request):
    """The system prompt's text a request carried."""
    return "".join(block["text"] for block in request["system"])


def tool_names(request):
    return [t["name"] for t in request["tools"]]


class TaskToolTest(unittest.TestCase):
    def test_one_sub_agent_answers_the_task_call(self):
        run = InProcess(self, [tool_step(task(GP, "[a] count the files"), text="Delegating."), text_step("Three files.")],
                        {"[a]": [tool_step(("execute", {"command": "ls | wc -l"})), text_step("There are 3 files.")]})
        for name in ("x", "y", "z"):
            open(os.path.join(run.workspace, name), "w").close()
        phase, reason, text = run.run("how many files?")
        self.assertEqual((phase, reason, text), (pb.COMPLETED, "", "Three files."))
        (sub_first, sub_last), (parent_first, parent_last) = run.requests("[a]"), run.requests()
        # the sub-agent's conversation starts fresh: the parent's system prompt (general-purpose), the brief alone
        self.assertEqual(sub_first["messages"], [{"role": "user", "content": [
            {"type": "text", "text": "[a] count the files", "cache_control": {"type": "ephemeral"}}]}])
        self.assertEqual(sub_first["system"], parent_first["system"])
        self.assertIn("3", json.dumps(sub_last["messages"][-1]))  # its command ran in the same workspace
        # its final text is the parent's tool result
        (result,) = [b for b in parent_last["messages"][-1]["content"] if b["type"] == "tool_result"]
        self.assertEqual((result["content"], result["is_error"]), ("There are 3 files.", False))
        # the task tool comes last, lists general-purpose, and a depth-1 agent has it too
        self.assertEqual(tool_names(parent_first), [t["name"] for t in agent.TOOLS] + ["task"])
        self.assertIn(f"- {GP}: ", parent_first["tools"][-1]["description"])
        self.assertEqual(tool_names(sub_first), tool_names(parent_first))
        # its events: tagged, no text deltas, its own prompt and turns; usage is the execution's total
        (call,) = run.of("tool_call", depth=0)
        nested = [e for e in run.events if e.depth]
        self.assertEqual({(e.subagent, e.task_call_id, e.depth) for e in nested}, {(GP, call.tool_call.id, 1)})
        self.assertEqual([e.WhichOneof("payload") for e in nested],
                         ["prompt", "usage", "turn", "tool_call", "tool_result", "usage", "turn"])
        self.assertEqual(nested[0].prompt.text, "[a] count the files")
        self.assertEqual([e.turn.number for e in run.of("turn", depth=1)], [1, 2])
        self.assertEqual([e.usage.input_tokens for e in run.of("usage")], [100, 200, 300, 400])
        self.assertEqual(run.agent.usage.output_tokens, 80)
        self.assertEqual(run.agent.turns, 2)  # the parent's own
        self.assertFalse(any(e.WhichOneof("payload") == "text" for e in nested))
        # the parent's events frame the sub-agent's: call, then its events, then the result
        seqs = [e.seq for e in nested]
        (done,) = run.of("tool_result", depth=0)
        self.assertTrue(call.seq < min(seqs) and max(seqs) < done.seq)

    def test_two_task_calls_of_a_turn_run_at_the_same_time(self):
        run = InProcess(self, [tool_step(task(GP, "[a] first half"), task(GP, "[b] second half")), text_step("Both.")],
                        {"[a]": [tool_step(meet("a", "b")), text_step("a done")],
                         "[b]": [tool_step(meet("b", "a")), text_step("b done")]})
        self.assertEqual(run.run()[0], pb.COMPLETED)
        calls = {e.tool_call.id: e for e in run.of("tool_call", depth=0)}
        results = {}
        for e in run.of("tool_result", depth=1):
            results[e.task_call_id] = interval(e.tool_result.output)
        a, b = results.values()
        self.assertEqual(set(results), set(calls))
        self.assertLess(a[0], b[1])  # each started before the other ended: they overlapped
        self.assertLess(b[0], a[1])
        # the results go back in call order, whichever finished first
        last = run.requests()[-1]["messages"][-1]["content"]
        self.assertEqual([r["content"] for r in last if r["type"] == "tool_result"], ["a done", "b done"])

    def test_declared_sub_agents_and_the_depth_limit(self):
        spec = agents.agent_spec(__import__("yaml").safe_load(agents_yaml("lead", """  subAgents:
    - name: checker
      description: checks one thing
      instructions: You check one thing and say whether it holds.
""")))
        team = subagents.Team(spec.instructions, spec.sub_agents)
        self.assertEqual(list(team.members), [GP, "checker"])
        run = InProcess(self, [tool_step(task("checker", "[c] check it")), text_step("Checked.")],
                        {"[c]": [tool_step(task(GP, "[d] go deeper")), text_step("holds")],
                         "[d]": [tool_step(task(GP, "[e] deeper still")), text_step("deep answer")]})
        self.assertEqual(run.run(team=team, instructions=spec.instructions)[0], pb.COMPLETED)
        (checker,), (deep,) = run.requests("[c]")[:1], run.requests("[d]")[:1]
        self.assertIn("You check one thing and say whether it holds.", system(checker))
        self.assertNotIn("You lead", system(checker))
        self.assertIn("You lead", system(run.requests()[0]))
        self.assertIn("- checker: checks one thing", run.requests()[0]["tools"][-1]["description"])
        self.assertIn("task", tool_names(checker))  # depth 1 may delegate
        self.assertIn("You check one thing", system(deep))  # its general-purpose has its instructions
        self.assertNotIn("task", tool_names(deep))  # depth 2 may not
        self.assertEqual(run.requests("[e]"), [])
        (refused,) = [e.tool_result for e in run.of("tool_result", depth=2)]
        self.assertTrue(refused.is_error)
        self.assertIn("unknown tool 'task'", refused.output)
        (deep_call,) = [e for e in run.of("tool_call", depth=1) if e.tool_call.name == "task"]
        self.assertEqual({(e.subagent, e.task_call_id) for e in run.events if e.depth == 2},
                         {(GP, deep_call.tool_call.id)})

    def test_failing_sub_agents_are_error_results_and_the_parent_goes_on(self):
        run = InProcess(self, [tool_step(task(GP, "[bad] call a broken API"), task(GP, "[loop] never stop"),
                                         task("nobody", "[x] who?"), task(GP, "")),
                               text_step("Two failed; I carry on.")],
                        {"[bad]": [{"errors": [(400, "the request was malformed somehow")], **text_step("unused")}],
                         "[loop]": [tool_step(("ls", {}))] * 5})
        phase, _, text = run.run(max_turns=2)
        self.assertEqual((phase, text), (pb.COMPLETED, "Two failed; I carry on."))
        by_id = {e.tool_result.id: e.tool_result for e in run.of("tool_result", depth=0)}
        results = [by_id[e.tool_call.id] for e in run.of("tool_call", depth=0)]  # in call order
        self.assertTrue(all(r.is_error for r in results))
        self.assertIn(f"sub-agent {GP} failed after 0 turns: ", results[0].output)
        self.assertIn("the request was malformed somehow", results[0].output)
        self.assertIn("reached the turn limit (2 turns)", results[1].output)
        self.assertIn(f"unknown sub-agent 'nobody'; the sub-agents are: {GP}", results[2].output)
        self.assertIn("the description is empty", results[3].output)
        (error,) = [e for e in run.of("error") if e.depth]
        self.assertEqual((error.subagent, error.error.code), (GP, "bad_request"))
        sent = run.requests()[-1]["messages"][-1]["content"]
        self.assertTrue(all(b["is_error"] for b in sent if b["type"] == "tool_result"))

    def test_cancel_reaches_a_sub_agents_command(self):
        one, two = sleep_tag(), sleep_tag()
        run = InProcess(self, [tool_step(task(GP, "[slow] wait"), task(GP, "[slow2] wait too")), text_step("unused")],
                        {"[slow]": [tool_step(slow(one)), text_step("unused")],
                         "[slow2]": [tool_step(slow(two, "two.pid")), text_step("unused")]})
        the_agent = run.make()
        outcome = []
        import threading
        thread = threading.Thread(target=lambda: outcome.append(the_agent.run("go", run.workspace)))
        thread.start()
        for p in ("sleep.pid", "two.pid"):
            wait_for(lambda p=p: read(os.path.join(run.workspace, p)).strip(), 30, p)
        self.assertTrue(running(one) and running(two))
        the_agent.cancel()
        thread.join(30)
        self.assertEqual(outcome[0][0], pb.CANCELLED)
        wait_for(lambda: not running(one) and not running(two), 30, "the sub-agents' commands to be killed")
        self.assertEqual(the_agent.children, set())
        results = [e.tool_result for e in run.of("tool_result", depth=0)]
        self.assertEqual([(r.is_error, r.exit_code) for r in results], [(True, 130), (True, 130)])
        self.assertEqual(len(run.requests()), 1)  # the parent asked nothing more

    def test_the_result_is_redacted_and_capped_like_any_tool_result(self):
        secret = "s3cr3t-value-0123456789"
        run = InProcess(self, [tool_step(task(GP, "[a] print it")), text_step("ok")],
                        {"[a]": [text_step(f"the value is {secret} " + "x" * agent.TOOL_OUTPUT_CHARS)]})
        redactor = models.project_secrets().Redactor({"MY_TOKEN": secret})
        self.assertEqual(run.run(redactor=redactor)[0], pb.COMPLETED)
        (result,) = [b for b in run.requests()[-1]["messages"][-1]["content"] if b["type"] == "tool_result"]
        self.assertNotIn(secret, json.dumps(run.fake.requests[-1]))
        self.assertTrue(result["content"].startswith("the value is [REDACTED:MY_TOKEN] xxx"))
        self.assertIn("characters cut from the middle of this output", result["content"])
        (event,) = run.of("tool_result", depth=0)
        self.assertTrue(event.tool_result.truncated)

    def test_resume_rebuilds_the_parents_conversation_only(self):
        script = [tool_step(task(GP, "[a] look around"), text="Asking."), text_step("It is a tidy place."),
                  text_step("Nothing else.")]
        run = InProcess(self, script, {"[a]": [tool_step(("ls", {})), text_step("tidy")]})
        self.assertEqual(run.run("describe it")[0], pb.COMPLETED)
        parent_events = list(run.events)
        run.events.clear()
        self.assertEqual(run.run("anything else?", history=parent_events)[0], pb.COMPLETED)
        parent_last, resumed = run.requests()[-2:]
        self.assertEqual(dumps(plain(resumed["messages"][:-2])), dumps(plain(parent_last["messages"])))
        self.assertEqual(resumed["system"], parent_last["system"])
        self.assertEqual(resumed["messages"][-1]["content"][0]["text"], "anything else?")
        self.assertEqual(len(run.requests("[a]")), 2)  # the sub-agent was not asked again


def agents_yaml(name, extra="", instructions=None):
    text = (f"apiVersion: agentic.stigmer.ai/v1\nkind: Agent\nmetadata:\n  name: {name}\nspec:\n"
            f"  description: the {name} agent\n  instructions: {instructions or f'You {name} the work in hand.'}\n")
    return text + extra


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


class AgentFileTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="stigmer-subfiles-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.home = os.path.join(self.tmp, "home")
        self.dir = os.path.join(self.tmp, ".stigmer", "agents")

    def agent(self, name, extra="", **kw):
        return write(os.path.join(self.dir, f"{name}.yaml"), agents_yaml(name, extra, **kw))

    def test_a_reference_by_name_or_path_is_resolved_at_submit(self):
        self.agent("lead", "  subAgents:\n    - reviewer\n    - {agent: ../../extra/tester.yml, name: qa}\n"
                           "    - {agent: reviewer, name: strict, instructions: You review strictly and briefly.}\n")
        self.agent("reviewer", "  subAgents:\n    - name: nitpicker\n      instructions: You find every small flaw.\n")
        write(os.path.join(self.tmp, "extra", "tester.yml"), agents_yaml("tester"))
        spec = agents.resolve("lead", self.tmp, self.home)
        subs = {s.name: s for s in spec.sub_agents}
        self.assertEqual(list(subs), ["reviewer", "qa", "strict"])
        self.assertEqual((subs["reviewer"].instructions, subs["reviewer"].description),
                         ("You reviewer the work in hand.", "the reviewer agent"))
        self.assertEqual(subs["qa"].instructions, "You tester the work in hand.")
        self.assertEqual(subs["strict"].instructions, "You review strictly and briefly.")
        self.assertEqual([s.name for s in subs["reviewer"].agent_spec.sub_agents], ["nitpicker"])
        self.assertEqual(agents.unsupported(spec), [])
        again = pb.ExecutionSpec.FromString(pb.ExecutionSpec(agent=spec).SerializeToString()).agent
        team = subagents.Team(again.instructions, again.sub_agents)
        self.assertEqual(list(team.members), [GP, "reviewer", "qa", "strict"])
        self.assertEqual(list(team.team_of(team.members["reviewer"]).members), [GP, "nitpicker"])
        self.assertEqual(list(team.team_of(team.members["qa"]).members), [GP])

    def test_problems_are_one_line(self):
        cases = [
            ("  subAgents:\n    - missing-one\n", "sub-agent missing-one: no agent named missing-one"),
            ("  subAgents:\n    - lead\n", "refers to itself through its sub-agents"),
            ("  subAgents:\n    - name: general-purpose\n      instructions: You do anything at all.\n",
             "general-purpose is the sub-agent every agent already has"),
            ("  subAgents:\n    - name: x y\n      instructions: You do anything at all.\n", "must be 1 to 64 letters"),
            ("  subAgents:\n    - description: nothing else\n", "missing name (or give agent: NAME"),
        ]
        for extra, needle in cases:
            with self.subTest(needle=needle):
                self.agent("lead", extra)
                with self.assertRaises(agents.AgentError) as caught:
                    agents.resolve("lead", self.tmp, self.home)
                self.assertIn(needle, str(caught.exception))
                self.assertEqual(len(str(caught.exception).splitlines()), 1)

    def test_a_referenced_agents_variables_become_the_running_agents(self):
        self.agent("lead", "  subAgents: [secretive]\n  envSpec:\n    data:\n      STYLE: {value: terse}\n")
        self.agent("secretive", "  envSpec:\n    data:\n      TOKEN: {isSecret: true, description: a token}\n"
                                "      STYLE: {value: long}\n")
        data = agents.resolve("lead", self.tmp, self.home).env_spec.data
        self.assertEqual({n: (v.is_secret, v.value) for n, v in data.items()},
                         {"STYLE": (False, "terse"), "TOKEN": (True, "")})  # the lead's own value wins

    def test_the_example_lead_agent_resolves(self):
        folder = os.path.join(HERE, "examples", "agents")
        spec = agents.resolve(os.path.join(folder, "lead-developer.yaml"), folder, self.home)
        self.assertEqual(agents.unsupported(spec), [])
        names = [s.name for s in spec.sub_agents]
        self.assertIn("code-reviewer", names)  # the example reviewer, by reference
        (reviewer,) = [s for s in spec.sub_agents if s.name == "code-reviewer"]
        self.assertEqual(reviewer.agent_spec.name, "code-reviewer")


class RenderTest(unittest.TestCase):
    def test_sub_agent_events_are_indented_under_their_task_line_with_the_name(self):
        call = pb.ToolCall(id="t1", name="task", input_json=json.dumps(
            {"subagent_type": "reviewer", "description": "review\nthe change"}))
        tag = dict(subagent="reviewer", task_call_id="t1", depth=1)
        events = [pb.Event(seq=1, tool_call=call),
                  pb.Event(seq=2, prompt=pb.Prompt(text="review the change", source="task"), **tag),
                  pb.Event(seq=3, tool_call=pb.ToolCall(id="t1", name="execute", input_json='{"command": "git diff"}'),
                           **tag),
                  pb.Event(seq=4, tool_result=pb.ToolResult(id="t1", exit_code=1, is_error=True, output="a\nb\nc",
                                                            duration_ms=1200), **tag),
                  pb.Event(seq=5, turn=pb.Turn(number=2, stop="done", text="Looks fine."), **tag),
                  pb.Event(seq=6, tool_result=pb.ToolResult(id="t1", output="Looks fine.", duration_ms=2500))]
        out, err = io.StringIO(), io.StringIO()
        renderer = terminal.Renderer(False, False, False)
        renderer.show_prompts = True
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            for event in events:
                renderer.event(event)
        self.assertEqual(out.getvalue().splitlines(), [
            "⏺ task reviewer · review the change",
            "    reviewer › review the change",
            "    reviewer ⏺ execute git diff",
            "    reviewer   ⎿ exit 1 · 1.2 s",
            "    reviewer     a",
            "    reviewer     b",
            "    reviewer     … 1 more line",
            "    reviewer Looks fine.",
            "  ⎿ ok · 2.5 s",
            "    Looks fine."])
        lines = []
        json_renderer = terminal.Renderer(True, False, False)
        with contextlib.redirect_stdout(out := io.StringIO()):
            for event in events:
                json_renderer.event(event)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([(d.get("subagent"), d.get("task_call_id"), d.get("depth")) for d in lines],
                         [(None, None, None)] + [("reviewer", "t1", 1)] * 4 + [(None, None, None)])


# ---- end to end: the CLI, a daemon or Redis, a worker ----

LEAD = agents_yaml("lead", """  subAgents:
    - name: checker
      description: checks one claim
      instructions: You check one claim and say whether it holds.
    - reviewer
""", instructions="You lead the work and delegate.")
REVIEWER = agents_yaml("reviewer", instructions="You review changes with care.")
TAG = sleep_tag()  # the end-to-end cancel test's sleep


class EndToEnd:
    """The same tests over the daemon (local) and over Redis (cloud): the fake is remade with routes."""

    script = [tool_step(task("reviewer", "[rev] review it"), task(GP, "[gp] count lines"),
                        task("checker", "[chk] check the claim")), text_step("Reviewed, counted, one check failed."),
              text_step("Nothing more.")]
    routes = {"[rev]": [tool_step(meet("rev", "gp")), text_step("review: fine")],
              "[gp]": [tool_step(meet("gp", "rev")), text_step("42 lines")],
              "[chk]": [{"errors": [(400, "scripted bad request")], **text_step("unused")}],
              "[slow]": [tool_step(slow(TAG)), text_step("unused")]}

    def with_routes(self):
        self.fake.stop()
        self.fake = FakeAnthropic(self.script, routes=self.routes).start()
        self.env["ANTHROPIC_BASE_URL"] = self.fake.url

    def space(self):
        """The workspace, with the lead and reviewer agent files in it."""
        write(os.path.join(self.ws, ".stigmer", "agents", "lead.yaml"), LEAD)
        write(os.path.join(self.ws, ".stigmer", "agents", "reviewer.yaml"), REVIEWER)
        return self.ws

    def foreground(self, *args):
        """A foreground `runner.py --json ARGS` in the workspace, as a process."""
        args = [*args, "--json"] if args[0] == "resume" else ["--json", *args]
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), *args], env=self.env,
                                cwd=self.ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
        self.addCleanup(reap, proc)
        return proc

    def json_run(self, *args):
        proc = self.foreground(*args)
        out, err = proc.communicate(timeout=180)
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        return proc.returncode, err, [o for o in lines if "seq" in o], lines[-1]

    def test_sub_agents_in_one_log_then_resume(self):
        self.space()
        code, err, events, summary = self.json_run("--agent", "lead", "review, count and check")
        self.assertEqual(code, 0, err)
        execution_id = events[0]["execution_id"]
        self.assertEqual(summary["final_text"], "Reviewed, counted, one check failed.")
        self.assertEqual(summary["turns"], 2)  # the lead's own turns
        # one contiguous log, the same live and replayed
        self.assertEqual([e["seq"] for e in events], list(range(1, len(events) + 1)))
        self.assertEqual(events, self.logs_json(execution_id))
        # the nesting fields: each sub-agent's events name it and the task call that started it
        calls = {e["id"]: json.loads(e["input_json"])["subagent_type"] for e in events
                 if e["kind"] == "tool_call" and "depth" not in e}
        self.assertEqual(sorted(calls.values()), ["checker", GP, "reviewer"])
        nested = [e for e in events if "depth" in e]
        self.assertEqual({e["depth"] for e in nested}, {1})
        for e in nested:
            self.assertEqual(calls[e["task_call_id"]], e["subagent"], e)
        self.assertFalse([e for e in nested if e["kind"] == "text"])
        # the two that ran commands overlapped in time
        spans = {e["subagent"]: interval(e["output"]) for e in nested if e["kind"] == "tool_result"}
        self.assertLess(spans["reviewer"][0], spans[GP][1])
        self.assertLess(spans[GP][0], spans["reviewer"][1])
        # the failing one is an error result for the lead, which went on
        results = {calls[e["id"]]: e for e in events if e["kind"] == "tool_result" and "depth" not in e}
        self.assertEqual((results["reviewer"]["output"], results[GP]["output"]), ("review: fine", "42 lines"))
        self.assertTrue(results["checker"]["is_error"])
        self.assertIn("sub-agent checker failed", results["checker"]["output"])
        self.assertIn("scripted bad request", results["checker"]["output"])
        # the referenced file's instructions, the lead's own for general-purpose, the declared checker's
        first = {self.fake.route(r): r for r in reversed(self.fake.requests)}
        self.assertIn("You review changes with care.", system(first["[rev]"]))
        self.assertEqual(system(first["[gp]"]), system(first[None]))
        self.assertIn("You lead the work and delegate.", system(first[None]))
        self.assertIn("You check one claim", system(first["[chk]"]))
        # usage: every reply counted once (lead 2, reviewer 2, general-purpose 2; the 400 none)
        self.assertEqual((summary["usage"]["input_tokens"], summary["usage"]["output_tokens"]), (600, 120))
        # the live view: the sub-agents under their task lines, by name
        shown = self.cli_logs(execution_id)
        self.assertIn("⏺ task reviewer · [rev] review it", shown)
        self.assertRegex(shown, r"\n    reviewer ⏺ execute date")
        self.assertRegex(shown, r"\n    checker ✗ ")
        # resume: the lead's conversation alone, byte for byte
        parent_last = [r for r in self.fake.requests if self.fake.route(r) is None][-1]
        code, err, events, summary = self.json_run("resume", execution_id, "anything more?")
        self.assertEqual(code, 0, err)
        self.assertEqual(summary["final_text"], "Nothing more.")
        resumed = self.fake.requests[-1]
        self.assertEqual(dumps(plain(resumed["messages"][:-2])), dumps(plain(parent_last["messages"])))
        self.assertEqual(resumed["system"], parent_last["system"])
        self.assertEqual(resumed["tools"], parent_last["tools"])

    def test_cancel_during_a_sub_agents_command_leaves_no_process(self):
        self.script = [tool_step(task(GP, "[slow] wait for it")), text_step("unused")]
        self.with_routes()
        proc = self.foreground("--workspace", self.ws, "wait")
        wait_for(lambda: read(os.path.join(self.ws, "sleep.pid")).strip(), 90, "the sub-agent's command to start")
        self.assertTrue(running(TAG), "its processes are not to be found")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
        self.assertEqual(proc.returncode, 130, err)
        wait_for(lambda: not running(TAG), 30, "the sub-agent's command to be killed")
        events = [e for e in map(json.loads, out.splitlines()) if "seq" in e]
        self.assertEqual([e["seq"] for e in events], list(range(1, len(events) + 1)))
        self.assertEqual(events[-1]["phase"], "CANCELLED")
        (result,) = [e for e in events if e["kind"] == "tool_result" and "depth" not in e]
        self.assertTrue(result["is_error"])
        self.assertTrue([e for e in events if e.get("subagent") == GP and e["kind"] == "tool_call"])


class LocalEndToEndTest(EndToEnd, CliCase):
    def setUp(self):
        super().setUp()
        self.ws = self.workspace
        self.with_routes()

    def logs_json(self, execution_id):
        return self.logs(execution_id)

    def cli_logs(self, execution_id):
        proc = self.cli("logs", execution_id)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout + proc.stderr


class CloudEndToEndTest(EndToEnd, CloudCase):
    def setUp(self):
        super().setUp()
        self.ws = self.workspace("ws")
        self.env["SANDBOX_ROOT_DIR"] = self.ws
        self.with_routes()

    def logs_json(self, execution_id):
        from testsupport import run_cli
        proc = run_cli(["logs", execution_id, "--json"], self.env, cwd=self.ws)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return [json.loads(line) for line in proc.stdout.splitlines()]

    def cli_logs(self, execution_id):
        from testsupport import run_cli
        proc = run_cli(["logs", execution_id], self.env, cwd=self.ws)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout + proc.stderr


if __name__ == "__main__":
    unittest.main()
