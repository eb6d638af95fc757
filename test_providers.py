"""End to end through the CLI with each OpenAI-compatible provider: `--model openai/...`,
`gemini/...` and `ollama/...` run by a real daemon and worker, the real openai SDK against the
fake Chat Completions API on loopback (testsupport.FakeOpenAI) with the base URLs pointed at
it; the key asked for on a pty for OpenAI and never for Ollama; no key in events, files or the
agent's shell.

    python -m unittest test_providers -v
"""
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
import unittest

from testsupport import (FAKE_KEY, HERE, OPENAI_KEY, FakeAnthropic, FakeOpenAI, assert_one_line, files_containing, free_port,
                         read_until, run_cli, text_step, tool_step)
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

KEY_VARS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL",
            "GEMINI_API_KEY", "GOOGLE_API_KEY", "GEMINI_BASE_URL", "OLLAMA_HOST", "STIGMER_SANDBOX_SECRETS", "MODE",
            "ENV", "STIGMER_MODEL", "SANDBOX_ROOT_DIR", "NO_COLOR")
GEMINI_KEY = "AIza-fake.not.a.real.gemini.key.0123"
SHOW_KEYS = "echo keys=[$ANTHROPIC_API_KEY$OPENAI_API_KEY$GEMINI_API_KEY$GOOGLE_API_KEY]"  # the shell sees none


