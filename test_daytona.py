"""Tests for daytona_sandbox.py's lifecycle: the real daytona SDK against the loopback stand-in.

    python -m unittest test_daytona -v

The sandbox's tools themselves are tested in test_sandbox.py (the Daytona* classes), from the
same test bodies as the host sandbox.
"""
import os
import shutil
import subprocess
import tempfile
import unittest
from unittest import mock
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

try:
    import daytona
except ImportError:
    daytona = None

import daytona_sandbox
from daytona_sandbox import DaytonaUnavailable, create_for_execution, make_client, sweep
from sandbox import SandboxError
from testsupport_daytona import FakeDaytona

KEY = "dtn_test"


def git(*args, cwd=None):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                                   GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
                                   GIT_CONFIG_GLOBAL="/dev/null")).stdout


@unittest.skipIf(daytona is None, "the daytona SDK is not installed: pip install -e '.[cloud]'")
class LifecycleTest(unittest.TestCase):
    def setUp(self):
        self.fake = FakeDaytona(api_key=KEY)
        self.addCleanup(self.fake.close)
        self.client = make_client(KEY, self.fake.api_url, "local")
        patcher = mock.patch.object(daytona_sandbox, "BACKOFF", 0.01)
        patcher.start()
        self.addCleanup(patcher.stop)

    def create(self, execution_id="exec-1", **kwargs):
        return create_for_execution(execution_id, "runner-a", api_key=KEY, api_url=self.fake.api_url,
                                    target="local", client=self.client, **kwargs)

    def posts(self, path="/api/sandbox"):
        return [c for c in self.fake.calls if c == ("POST", path)]

    def test_created_labelled_and_deleted_once(self):
        box = self.create(env={"GREETING": "hi"}, timeout=30)
        self.assertEqual(len(self.fake.created), 1)
        record = self.fake.sandboxes[box.id]["record"]
        self.assertEqual({k: v for k, v in record["labels"].items() if k.startswith("stigmer")},
                         {"stigmer": "1", "stigmer.execution": "exec-1", "stigmer.runner": "runner-a"})
        self.assertEqual((record["autoStopInterval"], record["autoDeleteInterval"]),
                         (daytona_sandbox.AUTO_STOP_MINUTES, 0))  # ephemeral: deleted once stopped
        self.assertGreater(box.created_in, 0)
        self.assertTrue(box.root.endswith("/workspace"))
        self.assertEqual(box.ls(), [])
        self.assertEqual(box.execute("pwd; echo $GREETING").stdout, f"{box.root}\nhi\n")
        self.assertEqual(box.timeout, 30)
        self.assertIsNone(box.patch())  # not a git checkout
        box.delete()
        box.delete()
        self.assertEqual(self.fake.deleted, [box.id])
        self.assertEqual(self.fake.sandboxes, {})

    def test_429_on_create_backs_off_and_succeeds(self):
        self.fake.fail("POST", "^/api/sandbox$", 429, times=2)
        box = self.create()
        self.assertEqual(len(self.posts()), 3)
        self.assertEqual(self.fake.created, [box.id])

    def test_rate_limit_and_5xx_give_up_with_a_clear_reason(self):
        for status, code in ((429, "rate_limit"), (500, "error"), (503, "error")):
            with self.subTest(status=status):
                self.fake.calls.clear()
                self.fake.fail("POST", "^/api/sandbox$", status, times=daytona_sandbox.CREATE_ATTEMPTS)
                with self.assertRaises(DaytonaUnavailable) as cm:
                    self.create()
                self.assertEqual(cm.exception.code, code)
                self.assertIn("create a sandbox", str(cm.exception))
                self.assertEqual(len(self.posts()), daytona_sandbox.CREATE_ATTEMPTS)
        self.assertEqual(self.fake.created, [])

    def test_401_is_a_clear_fatal_error_without_retries(self):
        client = make_client("dtn_wrong", self.fake.api_url, "local")
        with self.assertRaises(DaytonaUnavailable) as cm:
            create_for_execution("exec-1", "runner-a", api_key="dtn_wrong", api_url=self.fake.api_url,
                                 target="local", client=client)
        self.assertEqual(cm.exception.code, "auth")
        self.assertIn("DAYTONA_API_KEY", str(cm.exception))
        self.assertEqual(len(self.posts()), 1)
        with self.assertRaises(DaytonaUnavailable) as cm:
            make_client("", self.fake.api_url, "local")
        self.assertEqual(cm.exception.code, "auth")

    def test_toolbox_errors(self):
        box = self.create()
        box.write("a.txt", "text\n")
        self.fake.fail("GET", "/files/info$", 429, times=2)  # retried, then fine
        self.assertEqual(box.read("a.txt"), "text\n")
        self.fake.fail("GET", "/files/info$", 404)  # the model can act on this
        with self.assertRaises(SandboxError) as cm:
            box.read("a.txt")
        self.assertIn("does not exist", str(cm.exception))
        self.fake.fail("GET", "/files/info$", 500)
        with self.assertRaises(DaytonaUnavailable) as cm:
            box.read("a.txt")
        self.assertEqual(cm.exception.code, "error")
        self.fake.fail("POST", "/process/session$", 408)
        with self.assertRaises(DaytonaUnavailable) as cm:
            box.execute("true")
        self.assertEqual(cm.exception.code, "timeout")
        self.fake.fail("GET", "/command/[^/]+$", 401)
        with self.assertRaises(DaytonaUnavailable) as cm:
            box.execute("sleep 30")  # a hanging command whose polling is refused: stopped anyway
        self.assertEqual(cm.exception.code, "auth")
        self.assertEqual(self.fake.sandboxes[box.id]["sessions"], {})
        self.assertEqual(box.execute("echo ok").stdout, "ok\n")

    def test_sweep_deletes_sandboxes_of_terminal_executions_only(self):
        done = self.fake.add_sandbox({"stigmer": "1", "stigmer.execution": "done-1",
                                      "stigmer.runner": "dead-runner"})
        live = self.fake.add_sandbox({"stigmer": "1", "stigmer.execution": "live-1",
                                      "stigmer.runner": "runner-a"})
        other = self.fake.add_sandbox({"team": "someone else's"})
        asked = []

        def is_terminal(execution_id):
            asked.append(execution_id)
            return execution_id == "done-1"
        self.assertEqual(sweep(self.client, is_terminal), [done])
        self.assertEqual(sorted(asked), ["done-1", "live-1"])
        self.assertEqual(sorted(self.fake.sandboxes), sorted([live, other]))
        self.assertEqual(sweep(self.client, lambda _: False), [])

    def test_clone_and_patch_applies_to_a_fresh_clone(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        src, bare = os.path.join(tmp, "src"), os.path.join(tmp, "repo.git")
        os.makedirs(src)
        git("init", "-q", "-b", "main", cwd=src)
        for name, text in {"keep.txt": "one\ntwo\n", "gone.txt": "bye\n", "crlf.txt": "a\r\nb\r\n",
                           ".gitignore": "*.log\n"}.items():
            with open(os.path.join(src, name), "w", newline="") as f:
                f.write(text)
        git("add", "-A", cwd=src)
        git("commit", "-qm", "first", cwd=src)
        git("checkout", "-qb", "feature", cwd=src)
        with open(os.path.join(src, "keep.txt"), "a") as f:
            f.write("three on feature\n")
        git("commit", "-qam", "feature", cwd=src)
        git("clone", "-q", "--bare", src, bare)

        box = self.create(repo="file://" + bare, ref="feature")
        self.assertEqual(box.read("keep.txt"), "one\ntwo\nthree on feature\n")
        box.edit("keep.txt", "two", "TWO")
        box.edit("crlf.txt", "a\nb", "x\ny")
        box.write("new/dir/added.py", "print('hi')\n")
        box.execute("rm gone.txt; printf 'bin\\0ary' > blob.bin; echo noise > debug.log")
        patch = box.patch()
        self.assertFalse(patch.truncated)
        self.assertEqual(patch.binary_files, ["blob.bin"])
        self.assertIn("# stigmer: binary files changed, not included: blob.bin", patch.text)
        self.assertNotIn("debug.log", patch.text)
        self.assertEqual(box.execute("git status --porcelain").stdout,  # the index was not touched
                         " M crlf.txt\n D gone.txt\n M keep.txt\n?? blob.bin\n?? new/\n")

        fresh = os.path.join(tmp, "fresh")
        git("clone", "-q", "-b", "feature", bare, fresh)
        with open(os.path.join(tmp, "change.patch"), "w") as f:
            f.write(patch.text)
        git("apply", "--check", os.path.join(tmp, "change.patch"), cwd=fresh)
        git("apply", os.path.join(tmp, "change.patch"), cwd=fresh)
        for name in ("keep.txt", "crlf.txt", "new/dir/added.py"):
            with open(os.path.join(fresh, name), "rb") as f:
                self.assertEqual(f.read(), box.read(name).encode(), name)
        self.assertFalse(os.path.exists(os.path.join(fresh, "gone.txt")))

        small = box.patch(max_bytes=300)
        self.assertTrue(small.truncated)
        self.assertIn("# stigmer: patch capped at 300 bytes; left out:", small.text)
        self.assertLessEqual(len(small.text.split("diff --git", 1)[-1]), 300)
        self.assertEqual(small.size, patch.size)

    def test_failed_clone_is_fatal_and_leaves_no_sandbox(self):
        with self.assertRaises(DaytonaUnavailable) as cm:
            self.create(repo="file:///nonexistent/repo.git")
        self.assertEqual(cm.exception.code, "clone")
        self.assertIn("git clone of file:///nonexistent/repo.git failed", str(cm.exception))
        self.assertEqual(len(self.fake.created), 1)
        self.assertEqual(self.fake.deleted, self.fake.created)


if __name__ == "__main__":
    unittest.main()
