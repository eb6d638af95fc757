"""Tests for runner.Config (the one reader of the environment) and the CLI's quick start.

    python -m unittest test_config -v
"""
import os
import subprocess
import sys
import tempfile
import unittest

import models
import processes
import runner
from testsupport import HERE
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)


class ConfigTest(unittest.TestCase):
    def test_config(self):
        cfg = runner.Config.load({"STIGMER_HOME": "/tmp/h"})
        self.assertEqual((cfg.mode, cfg.env, cfg.endpoint), ("local", "development", "localhost:50051"))
        with self.assertRaises(runner.CliError):
            runner.Config.load({"MODE": "remote"})
        self.assertTrue(models.default_model().startswith("claude-"))

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

    def test_the_sandbox_follows_the_mode_unless_chosen(self):
        self.assertEqual(runner.Config.load({}).sandbox, "filesystem")
        cloud = {"MODE": "cloud", "REDIS_URL": "redis://127.0.0.1:9/0"}
        self.assertEqual(runner.Config.load(dict(cloud, DAYTONA_API_KEY="dtn_x.not.real")).sandbox, "daytona")
        self.assertEqual(runner.Config.load(dict(cloud, STIGMER_SANDBOX="filesystem")).sandbox, "filesystem")
        cfg = runner.Config.load({"STIGMER_SANDBOX": " Daytona ", "DAYTONA_API_KEY": "dtn_x.not.real.123",
                                  "DAYTONA_API_URL": "http://127.0.0.1:9/api", "DAYTONA_TARGET": "eu",
                                  "DAYTONA_SNAPSHOT": ""})
        self.assertEqual(cfg.sandbox, "daytona")
        self.assertEqual(cfg.daytona, ("dtn_x.not.real.123", "http://127.0.0.1:9/api", "eu", None))
        self.assertNotIn("dtn_x.not.real.123", repr(cfg.daytona))
        cfg.require_sandbox()  # a key and the SDK: fine
        with self.assertRaises(runner.CliError) as caught:
            runner.Config.load({"STIGMER_SANDBOX": "docker"})
        self.assertEqual(caught.exception.code, 2)
        self.assertIn("filesystem", str(caught.exception))

    def test_sandbox_mode_and_hidden_paths(self):
        import sandbox
        cfg = runner.Config.load({"STIGMER_HOME": "/h/st", "HOME": "/home/me"})
        self.assertEqual(cfg.sandbox_mode, "")  # unset: a run gets workspace-write (or its parent's)
        self.assertEqual(cfg.sandbox_hide, (*[f"/home/me/{name}" for name in sandbox.HIDDEN_IN_HOME], "/h/st",
                                            "/h/st/daemon.token"))
        self.assertIn("/home/me/.ssh", cfg.sandbox_hide)
        cfg = runner.Config.load({"STIGMER_HOME": "/h/st", "HOME": "/home/me", "STIGMER_SANDBOX_MODE": " Read-Only ",
                                  "STIGMER_SANDBOX_HIDE": "~/.config/gh: /srv/keys/ ::~"})
        self.assertEqual(cfg.sandbox_mode, "read-only")
        self.assertEqual(cfg.sandbox_hide[-3:], ("/home/me/.config/gh", "/srv/keys", "/home/me"))
        for environ, words in (({"STIGMER_SANDBOX_MODE": "danger-full-access"}, "is not a sandbox mode"),
                               ({"STIGMER_SANDBOX_HIDE": "/ok:relative/keys"}, "'relative/keys' is not an absolute")):
            with self.assertRaises(runner.CliError) as caught:
                runner.Config.load(environ)
            self.assertEqual(caught.exception.code, 2)
            self.assertIn(words, str(caught.exception))
            self.assertEqual(len(str(caught.exception).splitlines()), 1)
        run = next(a for a in runner.parser()._subparsers._group_actions[0].choices["run"]._actions
                   if a.dest == "sandbox_mode")
        self.assertEqual(set(run.choices), set(sandbox.SANDBOX_MODES))  # --sandbox-mode takes the sandbox's names

    def test_the_daemon_gets_no_service_key(self):
        self.assertEqual(processes.without_keys({"DAYTONA_API_KEY": "dtn_x", "ANTHROPIC_API_KEY": "k", "DAYTONA_TARGET": "eu",
                                                 "REDIS_URL": "redis://:pw@h/0", "GITHUB_TOKEN": "ghp_x"}),
                         {"DAYTONA_TARGET": "eu"})

    def test_daytona_needs_its_key(self):
        runner.Config.load({}).require_sandbox()  # the host needs nothing
        for environ, why in (({"STIGMER_SANDBOX": "daytona"}, "STIGMER_SANDBOX=daytona runs commands"),
                             ({"MODE": "cloud", "REDIS_URL": "redis://127.0.0.1:9/0"}, "MODE=cloud runs commands")):
            with self.assertRaises(runner.CliError) as caught:
                runner.Config.load(environ).require_sandbox()
            self.assertEqual(caught.exception.code, 2)
            self.assertIn(why, str(caught.exception))
            self.assertIn("needs DAYTONA_API_KEY", str(caught.exception))