class ProviderCase(unittest.TestCase):
    """A temporary STIGMER_HOME and workspace, a free daemon port, and a fake Chat Completions API."""

    script = [tool_step(("execute", {"command": SHOW_KEYS})), text_step("Looked at the environment.")]
    fake_key = OPENAI_KEY

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="stigmer-providers-")
        self.home = os.path.join(self.tmp, "home")
        self.workspace = os.path.join(self.tmp, "ws")
        os.makedirs(self.workspace)
        self.fake = FakeOpenAI(self.script, key=self.fake_key).start()
        self.env = {k: v for k, v in os.environ.items() if k not in KEY_VARS}
        self.env.update(STIGMER_HOME=self.home, STIGMER_BACKEND_ENDPOINT=f"127.0.0.1:{free_port()}",
                        SANDBOX_ROOT_DIR=self.workspace, HOME=os.path.join(self.tmp, "userhome"),
                        ANTHROPIC_API_KEY=FAKE_KEY)  # a key of another provider: used nowhere, shown nowhere

    def tearDown(self):
        run_cli(["stop"], self.env, timeout=30)
        self.fake.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def cli(self, *args, env=None):
        return subprocess.run([sys.executable, os.path.join(HERE, "runner.py"), *args], env=env or self.env,
                              cwd=self.workspace, capture_output=True, text=True, timeout=90,
                              stdin=subprocess.DEVNULL, start_new_session=True)  # no terminal to ask on

    def run_task(self, *args, env=None):
        """Run a task with --json; returns (CompletedProcess, events): the log's events, without the run
        object that opens the output and the summary object that closes it (kept in self.run_objects)."""
        proc = self.cli("--json", *args, "look at the environment", env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        self.run_objects = [obj for obj in lines if "seq" not in obj]
        return proc, [obj for obj in lines if "seq" in obj]

    def assertRanWith(self, events, model):
        """The run completed with MODEL (provider/model) in its record, log, list and summary."""
        phases = [e for e in events if e["kind"] == "phase"]
        self.assertEqual([e["phase"] for e in phases], ["PENDING", "RUNNING", "COMPLETED"])
        self.assertEqual(phases[0]["model"], model)
        self.assertEqual([(o["kind"], o["model"]) for o in self.run_objects], [("run", model), ("summary", model)])
        (result,) = [e for e in events if e["kind"] == "tool_result"]
        self.assertIn("keys=[]", result["output"])  # no provider key in the agent's shell
        self.assertEqual(self.fake.requests[0]["model"], model.split("/", 1)[1])
        execution_id = events[0]["execution_id"]
        logs = self.cli("logs", execution_id, "--json")
        self.assertEqual([json.loads(line) for line in logs.stdout.splitlines()], events)
        listed = [json.loads(line) for line in self.cli("list", "--json").stdout.splitlines()]
        self.assertEqual([(e["id"], e["spec"]["model"]) for e in listed], [(execution_id, model)])
        table = self.cli("list").stdout
        self.assertIn("MODEL", table)
        self.assertIn(model, table)

    def assertNoKeyAnywhere(self, key, *texts):
        """KEY is in none of TEXTS, the requests' bodies, nor any file under the home, workspace or user home."""
        for text in texts:
            self.assertNotIn(key, text)
        self.assertNotIn(key, json.dumps(self.fake.requests))
        self.assertEqual(files_containing(key, self.home, self.workspace, os.path.join(self.tmp, "userhome")), [])


class OpenAITest(ProviderCase):
    def test_openai_model_flag(self):
        env = dict(self.env, OPENAI_API_KEY=OPENAI_KEY, OPENAI_BASE_URL=self.fake.url + "/v1")
        proc, events = self.run_task("--model", "openai/gpt-fake", env=env)
        self.assertRanWith(events, "openai/gpt-fake")
        self.assertEqual(set(self.fake.paths), {"/v1/chat/completions"})
        self.assertNoKeyAnywhere(OPENAI_KEY, proc.stdout, proc.stderr)
        self.assertNoKeyAnywhere(FAKE_KEY, proc.stdout, proc.stderr)

    def test_bare_name_in_stigmer_model(self):
        env = dict(self.env, OPENAI_API_KEY=OPENAI_KEY, OPENAI_BASE_URL=self.fake.url + "/v1", STIGMER_MODEL="gpt-fake")
        _, events = self.run_task(env=env)
        self.assertRanWith(events, "openai/gpt-fake")

    def test_a_resumed_run_keeps_its_provider_and_its_key(self):
        self.fake.script.append(text_step("Nothing more."))
        env = {k: v for k, v in self.env.items() if k != "ANTHROPIC_API_KEY"}  # only the OpenAI key is there
        env.update(OPENAI_API_KEY=OPENAI_KEY, OPENAI_BASE_URL=self.fake.url + "/v1")
        _, events = self.run_task("--model", "openai/gpt-fake", env=env)
        proc = self.cli("resume", events[0]["execution_id"], "anything else?", "--json", env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        resumed = [obj for obj in map(json.loads, proc.stdout.splitlines()) if "seq" in obj]
        self.assertEqual(resumed[0]["model"], "openai/gpt-fake")
        self.assertEqual(resumed[-1]["final_text"], "Nothing more.")
        self.assertEqual([r["model"] for r in self.fake.requests], ["gpt-fake"] * 3)

    def test_openai_compatible_server(self):
        env = dict(self.env, OPENAI_API_KEY=OPENAI_KEY, OPENAI_BASE_URL=self.fake.url + "/v1")
        _, events = self.run_task("--model", "openai-compatible/org/model-7b", env=env)
        self.assertRanWith(events, "openai-compatible/org/model-7b")


class GeminiTest(ProviderCase):
    fake_key = GEMINI_KEY

    def test_gemini_model_flag_on_the_openai_compatible_endpoint(self):
        for var in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
            with self.subTest(var=var):
                self.fake.requests.clear()
                self.fake.paths.clear()
                env = dict(self.env, GEMINI_BASE_URL=self.fake.url + "/v1beta/openai/", **{var: GEMINI_KEY})
                proc, events = self.run_task("--model", "gemini/gemini-fake", env=env)
                self.assertEqual(set(self.fake.paths), {"/v1beta/openai/chat/completions"})
                phases = [e for e in events if e["kind"] == "phase"]
                self.assertEqual((phases[0]["model"], phases[-1]["phase"]), ("gemini/gemini-fake", "COMPLETED"))
                (result,) = [e for e in events if e["kind"] == "tool_result"]
                self.assertIn("keys=[]", result["output"])
                self.assertNoKeyAnywhere(GEMINI_KEY, proc.stdout, proc.stderr)


class OllamaTest(ProviderCase):
    fake_key = None  # Ollama takes requests without a key

    def test_ollama_needs_no_key_and_no_terminal(self):
        env = {k: v for k, v in self.env.items() if k != "ANTHROPIC_API_KEY"}
        env["OLLAMA_HOST"] = self.fake.url.removeprefix("http://")  # host:port, as Ollama users write it
        proc, events = self.run_task("--model", "ollama/qwen-fake", env=env)
        self.assertRanWith(events, "ollama/qwen-fake")
        self.assertEqual(set(self.fake.paths), {"/v1/chat/completions"})
        self.assertNotIn("API key", proc.stderr)



class PromptTest(ProviderCase):
    """The CLI on a pty, as a person runs it: asked for the chosen provider's key, and only that one."""

    def run_on_pty(self, args, env, answer_to=None, typed=b""):
        """Run the CLI with a pty as its terminal; type TYPED once ANSWER_TO shows. Returns (code, screen)."""
        main_fd, sub_fd = os.openpty()
        try:
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), *args], env=env,
                                    cwd=self.workspace, stdin=sub_fd, stdout=sub_fd, stderr=sub_fd,
                                    start_new_session=True,
                                    preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL),
                                                        fcntl.ioctl(0, termios.TIOCSCTTY, 0)))
            os.close(sub_fd)
            deadline = time.monotonic() + 90
            screen = b""
            if answer_to is not None:
                screen = read_until(main_fd, answer_to, deadline)
                self.assertIn(answer_to, screen)
                os.write(main_fd, typed)
            screen += read_until(main_fd, None, deadline)
            return proc.wait(timeout=30), screen.decode("utf-8", "replace")
        finally:
            os.close(main_fd)

    def test_openai_key_is_asked_for_masked(self):
        env = {k: v for k, v in self.env.items() if k != "ANTHROPIC_API_KEY"}
        env["OPENAI_BASE_URL"] = self.fake.url + "/v1"
        code, screen = self.run_on_pty(["--model", "openai/gpt-fake", "look at the environment"], env,
                                       answer_to=b"(OPENAI_API_KEY): ", typed=OPENAI_KEY.encode() + b"\r")
        self.assertEqual(code, 0, screen)
        self.assertIn("OpenAI API key, input hidden (OPENAI_API_KEY): ", screen)
        self.assertNotIn("(ANTHROPIC_API_KEY):", screen)  # the other provider's key is not asked for
        self.assertIn("completed", screen)
        self.assertIn("openai/gpt-fake", screen)  # the summary line names the model
        self.assertIn("keys=[]", screen)
        self.assertNoKeyAnywhere(OPENAI_KEY, screen)
        (execution,) = [json.loads(line) for line in self.cli("list", "--json").stdout.splitlines()]
        events = self.cli("logs", execution["id"], "--json").stdout
        self.assertNoKeyAnywhere(OPENAI_KEY, events)
        self.assertEqual(len(self.fake.requests), 2)  # the typed key reached the API

    def test_ollama_asks_for_nothing(self):
        self.fake.key = None
        env = {k: v for k, v in self.env.items() if k != "ANTHROPIC_API_KEY"}
        env["OLLAMA_HOST"] = self.fake.url
        code, screen = self.run_on_pty(["--model", "ollama/qwen-fake", "look at the environment"], env)
        self.assertEqual(code, 0, screen)
        self.assertNotIn("API key", screen)
        self.assertIn("ollama/qwen-fake", screen)


