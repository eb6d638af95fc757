"""Tests of conversations that last: resuming a run from its log (agent.rebuild, `runner.py resume`
and `-c`, over the daemon and over Redis) and clearing old tool results near the context window.
The real anthropic SDK talks to the fake Messages API; what the model was sent is read from the
fake's request log (FakeAnthropic.requests).

    python -m unittest test_resume -v
"""
import contextlib
import copy
import io
import json
import os
import shutil
import tempfile
import threading
import time
import unittest

import agent
import models
import stigmer_pb2 as pb
import terminal
from sandbox import FilesystemSandbox
from test_agent import anthropic_model
from test_runner import CliCase
from testsupport import FAKE_KEY, FakeAnthropic, running, sleep_tag, text_step, tool_step, wait_for
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)
from testsupport_redis import RedisServer, requires_redis

BIG = 8000  # characters of output of each `big` command: about 2000 tokens


def big(n):
    """A tool step whose command prints BIG characters (distinct per step)."""
    return ("execute", {"command": f"python3 -c \"print('{n}' * {BIG})\""})


def plain(messages):
    """Request messages without cache_control marks (where the breakpoint sits moves every turn)."""
    messages = copy.deepcopy(messages)
    for message in messages:
        for block in message["content"]:
            block.pop("cache_control", None)
    return messages


def dumps(value):
    return json.dumps(value, ensure_ascii=False)


class AgentRun:
    """Runs Agents in-process against one fake and one workspace; collects their events as pb.Event lists."""

    def __init__(self, test, script):
        self.test = test
        self.fake = FakeAnthropic(script).start()
        test.addCleanup(self.fake.stop)
        self.workspace = tempfile.mkdtemp(prefix="stigmer-resume-")
        test.addCleanup(shutil.rmtree, self.workspace, True)

    def run(self, prompt, history=(), model="claude-fake", **kwargs):
        """(phase, reason, events, agent) for one execution."""
        events = []
        emit = lambda **payload: events.append(pb.Event(seq=len(events) + 1, **payload))  # noqa: E731
        client_model = anthropic_model(self.test, self.fake.url)
        client_model.model = model
        the_agent = self.agent = agent.Agent(client_model, FilesystemSandbox(self.workspace), emit, **kwargs)
        phase, reason, _ = the_agent.run(prompt, self.workspace, history)
        return phase, reason, events, the_agent