class CloudConfigTest(unittest.TestCase):
    CLOUD = {"MODE": "cloud", "REDIS_URL": "redis://:pw@redis.internal:6380/2", "STIGMER_SANDBOX": "filesystem"}

    def error(self, environ):
        with self.assertRaises(runner.CliError) as caught:
            runner.Config.load(environ)
        self.assertEqual(caught.exception.code, 2)
        self.assertEqual(len(str(caught.exception).splitlines()), 1)
        return str(caught.exception)

    def test_one_error_lists_every_missing_setting(self):
        message = self.error({"MODE": "cloud", "STIGMER_SANDBOX": "nowhere"})
        self.assertIn("STIGMER_SANDBOX", message)
        message = self.error({"MODE": "cloud"})
        self.assertIn("REDIS_URL", message)
        # Reading needs REDIS_URL only: status, list, logs and cancel run nothing, so they need no Daytona key ...
        cfg = runner.Config.load({"MODE": "cloud", "REDIS_URL": "redis://h:1/0"})
        self.assertEqual(cfg.sandbox, "daytona")
        # ... while a command that runs the agent's commands needs it, and says the way around it
        with self.assertRaises(runner.CliError) as caught:
            cfg.require_sandbox()
        self.assertEqual(caught.exception.code, 2)
        self.assertIn("DAYTONA_API_KEY", str(caught.exception))
        self.assertIn("STIGMER_SANDBOX=filesystem", str(caught.exception))

    def test_cloud_settings(self):
        cfg = runner.Config.load(self.CLOUD)
        self.assertEqual((cfg.mode, cfg.sandbox, cfg.redis_url, cfg.redis_prefix),
                         ("cloud", "filesystem", self.CLOUD["REDIS_URL"], "stigmer:"))
        self.assertEqual(cfg.redis_settings, {"lease_ttl": 15.0, "claim_idle": 10.0, "retention": 604800.0})
        cfg = runner.Config.load(dict(self.CLOUD, STIGMER_REDIS_PREFIX="team-a:", STIGMER_LEASE_TTL="2",
                                      STIGMER_CLAIM_IDLE="0.5", STIGMER_RETENTION="3600",
                                      REDIS_URL="rediss://redis.example:6379/0"))
        self.assertEqual((cfg.redis_prefix, cfg.redis_url), ("team-a:", "rediss://redis.example:6379/0"))
        self.assertEqual(cfg.redis_settings, {"lease_ttl": 2.0, "claim_idle": 0.5, "retention": 3600.0})

    def test_bad_cloud_values(self):
        self.assertIn("redis://", self.error(dict(self.CLOUD, REDIS_URL="http://redis:6379")))
        self.assertIn("STIGMER_SANDBOX='docker'", self.error(dict(self.CLOUD, STIGMER_SANDBOX="docker")))
        self.assertIn("STIGMER_LEASE_TTL", self.error(dict(self.CLOUD, STIGMER_LEASE_TTL="soon")))
        self.assertIn("STIGMER_LEASE_TTL", self.error(dict(self.CLOUD, STIGMER_LEASE_TTL="0.1")))

    def test_stigmer_mode_wins_over_mode(self):
        self.assertEqual(runner.Config.load(dict(self.CLOUD, MODE="local", STIGMER_MODE="cloud")).mode, "cloud")
        self.assertEqual(runner.Config.load(dict(self.CLOUD, STIGMER_MODE="local")).mode, "local")
        self.assertIn("STIGMER_MODE='moon'", self.error({"STIGMER_MODE": "moon"}))

    def test_local_mode_reads_none_of_it(self):
        cfg = runner.Config.load({"REDIS_URL": "nonsense", "STIGMER_LEASE_TTL": "x",
                                  "STIGMER_REDIS_PREFIX": "p:"})
        self.assertEqual((cfg.mode, cfg.redis_url, cfg.redis_prefix, cfg.redis_settings), ("local", "", "", {}))

    def test_local_mode_never_imports_redis_and_cloud_mode_names_the_extra(self):
        code = ("import sys, os, runner; os.environ.pop('MODE', None); os.environ.pop('STIGMER_MODE', None)\n"
                "os.environ['STIGMER_HOME'] = sys.argv[1]; runner.run_cli(['list'])\n"
                "print(sorted(m for m in ('redis', 'redis_backend') if m in sys.modules))\n"
                "sys.modules['redis'] = None\n"
                "os.environ.update(MODE='cloud', REDIS_URL='redis://127.0.0.1:1/0', STIGMER_SANDBOX='filesystem')\n"
                "print(runner.run_cli(['list']))\n")
        with tempfile.TemporaryDirectory() as home:
            done = subprocess.run([sys.executable, "-c", code, home], cwd=HERE, capture_output=True, text=True,
                                  timeout=60)
        self.assertEqual(done.stdout.splitlines(), ["[]", "2"], done.stderr)
        self.assertIn("pip install -e '.[cloud]'", done.stderr)


