"""Tests of the agent loop in-process: `Agent` driving each model adapter through its real SDK
against a fake on loopback (`models.AnthropicModel` and the fake Messages API,
`models.OpenAIChatModel` and the fake Chat Completions API), a real FilesystemSandbox, and
the emitted events collected in a list. The same loop tests run once per adapter.

    python -m unittest test_agent -v
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import anthropic
import openai

import agent
import models
import sandbox
import stigmer_pb2 as pb
from sandbox import FilesystemSandbox
from testsupport import FAKE_KEY, HERE, OPENAI_KEY, FakeAnthropic, FakeOpenAI, text_step, tool_step
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)


def anthropic_model(test, url, key=FAKE_KEY, max_retries=0):  # the adapter retries (models.API_RETRIES), visibly
    """An AnthropicModel whose client talks to the fake at URL, closed when TEST ends."""
    client = anthropic.Anthropic(api_key=key, base_url=url, max_retries=max_retries)
    test.addCleanup(client.close)
    return models.AnthropicModel("claude-fake", client)


def openai_model(test, url, key=OPENAI_KEY, max_retries=0):
    """An OpenAIChatModel whose client talks to the fake Chat Completions API at URL, closed when TEST ends."""
    client = openai.OpenAI(api_key=key, base_url=url + "/v1", max_retries=max_retries)
    test.addCleanup(client.close)
    return models.OpenAIChatModel("gpt-fake", base_url=url + "/v1", client=client)


class LoopTests:
    """The agent-loop tests, run against each adapter: AgentLoopTest (AnthropicModel and the fake Messages
    API) and OpenAIAgentLoopTest (OpenAIChatModel and the fake Chat Completions API). A subclass gives the
    fake, the model factory, the keys, and how to read what a request carried."""

    Fake = make_model = key = wrong_key = key_var = call_prefix = None  # set by each subclass
    status_cases = {}  # status -> (error code, words in the reason, requests made with the SDK's retries)
    marks_latest_turn = False  # True: the latest message carries a cache breakpoint (changes in the next request)

    def run_agent(self, script, key=None, **kwargs):
        """Run SCRIPT through an Agent; returns (phase, reason, final_text, events, fake)."""
        workspace = tempfile.mkdtemp(prefix="stigmer-agent-")
        self.addCleanup(shutil.rmtree, workspace, True)
        self.workspace = workspace
        events = []
        with self.Fake(script) as fake:
            the_agent = agent.Agent(self.make_model(self, fake.url, key or self.key), FilesystemSandbox(workspace),
                                    lambda **p: events.append(p), **kwargs)
            self.agent = the_agent
            phase, reason, text = the_agent.run("do the task", workspace)
        return phase, reason, text, events, fake

    # What a request body carried, read the same way for both APIs.

    def sent_assistant(self, body):
        """(text, [(id, name, input)]) of the request's last assistant message."""
        message = [m for m in body["messages"] if m["role"] == "assistant"][-1]
        text = "".join(b["text"] for b in message["content"] if b["type"] == "text")
        return text, [(b["id"], b["name"], b["input"]) for b in message["content"] if b["type"] == "tool_use"]

    def sent_results(self, body):
        """[{"id", "content", "is_error"}] of the tool results at the end of the request."""
        return [{"id": b["tool_use_id"], "content": b["content"], "is_error": b["is_error"]}
                for b in body["messages"][-1]["content"] if b["type"] == "tool_result"]

    def sent_last(self, body):
        """(role, text) of the request's last message."""
        message = body["messages"][-1]
        return message["role"], message["content"][0]["text"]

    def call_id(self, step, n):
        return f"{self.call_prefix}_{step}_{n}"

    def kinds(self, events):
        return [next(iter(e)) for e in events]

    def errors(self, events):
        return [e["error"].code for e in events if "error" in e]

    def test_a_text_reply_completes_the_run(self):
        phase, reason, text, events, fake = self.run_agent([text_step("all done here, nothing to change", usage={
            "input": 300, "output": 40, "cache_read": 7, "cache_write": 5})])
        self.assertEqual((phase, reason, text), (pb.COMPLETED, "", "all done here, nothing to change"))
        self.assertEqual("".join(e["text"].text for e in events if "text" in e), "all done here, nothing to change")
        self.assertGreater(self.kinds(events).count("text"), 1)  # streamed in pieces, as they arrive
        (usage,) = [e["usage"] for e in events if "usage" in e]
        writes = 5 if self.marks_latest_turn else 0  # Chat Completions reports no cache writes
        self.assertEqual((usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens),
                         (300, 40, 7, writes))
        self.assertEqual((len(fake.requests), self.agent.turns), (1, 1))

    def test_tool_use_runs_the_tools_and_sends_the_results(self):
        step = tool_step(("write_file", {"path": "out.txt", "content": "hello"}), text="writing it")
        phase, _, text, events, fake = self.run_agent([step, text_step("wrote it")])
        self.assertEqual((phase, text), (pb.COMPLETED, "wrote it"))
        with open(os.path.join(self.workspace, "out.txt")) as f:
            self.assertEqual(f.read(), "hello")
        self.assertEqual(self.kinds(events).count("tool_call"), 1)
        (call,) = [e["tool_call"] for e in events if "tool_call" in e]
        self.assertEqual((call.id, call.name, json.loads(call.input_json)),
                         (self.call_id(0, 0), "write_file", {"path": "out.txt", "content": "hello"}))
        said, calls = self.sent_assistant(fake.requests[1])
        self.assertEqual(said, "writing it")
        self.assertEqual(calls, [(self.call_id(0, 0), "write_file", {"path": "out.txt", "content": "hello"})])
        (result,) = self.sent_results(fake.requests[1])
        self.assertEqual(result["id"], self.call_id(0, 0))
        self.assertIn(result["is_error"], (False, None))  # None: Chat Completions has no error flag
        (usage,) = [e["usage"] for e in events if "usage" in e][-1:]
        self.assertEqual((usage.input_tokens, usage.output_tokens), (200, 40))  # cumulative over both turns

    def test_max_tokens_asks_the_model_to_continue(self):
        phase, _, _, _, fake = self.run_agent([text_step("first half", stop="max_tokens"), text_step("second")])
        self.assertEqual(phase, pb.COMPLETED)
        self.assertEqual(self.sent_assistant(fake.requests[1]), ("first half", []))
        self.assertEqual(self.sent_last(fake.requests[1]), ("user", agent.CONTINUE_NOTE))

    def test_max_tokens_inside_a_tool_call_runs_nothing_and_says_why(self):
        cut = tool_step(("write_file", {"path": "big.txt", "content": "x"}), stop="max_tokens")
        phase, _, _, events, fake = self.run_agent([cut, text_step("ok, smaller")])
        self.assertEqual(phase, pb.COMPLETED)
        self.assertNotIn("tool_result", self.kinds(events))
        self.assertFalse(os.path.exists(os.path.join(self.workspace, "big.txt")))
        self.assertEqual(self.sent_last(fake.requests[1]), ("user", agent.TOOL_CUT_NOTE))

    def test_turn_limit(self):
        script = [tool_step(("execute", {"command": f"echo turn {i}"})) for i in range(10)]
        phase, reason, _, _, fake = self.run_agent(script, max_turns=3)
        self.assertEqual(phase, pb.FAILED)
        self.assertIn("turn limit (3 turns)", reason)
        self.assertEqual(len(fake.requests), 3)

    def test_token_limit(self):
        script = [tool_step(("execute", {"command": f"echo turn {i}"})) for i in range(10)]
        phase, reason, _, _, fake = self.run_agent(script, max_tokens_total=250)
        self.assertEqual(phase, pb.FAILED)
        self.assertIn("token limit (360 of 250 tokens)", reason)  # 120 tokens a turn: over 250 after the third
        self.assertEqual(len(fake.requests), 3)

    def test_malformed_tool_input_goes_back_to_the_model_as_an_error(self):
        step = tool_step(("execute", '{"command": }'))
        phase, _, _, events, fake = self.run_agent([step, text_step("sorry, again")])
        self.assertEqual(phase, pb.COMPLETED)
        (result,) = [e["tool_result"] for e in events if "tool_result" in e]
        self.assertTrue(result.is_error)
        self.assertEqual(result.exit_code, 2)
        self.assertIn("not a valid JSON object", result.output)
        _, calls = self.sent_assistant(fake.requests[1])
        self.assertIn("__malformed__", calls[-1][2])
        (sent,) = self.sent_results(fake.requests[1])
        self.assertIn(sent["is_error"], (True, None))
        self.assertIn("not a valid JSON object", sent["content"])

    def test_refusal_runs_no_tools(self):
        step = tool_step(("execute", {"command": "touch should-not-exist"}), stop="refusal")
        phase, reason, _, events, fake = self.run_agent([step])
        self.assertEqual(phase, pb.FAILED)
        self.assertIn("refused", reason)
        self.assertNotIn("tool_call", self.kinds(events))
        self.assertFalse(os.path.exists(os.path.join(self.workspace, "should-not-exist")))
        self.assertEqual(len(fake.requests), 1)

    def context_full_error(self):
        """The scripted error by which the fake says the conversation no longer fits."""
        return (400, "prompt is too long: 250000 tokens > 200000 maximum")

    def test_context_window_full_as_an_error(self):
        step = text_step("never", errors=[self.context_full_error()])
        phase, reason, _, events, fake = self.run_agent([step])
        self.assertEqual(phase, pb.FAILED)
        self.assertEqual(reason, "the conversation no longer fits the model's context window")
        self.assertEqual(self.errors(events), ["context_window"])
        self.assertEqual(len(fake.requests), 1)

    def test_other_400s_say_what_the_api_said(self):
        phase, reason, _, events, _ = self.run_agent([text_step("never", errors=[(400, "tools.0: bad schema")])])
        self.assertEqual(phase, pb.FAILED)
        self.assertIn("tools.0: bad schema", reason)
        self.assertEqual(self.errors(events), ["bad_request"])

    def test_401_is_a_clear_failure(self):
        phase, reason, _, events, fake = self.run_agent([text_step("never")], key=self.wrong_key)
        self.assertEqual(phase, pb.FAILED)
        self.assertIn(self.key_var, reason)
        self.assertIn("401", reason)
        self.assertEqual(self.errors(events), ["auth"])
        self.assertEqual(fake.statuses, [(0, 401)])  # not retried

    def test_404_says_to_check_the_model_name(self):
        phase, reason, _, events, fake = self.run_agent([text_step("never", errors=[(404, "model: no-such-model")])])
        self.assertEqual(phase, pb.FAILED)
        self.assertIn("404", reason)
        self.assertIn("check the model name (STIGMER_MODEL or --model)", reason)
        self.assertEqual(self.errors(events), ["not_found"])
        self.assertEqual(fake.statuses, [(0, 404)])  # not retried

    def test_429_once_is_retried_and_says_so(self):
        phase, _, text, events, fake = self.run_agent([text_step("hello after a retry", errors=[429])])
        self.assertEqual((phase, text), (pb.COMPLETED, "hello after a retry"))
        self.assertEqual(fake.statuses, [(0, 429), (0, 200)])
        self.assertEqual(self.errors(events), ["api_retry"])  # the retry is an event: a slow turn says why
        retry = [e["error"].message for e in events if "error" in e][0]
        self.assertIn("retrying in 0.05 s (1 of 2): rate limited", retry)  # the API's retry-after

    def test_429_after_the_sdk_retries_is_a_rate_limit_failure(self):
        phase, reason, _, events, fake = self.run_agent([text_step("never", errors=[429] * 3)])
        self.assertEqual(phase, pb.FAILED)
        self.assertIn("rate limited", reason)
        self.assertEqual(self.errors(events), ["api_retry", "api_retry", "rate_limit"])
        self.assertEqual(fake.statuses, [(0, 429)] * 3)  # our retries (models.API_RETRIES), nothing more

    def test_api_errors_become_human_messages(self):
        for status, (code, words, tries) in self.status_cases.items():
            with self.subTest(status=status):
                phase, reason, _, events, fake = self.run_agent([text_step("never", errors=[status] * 3)])
                self.assertEqual(phase, pb.FAILED)
                self.assertIn(words, reason)
                self.assertEqual([e["error"].code for e in events if "error" in e], ["api_retry"] * (tries - 1) + [code])
                self.assertEqual(len(fake.requests), tries)  # 5xx is asked again, 403 is not

    def test_connection_refused_is_a_connection_failure(self):
        events = []
        the_agent = agent.Agent(self.make_model(self, "http://127.0.0.1:9", self.key, max_retries=0),
                                FilesystemSandbox(tempfile.mkdtemp()), lambda **p: events.append(p))
        phase, reason, _ = the_agent.run("x", "/tmp")
        self.assertEqual(phase, pb.FAILED)
        self.assertIn("could not reach the model API", reason)
        self.assertEqual(self.errors(events), ["api_retry", "api_retry", "connection"])  # asked again twice, said

    def test_a_stream_that_breaks_mid_reply_is_asked_again(self):
        phase, _, text, events, fake = self.run_agent([text_step("a complete answer at last", drop=1)])
        self.assertEqual((phase, text), (pb.COMPLETED, "a complete answer at last"))
        self.assertEqual(len(fake.requests), 2)
        self.assertEqual([e["error"].code for e in events if "error" in e], ["stream_retry"])
        (retry,) = [e["error"].message for e in events if "error" in e]
        self.assertIn("broke off", retry)

    def test_a_stream_that_keeps_breaking_fails_clearly(self):
        phase, reason, _, events, fake = self.run_agent([text_step("never whole", drop=5)])
        self.assertEqual(phase, pb.FAILED)
        self.assertIn("connection to the model API broke", reason)
        self.assertEqual(len(fake.requests), models.STREAM_RETRIES + 1)
        self.assertEqual(self.errors(events), ["stream_retry"] * models.STREAM_RETRIES + ["connection"])

    def test_long_tool_output_is_capped_for_the_model(self):
        step = tool_step(("execute", {"command": "python3 -c \"print('a' * 60000 + 'END')\""}))
        phase, _, _, events, fake = self.run_agent([step, text_step("ok")])
        (sent,) = [r["content"] for r in self.sent_results(fake.requests[1])]
        self.assertLess(len(sent), agent.TOOL_OUTPUT_CHARS + 200)
        self.assertIn("characters cut from the middle", sent)
        self.assertTrue(sent.rstrip().endswith("END"))
        (result,) = [e["tool_result"] for e in events if "tool_result" in e]
        self.assertTrue(result.truncated)

    def test_all_tool_results_of_a_turn_go_back_in_one_message(self):
        step = tool_step(("write_file", {"path": "a.txt", "content": "A"}), ("ls", {}), ("read_file", {"path": "a.txt"}))
        phase, _, _, _, fake = self.run_agent([step, text_step("ok")])
        self.assertEqual(phase, pb.COMPLETED)
        results = self.sent_results(fake.requests[1])
        self.assertEqual([r["id"] for r in results], [self.call_id(0, n) for n in range(3)])
        self.assertIn("a.txt", results[1]["content"])
        self.assertEqual(results[2]["content"], "1\tA")

    def test_the_prefix_is_byte_identical_from_turn_to_turn(self):
        script = [tool_step(("ls", {}), text="looking"), tool_step(("execute", {"command": "echo hi"})), text_step("ok")]
        phase, _, _, _, fake = self.run_agent(script)
        self.assertEqual(phase, pb.COMPLETED)
        for earlier, later in zip(fake.requests, fake.requests[1:]):
            kept = earlier["messages"][:-1] if self.marks_latest_turn else earlier["messages"]
            self.assertEqual(json.dumps(later["messages"][:len(kept)]), json.dumps(kept))  # order and bytes
            self.assertGreater(len(later["messages"]), len(earlier["messages"]))
            self.assertEqual(json.dumps(later["tools"]), json.dumps(earlier["tools"]))
            self.assertEqual(later.get("system"), earlier.get("system"))

    def test_cancel_during_a_tool_kills_it_and_stops(self):
        step = tool_step(("execute", {"command": "sleep 60"}))
        done = {}
        with self.Fake([step, text_step("never")]) as fake:
            events = []
            started = threading.Event()

            def emit(**p):
                events.append(p)
                if "tool_call" in p:
                    started.set()

            the_agent = agent.Agent(self.make_model(self, fake.url, self.key), FilesystemSandbox(tempfile.mkdtemp()),
                                    emit)
            thread = threading.Thread(target=lambda: done.update(r=the_agent.run("x", "/tmp")))
            thread.start()
            self.assertTrue(started.wait(30))
            the_agent.cancel()
            thread.join(30)
        self.assertFalse(thread.is_alive())
        self.assertEqual(done["r"][0], pb.CANCELLED)
        (result,) = [e["tool_result"] for e in events if "tool_result" in e]
        self.assertEqual(result.exit_code, 130)
        self.assertEqual(len(fake.requests), 1)  # nothing sent to the model after the cancel

    def test_cancel_while_the_model_answers(self):
        done = {}
        with self.Fake([text_step("too late", delay=0.5)]) as fake:
            events = []
            the_agent = agent.Agent(self.make_model(self, fake.url, self.key), FilesystemSandbox(tempfile.mkdtemp()),
                                    lambda **p: events.append(p))
            thread = threading.Thread(target=lambda: done.update(r=the_agent.run("x", "/tmp")))
            thread.start()
            deadline = time.monotonic() + 30
            while not fake.requests and time.monotonic() < deadline:
                time.sleep(0.01)
            the_agent.cancel()
            thread.join(30)
        self.assertFalse(thread.is_alive())
        self.assertEqual(done["r"], (pb.CANCELLED, "cancelled by the user", ""))
        self.assertEqual(self.kinds(events), ["prompt"])  # the task; no text, usage or error after the cancel