class ResumeAgentTest(unittest.TestCase):
    """agent.rebuild: the next request, rebuilt from the events, is the one the parent would have sent."""

    script = [
        tool_step(("write_file", {"path": "notes.txt", "content": "one\n"}), text="Writing notes."),
        tool_step(("execute", {"command": "cat notes.txt"}), ("ls", {})),
        tool_step(("read_file", {"path": "notes.txt", "offset": 0}), text="Reading it back."),
        text_step("Wrote notes.txt."),
        text_step("Second answer."),
    ]

    def test_a_resumed_request_is_the_parents_next_request_plus_the_follow_up(self):
        # The control run goes one turn further than the parent: its request 3 is what the parent would send next.
        control = AgentRun(self, self.script)
        self.assertEqual(control.run("write notes", max_turns=4)[0], pb.COMPLETED)
        parent_run = AgentRun(self, self.script)
        parent_run.workspace = control.workspace  # the system prompt names the workspace
        phase, reason, events, _ = parent_run.run("write notes", max_turns=3)
        self.assertEqual(phase, pb.FAILED)
        self.assertIn("turn limit", reason)
        self.assertEqual(len(parent_run.fake.requests), 3)
        phase, _, child_events, _ = parent_run.run("now append two", history=events)
        self.assertEqual(phase, pb.COMPLETED)
        would_send, resumed = control.fake.requests[3], parent_run.fake.requests[3]
        for key in ("model", "max_tokens", "system", "tools"):
            self.assertEqual(dumps(resumed[key]), dumps(would_send[key]), key)
        self.assertEqual(dumps(plain(resumed["messages"][:-1])), dumps(plain(would_send["messages"])))
        self.assertEqual(resumed["messages"][-1], {"role": "user", "content": [
            {"type": "text", "text": "now append two", "cache_control": {"type": "ephemeral"}}]})
        # the child's own first events: its task (with the system prompt kept), then the model's turn
        self.assertEqual(child_events[0].WhichOneof("payload"), "prompt")
        self.assertEqual((child_events[0].prompt.source, child_events[0].prompt.system),
                         ("task", events[0].prompt.system))

    def test_a_chain_of_three_and_another_model(self):
        run = AgentRun(self, self.script)
        _, _, first, _ = run.run("write notes")  # 4 requests, COMPLETED with "Wrote notes.txt."
        _, _, second, _ = run.run("and then?", history=first)
        _, _, third, _ = run.run("one more", history=first + second, model="claude-other")
        parent_last, child, grandchild = run.fake.requests[3], run.fake.requests[4], run.fake.requests[5]
        self.assertEqual(dumps(plain(child["messages"][:4])), dumps(plain(parent_last["messages"][:4])))
        self.assertEqual(plain(child["messages"][-2:]), [
            {"role": "assistant", "content": [{"text": "Wrote notes.txt.", "type": "text"}]},
            {"role": "user", "content": [{"type": "text", "text": "and then?"}]}])
        self.assertEqual(dumps(plain(grandchild["messages"][:-2])), dumps(plain(child["messages"])))
        self.assertEqual(plain(grandchild["messages"][-2:]), [
            {"role": "assistant", "content": [{"text": "Second answer.", "type": "text"}]},
            {"role": "user", "content": [{"type": "text", "text": "one more"}]}])
        self.assertEqual(grandchild["model"], "claude-other")  # another model continues the same messages
        self.assertEqual(grandchild["system"], child["system"])

    def test_a_cut_off_reply_and_its_note_are_rebuilt(self):
        run = AgentRun(self, [text_step("Half of it", stop="max_tokens"), tool_step(("ls", {})), text_step("ok"),
                              text_step("again")])
        _, _, events, _ = run.run("long answer")
        run.run("more", history=events)
        parent_last, resumed = run.fake.requests[2], run.fake.requests[3]
        self.assertEqual(parent_last["messages"][2]["content"][0]["text"], agent.CONTINUE_NOTE)
        self.assertEqual(dumps(plain(resumed["messages"][:len(parent_last["messages"])])),
                         dumps(plain(parent_last["messages"])))

    def test_a_tool_call_without_result_gets_not_run(self):
        run = AgentRun(self, [tool_step(("ls", {}), ("ls", {"path": "."})), text_step("fine")])
        _, _, events, _ = run.run("list", max_turns=1)
        kinds = [e.WhichOneof("payload") for e in events]
        lost = kinds.index("tool_result", kinds.index("tool_result") + 1)  # the runner died before the second result
        system, messages, tokens = agent.rebuild(events[:lost])
        self.assertEqual(messages[-1], {"role": "tool_results", "results": [
            {"id": "toolu_0_0", "output": messages[-1]["results"][0]["output"], "is_error": False},
            {"id": "toolu_0_1", "output": agent.NOT_RUN, "is_error": True}]})
        self.assertTrue(system.startswith("You are a coding agent"))
        self.assertEqual(tokens, 100)  # the fake's default input tokens for the request

    def test_a_cancelled_run_resumes_with_its_not_run_results(self):
        tag = sleep_tag()
        run = AgentRun(self, [tool_step(("execute", {"command": f"sleep {tag}"}), ("execute", {"command": "echo 2"})),
                              text_step("resumed")])
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=run.run("sleep")))
        thread.start()
        wait_for(lambda: running(tag), 30, "the first command to run")
        run.agent.cancel()
        thread.join(30)
        phase, _, events, _ = result["r"]
        self.assertEqual(phase, pb.CANCELLED)
        run.run("go on", history=events)
        (resumed,) = run.fake.requests[1:]
        results = [b for b in resumed["messages"][2]["content"]]
        self.assertEqual([r["tool_use_id"] for r in results], ["toolu_0_0", "toolu_0_1"])
        self.assertEqual(results[1]["content"], agent.NOT_RUN)
        self.assertEqual(resumed["messages"][3]["content"][0]["text"], "go on")