class HintsTest(unittest.TestCase):
    """Hints name the command as the user typed it; a python without the packages gets one line, not a traceback."""

    def status_without_daemon(self, argv):
        with tempfile.TemporaryDirectory() as home:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("STIGMER_", "MODE"))}
            env.update(STIGMER_HOME=home, STIGMER_BACKEND_ENDPOINT="127.0.0.1:9")
            return subprocess.run([*argv, "status"], cwd=HERE, env=env, capture_output=True, text=True, timeout=60)

    def test_hints_say_python_runner_py_when_so_typed(self):
        done = self.status_without_daemon([sys.executable, os.path.join(HERE, "runner.py")])
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("`python runner.py start`", done.stderr)

    @unittest.skipUnless(os.path.exists(os.path.join(os.path.dirname(sys.executable), "stigmer")),
                         "the stigmer console script is not installed beside this python (pip install -e .)")
    def test_hints_say_stigmer_when_so_typed(self):
        done = self.status_without_daemon([os.path.join(os.path.dirname(sys.executable), "stigmer")])
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("`stigmer start`", done.stderr)
        self.assertNotIn("runner.py", done.stderr)

    def test_a_python_without_grpc_gets_one_line_naming_the_venv(self):
        code = ("import sys; sys.modules['grpc'] = None; import runner; "
                "sys.exit(runner.run_cli(['cancel', 'ex-1']))")
        with tempfile.TemporaryDirectory() as home:
            done = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=60,
                                  env=dict(os.environ, STIGMER_HOME=home, MODE="local", STIGMER_MODE="local"))
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertEqual(done.stderr.count("\n"), 1, done.stderr)
        self.assertIn("the grpc package is not installed", done.stderr)
        self.assertIn(".venv/bin/activate", done.stderr)


class StartTest(unittest.TestCase):
    def test_help_loads_neither_grpc_nor_the_daemon(self):
        code = ("import sys, runner; runner.run_cli(['--help']); "
                "print(sorted(m for m in ('grpc', 'daemon', 'daemon_client', 'stigmer_pb2', 'terminal') "
                "if m in sys.modules))")
        done = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("stigmer", done.stdout)
        self.assertEqual(done.stdout.strip().splitlines()[-1], "[]")

    def test_the_worker_and_cloud_mode_import_neither_grpc_nor_the_daemon_client(self):
        code = ("import sys, worker, redis_backend, terminal; "
                "print(sorted(m for m in ('grpc', 'daemon_client', 'daemon', 'stigmer_pb2_grpc') if m in sys.modules))")
        done = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip().splitlines()[-1], "[]")

    def test_daemon_py_takes_its_settings_from_config(self):
        env = dict(os.environ, STIGMER_RUNNER_GRACE="later")
        done = subprocess.run([sys.executable, os.path.join(HERE, "daemon.py"), "--endpoint", "127.0.0.1:0"],
                              env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertEqual(done.stderr, "stigmer: STIGMER_RUNNER_GRACE='later' is not a number of seconds: "
                                      "use, for example, STIGMER_RUNNER_GRACE=15\n")


class PackagingTest(unittest.TestCase):
    def test_every_module_is_installed(self):
        """`pip install` ships every module the CLI may import: pyproject's py-modules lists them all."""
        import glob
        import tomllib
        with open(os.path.join(HERE, "pyproject.toml"), "rb") as f:
            listed = tomllib.load(f)["tool"]["setuptools"]["py-modules"]
        shipped = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py"))}
        shipped -= {"bench"} | {m for m in shipped if m.startswith(("test_", "testsupport"))}
        self.assertEqual(sorted(listed), sorted(shipped))


if __name__ == "__main__":
    unittest.main()