class AgentLoopTest(LoopTests, unittest.TestCase):
    """The loop through AnthropicModel; and what only the Messages API has (pause_turn, a context-full stop
    reason, the tool_result error flag)."""
    slow = True  # among the longest: testsupport_parallel starts it first

    Fake, make_model, key, wrong_key = FakeAnthropic, staticmethod(anthropic_model), FAKE_KEY, "sk-ant-wrong.key.0000000000"
    call_prefix = "toolu"  # the fake's tool-call ids: PREFIX_STEP_N
    key_var = "ANTHROPIC_API_KEY"
    status_cases = {403: ("permission", "403", 1), 529: ("overloaded", "overloaded", 3), 500: ("api_error", "500", 3)}
    marks_latest_turn = True

    def test_pause_turn_continues_with_the_assistant_turn(self):
        phase, _, text, _, fake = self.run_agent([text_step("thinking…", stop="pause_turn"), text_step("done")])
        self.assertEqual((phase, text), (pb.COMPLETED, "done"))
        self.assertEqual(len(fake.requests), 2)
        self.assertEqual(fake.requests[1]["messages"][-1]["role"], "assistant")
        self.assertEqual(fake.requests[1]["messages"][-1]["content"][0]["text"], "thinking…")

    def test_context_window_full_as_a_stop_reason(self):
        phase, reason, _, events, fake = self.run_agent([text_step("so much", stop="model_context_window_exceeded")])
        self.assertEqual(phase, pb.FAILED)
        self.assertIn("context window", reason)
        self.assertEqual(len(fake.requests), 1)

    def test_failed_tools_are_flagged_to_the_model(self):
        step = tool_step(("execute", {"command": "exit 3"}), ("ls", {}))
        phase, _, _, _, fake = self.run_agent([step, text_step("ok")])
        self.assertEqual(phase, pb.COMPLETED)
        self.assertEqual([r["is_error"] for r in self.sent_results(fake.requests[1])], [True, False])


    def test_a_search_that_stops_early_says_so(self):
        steps = [tool_step(("write_file", {"path": "a.txt", "content": "needle\n"})),
                 tool_step(("glob", {"pattern": "**/*"}), ("grep", {"pattern": "needle"})), text_step("ok")]
        with mock.patch.object(sandbox, "SEARCH_TIMEOUT", -1.0):  # every search is past its limit at once
            phase, _, _, _, fake = self.run_agent(steps)
        self.assertEqual(phase, pb.COMPLETED)
        results = self.sent_results(fake.requests[2])
        self.assertEqual(len(results), 2)
        for result in results:
            self.assertIn("[search stopped at the -1 s time limit: the results are partial]", str(result["content"]))
        phase, _, _, _, fake = self.run_agent([tool_step(("glob", {"pattern": "*"})), text_step("ok")])
        self.assertIn("(no matches)", str(self.sent_results(fake.requests[1])[0]["content"]))