class ContextTest(unittest.TestCase):
    """Old tool results are cleared, oldest first, when the previous request neared the window."""

    def test_growing_input_clears_the_oldest_results_and_keeps_prefixes_stable(self):
        usage = [1000, 3000, 5000, 7000, 8500, 6000, 8200]  # input tokens each request reports
        script = [tool_step(big(n), usage={"input": tokens}) for n, tokens in enumerate(usage)]
        run = AgentRun(self, script + [text_step("done", usage={"input": 6500})])
        phase, reason, events, _ = run.run("fill the context", context_window=10_000)
        self.assertEqual(phase, pb.COMPLETED, reason)
        cleared = [e.context_cleared for e in events if e.WhichOneof("payload") == "context_cleared"]
        self.assertEqual([list(c.ids) for c in cleared], [["toolu_0_0", "toolu_1_0"], ["toolu_2_0", "toolu_3_0"]])
        self.assertEqual([(c.tokens_before, c.window) for c in cleared], [(8500, 10_000), (8200, 10_000)])
        self.assertTrue(all(c.tokens_after < 5000 for c in cleared))
        requests = run.fake.requests
        self.assertEqual(len(requests), 8)

        def outputs(request):
            return {b["tool_use_id"]: b["content"] for m in request["messages"] for b in m["content"]
                    if b["type"] == "tool_result"}

        last = outputs(requests[7])
        for n in range(4):  # cleared, oldest first, with a note naming the command
            self.assertEqual(last[f"toolu_{n}_0"], f"output of `{big(n)[1]['command']}` cleared to save context; "
                                                   "run it again if you need it")
        for n in range(4, 7):  # the newest are whole
            self.assertEqual(last[f"toolu_{n}_0"], str(n) * BIG)
        self.assertEqual(outputs(requests[4])["toolu_0_0"], "0" * BIG)  # not yet cleared before the threshold
        self.assertIn("cleared", outputs(requests[5])["toolu_0_0"])
        self.assertEqual(outputs(requests[5])["toolu_2_0"], "2" * BIG)
        # the prefix breaks only where results were cleared, and is stable between clearings
        for i in range(1, len(requests)):
            before, after = plain(requests[i - 1]["messages"]), plain(requests[i]["messages"])
            self.assertEqual(requests[i]["system"], requests[i - 1]["system"])
            self.assertEqual(requests[i]["tools"], requests[i - 1]["tools"])
            same = dumps(after[:len(before)]) == dumps(before)
            self.assertEqual(same, i not in (5, 7), f"request {i}")
        turns = [e.turn.context_tokens for e in events if e.WhichOneof("payload") == "turn"]
        self.assertEqual(turns, usage + [6500])
        # a resumed run starts from the cleared conversation, as the parent left it
        run.fake.script.append(text_step("resumed"))
        run.run("go on", history=events, context_window=10_000)
        self.assertEqual(dumps(plain(requests[8]["messages"][:len(requests[7]["messages"])])),
                         dumps(plain(requests[7]["messages"])))

    def test_a_prompt_too_long_error_clears_and_asks_again(self):
        steps = [tool_step(big(n)) for n in range(7)]
        steps[6]["errors"] = [(400, "prompt is too long: 250000 tokens > 200000 maximum")]
        run = AgentRun(self, steps + [text_step("fits now")])
        phase, reason, events, _ = run.run("fill it", context_window=10_000)
        self.assertEqual(phase, pb.COMPLETED, reason)
        (cleared,) = [e.context_cleared for e in events if e.WhichOneof("payload") == "context_cleared"]
        self.assertEqual(list(cleared.ids), ["toolu_0_0", "toolu_1_0", "toolu_2_0"])
        self.assertEqual(cleared.tokens_before, 10_000)
        first, again = run.fake.requests[6], run.fake.requests[7]
        self.assertIn("0" * BIG, dumps(first))
        self.assertNotIn("0" * BIG, dumps(again))
        self.assertNotIn("error", [e.WhichOneof("payload") for e in events])

    def test_when_nothing_can_be_cleared_the_run_fails_as_before(self):
        run = AgentRun(self, [text_step("x", stop="model_context_window_exceeded")])
        phase, reason, events, _ = run.run("too big", context_window=10_000)
        self.assertEqual((phase, reason), (pb.FAILED, "the conversation no longer fits the model's context window"))

    def test_context_window_table(self):
        self.assertEqual(models.context_window("claude-sonnet-4-5"), 200_000)
        self.assertEqual(models.context_window("anthropic/claude-opus-4-1"), 200_000)
        self.assertEqual(models.context_window("openai/gpt-4o-mini"), 128_000)
        self.assertEqual(models.context_window("gemini/gemini-2.5-pro"), 1_048_576)
        self.assertEqual(models.context_window("ollama/llama3.2"), models.DEFAULT_CONTEXT_WINDOW)
        self.assertEqual(models.context_window("claude-sonnet-4-5", override=50_000), 50_000)