class ReadmeCommandsTest(ProviderCase):
    """The README's provider commands, as written, with every provider's API pointed at a fake."""

    script = [text_step("A small project.")]
    fake_key = None  # one fake for every OpenAI-compatible provider: any key (or none) will do

    def readme_commands(self):
        with open(os.path.join(HERE, "README.md")) as f:
            section = f.read().split("\n## Models\n", 1)[1].split("\n## ", 1)[0]
        block = section.split("```sh\n", 1)[1].split("```", 1)[0]
        return [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.strip()]

    def test_one_working_command_per_provider(self):
        anthropic_fake = FakeAnthropic([text_step("A small project.")]).start()
        self.addCleanup(anthropic_fake.stop)
        commands = self.readme_commands()
        models_run = []
        for words in commands:
            env = dict(self.env, OPENAI_API_KEY=OPENAI_KEY, GEMINI_API_KEY=GEMINI_KEY)
            while "=" in words[0]:  # VAR=value before the command
                name, _, value = words.pop(0).partition("=")
                env[name] = value
            env.update(ANTHROPIC_BASE_URL=anthropic_fake.url, OPENAI_BASE_URL=self.fake.url + "/v1",
                       GEMINI_BASE_URL=self.fake.url + "/v1beta/openai/", OLLAMA_HOST=self.fake.url)
            self.assertEqual(words[:2], ["python", "runner.py"])
            model = words[words.index("--model") + 1]
            with self.subTest(model=model):
                proc = self.cli(*words[2:], env=env)  # as written: text on a pipe
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertIn("A small project.", proc.stdout)
                self.assertIn(model, proc.stderr)  # the header and summary lines name it
                newest = json.loads(self.cli("list", "--json", "--limit", "1", env=env).stdout.splitlines()[0])
                self.assertEqual((newest["spec"]["model"], newest["phase"]), (model, "COMPLETED"))
                models_run.append(model.split("/")[0])
        self.assertEqual(models_run, ["anthropic", "openai", "gemini", "ollama", "openai-compatible"])
        self.assertEqual(len(anthropic_fake.requests), 1)
        self.assertEqual(sorted(self.fake.paths), ["/v1/chat/completions"] * 3 + ["/v1beta/openai/chat/completions"])


