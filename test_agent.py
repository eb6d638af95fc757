"""Tests of the agent loop in-process: the real anthropic SDK against the fake Messages API,
a real FilesystemSandbox, and the emitted events collected in a list.

    python -m unittest test_agent -v
"""
import shutil
import tempfile
import threading
import unittest

import anthropic

import agent
import stigmer_pb2 as pb
from sandbox import FilesystemSandbox
from testsupport import FAKE_KEY, FakeAnthropic, text_step, tool_step


class AgentLoopTest(unittest.TestCase):
    def run_agent(self, script, **kwargs):
        """Run SCRIPT through an Agent; returns (phase, reason, final_text, events, fake)."""
        workspace = tempfile.mkdtemp(prefix="stigmer-agent-")
        self.addCleanup(shutil.rmtree, workspace, True)
        events = []
        with FakeAnthropic(script) as fake:
            client = anthropic.Anthropic(api_key=FAKE_KEY, base_url=fake.url, max_retries=2)
            the_agent = agent.Agent(client, FilesystemSandbox(workspace), lambda **p: events.append(p),
                                    model="claude-fake", **kwargs)
            self.agent = the_agent
            phase, reason, text = the_agent.run("do the task", workspace)
        return phase, reason, text, events, fake

    def kinds(self, events):
        return [next(iter(e)) for e in events]

    def test_pause_turn_continues_with_the_assistant_turn(self):
        phase, _, text, _, fake = self.run_agent([text_step("thinking…", stop="pause_turn"), text_step("done")])
        self.assertEqual((phase, text), (pb.COMPLETED, "done"))
        self.assertEqual(len(fake.requests), 2)
        self.assertEqual(fake.requests[1]["messages"][-1]["role"], "assistant")
        self.assertEqual(fake.requests[1]["messages"][-1]["content"][0]["text"], "thinking…")

    def test_max_tokens_asks_the_model_to_continue(self):
        phase, _, _, _, fake = self.run_agent([text_step("first half", stop="max_tokens"), text_step("second")])
        self.assertEqual(phase, pb.COMPLETED)
        last = fake.requests[1]["messages"]
        self.assertEqual(last[-2]["content"][0]["text"], "first half")
        self.assertEqual(last[-1]["content"][0]["text"], agent.CONTINUE_NOTE)

    def test_max_tokens_inside_a_tool_call_runs_nothing_and_says_why(self):
        cut = tool_step(("write_file", {"path": "big.txt", "content": "x"}), stop="max_tokens")
        phase, _, _, events, fake = self.run_agent([cut, text_step("ok, smaller")])
        self.assertEqual(phase, pb.COMPLETED)
        self.assertNotIn("tool_result", self.kinds(events))
        self.assertEqual(fake.requests[1]["messages"][-1]["content"][0]["text"], agent.TOOL_CUT_NOTE)

    def test_api_errors_become_human_messages(self):
        cases = {403: ("permission", "403"), 529: ("overloaded", "overloaded"), 500: ("api_error", "500")}
        for status, (code, words) in cases.items():
            with self.subTest(status=status):
                phase, reason, _, events, fake = self.run_agent([text_step("never", errors=[status] * 3)])
                self.assertEqual(phase, pb.FAILED)
                self.assertIn(words, reason)
                self.assertEqual([e["error"].code for e in events if "error" in e], [code])
                retried = 3 if status in (529, 500) else 1  # the SDK retries 5xx, not 403
                self.assertEqual(len(fake.requests), retried)

    def test_connection_refused_is_a_connection_failure(self):
        client = anthropic.Anthropic(api_key=FAKE_KEY, base_url="http://127.0.0.1:9", max_retries=0)
        events = []
        the_agent = agent.Agent(client, FilesystemSandbox(tempfile.mkdtemp()), lambda **p: events.append(p),
                                model="m")
        phase, reason, _ = the_agent.run("x", "/tmp")
        self.assertEqual(phase, pb.FAILED)
        self.assertIn("could not reach the model API", reason)

    def test_a_stream_that_breaks_mid_reply_is_asked_again(self):
        phase, _, text, events, fake = self.run_agent([text_step("a complete answer at last", drop=1)])
        self.assertEqual((phase, text), (pb.COMPLETED, "a complete answer at last"))
        self.assertEqual(len(fake.requests), 2)
        self.assertEqual([e["error"].code for e in events if "error" in e], ["stream_retry"])

    def test_a_stream_that_keeps_breaking_fails_clearly(self):
        phase, reason, _, _, fake = self.run_agent([text_step("never whole", drop=5)])
        self.assertEqual(phase, pb.FAILED)
        self.assertIn("connection to the model API broke", reason)
        self.assertEqual(len(fake.requests), agent.STREAM_RETRIES + 1)

    def test_long_tool_output_is_capped_for_the_model(self):
        step = tool_step(("execute", {"command": "python3 -c \"print('a' * 60000 + 'END')\""}))
        phase, _, _, events, fake = self.run_agent([step, text_step("ok")])
        sent = fake.requests[1]["messages"][-1]["content"][0]["content"]
        self.assertLess(len(sent), agent.TOOL_OUTPUT_CHARS + 200)
        self.assertIn("characters cut from the middle", sent)
        self.assertTrue(sent.rstrip().endswith("END"))
        (result,) = [e["tool_result"] for e in events if "tool_result" in e]
        self.assertTrue(result.truncated)

    def test_all_tool_results_of_a_turn_go_back_in_one_message(self):
        step = tool_step(("write_file", {"path": "a.txt", "content": "A"}), ("ls", {}), ("read_file", {"path": "a.txt"}))
        phase, _, _, _, fake = self.run_agent([step, text_step("ok")])
        self.assertEqual(phase, pb.COMPLETED)
        results = fake.requests[1]["messages"][-1]["content"]
        self.assertEqual([r["tool_use_id"] for r in results], ["toolu_0_0", "toolu_0_1", "toolu_0_2"])
        self.assertIn("a.txt", results[1]["content"])
        self.assertEqual(results[2]["content"], "1\tA")

    def test_cancel_during_a_tool_kills_it_and_stops(self):
        step = tool_step(("execute", {"command": "sleep 60"}))
        done = {}
        with FakeAnthropic([step, text_step("never")]) as fake:
            client = anthropic.Anthropic(api_key=FAKE_KEY, base_url=fake.url)
            events = []
            started = threading.Event()

            def emit(**p):
                events.append(p)
                if "tool_call" in p:
                    started.set()

            the_agent = agent.Agent(client, FilesystemSandbox(tempfile.mkdtemp()), emit, model="m")
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


if __name__ == "__main__":
    unittest.main()