class ResumeCase(CliCase):
    def resume(self, *args):
        """`runner.py resume ARGS --json`; returns (CompletedProcess, events): the log's events, without the
        run and summary objects around them."""
        proc = self.cli("resume", *args, "--json")
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        return proc, [obj for obj in lines if "seq" in obj]


class ResumeCliTest(ResumeCase):
    """`resume` and a chain of three, through the CLI, a real daemon and worker."""

    script = [
        tool_step(("write_file", {"path": "notes.txt", "content": "one\n"}), text="Writing notes."),
        tool_step(("execute", {"command": "cat notes.txt"})),
        text_step("Wrote notes.txt."),
        tool_step(("execute", {"command": "echo two >> notes.txt && cat notes.txt"})),
        text_step("Appended two."),
        text_step("Three executions, one conversation."),
    ]

    def test_resume_continues_the_conversation_and_a_chain_of_three(self):
        proc, events = self.run_task("write notes")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        parent = events[0]["execution_id"]
        proc, events = self.resume(parent, "now append two")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        child = events[0]["execution_id"]
        self.assertNotEqual(child, parent)
        requests = self.fake.requests
        self.assertEqual(len(requests), 5)
        self.assertEqual(dumps(plain(requests[3]["messages"][:-2])), dumps(plain(requests[2]["messages"])))
        self.assertEqual(plain(requests[3]["messages"][-2:]), [
            {"role": "assistant", "content": [{"text": "Wrote notes.txt.", "type": "text"}]},
            {"role": "user", "content": [{"type": "text", "text": "now append two"}]}])
        self.assertEqual(requests[3]["system"], requests[2]["system"])
        with open(os.path.join(self.workspace, "notes.txt")) as f:
            self.assertEqual(f.read(), "one\ntwo\n")
        proc, events = self.resume(child, "how many executions?")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        grandchild = events[0]["execution_id"]
        self.assertEqual(dumps(plain(requests[5]["messages"][:-2])), dumps(plain(requests[4]["messages"])))
        self.assertEqual(requests[5]["messages"][0]["content"][0]["text"], "write notes")
        self.assertEqual(events[-1]["final_text"], "Three executions, one conversation.")
        # list shows what continues what
        rows = {r["id"]: r for r in map(json.loads, self.cli("list", "--json").stdout.splitlines())}
        self.assertEqual(rows[child]["spec"]["parent_id"], parent)
        self.assertEqual(rows[grandchild]["spec"]["parent_id"], child)
        self.assertEqual(rows[parent]["spec"]["parent_id"], "")
        table = self.cli("list").stdout
        self.assertIn("CONTINUES", table)
        self.assertRegex(table, rf"{grandchild} .* {child} ")
        # logs --history: the whole conversation, oldest execution first
        proc = self.cli("logs", grandchild, "--json", "--history")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        shown = [json.loads(line) for line in proc.stdout.splitlines()]
        order = list(dict.fromkeys(e["execution_id"] for e in shown))
        self.assertEqual(order, [parent, child, grandchild])
        prompts = [e["text"] for e in shown if e["kind"] == "prompt"]
        self.assertEqual(prompts, ["write notes", "now append two", "how many executions?"])
        self.assertEqual(len(self.logs(grandchild)), len([e for e in shown if e["execution_id"] == grandchild]))

    def test_unknown_execution(self):
        proc = self.cli("resume", "ex-nope", "more")
        self.assertEqual(proc.returncode, 1)
        self.assertIn("no execution 'ex-nope'", proc.stderr)