class OpenAIAgentLoopTest(LoopTests, unittest.TestCase):
    """Every loop test again, through OpenAIChatModel, the real openai SDK and the fake Chat Completions API."""
    slow = True  # among the longest: testsupport_parallel starts it first

    Fake, make_model, key, wrong_key = FakeOpenAI, staticmethod(openai_model), OPENAI_KEY, "sk-wrong.key.000000000"
    call_prefix = "call"
    key_var = "OPENAI_API_KEY"
    status_cases = {403: ("permission", "403", 1), 500: ("api_error", "500", 3), 503: ("api_error", "503", 3)}

    def context_full_error(self):
        return "context"

    def sent_assistant(self, body):
        message = [m for m in body["messages"] if m["role"] == "assistant"][-1]
        return message["content"] or "", [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                                          for c in message.get("tool_calls") or ()]

    def sent_results(self, body):
        results = []
        for message in reversed(body["messages"]):
            if message["role"] != "tool":
                break
            results.insert(0, {"id": message["tool_call_id"], "content": message["content"], "is_error": None})
        return results

    def sent_last(self, body):
        return body["messages"][-1]["role"], body["messages"][-1]["content"]

    def test_the_request_asks_for_usage_and_caps_output(self):
        phase, _, _, _, fake = self.run_agent([text_step("hi")])
        (body,) = fake.requests
        self.assertEqual(phase, pb.COMPLETED)
        self.assertEqual(body["stream_options"], {"include_usage": True})
        self.assertEqual(body["max_completion_tokens"], models.MAX_OUTPUT_TOKENS)
        self.assertEqual(body["messages"][0]["role"], "system")
        self.assertEqual([t["function"]["name"] for t in body["tools"]], [t["name"] for t in agent.TOOLS])
        self.assertEqual(fake.paths, ["/v1/chat/completions"])


