"""Tests of models.py: model-name resolution, default models, base URLs and keys per provider, shared
clients, what AnthropicModel sends (prompt-cache breakpoints, neutral messages as Messages API content)
to the fake Messages API, and what OpenAIChatModel sends and reads on the fake Chat Completions API.

    python -m unittest test_models -v
"""
import collections
import subprocess
import sys
import threading
import unittest

import anthropic
import openai

import models
from testsupport import FAKE_KEY, HERE, OPENAI_KEY, FakeAnthropic, FakeOpenAI, text_step, tool_step
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

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

    def test_providers_and_bare_names(self):
        cases = {"openai/gpt-4.1": ("openai", "gpt-4.1"), "gpt-4o": ("openai", "gpt-4o"), "o3": ("openai", "o3"),
                 "o4-mini": ("openai", "o4-mini"), "o1-preview": ("openai", "o1-preview"),
                 "gemini-2.5-flash": ("gemini", "gemini-2.5-flash"), "gemini/gemini-2.5-pro": ("gemini", "gemini-2.5-pro"),
                 "ollama/qwen3:8b": ("ollama", "qwen3:8b"), "OpenAI/gpt-4.1": ("openai", "gpt-4.1"),
                 "openai-compatible/meta-llama/Llama-3-8B": ("openai-compatible", "meta-llama/Llama-3-8B"),
                 "openai": ("openai", models.DEFAULT_MODELS["openai"]), "ollama/": ("ollama", "qwen3:8b"),
                 "gemini": ("gemini", "gemini-2.5-flash"), "anthropic": ("anthropic", models.default_model())}
        for name, expected in cases.items():
            with self.subTest(name=name):
                self.assertEqual(models.resolve(name), expected)
        self.assertEqual(models.qualified("gpt-4.1"), "openai/gpt-4.1")
        self.assertEqual(set(models.DEFAULT_MODELS), set(models.PROVIDERS))
        self.assertEqual(set(models.PROVIDERS), set(models.project_secrets().PROVIDERS))  # one list of providers

    def test_the_provider_table_in_secrets_py_is_what_models_reads(self):
        table = models.project_secrets().PROVIDERS
        for name, p in table.items():
            with self.subTest(provider=name):
                self.assertEqual(models.KEYS[name], p.key_vars)
                self.assertEqual(models.DEFAULT_MODELS[name], p.default_model)
                if p.base_url_var and name != "ollama":  # Ollama's variable is a host, made into a URL
                    moved = {p.base_url_var: "http://127.0.0.1:7/x", **{v: "k-123456789" for v in p.key_vars}}
                    self.assertEqual(models.endpoint(name, moved)[0], "http://127.0.0.1:7/x")
                    # ... and its default server when the variable is unset (the SDK's own when None)
                    if not p.needs_server:
                        got = models.endpoint(name, {v: "k-123456789" for v in p.key_vars})[0]
                        self.assertEqual(got, p.base_url)
        problems = models.project_secrets().provider_problems("openai-compatible", {})
        with self.assertRaises(models.ModelError) as caught:
            models.check_provider("openai-compatible", {})
        self.assertEqual(caught.exception.message, problems[0])

    def test_unknown_names_say_which_forms_work(self):
        for name in ("qwen3:8b", "mystery/model-1", "o30", "m", "llama3"):
            with self.subTest(name=name), self.assertRaises(models.ModelError) as caught:
                models.resolve(name)
            self.assertEqual(caught.exception.code, "model")
            self.assertIn(repr(name), caught.exception.message)
            self.assertIn("provider/model", caught.exception.message)
            for word in ("anthropic", "openai", "gemini", "ollama", "openai-compatible", "claude-", "gpt-"):
                self.assertIn(word, caught.exception.message)

    def test_openai_compatible_has_no_default_model(self):
        with self.assertRaises(models.ModelError) as caught:
            models.resolve("openai-compatible")
        self.assertIn("openai-compatible/MODEL", caught.exception.message)

    def test_default_model_is_a_sonnet(self):
        name = models.default_model()
        self.assertTrue(name.startswith("claude-sonnet-"), name)
        self.assertNotRegex(name, r"-\d{8}$")  # the undated alias when the SDK lists one

    def test_make_model(self):
        model = models.make_model("anthropic/claude-x-1", {"ANTHROPIC_API_KEY": FAKE_KEY})
        self.assertIsInstance(model, models.AnthropicModel)
        self.assertEqual((model.provider, model.model), ("anthropic", "claude-x-1"))
        for name in ("openai/gpt-4.1", "gemini/gemini-2.5-flash", "ollama/qwen3:8b"):
            with self.subTest(name=name):
                model = models.make_model(name, {"OPENAI_API_KEY": "sk-1", "GEMINI_API_KEY": "AIza-1"})
                self.assertIsInstance(model, models.OpenAIChatModel)
                self.assertEqual(f"{model.provider}/{model.model}", name)
        with self.assertRaises(models.ModelError):
            models.make_model("nope", {})

    def test_model_key_vars(self):
        self.assertEqual(models.model_key_vars(), ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "OPENAI_API_KEY",
                                                   "GEMINI_API_KEY", "GOOGLE_API_KEY"))  # no empty name for Ollama