class ResumeCancelledCliTest(ResumeCase):
    """A running execution cannot be resumed; once cancelled it can, its cut tool calls answered."""

    script = [
        tool_step(("execute", {"command": "sleep 30"}), ("execute", {"command": "echo second"})),
        text_step("Both were interrupted; I will go on."),
    ]

    def test_refused_while_running_then_resumed_after_cancel(self):
        proc = self.cli("run", "sleep a while", "--detach")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        parent = proc.stdout.strip()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(e["kind"] == "tool_call" for e in self.logs(parent)):
                break
            time.sleep(0.2)
        refused = self.cli("resume", parent, "go on")
        self.assertEqual(refused.returncode, 1)
        self.assertIn(f"{parent} is still running: wait for it to end", refused.stderr)
        self.assertIn(f"python runner.py cancel {parent}", refused.stderr)
        self.assertEqual(len(self.fake.requests), 1)  # nothing was submitted
        self.assertEqual(self.cli("cancel", parent).returncode, 0)
        while time.monotonic() < deadline and self.logs(parent)[-1].get("phase") != "CANCELLED":
            time.sleep(0.2)
        self.assertEqual(self.logs(parent)[-1]["phase"], "CANCELLED")
        proc, events = self.resume(parent, "go on")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        resumed = self.fake.requests[-1]
        results = resumed["messages"][2]["content"]
        self.assertEqual([r["tool_use_id"] for r in results], ["toolu_0_0", "toolu_0_1"])
        self.assertEqual(results[1]["content"], agent.NOT_RUN)
        self.assertEqual(resumed["messages"][3]["content"][0]["text"], "go on")
        self.assertEqual(events[-1]["phase"], "COMPLETED")


class ContinueCliTest(CliCase):
    """`-c` continues the latest execution of the current workspace, across a daemon restart."""

    script = [tool_step(("execute", {"command": "echo hi"})), text_step("Said hi."), text_step("Continued.")]

    def test_continue_picks_the_latest_in_this_workspace_after_a_restart(self):
        nothing = self.cli("-c", "and then?")
        self.assertEqual(nothing.returncode, 2)
        self.assertIn("nothing to continue", nothing.stderr)
        self.assertEqual(self.cli("start").returncode, 0)
        proc, events = self.run_task("say hi")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        here = events[0]["execution_id"]
        elsewhere = os.path.join(self.tmp, "other")
        os.makedirs(elsewhere)
        proc, events = self.run_task("say hi elsewhere", "--workspace", elsewhere)  # newer, another workspace
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.cli("stop").returncode, 0)
        self.assertEqual(self.cli("start").returncode, 0)  # a new daemon reads the log from SQLite
        proc, events = self.run_task("-c", "and then?")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(events[-1]["final_text"], "Continued.")
        child = events[0]["execution_id"]
        rows = {r["id"]: r for r in map(json.loads, self.cli("list", "--json").stdout.splitlines())}
        self.assertEqual(rows[child]["spec"]["parent_id"], here)
        self.assertEqual(rows[child]["spec"]["workspace"], self.workspace)
        parent_last, resumed = self.fake.requests[1], self.fake.requests[-1]
        self.assertEqual(dumps(plain(resumed["messages"][:-2])), dumps(plain(parent_last["messages"])))
        self.assertEqual(resumed["messages"][-1]["content"][0]["text"], "and then?")


