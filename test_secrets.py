"""Tests for secrets.py: the masked prompt on a real pty, the environment handed to children,
the streaming Redactor, and the name it shares with the standard library.

    python -m unittest test_secrets -v

The installed-console-script test does a real `pip install` into a throwaway venv (about 5 s).
"""
import contextlib
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import termios
import time
import unittest

import models
from testsupport import read_until
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

HERE = os.path.dirname(os.path.abspath(__file__))
SECRETS_PY = os.path.join(HERE, "secrets.py")
PYTHON = sys.executable


S = models.project_secrets()  # our secrets.py, beside the standard library's
KEY = "sk-ant-api03-" + "x7Qz" * 10  # a fake key; tests that type keys use a fresh one each run


def answers(*replies):
    """A fake prompt giving each reply in turn (an exception instance is raised instead)."""
    queue = list(replies)

    def prompt(question):
        prompt.asked.append(question)
        reply = queue.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply
    prompt.asked = []
    return prompt


def never(question):
    raise AssertionError(f"prompted unexpectedly: {question!r}")


def run(args, **kwargs):
    kwargs.setdefault("timeout", 30)
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


def files_containing(needle, *roots):
    """Every file under roots whose bytes contain needle."""
    hits = []
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as f:
                        if needle.encode() in f.read():
                            hits.append(path)
    return hits