class AgentPartsTest(unittest.TestCase):
    """The small pure pieces of the loop."""

    def test_cap_output_keeps_head_and_tail(self):
        text = "A" * 40_000 + "Z" * 40_000
        capped, cut = agent.cap_output(text)
        self.assertTrue(cut)
        self.assertLess(len(capped), agent.TOOL_OUTPUT_CHARS + 100)
        self.assertTrue(capped.startswith("A") and capped.endswith("Z"))
        self.assertIn("50000 characters cut", capped)
        self.assertEqual(agent.cap_output("short"), ("short", False))

    def test_check_args(self):
        schema = next(t["input_schema"] for t in agent.TOOLS if t["name"] == "read_file")
        self.assertIsNone(agent.check_args({"path": "a", "offset": 3}, schema))
        self.assertIn("missing required field: path", agent.check_args({}, schema))
        self.assertIn("offset must be an integer", agent.check_args({"path": "a", "offset": "3"}, schema))
        self.assertIn("offset must be an integer", agent.check_args({"path": "a", "offset": True}, schema))
        self.assertIn("unknown field: bogus", agent.check_args({"path": "a", "bogus": 1}, schema))

    def test_every_tool_has_an_implementation_and_schema(self):
        self.assertEqual([t["name"] for t in agent.TOOLS], list(agent.TOOL_FUNCS))
        for tool in agent.TOOLS:
            self.assertGreater(len(tool["description"]), 40)
            self.assertEqual(tool["input_schema"]["type"], "object")

    def test_the_loop_imports_no_provider_sdk(self):
        code = "import sys, agent, models; print(sorted(m for m in ('anthropic', 'openai') if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.strip(), "[]")

if __name__ == "__main__":
    unittest.main()
