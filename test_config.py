"""Tests for runner.Config (the one reader of the environment) and the CLI's quick start.

    python -m unittest test_config -v
"""
import os
import subprocess
import sys
import unittest

import runner
from testsupport import HERE


class ConfigTest(unittest.TestCase):
    def test_config(self):
        cfg = runner.Config.load({"STIGMER_HOME": "/tmp/h"})
        self.assertEqual((cfg.mode, cfg.env, cfg.endpoint), ("local", "development", "localhost:50051"))
        with self.assertRaises(runner.CliError):
            runner.Config.load({"MODE": "remote"})
        self.assertTrue(runner.default_model().startswith("claude-"))

    def test_defaults_and_overrides(self):
        cfg = runner.Config.load({})
        self.assertEqual(cfg.home, os.path.expanduser("~/.stigmer"))
        self.assertEqual((cfg.runner_grace, cfg.model, cfg.sandbox_root), (15.0, "", os.getcwd()))
        cfg = runner.Config.load({"STIGMER_HOME": "/tmp/h/../st", "STIGMER_BACKEND_ENDPOINT": "127.0.0.1:7",
                                  "MODE": " Local ", "ENV": "PRODUCTION", "STIGMER_RUNNER_GRACE": "2.5",
                                  "SANDBOX_ROOT_DIR": "/tmp", "STIGMER_MODEL": "claude-x"})
        self.assertEqual(cfg[:7], ("local", "production", "/tmp/st", "127.0.0.1:7", "/tmp", "claude-x", 2.5))

    def test_a_bad_runner_grace_is_a_usage_error(self):
        for value in ("soon", "-1", "inf", "nan"):
            with self.assertRaises(runner.CliError) as caught:
                runner.Config.load({"STIGMER_RUNNER_GRACE": value})
            self.assertEqual(caught.exception.code, 2)
            self.assertIn("STIGMER_RUNNER_GRACE", str(caught.exception))
        self.assertEqual(runner.Config.load({"STIGMER_RUNNER_GRACE": "0"}).runner_grace, 0.0)


class StartTest(unittest.TestCase):
    def test_help_loads_neither_grpc_nor_the_daemon(self):
        code = ("import sys, runner; runner.run_cli(['--help']); "
                "print(sorted(m for m in ('grpc', 'daemon', 'daemon_client', 'stigmer_pb2', 'terminal') "
                "if m in sys.modules))")
        done = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("stigmer", done.stdout)
        self.assertEqual(done.stdout.strip().splitlines()[-1], "[]")

    def test_daemon_py_takes_its_settings_from_config(self):
        env = dict(os.environ, STIGMER_RUNNER_GRACE="later")
        done = subprocess.run([sys.executable, os.path.join(HERE, "daemon.py"), "--endpoint", "127.0.0.1:0"],
                              env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertEqual(done.stderr, "stigmer: STIGMER_RUNNER_GRACE='later' is not a number of seconds: "
                                      "use, for example, STIGMER_RUNNER_GRACE=15\n")


if __name__ == "__main__":
    unittest.main()