class ModelErrorTest(ProviderCase):
    assertOneLine = assert_one_line

    def test_unknown_model_name_lists_the_forms(self):
        self.assertOneLine(self.cli("--model", "llama3", "x"), 2, "'llama3'", "provider/model", "ollama")

    def test_openai_compatible_needs_a_base_url(self):
        self.assertOneLine(self.cli("--model", "openai-compatible/m", "x"), 2, "OPENAI_BASE_URL")

    def test_missing_key_without_terminal_names_the_providers_variable(self):
        self.assertOneLine(self.cli("--model", "gemini/gemini-fake", "x"), 2, "GEMINI_API_KEY")
        self.assertOneLine(self.cli("--model", "gpt-4.1", "x"), 2, "OPENAI_API_KEY")

    def test_only_another_providers_key_says_how_to_use_it(self):
        env = {k: v for k, v in self.env.items() if k != "ANTHROPIC_API_KEY"}
        env["GEMINI_API_KEY"] = GEMINI_KEY
        proc = self.cli("x", env=env)  # the default model is Anthropic's
        self.assertOneLine(proc, 2, "ANTHROPIC_API_KEY is not set", "GEMINI_API_KEY is set", "--model gemini")
        self.assertNotIn(GEMINI_KEY, proc.stderr)

    def test_a_wrong_model_name_says_to_check_it(self):
        self.fake.script[:] = [text_step("never", errors=[(404, "The model `gpt-nope` does not exist")])]
        env = dict(self.env, OPENAI_API_KEY=OPENAI_KEY, OPENAI_BASE_URL=self.fake.url + "/v1")
        proc = self.cli("--json", "--model", "openai/gpt-nope", "x", env=env)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("check the model name (STIGMER_MODEL or --model)", proc.stderr)
        self.assertIn("gpt-nope", proc.stderr)


if __name__ == "__main__":
    unittest.main()