class EndpointTest(unittest.TestCase):
    """Base URLs and keys per provider, from the environment the runner's Config read."""

    def test_base_urls_and_keys(self):
        env = {"OPENAI_API_KEY": "sk-o", "GEMINI_API_KEY": "AIza-g", "ANTHROPIC_API_KEY": "sk-ant-a"}
        self.assertEqual(models.endpoint("anthropic", env), (None, "sk-ant-a", "ANTHROPIC_API_KEY"))
        self.assertEqual(models.endpoint("openai", env), ("https://api.openai.com/v1", "sk-o", "OPENAI_API_KEY"))
        self.assertEqual(models.endpoint("gemini", env), (models.GEMINI_BASE_URL, "AIza-g", "GEMINI_API_KEY"))
        self.assertEqual(models.endpoint("ollama", {}), ("http://localhost:11434/v1", models.KEYLESS, "OLLAMA_HOST"))
        moved = dict(env, OPENAI_BASE_URL="http://127.0.0.1:9/v1", GEMINI_BASE_URL="http://127.0.0.1:8/g/",
                     ANTHROPIC_BASE_URL="http://127.0.0.1:7/v1/")
        self.assertEqual(models.endpoint("openai", moved)[0], "http://127.0.0.1:9/v1")
        self.assertEqual(models.endpoint("gemini", moved)[0], "http://127.0.0.1:8/g/")
        self.assertEqual(models.endpoint("anthropic", moved)[0], "http://127.0.0.1:7")  # the SDK adds /v1/messages
        self.assertEqual(models.endpoint("openai-compatible", moved), ("http://127.0.0.1:9/v1", "sk-o", "OPENAI_API_KEY"))

    def test_gemini_takes_google_api_key_and_anthropic_an_auth_token(self):
        self.assertEqual(models.endpoint("gemini", {"GOOGLE_API_KEY": "AIza-x"})[1:], ("AIza-x", "GOOGLE_API_KEY"))
        self.assertEqual(models.endpoint("anthropic", {"ANTHROPIC_AUTH_TOKEN": "tok-1"})[1:],
                         ("tok-1", "ANTHROPIC_AUTH_TOKEN"))

    def test_ollama_host_forms(self):
        for host, url in {"127.0.0.1:11500": "http://127.0.0.1:11500/v1", "http://box:11434/": "http://box:11434/v1",
                          "https://box/v1": "https://box/v1"}.items():
            with self.subTest(host=host):
                self.assertEqual(models.endpoint("ollama", {"OLLAMA_HOST": host})[0], url)

    def test_missing_settings_say_what_to_export(self):
        for provider, words in {"openai": "OPENAI_API_KEY", "gemini": "GEMINI_API_KEY or GOOGLE_API_KEY",
                                "anthropic": "ANTHROPIC_API_KEY", "openai-compatible": "OPENAI_BASE_URL"}.items():
            with self.subTest(provider=provider), self.assertRaises(models.ModelError) as caught:
                models.endpoint(provider, {})
            self.assertIn(words, caught.exception.message)
        self.assertEqual(models.endpoint("openai-compatible", {"OPENAI_BASE_URL": "http://h/v1"})[1], models.KEYLESS)
        with self.assertRaises(models.ModelError):
            models.check_provider("openai-compatible", {})
        models.check_provider("openai", {})  # installed here; a key is not its business

    def test_clients_are_shared_per_provider_base_url_and_key(self):
        env = {"OPENAI_API_KEY": "sk-share-1", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
        one, two = models.make_model("openai/a", env), models.make_model("openai/b", env)
        self.assertIs(one.client, two.client)  # one connection pool
        self.assertIsNot(models.make_model("openai/a", dict(env, OPENAI_API_KEY="sk-share-2")).client, one.client)
        self.assertIsNot(models.make_model("openai-compatible/a", env).client, one.client)
        self.assertIsNot(models.make_model("openai/a", dict(env, OPENAI_BASE_URL="http://127.0.0.1:8/v1")).client,
                         one.client)
        self.assertEqual(str(one.client.base_url).rstrip("/"), "http://127.0.0.1:9/v1")
        self.assertEqual(one.client.api_key, "sk-share-1")

    def test_without_the_openai_package_the_error_says_how_to_install_it(self):
        code = ("import sys; sys.modules['openai'] = None; import models\n"
                "try:\n    models.make_model('openai/gpt-4.1', {'OPENAI_API_KEY': 'sk-x'})\n"
                "except models.ModelError as exc:\n    print(exc.code, exc.message)")
        out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
        self.assertIn("missing_sdk", out.stdout)
        self.assertIn("pip install -e '.[openai]'", out.stdout)


class OpenAIChatModelTest(unittest.TestCase):
    def turn(self, script, messages, model="gpt-fake", provider="openai"):
        """One OpenAIChatModel turn against the fake; returns (reply, request body, texts)."""
        texts = []
        with FakeOpenAI(script) as fake:
            client = openai.OpenAI(api_key=OPENAI_KEY, base_url=fake.url + "/v1", max_retries=0)
            self.addCleanup(client.close)
            reply = models.OpenAIChatModel(model, provider=provider, client=client).turn(
                "be brief", TOOLS, messages, texts.append, threading.Event())
        (body,) = fake.requests
        return reply, body, texts

    def test_neutral_messages_as_chat_messages(self):
        calls = [models.ToolUse("call_0_0", "ls", {}), models.ToolUse("call_0_1", "read_file", {"path": "ä"})]
        messages = [{"role": "user", "text": "look around"},
                    {"role": "assistant", "text": "", "tool_calls": calls},
                    {"role": "tool_results", "results": [{"id": "call_0_0", "output": "a", "is_error": False},
                                                         {"id": "call_0_1", "output": "no", "is_error": True}]}]
        reply, body, texts = self.turn([{}, text_step("done")], messages)
        self.assertEqual(body["messages"], [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "look around"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0_0", "type": "function", "function": {"name": "ls", "arguments": "{}"}},
                {"id": "call_0_1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "ä"}'}}]},
            {"role": "tool", "tool_call_id": "call_0_0", "content": "a"},
            {"role": "tool", "tool_call_id": "call_0_1", "content": "no"}])
        self.assertEqual(body["tools"][1], {"type": "function", "function": {
            "name": "read_file", "description": "Read a file.", "parameters": TOOLS[1]["input_schema"]}})
        self.assertEqual((body["stream"], body["stream_options"]), (True, {"include_usage": True}))
        self.assertEqual(body["max_completion_tokens"], models.MAX_OUTPUT_TOKENS)
        self.assertEqual((reply.text, reply.stop, reply.tool_calls), ("done", models.STOP_DONE, []))
        self.assertEqual("".join(texts), "done")

    def test_a_results_images_are_a_note_in_a_chat_tool_message(self):
        calls = [models.ToolUse("call_0_0", "mcp__t__picture", {})]
        messages = [{"role": "user", "text": "draw"}, {"role": "assistant", "text": "", "tool_calls": calls},
                    {"role": "tool_results", "results": [{"id": "call_0_0", "output": "here", "is_error": False,
                                                          "images": [("image/png", b"\x89PNG")] * 2}]}]
        _, body, _ = self.turn([{}, text_step("done")], messages)
        self.assertEqual(body["messages"][-1], {"role": "tool", "tool_call_id": "call_0_0", "content": (
            "here\n[2 images returned by the tool: not shown, this model's API takes no images in tool results]")})

    def test_other_servers_get_max_tokens(self):
        _, body, _ = self.turn([text_step("hi")], [{"role": "user", "text": "go"}], provider="ollama")
        self.assertEqual(body["max_tokens"], models.MAX_OUTPUT_TOKENS)
        self.assertNotIn("max_completion_tokens", body)

    def test_a_tool_reply_with_cached_usage(self):
        step = tool_step(("read_file", {"path": "x"}), ("ls", {}), text="reading",
                         usage={"input": 9, "output": 3, "cache_read": 2})
        reply, _, _ = self.turn([step], [{"role": "user", "text": "go"}])
        self.assertEqual(reply, models.Reply("reading", [models.ToolUse("call_0_0", "read_file", {"path": "x"}),
                                                         models.ToolUse("call_0_1", "ls", {})],
                                             models.STOP_TOOL_USE, models.Usage(9, 3, 2, 0)))

    def test_stop_kinds(self):
        cases = [("stop", models.STOP_DONE), ("length", models.STOP_MAX_TOKENS),
                 ("content_filter", models.STOP_REFUSAL), ("tool_calls", models.STOP_TOOL_USE)]
        for finish, kind in cases:
            with self.subTest(finish=finish):
                reply, _, _ = self.turn([text_step("t", finish=finish)], [{"role": "user", "text": "go"}])
                self.assertEqual(reply.stop, kind)

    def test_tool_calls_ending_with_stop_are_tool_use(self):  # Ollama ends a tool-calling reply with "stop"
        reply, _, _ = self.turn([tool_step(("ls", {}), finish="stop")], [{"role": "user", "text": "go"}])
        self.assertEqual((reply.stop, [c.name for c in reply.tool_calls]), (models.STOP_TOOL_USE, ["ls"]))

    def test_call_deltas_without_an_index(self):
        Delta = collections.namedtuple("Delta", "index id function")
        Function = collections.namedtuple("Function", "name arguments")
        calls = []
        for delta in (Delta(None, "c1", Function("ls", "")), Delta(None, None, Function(None, '{"pa')),
                      Delta(None, None, Function(None, 'th": "."}')), Delta(None, "c2", Function("grep", "{}"))):
            models._add_call_delta(calls, delta)
        self.assertEqual([(c["id"], c["name"], "".join(c["arguments"])) for c in calls],
                         [("c1", "ls", '{"path": "."}'), ("c2", "grep", "{}")])

    def test_arguments_that_are_not_an_object(self):
        self.assertEqual(models.parse_arguments(""), {})
        self.assertIn("__malformed__", models.parse_arguments("[1]"))
        self.assertIn("__malformed__", models.parse_arguments('{"a": '))

    def test_cancelled_before_the_reply_is_read(self):
        cancelled = threading.Event()
        cancelled.set()
        with FakeOpenAI([text_step("never read")]) as fake:
            client = openai.OpenAI(api_key=OPENAI_KEY, base_url=fake.url + "/v1", max_retries=0)
            self.addCleanup(client.close)
            with self.assertRaises(models.Cancelled):
                models.OpenAIChatModel("gpt-fake", client=client).turn("s", TOOLS, [{"role": "user", "text": "go"}],
                                                                       self.fail, cancelled)


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