class WorkerChainTest(unittest.TestCase):
    """Worker.conversation walks the chain through the link's history(), oldest execution first."""

    def test_chain_order_and_refusals(self):
        import worker

        def prompt(execution_id, text):
            return pb.Event(execution_id=execution_id, seq=1, prompt=pb.Prompt(text=text, source="task"))

        log = {"ex-1": (pb.Execution(id="ex-1", phase=pb.COMPLETED), [prompt("ex-1", "first")]),
               "ex-2": (pb.Execution(id="ex-2", phase=pb.CANCELLED, spec=pb.ExecutionSpec(parent_id="ex-1")),
                        [prompt("ex-2", "second")]),
               "ex-old": (pb.Execution(id="ex-old", phase=pb.COMPLETED), [pb.Event(seq=1, text=pb.TextDelta(text="x"))]),
               "ex-run": (pb.Execution(id="ex-run", phase=pb.RUNNING), [prompt("ex-run", "busy")])}

        def history(execution_id):
            if execution_id not in log:
                raise LookupError(f"no execution {execution_id!r}")
            return log[execution_id]

        w = worker.Worker(environ=os.environ, history=history)
        self.assertEqual([e.prompt.text for e in w.conversation("ex-2")], ["first", "second"])
        for wanted, message in (("ex-old", "older stigmer"), ("ex-run", r"has not ended \(RUNNING\)"),
                                ("ex-gone", "could not read the log of ex-gone")):
            with self.assertRaisesRegex(worker.HistoryError, message):
                w.conversation(wanted)
        with self.assertRaisesRegex(worker.HistoryError, "cannot read the log"):
            worker.Worker(environ=os.environ).conversation("ex-1")


class RenderTest(unittest.TestCase):
    """What a person sees: the task in logs, the clearing line, the summary, ancestors under headings."""

    def render(self, renderer, events, summary=None):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            for event in events:
                renderer.event(event)
            if summary is not None:
                renderer.summary(summary, "COMPLETED", 1.0)
        return out.getvalue()

    def test_prompts_clearing_and_summary(self):
        events = [pb.Event(seq=1, prompt=pb.Prompt(text="fix it", source="task", system="S")),
                  pb.Event(seq=2, prompt=pb.Prompt(text=agent.CONTINUE_NOTE, source="note")),
                  pb.Event(seq=3, context_cleared=pb.ContextCleared(results=4, tokens_before=170_000,
                                                                    tokens_after=99_000, window=200_000, ids=["a"])),
                  pb.Event(seq=4, turn=pb.Turn(number=1, stop="done", text="ok"))]
        shown = self.render(terminal.Renderer(False, False, False), events, pb.Execution(id="ex-1", turns=1))
        self.assertNotIn("fix it", shown)  # `run`: the user just typed it
        self.assertIn("⟲ cleared 4 old tool results to save context (170,000 → ~99,000 of 200,000 tokens)", shown)
        self.assertIn("context: 4 old tool results cleared to stay inside the 200,000-token window", shown)
        renderer = terminal.Renderer(False, False, False)
        renderer.show_prompts = True
        shown = self.render(renderer, events)
        self.assertIn("› fix it", shown)
        self.assertNotIn(agent.CONTINUE_NOTE, shown)  # the runner's notes are not the user's words

    def test_ancestors_come_first_under_headings(self):
        from test_terminal import ListClient

        class Chain(ListClient):
            def get(self, execution_id):
                return {"ex-1": pb.Execution(id="ex-1", phase=pb.COMPLETED),
                        "ex-2": pb.Execution(id="ex-2", phase=pb.FAILED, spec=pb.ExecutionSpec(parent_id="ex-1"))}[
                    execution_id]

            def watch(self, execution_id, after_seq=0, follow=True):
                return iter([pb.Event(execution_id=execution_id, seq=1, prompt=pb.Prompt(
                    text=f"task of {execution_id}", source="task"))])

        out = io.StringIO()
        renderer = terminal.Renderer(False, False, False)
        renderer.show_prompts = True
        with contextlib.redirect_stdout(out):
            terminal.show_ancestors(Chain([]), pb.Execution(id="ex-3", spec=pb.ExecutionSpec(parent_id="ex-2")),
                                    renderer)
        self.assertEqual(out.getvalue().splitlines(), ["── ex-1 · completed ──", "› task of ex-1",
                                                       "── ex-2 · failed ──", "› task of ex-2", "── ex-3 ──"])