class GatherTest(unittest.TestCase):
    def setUp(self):
        self.warnings = []

    def gather(self, prompt=never, environ=None, **kwargs):
        kwargs.setdefault("stdin_isatty", True)
        return S.gather(environ={} if environ is None else environ, prompt=prompt,
                        warn=self.warnings.append, **kwargs)

    def test_environment_value_used_as_is(self):
        got = self.gather(environ={"ANTHROPIC_API_KEY": " " + KEY})
        self.assertEqual(dict(got), {"ANTHROPIC_API_KEY": " " + KEY})

    def test_alt_variable_kept_under_its_own_name(self):
        got = self.gather(environ={"ANTHROPIC_AUTH_TOKEN": "bearer-token-123"})
        self.assertEqual(got.names, ("ANTHROPIC_AUTH_TOKEN",))

    def test_missing_key_prompted_naming_provider_and_variable(self):
        prompt = answers(KEY)
        got = self.gather(prompt, environ={"ANTHROPIC_API_KEY": ""})
        self.assertEqual(prompt.asked, ["Anthropic API key, input hidden (ANTHROPIC_API_KEY): "])
        self.assertEqual(got["ANTHROPIC_API_KEY"], KEY)
        self.assertEqual(self.warnings, [])

    def test_whitespace_stripped(self):
        got = self.gather(answers(f"  {KEY}\t \n"))
        self.assertEqual(got["ANTHROPIC_API_KEY"], KEY)

    def test_empty_answer_asks_again(self):
        prompt = answers("", "   ", KEY)
        self.assertEqual(self.gather(prompt)["ANTHROPIC_API_KEY"], KEY)
        self.assertEqual(len(prompt.asked), 3)
        self.assertEqual(len(self.warnings), 2)

    def test_three_empty_answers_fail(self):
        prompt = answers("", "", " ", KEY)
        with self.assertRaises(S.SecretError) as caught:
            self.gather(prompt)
        self.assertNotIsInstance(caught.exception, (S.MissingSecret, S.PromptCancelled))
        self.assertEqual(len(prompt.asked), 3)
        self.assertIn("ANTHROPIC_API_KEY", str(caught.exception))

    def test_control_characters_refused_without_echo(self):
        for bad in (KEY[:10] + "\n" + KEY[10:], KEY + "\x1b[201~", KEY[:5] + "\x00" + KEY[5:], KEY + "\x7f"):
            with self.subTest(bad=bad), self.assertRaises(S.SecretError) as caught:
                self.gather(answers(bad))
            self.assertNotIn(KEY[8:20], str(caught.exception))
            self.assertIn("control character", str(caught.exception))

    def test_unlike_key_warns_but_is_used(self):
        got = self.gather(answers("not-an-anthropic-key-42"))
        self.assertEqual(got["ANTHROPIC_API_KEY"], "not-an-anthropic-key-42")
        self.assertEqual(len(self.warnings), 1)
        self.assertIn("sk-ant-", self.warnings[0])
        self.assertNotIn("not-an-anthropic-key-42", self.warnings[0])

    def test_ctrl_c_and_eof_cancel(self):
        for interrupt in (KeyboardInterrupt(), EOFError()):
            with self.subTest(interrupt=type(interrupt).__name__):
                with self.assertRaises(S.PromptCancelled) as caught:
                    self.gather(answers(interrupt))
                self.assertIsInstance(caught.exception, S.SecretError)
                self.assertIn("ANTHROPIC_API_KEY", str(caught.exception))

    def test_no_terminal_fails_at_once_naming_the_variables(self):
        with self.assertRaises(S.MissingSecret) as caught:
            self.gather(never, stdin_isatty=False, extra=["GITHUB_TOKEN"])
        self.assertEqual(caught.exception.names, ("ANTHROPIC_API_KEY", "GITHUB_TOKEN"))
        self.assertIn("export ANTHROPIC_API_KEY=... GITHUB_TOKEN=...", str(caught.exception))
        with self.assertRaises(S.MissingSecret) as caught:
            self.gather(never, stdin_isatty=False)
        self.assertEqual(str(caught.exception),
                         "ANTHROPIC_API_KEY is not set and there is no terminal to ask on: "
                         "export ANTHROPIC_API_KEY=... or run `python runner.py start` in a terminal")

    def test_extra_secrets_and_several_providers(self):
        prompt = answers("ghp_" + "a" * 36)
        got = self.gather(prompt, providers=("anthropic", "openai"), extra=["GITHUB_TOKEN"],
                          environ={"ANTHROPIC_API_KEY": KEY, "OPENAI_API_KEY": "sk-proj-abc"})
        self.assertEqual(got.names, ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GITHUB_TOKEN"))
        self.assertEqual(prompt.asked, ["Secret for the agent's shell, input hidden (GITHUB_TOKEN): "])
        with self.assertRaises(S.SecretError):
            self.gather(providers=("nope",))
        with self.assertRaises(S.SecretError):
            self.gather(extra=["NOT-A-NAME"], environ={"ANTHROPIC_API_KEY": KEY})

    def test_secrets_repr_masks_values(self):
        got = S.Secrets({"ANTHROPIC_API_KEY": KEY, "GITHUB_TOKEN": "ghp_secretvalue"})
        for text in (repr(got), str(got), f"{got}", repr([got])):
            self.assertNotIn(KEY[7:], text)
            self.assertNotIn("secretvalue", text)
            self.assertIn("ANTHROPIC_API_KEY", text)
        self.assertEqual(got.names, ("ANTHROPIC_API_KEY", "GITHUB_TOKEN"))
        self.assertEqual(dict(got)["GITHUB_TOKEN"], "ghp_secretvalue")
        self.assertEqual(len(got), 2)

    def test_providers_table(self):
        anthropic = S.PROVIDERS["anthropic"]
        self.assertEqual((anthropic.env_var, anthropic.alt_env_vars, anthropic.prefix),
                         ("ANTHROPIC_API_KEY", ("ANTHROPIC_AUTH_TOKEN",), "sk-ant-"))
        self.assertEqual(S.PROVIDERS["openai"].env_var, "OPENAI_API_KEY")
        self.assertEqual(S.PROVIDERS["gemini"].env_var, "GEMINI_API_KEY")
        with self.assertRaises(Exception):
            anthropic.env_var = "X"  # frozen


class ProviderKeysTest(unittest.TestCase):
    """Keys for the chosen provider only; providers without a key; the check tells the truth."""

    def check(self, argv, environ):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = S.main(argv, environ=environ)
        return code, out.getvalue(), err.getvalue()

    def test_each_provider_asks_for_its_own_key_only(self):
        for provider, var in (("openai", "OPENAI_API_KEY"), ("gemini", "GEMINI_API_KEY")):
            with self.subTest(provider=provider):
                prompt = answers("a-key-for-" + provider)
                got = S.gather((provider,), environ={"ANTHROPIC_API_KEY": ""}, prompt=prompt, stdin_isatty=True,
                               warn=lambda m: None)
                self.assertEqual(got.names, (var,))
                self.assertEqual(len(prompt.asked), 1)
                self.assertIn(var, prompt.asked[0])

    def test_gemini_takes_google_api_key(self):
        got = S.gather(("gemini",), environ={"GOOGLE_API_KEY": "AIza-google-key"}, prompt=never, stdin_isatty=True)
        self.assertEqual(dict(got), {"GOOGLE_API_KEY": "AIza-google-key"})

    def test_ollama_needs_no_key_even_without_a_terminal(self):
        got = S.gather(("ollama",), environ={}, prompt=never, stdin_isatty=False)
        self.assertEqual(dict(got), {})

    def test_openai_compatible_key_is_optional(self):
        self.assertEqual(dict(S.gather(("openai-compatible",), environ={}, prompt=never, stdin_isatty=False)), {})
        got = S.gather(("openai-compatible",), environ={"OPENAI_API_KEY": "vllm-key-123"}, prompt=never,
                       stdin_isatty=False)
        self.assertEqual(dict(got), {"OPENAI_API_KEY": "vllm-key-123"})

    def test_check_ollama_is_ok_without_a_key(self):
        code, out, _ = self.check(["check", "--provider", "ollama"], {})
        self.assertEqual(code, 0)
        self.assertRegex(out, r"not needed\s+ollama")

    def test_check_openai_compatible_needs_a_base_url(self):
        code, _, err = self.check(["check", "--provider", "openai-compatible"], {})
        self.assertEqual(code, 1)
        self.assertIn("OPENAI_BASE_URL", err)
        code, out, _ = self.check(["check", "--json", "--provider", "openai-compatible"],
                                  {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
        self.assertEqual((code, json.loads(out)["ok"]), (0, True))

    def test_check_names_the_missing_sdk(self):
        saved = S.importlib.util.find_spec
        S.importlib.util.find_spec = lambda name, *a: None if name == "openai" else saved(name, *a)
        try:
            code, out, _ = self.check(["check", "--json", "--provider", "openai"], {"OPENAI_API_KEY": "sk-x" * 5})
        finally:
            S.importlib.util.find_spec = saved
        report = json.loads(out)  # the key is set: the check passes, and says apart that the SDK is missing
        self.assertEqual((code, report["ok"], report["problems"]), (0, True, []))
        self.assertIn("pip install -e '.[openai]'", report["notes"][0])

    def test_odd_key_warning_is_not_prefixed_twice(self):
        warnings = []
        S.gather(environ={}, prompt=answers("not-an-anthropic-key-42"), stdin_isatty=True, warn=warnings.append)
        self.assertEqual(len(warnings), 1)
        self.assertFalse(warnings[0].lower().startswith("warning"), warnings[0])

    def test_secret_looking_names(self):
        for name in ("GITHUB_TOKEN", "aws_secret_access_key", "DB_PASSWORD", "GOOGLE_APPLICATION_CREDENTIALS",
                     "NPM_AUTH_TOKEN", "Api_Key"):
            self.assertTrue(S.looks_secret(name), name)
        for name in ("HOME", "PATH", "LANG", "EDITOR", "PWD", "STIGMER_SANDBOX_SECRETS"):  # the last holds names
            self.assertFalse(S.looks_secret(name), name)
        self.assertEqual(S.secret_looking_names({"GITHUB_TOKEN": "x", "EMPTY_TOKEN": "", "HOME": "/h"}),
                         ["GITHUB_TOKEN"])


class NamesAndEnvTest(unittest.TestCase):
    def test_sandbox_secret_names_merge_dedupe_order(self):
        environ = {"STIGMER_SANDBOX_SECRETS": " NPM_TOKEN, GITHUB_TOKEN,,_X1 "}
        self.assertEqual(S.sandbox_secret_names(["GITHUB_TOKEN", "AWS_KEY", "GITHUB_TOKEN"], environ),
                         ["GITHUB_TOKEN", "AWS_KEY", "NPM_TOKEN", "_X1"])
        self.assertEqual(S.sandbox_secret_names(environ={}), [])

    def test_sandbox_secret_names_refuse_bad_names(self):
        for bad in ("1ABC", "A-B", "A B", "", "A=B", "É"):
            with self.subTest(bad=bad), self.assertRaises(S.SecretError):
                S.sandbox_secret_names([bad], environ={})
        with self.assertRaises(S.SecretError) as caught:
            S.sandbox_secret_names(environ={"STIGMER_SANDBOX_SECRETS": "OK,no good"})
        self.assertIn("STIGMER_SANDBOX_SECRETS", str(caught.exception))

    def test_child_env_adds_secrets_to_a_copy(self):
        base = {"PATH": "/bin", "HOME": "/h"}
        env = S.child_env(S.Secrets({"ANTHROPIC_API_KEY": KEY}), base)
        self.assertEqual(env, {"PATH": "/bin", "HOME": "/h", "ANTHROPIC_API_KEY": KEY})
        self.assertEqual(base, {"PATH": "/bin", "HOME": "/h"})
        self.assertEqual(S.child_env({"X_SECRET": "v"})["PATH"], os.environ["PATH"])
        self.assertNotIn("X_SECRET", os.environ)

    def test_our_code_in_a_child_with_temporary_home_writes_no_key(self):
        # A child does what the CLI does with a key: gather, child_env, redact, hand it to
        # `secrets.py check` and `runner.py --help`. Nothing under HOME, the cwd or TMPDIR may
        # hold it afterwards. (test_runner.SecretsTest runs a whole task and scans STIGMER_HOME.)
        key = "sk-ant-childenv-" + S.token_hex(16)
        with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as work:
            os.mkdir(os.path.join(work, "tmp"))
            base = {"HOME": home, "PATH": os.environ["PATH"], "TMPDIR": os.path.join(work, "tmp"),
                    "PYTHONDONTWRITEBYTECODE": "1", "STIGMER_SANDBOX_SECRETS": "GITHUB_TOKEN",
                    "GITHUB_TOKEN": "ghp_" + S.token_hex(12)}
            child = (
                "import hashlib, importlib.util, os, subprocess, sys\n"
                "spec = importlib.util.spec_from_file_location('stigmer_secrets', sys.argv[1])\n"
                "S = importlib.util.module_from_spec(spec); spec.loader.exec_module(S)\n"
                "names = S.sandbox_secret_names()\n"
                "found = S.gather(('anthropic',), names, stdin_isatty=False)\n"
                "env = S.child_env(found)\n"
                "key = env['ANTHROPIC_API_KEY']\n"
                "r = found.redactor()\n"
                "print(r.redact('key=' + key), ''.join([r.feed(key[:9]), r.feed(key[9:] + '.'), r.flush()]))\n"
                "open('notes.txt', 'w').write(r.redact(f'log: {key}\\n'))\n"
                "here = os.path.dirname(sys.argv[1])\n"
                "for args in ([os.path.join(here, 'secrets.py'), 'check', '--json'],\n"
                "             [os.path.join(here, 'runner.py'), '--help']):\n"
                "    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)\n"
                "    assert done.returncode == 0 and key not in done.stdout + done.stderr, done\n"
                "print(hashlib.sha256(key.encode()).hexdigest(), repr(found))\n"
            )
            done = run([PYTHON, "-c", child, SECRETS_PY], cwd=work,
                       env=S.child_env(S.Secrets({"ANTHROPIC_API_KEY": key}), base))
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertEqual(done.stdout.split("\n")[0],
                             "key=[REDACTED:ANTHROPIC_API_KEY] [REDACTED:ANTHROPIC_API_KEY].")
            self.assertIn(hashlib.sha256(key.encode()).hexdigest(), done.stdout)
            self.assertNotIn(key, done.stdout + done.stderr)
            with open(os.path.join(work, "notes.txt")) as f:
                self.assertEqual(f.read(), "log: [REDACTED:ANTHROPIC_API_KEY]\n")
            self.assertEqual(files_containing(key, home, work), [])
            with open(os.path.join(work, "canary"), "w") as f:  # the scan itself can fail
                f.write("a fake canary value for the scanner")
            self.assertEqual(len(files_containing("fake canary value", home, work)), 1)

    def test_check_cli_reports_names_only(self):
        value = "sk-ant-" + "v" * 30

        def check(argv, environ):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = S.main(argv, environ=environ)
            self.assertNotIn(value, out.getvalue() + err.getvalue())
            return code, out.getvalue(), err.getvalue()

        code, out, _ = check(["check"], {"ANTHROPIC_API_KEY": value})
        self.assertEqual(code, 0)
        self.assertRegex(out, r"ANTHROPIC_API_KEY\s+set")
        code, out, err = check(["check", "--secret", "GITHUB_TOKEN"], {"ANTHROPIC_API_KEY": value})
        self.assertEqual(code, 1)
        self.assertRegex(out, r"GITHUB_TOKEN\s+missing")
        self.assertIn("export GITHUB_TOKEN=...", err)
        code, out, _ = check(["check", "--json", "--provider", "openai"],
                             {"OPENAI_API_KEY": value, "STIGMER_SANDBOX_SECRETS": "HOME_X"})
        report = json.loads(out)
        self.assertEqual((code, report["ok"]), (1, False))
        self.assertEqual([(r["name"], r["set"]) for r in report["secrets"]],
                         [("OPENAI_API_KEY", True), ("HOME_X", False)])
        self.assertEqual(check(["check", "--secret", "no-good"], {})[0], 2)


# ---- the masked prompt on a real terminal ----

PROMPT_CHILD = r"""
import hashlib, importlib.util, os, sys
spec = importlib.util.spec_from_file_location("stigmer_secrets", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
report = int(sys.argv[2])
try:
    got = module.gather(environ={})
except module.SecretError as exc:
    os.write(report, type(exc).__name__.encode())
    print("stigmer:", exc, file=sys.stderr)
    sys.exit(130 if isinstance(exc, module.PromptCancelled) else 2)
os.write(report, hashlib.sha256(got["ANTHROPIC_API_KEY"].encode()).hexdigest().encode())
"""



class PtyPromptTest(unittest.TestCase):
    def type_at_prompt(self, typed, stdin_is_pty=True):
        """Run PROMPT_CHILD on a new pty (its controlling terminal); type at the prompt.
        Returns (exit code, everything the terminal showed, what the child reported)."""
        master, slave = os.openpty()
        report_r, report_w = os.pipe()
        ctty = 0 if stdin_is_pty else 1
        try:
            proc = subprocess.Popen(
                [PYTHON, "-c", PROMPT_CHILD, SECRETS_PY, str(report_w)],
                stdin=slave if stdin_is_pty else subprocess.PIPE, stdout=slave, stderr=slave,
                pass_fds=(report_w,), start_new_session=True,
                preexec_fn=lambda: (
                    # Ctrl-C must raise SIGINT as in a terminal, even if CI started us with SIGINT ignored
                    signal.signal(signal.SIGINT, signal.SIG_DFL),
                    fcntl.ioctl(ctty, termios.TIOCSCTTY, 0)))
            os.close(slave)
            os.close(report_w)
            deadline = time.monotonic() + 15
            shown = read_until(master, b"(ANTHROPIC_API_KEY): ", deadline)
            self.assertIn(b"Anthropic API key, input hidden (ANTHROPIC_API_KEY): ", shown)
            os.write(master, typed)
            shown += read_until(master, None, deadline)
            code = proc.wait(timeout=max(1, deadline - time.monotonic()))
            reported = read_until(report_r, None, deadline).decode()
            if proc.stdin:
                proc.stdin.close()
            return code, shown, reported
        finally:
            os.close(master)
            os.close(report_r)

    def test_typed_key_is_not_echoed_and_arrives_exactly(self):
        key = "sk-ant-pty-" + S.token_urlsafe(24)
        code, shown, reported = self.type_at_prompt(f"  {key} \r".encode())
        self.assertEqual(code, 0, shown)
        self.assertEqual(reported, hashlib.sha256(key.encode()).hexdigest())
        self.assertNotIn(key[7:].encode(), shown)
        self.assertNotIn(key[-12:].encode(), shown)

    def test_prompt_uses_dev_tty_when_stdin_is_a_pipe(self):
        key = "sk-ant-tty-" + S.token_urlsafe(24)
        code, shown, reported = self.type_at_prompt(f"{key}\r".encode(), stdin_is_pty=False)
        self.assertEqual(code, 0, shown)
        self.assertEqual(reported, hashlib.sha256(key.encode()).hexdigest())
        self.assertNotIn(key[-12:].encode(), shown)

    def test_ctrl_c_and_ctrl_d_at_the_prompt_cancel(self):
        for typed in (b"\x03", b"\x04"):
            with self.subTest(typed=typed):
                code, shown, reported = self.type_at_prompt(typed)
                self.assertEqual((code, reported), (130, "PromptCancelled"), shown)
                self.assertNotIn(b"Traceback", shown)

    def test_no_terminal_fails_at_once(self):
        for stdin in (subprocess.DEVNULL, subprocess.PIPE):  # a pipe left open would hang a fallback read
            with self.subTest(stdin=stdin):
                report_r, report_w = os.pipe()
                started = time.monotonic()
                proc = subprocess.Popen([PYTHON, "-c", PROMPT_CHILD, SECRETS_PY, str(report_w)], stdin=stdin,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        pass_fds=(report_w,), start_new_session=True)
                os.close(report_w)
                try:
                    out, err = proc.communicate(timeout=10)
                finally:
                    proc.kill()
                    reported = read_until(report_r, None, time.monotonic() + 1).decode()
                    os.close(report_r)
                self.assertLess(time.monotonic() - started, 10)
                self.assertEqual((proc.returncode, reported), (2, "MissingSecret"), err)
                self.assertIn("ANTHROPIC_API_KEY is not set and there is no terminal to ask on", err)
                self.assertIn("export ANTHROPIC_API_KEY=...", err)
                self.assertNotIn("Traceback", err)
                self.assertNotIn("Warning", err)  # getpass's "can not control echo" fallback


# ---- the redactor ----

class RedactorTest(unittest.TestCase):
    SECRETS = {"ANTHROPIC_API_KEY": KEY, "GITHUB_TOKEN": "ghp_" + "T0k3n" * 7}
    TEXT = f"key={KEY} then ghp_ and {SECRETS['GITHUB_TOKEN']}! and sk-ant- end"
    WANT = "key=[REDACTED:ANTHROPIC_API_KEY] then ghp_ and [REDACTED:GITHUB_TOKEN]! and sk-ant- end"

    def streamed(self, redactor, chunks):
        return "".join([redactor.feed(c) for c in chunks] + [redactor.flush()])

    def test_whole_text(self):
        self.assertEqual(S.Redactor(self.SECRETS).redact(self.TEXT), self.WANT)

    def test_json_is_redacted_as_decoded_then_as_written(self):
        tricky = 'q"uo\\te\nnew-line-9'  # JSON escapes the quote, the backslash and the newline
        redactor = S.Redactor({"DB_PASSWORD": tricky, "PIN_SECRET": "123456789012"})
        text = json.dumps({"command": f"echo {tricky}", tricky: [tricky, 123456789012], "n": 1}, ensure_ascii=False)
        self.assertEqual(json.loads(redactor.redact_json(text)),
                         {"command": "echo [REDACTED:DB_PASSWORD]", "[REDACTED:DB_PASSWORD]": [
                             "[REDACTED:DB_PASSWORD]", "[REDACTED:PIN_SECRET]"], "n": 1})
        self.assertEqual(redactor.redact(text).count("[REDACTED:DB_PASSWORD]"), 0)  # why redact_json exists
        clean = '{"command": "ls -la"}'
        self.assertIs(redactor.redact_json(clean), clean)
        self.assertEqual(redactor.redact_json(f"not json {tricky}"), "not json [REDACTED:DB_PASSWORD]")

    def test_every_split_into_two_chunks(self):
        redactor = S.Redactor(self.SECRETS)
        for i in range(len(self.TEXT) + 1):
            self.assertEqual(self.streamed(redactor, [self.TEXT[:i], self.TEXT[i:]]), self.WANT, i)

    def test_every_split_into_three_chunks(self):
        redactor = S.Redactor(self.SECRETS)
        text = f"{KEY} ghp_ {self.SECRETS['GITHUB_TOKEN']}."
        want = redactor.redact(text)
        self.assertEqual(want, "[REDACTED:ANTHROPIC_API_KEY] ghp_ [REDACTED:GITHUB_TOKEN].")
        for i in range(len(text) + 1):
            for j in range(i, len(text) + 1):
                self.assertEqual(self.streamed(redactor, [text[:i], text[i:j], text[j:]]), want, (i, j))

    def test_random_chunks_with_nested_values_match_whole_text(self):
        secrets = {"DB_PASSWORD": "hunter2hunter2", "DATABASE_URL": "postgres://app:hunter2hunter2@db/app",
                   "TOKEN": "abcabcabcd", "TOKEN_LONG": "abcabcabcdabcabcabce", "PIN": "1234"}
        pieces = list(secrets.values()) + ["abc", "abcabc", "hunter2", "postgres://app:", " ", "x", "\n", "é"]
        rng = random.Random(7)
        redactor = S.Redactor(secrets)
        for _ in range(300):
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
            want = redactor.redact(text)
            for value in list(secrets.values())[:4]:
                self.assertNotIn(value, want.replace("[REDACTED:", "\0"))
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
            chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            self.assertEqual(self.streamed(redactor, chunks), want, chunks)

    def test_longer_overlapping_value_wins(self):
        redactor = S.Redactor({"DB_PASSWORD": "hunter2hunter2", "DATABASE_URL": "postgres://app:hunter2hunter2@db/app",
                               "SHORT_KEY": "sk-ant-abcdefgh", "LONG_KEY": "sk-ant-abcdefgh-longer"})
        self.assertEqual(redactor.redact("url=postgres://app:hunter2hunter2@db/app pw=hunter2hunter2"),
                         "url=[REDACTED:DATABASE_URL] pw=[REDACTED:DB_PASSWORD]")
        self.assertEqual(redactor.redact("sk-ant-abcdefgh-longer sk-ant-abcdefgh-long"),
                         "[REDACTED:LONG_KEY] [REDACTED:SHORT_KEY]-long")
        self.assertEqual(self.streamed(redactor, ["sk-ant-abcdefgh", "-longer"]), "[REDACTED:LONG_KEY]")

    def test_partly_overlapping_values_leak_nothing(self):
        redactor = S.Redactor({"A": "AAAABBBB", "B": "BBBBCCCCCCCC"})
        self.assertEqual(redactor.redact("xAAAABBBBCCCCCCCCx"), "x[REDACTED:B]x")
        self.assertEqual(redactor.redact("xBBBBCCCCCCCCx AAAABBBB"), "x[REDACTED:B]x [REDACTED:A]")
        self.assertEqual(redactor.redact("AAAABBBBAAAABBBB"), "[REDACTED:A][REDACTED:A]")  # touching only
        for i in range(len("xAAAABBBBCCCCCCCCx") + 1):
            text = "xAAAABBBBCCCCCCCCx"
            self.assertEqual(self.streamed(redactor, [text[:i], text[i:]]), "x[REDACTED:B]x", i)
        # A run of a value overlapping itself, joined by a longer one at its far end.
        redactor = S.Redactor({"P": "hunter2hunter2", "Q": "2hunter2-and-more"})
        text = "<" + "hunter2" * 5 + "-and-more>"
        self.assertEqual(redactor.redact(text), "<[REDACTED:Q]>")
        for i in range(len(text) + 1):
            self.assertEqual(self.streamed(redactor, [text[:i], text[i:]]), "<[REDACTED:Q]>", i)

    def test_random_overlaps_match_a_brute_force_reference(self):
        def reference(secrets, text):
            """Mark every occurrence of every value; merge overlapping ones; longest labels."""
            values = sorted(dict.fromkeys(v for v in secrets.values() if len(v) >= S.MIN_REDACT_LEN),
                            key=len, reverse=True)
            names = {}
            for name, value in secrets.items():
                names.setdefault(value, name)
            found = sorted((i, i + len(v), values.index(v)) for v in values
                           for i in range(len(text)) if text.startswith(v, i))
            out, pos, k = [], 0, 0
            while k < len(found):
                start, end, best = found[k]
                k += 1
                while k < len(found) and found[k][0] < end:
                    end, best = max(end, found[k][1]), min(best, found[k][2])
                    k += 1
                out += (text[pos:start], f"[REDACTED:{names[values[best]]}]")
                pos = end
            return "".join(out) + text[pos:]

        rng = random.Random(11)
        for trial in range(60):
            alphabet = "ab" if trial % 2 else "abc"
            secrets = {f"S{i}": "".join(rng.choice(alphabet) for _ in range(rng.randint(8, 14)))
                       for i in range(rng.randint(1, 4))}
            redactor = S.Redactor(secrets)
            for _ in range(20):
                text = "".join(rng.choice([*secrets.values(), "a", "b", "ab", "x"])
                               for _ in range(rng.randint(0, 12)))
                want = reference(secrets, text)
                self.assertEqual(redactor.redact(text), want, (secrets, text))
                cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
                chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
                self.assertEqual(self.streamed(redactor, chunks), want, (secrets, chunks))
                self.assertEqual(self.streamed(redactor, list(text)), want, (secrets, text))
                plain = re.sub(r"\[REDACTED:S\d+\]", "\0", want)
                for value in secrets.values():  # nothing long enough to be a value survives
                    self.assertNotIn(value, plain)

    def test_short_values_left_alone(self):
        redactor = S.Redactor({"PIN": "1234567", "OK": "12345678"})
        self.assertEqual(redactor.redact("1234567 12345678"), "1234567 [REDACTED:OK]")
        self.assertEqual(redactor.names, ("OK",))

    def test_regex_characters_in_values(self):
        value = "a.b*c+d?(e)[f]|g\\h^$"
        redactor = S.Redactor({"ODD": value})
        self.assertEqual(redactor.redact(f"<{value}> a.bXc"), "<[REDACTED:ODD]> a.bXc")
        self.assertEqual(self.streamed(redactor, ["<a.b*c+d", "?(e)[f]|g\\h^", "$>"]), "<[REDACTED:ODD]>")

    def test_holds_back_only_a_possible_start_and_flush_releases_it(self):
        redactor = S.Redactor(self.SECRETS)
        self.assertEqual(redactor.feed("plain text, nothing to hide"), "plain text, nothing to hide")
        self.assertEqual(redactor.feed("almost sk-ant-api"), "almost ")
        self.assertEqual(redactor.feed("03-nope"), "sk-ant-api03-nope")
        self.assertEqual(redactor.feed("tail " + KEY[:-1]), "tail ")
        self.assertEqual(redactor.flush(), KEY[:-1])
        self.assertEqual(redactor.flush(), "")
        redactor.feed("ghp_T0k3n")
        self.assertEqual(redactor.feed("T0k3nT0k3nT0k3nT0k3nT0k3nT0k3n."), "[REDACTED:GITHUB_TOKEN].")

    def test_hold_never_exceeds_longest_value_minus_one(self):
        redactor = S.Redactor({"A": "aaaaaaaaab"})
        self.assertEqual(redactor.feed("x" + "a" * 30), "x" + "a" * 21)
        self.assertEqual(redactor.feed("b"), "[REDACTED:A]")

    def test_streams_are_independent(self):
        first = S.Redactor(self.SECRETS)
        second = first.stream()
        self.assertEqual(first.feed(KEY[:12]), "")
        self.assertEqual(second.feed("hello"), "hello")
        self.assertEqual(first.feed(KEY[12:]), "[REDACTED:ANTHROPIC_API_KEY]")

    def test_many_secrets_without_prefilter(self):
        secrets = {f"S{i}": f"value-{i:02d}-" + "z" * i for i in range(S.PREFILTER_MAX + 4)}
        redactor = S.Redactor(secrets)
        text = " ".join(secrets.values()) + " value-0"
        want = " ".join(f"[REDACTED:{name}]" for name in secrets) + " value-0"
        self.assertEqual(redactor.redact(text), want)
        self.assertEqual(self.streamed(redactor, [text[i:i + 5] for i in range(0, len(text), 5)]), want)

    def test_no_secrets_passes_through(self):
        for redactor in (S.Redactor(), S.Redactor({}), S.Redactor({"PIN": "1234"})):
            self.assertEqual(redactor.redact("sk-ant-anything"), "sk-ant-anything")
            self.assertEqual(redactor.feed("sk-ant-"), "sk-ant-")
            self.assertEqual(redactor.flush(), "")

    def test_repr_masks_values(self):
        redactor = S.Redactor(self.SECRETS)
        self.assertEqual(repr(redactor), "Redactor(ANTHROPIC_API_KEY='***', GITHUB_TOKEN='***')")
        self.assertEqual(repr(S.Secrets(self.SECRETS).redactor()), repr(redactor))


# ---- the name `secrets`: the standard library's API on every entry path ----

STDLIB_PROBE = "import json, secrets; print(json.dumps([secrets.__file__, secrets.__all__]))"
CHECKOUT_PROBE = r"""
import json, sys
first = sys.path[0]
import secrets, anthropic, pydantic
import runner
print(json.dumps({
    "path0": first, "file": secrets.__file__, "hex": len(secrets.token_hex(4)),
    "digest": secrets.compare_digest(b"ab", b"ab"), "below": secrets.randbelow(3) < 3,
    "pydantic": pydantic.SecretStr("k") == pydantic.SecretStr("k") != pydantic.SecretStr("j"),
    "anthropic": callable(anthropic.Anthropic), "ours": hasattr(secrets, "Redactor"),
    "runner": hasattr(runner.stigmer_secrets, "Redactor"),
}))
"""


def stdlib_secrets():
    """The standard library's secrets (file, __all__), as a neutral directory sees it."""
    done = run([PYTHON, "-I", "-c", STDLIB_PROBE], cwd=tempfile.gettempdir())
    return json.loads(done.stdout)


REEXEC = """import json, os, sys
sys.path.insert(0, sys.argv[1])
import secrets as S
if S.SECRETS_FD_VAR not in os.environ:
    print(os.getpid(), file=sys.stderr, flush=True)
    S.reexec_without_secrets(sorted(S.environment_secrets(os.environ)))
got = S.inherited_secrets()
with open(f"/proc/{os.getpid()}/environ", "rb") as f:
    block = f.read().split(b"\\0")
print(json.dumps({"got": got, "pid": os.getpid(), "argv": sys.argv[2:],
                  "block": sorted(v.split(b"=", 1)[0].decode() for v in block if v)}))
"""


@unittest.skipUnless(os.path.exists("/proc/self/environ"), "reads /proc/PID/environ (Linux)")
class SecretsPipeTest(unittest.TestCase):
    """Issue 28, item 6: a process can move its secrets out of its environment block, which every process of
    the user can read at /proc/PID/environ, into a pipe that it reads once."""

    def test_reexec_moves_the_secrets_out_of_the_environment_block(self):
        env = {"PATH": os.environ["PATH"], "ANTHROPIC_API_KEY": "sk-ant-moved-0123456789",
               "GITHUB_TOKEN": "ghp_moved0123456789", "DAYTONA_API_KEY": "dtn_moved0123456789",
               "REDIS_URL": "redis://:pw0123456789@host:6379/0", "PLAIN": "stays"}
        done = subprocess.run([sys.executable, "-c", REEXEC, HERE, "an argument", "--flag"], env=env,
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        out = json.loads(done.stdout)
        self.assertEqual(out["pid"], int(done.stderr.split()[0]))  # the same process, re-executed
        self.assertEqual(out["argv"], ["an argument", "--flag"])
        self.assertEqual(out["got"], {k: v for k, v in env.items() if k not in ("PATH", "PLAIN")})
        self.assertIn("PLAIN", out["block"])
        self.assertEqual(set(out["block"]) & set(out["got"]), set())  # no key, token or credential left in it

    def test_a_pipe_hands_secrets_to_a_child_once(self):
        values = {"OPENAI_API_KEY": "sk-o-" + "x" * 80_000}  # more than a pipe holds by default
        fd = S.secrets_pipe(values)
        try:
            child = subprocess.run([sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
                                    "import secrets as S; print(json.dumps(S.inherited_secrets()))", HERE],
                                   env={"PATH": os.environ["PATH"], S.SECRETS_FD_VAR: str(fd)}, pass_fds=(fd,),
                                   capture_output=True, text=True, timeout=60)
        finally:
            os.close(fd)
        self.assertEqual(child.returncode, 0, child.stderr)
        self.assertEqual(json.loads(child.stdout), values)
        self.assertEqual(S.inherited_secrets({}), {})
        with self.assertRaises(S.SecretError):
            S.inherited_secrets({S.SECRETS_FD_VAR: "999"})


class ShadowingTest(unittest.TestCase):
    def test_stdlib_api_reexported(self):
        path, names = stdlib_secrets()
        self.assertNotEqual(os.path.realpath(path), os.path.realpath(SECRETS_PY))
        self.assertTrue(set(names) <= set(S.__all__), set(names) - set(S.__all__))
        self.assertEqual(os.path.realpath(S._std.__file__), os.path.realpath(path))
        for name in names:
            self.assertIs(getattr(S, name), getattr(S._std, name), name)
        self.assertEqual(len(S.token_hex(4)), 8)
        self.assertEqual(len(S.token_bytes(5)), 5)
        self.assertRegex(S.token_urlsafe(8), r"^[A-Za-z0-9_-]+$")
        self.assertTrue(S.compare_digest("abc", "abc") and not S.compare_digest("abc", "abd"))
        self.assertIn(S.choice("xyz"), "xyz")
        self.assertLess(S.randbelow(5), 5)
        self.assertIsInstance(S.SystemRandom().random(), float)
        self.assertEqual(S.DEFAULT_ENTROPY, 32)

    def test_from_the_checkout(self):
        done = run([PYTHON, "-c", CHECKOUT_PROBE], cwd=HERE)
        self.assertEqual(done.returncode, 0, done.stderr)
        got = json.loads(done.stdout)
        self.assertEqual(got.pop("path0"), "")
        self.assertEqual(got.pop("file"), SECRETS_PY)  # ours shadows the stdlib here
        self.assertEqual(set(got.values()), {True, 8}, got)
        done = run([PYTHON, "runner.py", "--help"], cwd=HERE)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNotIn("Traceback", done.stderr)

    def test_from_python_m_unittest(self):
        env = dict(os.environ, STIGMER_UNITTEST_PROBE="1")
        done = run([PYTHON, "-m", "unittest", "-v", "test_secrets.UnittestEntryProbe"], cwd=HERE, env=env)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("Ran 1 test", done.stderr)
        self.assertNotIn("skipped", done.stderr)

    @unittest.skipUnless(importlib.util.find_spec("setuptools") and importlib.util.find_spec("pip"),
                         "needs pip and setuptools to install the project offline")
    def test_installed_console_script(self):
        # SLOW (~5 s): a real `pip install` of a copy of the checkout into a throwaway venv that
        # sees this venv's site-packages through a .pth file, so nothing is downloaded.
        import sysconfig
        import tomllib
        with tempfile.TemporaryDirectory() as tmp:
            src, venv = os.path.join(tmp, "src"), os.path.join(tmp, "venv")
            os.mkdir(src)
            with open(os.path.join(HERE, "pyproject.toml")) as f:
                pyproject = f.read()
            modules = tomllib.loads(pyproject)["tool"]["setuptools"]["py-modules"]
            with open(os.path.join(src, "pyproject.toml"), "w") as f:
                f.write(pyproject)  # setuptools only warns about listed modules not yet written
            for name in [m + ".py" for m in modules] + ["stigmer.proto", "README.md"]:
                if os.path.exists(os.path.join(HERE, name)):
                    shutil.copy(os.path.join(HERE, name), src)
            run([PYTHON, "-m", "venv", "--without-pip", venv], check=True)
            vpython = os.path.join(venv, "bin", "python")
            site = run([vpython, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
            with open(os.path.join(site, "parent-venv.pth"), "w") as f:
                f.write(sysconfig.get_paths()["purelib"] + "\n")
            env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PIP_NO_CACHE_DIR="1")
            env.pop("PYTHONPATH", None)
            done = run([vpython, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", src],
                       cwd=tmp, env=env, timeout=120)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            done = run([os.path.join(venv, "bin", "stigmer"), "--help"], cwd=tmp, env=env)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("runner", done.stdout)
            probe = ("import json, secrets, anthropic, pydantic, runner; print(json.dumps(["
                     "runner.__file__, secrets.__file__, runner.stigmer_secrets.__file__, len(secrets.token_hex(4)),"
                     "hasattr(runner.stigmer_secrets, 'Redactor'), hasattr(secrets, 'Redactor'), "
                     "callable(anthropic.Anthropic), pydantic.SecretStr('k') == pydantic.SecretStr('k')]))")
            done = run([vpython, "-c", probe], cwd=tmp, env=env)
            self.assertEqual(done.returncode, 0, done.stderr)
            runner_file, secrets_file, ours_file, *checks = json.loads(done.stdout)
            self.assertEqual(os.path.dirname(runner_file), site)  # really installed
            self.assertEqual(ours_file, os.path.join(site, "secrets.py"))
            self.assertEqual(secrets_file, stdlib_secrets()[0])
            self.assertEqual(checks, [8, True, False, True, True])


@unittest.skipUnless(os.environ.get("STIGMER_UNITTEST_PROBE"), "run by ShadowingTest.test_from_python_m_unittest")
class UnittestEntryProbe(unittest.TestCase):
    def test_secrets_and_anthropic_under_python_m_unittest(self):
        import secrets
        import anthropic
        import pydantic
        import runner
        self.assertEqual(secrets.__file__, SECRETS_PY)
        self.assertEqual(len(secrets.token_hex(4)), 8)
        self.assertTrue(pydantic.SecretStr("k") == pydantic.SecretStr("k"))
        self.assertTrue(callable(anthropic.Anthropic))
        self.assertTrue(hasattr(runner.stigmer_secrets, "Redactor"))


if __name__ == "__main__":
    unittest.main()
