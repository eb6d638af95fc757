"""Tests of models.py: model-name resolution, the default model, and what AnthropicModel sends
(prompt-cache breakpoints, neutral messages as Messages API content) to the fake Messages API.

    python -m unittest test_models -v
"""
import threading
import unittest

import anthropic

import models
from testsupport import FAKE_KEY, FakeAnthropic, text_step, tool_step

EPHEMERAL = {"type": "ephemeral"}
TOOLS = [{"name": "ls", "description": "List a directory.", "input_schema": {"type": "object", "properties": {}}},
         {"name": "read_file", "description": "Read a file.",
          "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}]


class ResolveTest(unittest.TestCase):
    def test_forms(self):
        self.assertEqual(models.resolve("anthropic/claude-x-1"), ("anthropic", "claude-x-1"))
        self.assertEqual(models.resolve("claude-sonnet-4-5"), ("anthropic", "claude-sonnet-4-5"))
        self.assertEqual(models.resolve(" claude-haiku-4-5 "), ("anthropic", "claude-haiku-4-5"))
        self.assertEqual(models.resolve(""), ("anthropic", models.default_model()))
        self.assertEqual(models.resolve(None), ("anthropic", models.default_model()))

    def test_unknown_names_say_which_forms_work(self):
        for name in ("gpt-4o", "mystery/model-1", "anthropic/", "m"):
            with self.subTest(name=name), self.assertRaises(models.ModelError) as caught:
                models.resolve(name)
            self.assertEqual(caught.exception.code, "model")
            self.assertIn(repr(name), caught.exception.message)
            self.assertIn("provider/model", caught.exception.message)
            self.assertIn("anthropic", caught.exception.message)

    def test_default_model_is_a_sonnet(self):
        name = models.default_model()
        self.assertTrue(name.startswith("claude-sonnet-"), name)
        self.assertNotRegex(name, r"-\d{8}$")  # the undated alias when the SDK lists one

    def test_make_model(self):
        model = models.make_model("anthropic/claude-x-1")
        self.assertIsInstance(model, models.AnthropicModel)
        self.assertEqual((model.provider, model.model), ("anthropic", "claude-x-1"))
        with self.assertRaises(models.ModelError):
            models.make_model("nope")

    def test_model_key_vars(self):
        self.assertIn("ANTHROPIC_API_KEY", models.model_key_vars())


class AnthropicModelTest(unittest.TestCase):
    def turn(self, script, messages):
        """One AnthropicModel turn against the fake; returns (reply, request body, texts)."""
        texts = []
        with FakeAnthropic(script) as fake:
            client = anthropic.Anthropic(api_key=FAKE_KEY, base_url=fake.url, max_retries=0)
            self.addCleanup(client.close)
            reply = models.AnthropicModel("claude-fake", client).turn("be brief", TOOLS, messages, texts.append,
                                                                      threading.Event())
        (body,) = fake.requests
        return reply, body, texts

    def test_cache_breakpoints_system_last_tool_and_latest_message(self):
        calls = [models.ToolUse("toolu_0_0", "ls", {}), models.ToolUse("toolu_0_1", "read_file", {"path": "a"})]
        messages = [{"role": "user", "text": "look around"},
                    {"role": "assistant", "text": "looking", "tool_calls": calls},
                    {"role": "tool_results", "results": [{"id": "toolu_0_0", "output": "a", "is_error": False},
                                                         {"id": "toolu_0_1", "output": "no", "is_error": True}]}]
        reply, body, texts = self.turn([{}, text_step("done")], messages)
        self.assertEqual(body["system"], [{"type": "text", "text": "be brief", "cache_control": EPHEMERAL}])
        self.assertEqual([t.get("cache_control") for t in body["tools"]], [None, EPHEMERAL])
        self.assertEqual(body["max_tokens"], models.MAX_OUTPUT_TOKENS)
        self.assertEqual(body["messages"], [
            {"role": "user", "content": [{"type": "text", "text": "look around"}]},
            {"role": "assistant", "content": [
                {"text": "looking", "type": "text"},
                {"id": "toolu_0_0", "input": {}, "name": "ls", "type": "tool_use"},
                {"id": "toolu_0_1", "input": {"path": "a"}, "name": "read_file", "type": "tool_use"}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_0_0", "is_error": False, "content": "a"},
                {"type": "tool_result", "tool_use_id": "toolu_0_1", "is_error": True, "content": "no",
                 "cache_control": EPHEMERAL}]}])
        self.assertEqual(TOOLS[-1].get("cache_control"), None)  # the caller's schemas are not changed
        self.assertEqual(calls[1].input, {"path": "a"})
        self.assertEqual((reply.text, reply.stop, reply.tool_calls), ("done", models.STOP_DONE, []))
        self.assertEqual("".join(texts), "done")

    def test_a_tool_reply(self):
        step = tool_step(("read_file", {"path": "x"}), text="reading", usage={"input": 9, "output": 3, "cache_read": 2,
                                                                             "cache_write": 1})
        reply, body, _ = self.turn([step], [{"role": "user", "text": "go"}])
        self.assertEqual(body["messages"][-1]["content"][-1]["cache_control"], EPHEMERAL)
        self.assertEqual(reply, models.Reply("reading", [models.ToolUse("toolu_0_0", "read_file", {"path": "x"})],
                                             models.STOP_TOOL_USE, models.Usage(9, 3, 2, 1)))

    def test_stop_kinds(self):
        cases = [("end_turn", models.STOP_DONE), ("stop_sequence", models.STOP_DONE),
                 ("max_tokens", models.STOP_MAX_TOKENS), ("refusal", models.STOP_REFUSAL),
                 ("pause_turn", models.STOP_PAUSE), ("model_context_window_exceeded", models.STOP_CONTEXT),
                 ("tool_use", models.STOP_TOOL_USE)]
        with FakeAnthropic([text_step(f"turn {i}", stop=stop) for i, (stop, _) in enumerate(cases)]) as fake:
            client = anthropic.Anthropic(api_key=FAKE_KEY, base_url=fake.url, max_retries=0)
            self.addCleanup(client.close)
            model = models.AnthropicModel("claude-fake", client)
            messages = [{"role": "user", "text": "go"}]
            for i, (stop, kind) in enumerate(cases):  # the fake answers step i to a request with i assistant turns
                with self.subTest(stop=stop):
                    reply = model.turn("s", TOOLS, messages, lambda text: None, threading.Event())
                    self.assertEqual((reply.text, reply.stop), (f"turn {i}", kind))
                messages += [{"role": "assistant", "text": reply.text, "tool_calls": []},
                             {"role": "user", "text": "on"}]

    def test_cancelled_before_the_reply_is_read(self):
        cancelled = threading.Event()
        cancelled.set()
        with FakeAnthropic([text_step("never read")]) as fake:
            client = anthropic.Anthropic(api_key=FAKE_KEY, base_url=fake.url, max_retries=0)
            self.addCleanup(client.close)
            with self.assertRaises(models.Cancelled):
                models.AnthropicModel("claude-fake", client).turn("s", TOOLS, [{"role": "user", "text": "go"}],
                                                                  self.fail, cancelled)


if __name__ == "__main__":
    unittest.main()