@requires_redis
class ResumeRedisTest(unittest.TestCase):
    """The same rebuild over the Redis link: a real Worker reads the parent's events with RedisLink.history."""

    def setUp(self):
        import redis_backend
        self.server = RedisServer().start()
        self.addCleanup(self.server.stop)
        self.fake = FakeAnthropic([tool_step(("execute", {"command": "echo one"})), text_step("One."),
                                   text_step("Two.")]).start()
        self.addCleanup(self.fake.stop)
        saved = {k: os.environ.get(k) for k in ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY")}
        os.environ.update(ANTHROPIC_BASE_URL=self.fake.url, ANTHROPIC_API_KEY=FAKE_KEY)
        self.addCleanup(lambda: [os.environ.pop(k, None) if v is None else os.environ.update({k: v})
                                 for k, v in saved.items()])
        self.client = redis_backend.RedisClient(self.server.url, "resume:")
        self.addCleanup(self.client.close)
        import worker
        link = redis_backend.RedisLink(self.server.url, "resume:")
        self.worker = worker.Worker(environ=os.environ, capacity=1, mode="cloud", model="claude-fake", history=link.history)
        thread = threading.Thread(target=link.run, args=(self.worker,), daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(self.worker.stop, 2)
        self.workspace = tempfile.mkdtemp(prefix="stigmer-redis-resume-")
        self.addCleanup(shutil.rmtree, self.workspace, True)

    def finished(self, execution_id):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ex = self.client.get(execution_id)
            if ex.phase in (pb.COMPLETED, pb.FAILED, pb.CANCELLED):
                return ex
            time.sleep(0.1)
        self.fail(f"{execution_id} did not finish")

    def test_resume_over_redis(self):
        self.worker.preload()
        parent = self.client.submit(pb.ExecutionSpec(prompt="say one", workspace=self.workspace))
        child_spec = pb.ExecutionSpec(prompt="and two", workspace=self.workspace, parent_id=parent.id)
        with self.assertRaisesRegex(Exception, "still (pending|running)"):
            self.client.submit(child_spec)
        self.assertEqual(self.finished(parent.id).phase, pb.COMPLETED)
        child = self.client.submit(child_spec)
        self.assertEqual(self.finished(child.id).final_text, "Two.")
        parent_last, resumed = self.fake.requests[1], self.fake.requests[2]
        self.assertEqual(dumps(plain(resumed["messages"][:-2])), dumps(plain(parent_last["messages"])))
        self.assertEqual(resumed["messages"][-1]["content"][0]["text"], "and two")


if __name__ == "__main__":
    unittest.main()
