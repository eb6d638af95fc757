"""Tests for sandbox.py: real subprocesses in temporary directories.

    python -m unittest test_sandbox -v
"""
import os
import shutil
import sys
import tempfile
import textwrap
import threading
import time
import unittest
from unittest import mock

import sandbox
from sandbox import ExecutionResult, FilesystemSandbox, SandboxError

HANG = 15  # seconds; a call that takes longer than this has hung (the commands sleep 30-60 s)


def alive(pid):
    """True if pid still runs a moment later (a zombie counts as dead: PID 1 may never
    reap orphans, and SIGKILL takes a moment to land)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return False
        if state in ("Z", "X"):
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.01)


class SandboxCase(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name
        self.root = os.path.join(self.tmp, "work")
        self.box = FilesystemSandbox(self.root)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def put(self, rel, data):
        full = self.path(rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
        return full

    def pid_from(self, name):
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline:
            try:
                with open(self.path(name)) as f:
                    text = f.read().strip()
                if text:
                    return int(text)
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        self.fail(f"{name} was never written")


class ExecuteTest(SandboxCase):
    def test_echo_exit_codes_and_output(self):
        r = self.box.execute("echo hello; echo oops >&2; exit 3")
        self.assertIsInstance(r, ExecutionResult)
        self.assertEqual((r.exit_code, r.stdout, r.stderr), (3, "hello\n", "oops\n"))
        self.assertEqual(r.output, "hello\noops\n")
        self.assertFalse(r.timed_out or r.truncated or r.cancelled)
        self.assertEqual(self.box.execute("true").exit_code, 0)
        self.assertEqual(self.box.execute("printf x; echo y >&2").output, "x\ny\n")

    def test_root_is_created_resolved_and_the_cwd(self):
        link = os.path.join(self.tmp, "link")
        os.symlink(self.root, link)
        box = FilesystemSandbox(link)
        self.assertEqual(box.root, os.path.realpath(self.root))
        self.assertEqual(box.execute("pwd").stdout.strip(), box.root)
        box2 = FilesystemSandbox(os.path.join(self.tmp, "new", "dir"))
        self.assertTrue(os.path.isdir(box2.root))

    def test_environment_layers_and_removal(self):
        with mock.patch.dict(os.environ, {"HOST_ONLY": "host", "HIDE_ME": "secret", "PAGER": "less"}):
            box = FilesystemSandbox(self.root, env={"A": "box", "B": "box", "HIDE_ME": None})
            r = box.execute('echo "$A $B $HOST_ONLY ${HIDE_ME-unset} $PAGER $GIT_PAGER '
                            '$GIT_TERMINAL_PROMPT"', env={"B": "call"})
            self.assertEqual(r.stdout, "box call host unset cat cat 0\n")
            r = box.execute('echo "${A-unset} $PAGER"', env={"A": None, "PAGER": "more"})
            self.assertEqual(r.stdout, "unset more\n")

    def test_invalid_arguments(self):
        for bad in ("", "   ", None, "echo \0"):
            with self.assertRaises(SandboxError):
                self.box.execute(bad)
        for bad in (0, -1, "5", True, float("nan")):
            with self.assertRaises(SandboxError):
                self.box.execute("true", timeout=bad)
        with self.assertRaises(SandboxError):
            self.box.execute("true", env={"A": 1})
        with self.assertRaises(SandboxError):
            FilesystemSandbox(self.root, timeout=0)
        with self.assertRaises(SandboxError):
            FilesystemSandbox(self.root, max_output_bytes=0)

    def test_timeout_keeps_partial_output(self):
        t = time.monotonic()
        r = self.box.execute("echo partial; echo err >&2; sleep 30", timeout=1)
        self.assertLess(time.monotonic() - t, HANG)
        self.assertTrue(r.timed_out)
        self.assertEqual(r.exit_code, 124)
        self.assertEqual(r.stdout, "partial\n")
        self.assertIn("err\n", r.stderr)
        self.assertIn("timed out after 1 s", r.stderr)

    def test_default_timeout_from_constructor(self):
        box = FilesystemSandbox(self.root, timeout=0.5)
        r = box.execute("sleep 30")
        self.assertTrue(r.timed_out)
        self.assertIn("timed out after 0.5 s", r.stderr)

    def test_background_child_holding_pipes_does_not_hang(self):
        t = time.monotonic()
        r = self.box.execute("sleep 60 & echo started $!")
        self.assertLess(time.monotonic() - t, HANG)
        self.assertEqual(r.exit_code, 0)
        self.assertFalse(r.timed_out)
        self.assertTrue(r.stdout.startswith("started "))
        self.assertFalse(alive(int(r.stdout.split()[1])), "background sleep survived")

    def test_detached_background_child_is_killed_after_normal_exit(self):
        r = self.box.execute("sleep 60 >/dev/null 2>&1 & echo $!")
        self.assertEqual(r.exit_code, 0)
        self.assertFalse(alive(int(r.stdout)), "background sleep survived")

    def test_timeout_kills_whole_process_tree(self):
        script = textwrap.dedent("""
            import os, subprocess, time
            open("child.pid", "w").write(str(os.getpid()))
            g = subprocess.Popen(["sleep", "60"])
            open("grandchild.pid", "w").write(str(g.pid))
            time.sleep(60)
        """)
        self.put("tree.py", script)
        r = self.box.execute(f"{sys.executable} tree.py", timeout=1)
        self.assertTrue(r.timed_out)
        for name in ("child.pid", "grandchild.pid"):
            self.assertFalse(alive(self.pid_from(name)), f"{name} survived")

    def test_sigterm_trap_gets_sigkill(self):
        self.put("stubborn.py", "import os, signal, time\n"
                                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                "open('stubborn.pid', 'w').write(str(os.getpid()))\n"
                                "time.sleep(60)\n")
        t = time.monotonic()
        r = self.box.execute(f"exec {sys.executable} stubborn.py", timeout=1)
        self.assertLess(time.monotonic() - t, HANG)
        self.assertEqual((r.exit_code, r.timed_out), (124, True))
        self.assertFalse(alive(self.pid_from("stubborn.pid")))

    def test_stdin_is_closed(self):
        t = time.monotonic()
        r = self.box.execute("cat; echo done", timeout=30)
        self.assertLess(time.monotonic() - t, HANG)
        self.assertEqual((r.exit_code, r.stdout, r.timed_out), (0, "done\n", False))

    def test_huge_output_is_truncated_to_head_and_tail(self):
        box = FilesystemSandbox(self.root, max_output_bytes=100_000)
        r = box.execute("yes | head -c 50000000")
        self.assertTrue(r.truncated)
        self.assertTrue(r.stdout.startswith("y\ny\n") and r.stdout.endswith("y\ny\n"))
        self.assertIn(f"… {50_000_000 - 100_000} bytes omitted …", r.stdout)
        self.assertLess(len(r.stdout), 100_000 + 100)
        r = box.execute("seq 1 1000000; seq 1 300000 >&2")
        self.assertTrue(r.stdout.startswith("1\n2\n3\n") and r.stdout.endswith("\n999999\n1000000\n"))
        self.assertTrue(r.stderr.startswith("1\n2\n") and r.stderr.endswith("\n300000\n"))
        self.assertLess(len(r.stderr), 100_000 + 100)
        r = box.execute("seq 1 1000")
        self.assertFalse(r.truncated)
        self.assertNotIn("omitted", r.stdout)

    def test_invalid_utf8_is_replaced(self):
        r = self.box.execute(r"printf 'a\377\376b'")
        self.assertEqual(r.stdout, "a\ufffd\ufffdb")

    def test_signal_exit_codes(self):
        self.assertEqual(self.box.execute("kill -9 $$").exit_code, 137)
        self.assertEqual(self.box.execute("kill -15 $$").exit_code, 143)

    def test_cancel_event(self):
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        t = time.monotonic()
        r = self.box.execute("echo $! >/dev/null; sleep 60 & echo $!; wait", cancel=cancel)
        self.assertLess(time.monotonic() - t, HANG)
        self.assertEqual((r.exit_code, r.cancelled, r.timed_out), (130, True, False))
        self.assertIn("cancelled", r.stderr)
        self.assertFalse(alive(int(r.stdout)), "cancelled sleep survived")
        r = self.box.execute("echo never", cancel=cancel)  # already set: nothing runs
        self.assertEqual((r.exit_code, r.cancelled, r.stdout), (130, True, ""))

    def test_kill_all(self):
        results = []
        worker = threading.Thread(target=lambda: results.append(self.box.execute("sleep 60")))
        worker.start()
        deadline = time.monotonic() + HANG
        while not sandbox._LIVE and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertGreaterEqual(sandbox.kill_all(), 1)
        worker.join(HANG)
        self.assertFalse(worker.is_alive(), "execute did not return after kill_all")
        self.assertEqual(results[0].exit_code, 137)
        self.assertEqual(sandbox._LIVE, set())


class PathRulesTest(SandboxCase):
    def setUp(self):
        super().setUp()
        self.outside = os.path.join(self.tmp, "outside")
        os.makedirs(self.outside)
        with open(os.path.join(self.outside, "secret.txt"), "w") as f:
            f.write("needle outside\n")
        os.symlink(self.outside, self.path("out_dir"))
        os.symlink(os.path.join(self.outside, "secret.txt"), self.path("out_file"))
        os.symlink(os.path.join(self.outside, "new.txt"), self.path("out_dangling"))
        os.symlink("loop_b", self.path("loop_a"))
        os.symlink("loop_a", self.path("loop_b"))

    def assertRefused(self, call, words="outside the workspace"):
        with self.assertRaises(SandboxError) as cm:
            call()
        self.assertIn(words, str(cm.exception))

    def test_every_tool_refuses_paths_outside(self):
        box = self.box
        for path in ("../x", "../outside/secret.txt", "/etc/passwd", "out_file", "out_dir/secret.txt",
                     "out_dangling", "sub/../../x"):
            with self.subTest(path=path):
                self.assertRefused(lambda: box.read(path))
                self.assertRefused(lambda: box.write(path, "x"))
                self.assertRefused(lambda: box.edit(path, "needle", "pin"))
                self.assertRefused(lambda: box.ls(path))
                self.assertRefused(lambda: box.glob("*", path))
                self.assertRefused(lambda: box.grep("needle", path))
        for path in ("..", "/etc", "out_dir"):
            self.assertRefused(lambda: box.ls(path))
        self.assertFalse(os.path.exists(os.path.join(self.outside, "new.txt")))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "x")))
        with open(os.path.join(self.outside, "secret.txt")) as f:
            self.assertEqual(f.read(), "needle outside\n")
        self.assertRefused(lambda: box.glob("../*"), "relative")
        self.assertRefused(lambda: box.glob("/etc/*"), "relative")

    def test_symlink_loop_is_refused(self):
        for call in (lambda: self.box.read("loop_a"), lambda: self.box.write("loop_a", "x"),
                     lambda: self.box.edit("loop_a", "a", "b"), lambda: self.box.ls("loop_a"),
                     lambda: self.box.glob("*", "loop_a"), lambda: self.box.grep("x", "loop_a")):
            self.assertRefused(call, "symlink loop")

    def test_search_never_leaves_the_root(self):
        self.put("inside.txt", "needle inside\n")
        os.symlink("inside.txt", self.path("in_link"))
        # out_* resolve outside and are left out; the loops are names inside the root
        self.assertEqual(self.box.glob("**/*"), ["in_link", "inside.txt", "loop_a", "loop_b"])
        for use_rg in (False, True):
            with mock.patch.object(sandbox, "USE_RG", use_rg):
                self.assertEqual(self.box.grep("needle"), [("inside.txt", 1, "needle inside")])

    def test_dotted_names_and_absolute_paths_inside_are_fine(self):
        for name in ("foo..bar.txt", "[...slug]/page.tsx", "a/../dots...", self.path("abs.txt")):
            with self.subTest(name=name):
                self.box.write(name, "one two\n")
                self.assertEqual(self.box.read(name), "one two\n")
                self.assertEqual(self.box.edit(name, "two", "three"), 1)
                self.assertEqual(self.box.read(name), "one three\n")
        self.assertEqual(self.box.ls(), ["[...slug]/", "abs.txt", "dots...", "foo..bar.txt", "loop_a",
                                         "loop_b", "out_dangling", "out_dir/", "out_file"])
        self.assertEqual(self.box.ls("[...slug]"), ["page.tsx"])
        self.assertEqual(self.box.ls(self.root), self.box.ls("."))
        self.assertEqual(self.box.glob("*..*"), ["[...slug]", "dots...", "foo..bar.txt"])
        self.assertEqual(self.box.grep("three", "[...slug]"), [("[...slug]/page.tsx", 1, "one three")])
        self.assertEqual(self.box.grep("three", self.path("foo..bar.txt")),
                         [("foo..bar.txt", 1, "one three")])


class FileToolsTest(SandboxCase):
    def test_ls(self):
        self.put("b.txt", "")
        self.put("a/x.txt", "")
        self.put(".hidden", "")
        self.assertEqual(self.box.ls(), [".hidden", "a/", "b.txt"])
        self.assertEqual(self.box.ls("a"), ["x.txt"])
        self.assertRaises(SandboxError, self.box.ls, "b.txt")
        self.assertRaises(SandboxError, self.box.ls, "missing")

    def test_read_offset_limit_and_line_endings(self):
        self.put("f.txt", b"zero\r\none\ntwo\nthree")
        self.assertEqual(self.box.read("f.txt"), "zero\r\none\ntwo\nthree")
        self.assertEqual(self.box.read("f.txt", offset=1, limit=2), "one\ntwo\n")
        self.assertEqual(self.box.read("f.txt", offset=3), "three")
        self.assertEqual(self.box.read("f.txt", limit=1), "zero\r\n")
        self.assertEqual(self.box.read("f.txt", offset=10), "")
        self.put("form.txt", "a\x0cb\u2028c\n")  # only \n splits lines
        self.assertEqual(self.box.read("form.txt", limit=1), "a\x0cb\u2028c\n")
        for bad in ({"offset": -1}, {"limit": -1}, {"offset": "1"}):
            self.assertRaises(SandboxError, self.box.read, "f.txt", **bad)

    def test_read_refusals(self):
        os.makedirs(self.path("d"))
        self.assertRaises(SandboxError, self.box.read, "missing.txt")
        self.assertRaises(SandboxError, self.box.read, "d")
        self.put("bin.dat", b"\x7fELF\0\0" + b"x" * 1994)
        with self.assertRaises(SandboxError) as cm:
            self.box.read("bin.dat")
        self.assertIn("binary", str(cm.exception))
        self.assertIn("2.0 KiB", str(cm.exception))
        with open(self.path("big.txt"), "wb") as f:
            f.truncate(11 * 1024 * 1024)  # sparse, so cheap
        with self.assertRaises(SandboxError) as cm:
            self.box.read("big.txt")
        self.assertIn("11.0 MB", str(cm.exception))

    def test_read_non_utf8_is_replaced(self):
        self.put("latin1.txt", "café\n".encode("latin-1"))
        self.assertEqual(self.box.read("latin1.txt"), "caf\ufffd\n")

    def test_write_creates_parents_keeps_mode_and_leaves_no_temp(self):
        self.box.write("deep/er/new.txt", "héllo\n")
        with open(self.path("deep/er/new.txt"), "rb") as f:
            self.assertEqual(f.read(), "héllo\n".encode())
        script = self.put("run.sh", "#!/bin/sh\n")
        os.chmod(script, 0o750)
        self.box.write("run.sh", "#!/bin/sh\necho hi\n")
        self.assertEqual(os.stat(script).st_mode & 0o777, 0o750)
        self.assertEqual(self.box.execute("./run.sh").stdout, "hi\n")
        self.assertEqual(sorted(os.listdir(self.root)), ["deep", "run.sh"])
        self.assertEqual(os.listdir(self.path("deep/er")), ["new.txt"])
        self.assertRaises(SandboxError, self.box.write, "deep", "x")
        self.assertRaises(SandboxError, self.box.write, "f.txt", b"bytes")

    def test_write_failure_leaves_old_file_whole(self):
        self.put("keep.txt", "original\n")
        with mock.patch("sandbox.os.fsync", side_effect=OSError(28, "No space left on device")):
            with self.assertRaises(OSError):
                self.box.write("keep.txt", "new content\n")
        with open(self.path("keep.txt")) as f:
            self.assertEqual(f.read(), "original\n")
        self.assertEqual(os.listdir(self.root), ["keep.txt"])

    def test_edit(self):
        self.put("e.py", "x = 1\ny = 1\nz = 2\n")
        self.assertEqual(self.box.edit("e.py", "z = 2", "z = 3"), 1)
        with self.assertRaises(SandboxError) as cm:
            self.box.edit("e.py", "= 1", "= 0")
        self.assertIn("2 times", str(cm.exception))
        self.assertEqual(self.box.edit("e.py", "= 1", "= 0", replace_all=True), 2)
        self.assertEqual(self.box.read("e.py"), "x = 0\ny = 0\nz = 3\n")
        self.assertRaises(SandboxError, self.box.edit, "e.py", "x", "x")
        self.assertRaises(SandboxError, self.box.edit, "e.py", "", "x")
        self.assertRaises(SandboxError, self.box.edit, "missing.py", "a", "b")

    def test_edit_not_found_hints(self):
        self.put("h.py", "def f():\n    return  1")
        cases = {"nothing like it": "copy the exact text",
                 "def f():\n  return 1": "whitespace",
                 "    return  1\n": "trailing newline"}
        for old, hint in cases.items():
            with self.subTest(old=old):
                with self.assertRaises(SandboxError) as cm:
                    self.box.edit("h.py", old, "x")
                self.assertIn("not found", str(cm.exception))
                self.assertIn(hint, str(cm.exception))
        self.assertEqual(self.box.read("h.py"), "def f():\n    return  1")

    def test_edit_keeps_crlf_and_undecodable_bytes(self):
        self.put("w.txt", b"one\r\ntwo\r\nthree \xff\r\n")
        self.assertEqual(self.box.edit("w.txt", "one\ntwo\n", "1\n2\nextra\n"), 1)
        with open(self.path("w.txt"), "rb") as f:
            self.assertEqual(f.read(), b"1\r\n2\r\nextra\r\nthree \xff\r\n")
        self.put("lf.txt", b"a\nb\n")
        self.box.edit("lf.txt", "a\nb", "c\nd")
        with open(self.path("lf.txt"), "rb") as f:
            self.assertEqual(f.read(), b"c\nd\n")

    def test_glob(self):
        for rel in ("a.py", "pkg/b.py", "pkg/sub/c.py", "pkg/readme.md", ".hidden/d.py",
                    ".git/hooks/e.py"):
            self.put(rel, "")
        self.assertEqual(self.box.glob("*.py"), ["a.py"])
        self.assertEqual(self.box.glob("**/*.py"),
                         [".hidden/d.py", "a.py", "pkg/b.py", "pkg/sub/c.py"])
        self.assertEqual(self.box.glob("pkg/**/*.py"), ["pkg/b.py", "pkg/sub/c.py"])
        self.assertEqual(self.box.glob("*.py", "pkg"), ["pkg/b.py"])
        self.assertEqual(self.box.glob("?.[pm][yd]"), ["a.py"])
        self.assertEqual(self.box.glob("pkg/*"), ["pkg/b.py", "pkg/readme.md", "pkg/sub"])
        self.assertEqual(self.box.glob("*.nothing"), [])


class GrepTest(SandboxCase):
    def setUp(self):
        super().setUp()
        files = {
            "a.txt": "needle one\nno\nneedle two\n",
            "a/b.txt": "x needle\n",
            "a-b.py": "needle = 1\n",
            "sub/deep/c.py": "print('needle')\r\n",
            ".hidden.txt": "needle hidden\n",
            ".git/config": "needle in git\n",
            "ignored.log": "needle though gitignored\n",
            ".gitignore": "*.log\n",
            "latin.txt": "caf\xe9 needle\n".encode("latin-1"),
            "bin.dat": b"needle\0\x01\x02",
            "late_nul.txt": b"needle\n" + b"x" * 100 + b"\0",
            "regex.txt": "a.c(x)*[y]+?\nabcxxy\nneedle.\n",
            "empty.txt": "",
        }
        for rel, data in files.items():
            self.put(rel, data)
        os.symlink("a.txt", self.path("link.txt"))
        self.expected = [
            (".hidden.txt", 1, "needle hidden"),
            ("a-b.py", 1, "needle = 1"),
            ("a.txt", 1, "needle one"),
            ("a.txt", 3, "needle two"),
            ("a/b.txt", 1, "x needle"),
            ("ignored.log", 1, "needle though gitignored"),
            ("latin.txt", 1, "caf\ufffd needle"),
            ("regex.txt", 3, "needle."),
            ("sub/deep/c.py", 1, "print('needle')"),
        ]

    def both(self, *args, **kwargs):
        """grep with the Python search, and with rg when it is installed; asserts they agree."""
        with mock.patch.object(sandbox, "USE_RG", False):
            python = self.box.grep(*args, **kwargs)
        if shutil.which("rg"):
            rg = self.box.grep(*args, **kwargs)
            self.assertEqual(rg, python, "rg and the Python search disagree")
        return python

    def test_python_search_results(self):
        self.assertEqual(self.both("needle"), self.expected)

    def test_rg_and_python_agree_via_path(self):
        real_rg = shutil.which("rg")
        if not real_rg:
            self.skipTest("ripgrep (rg) is not installed: only the Python search was tested")
        bin_dir = os.path.join(self.tmp, "bin")
        os.makedirs(bin_dir)
        log = os.path.join(self.tmp, "rg.log")
        with open(os.path.join(bin_dir, "rg"), "w") as f:
            f.write(f'#!/bin/sh\necho called >> "{log}"\nexec "{real_rg}" "$@"\n')
        os.chmod(os.path.join(bin_dir, "rg"), 0o755)
        with mock.patch.dict(os.environ, {"PATH": bin_dir}):
            with_rg = self.box.grep("needle")
            self.assertTrue(os.path.exists(log), "the rg on PATH was not used")
            self.assertEqual(self.box.grep("needle", glob="*.txt", path="a"), [("a/b.txt", 1, "x needle")])
        with mock.patch.dict(os.environ, {"PATH": os.path.join(self.tmp, "empty")}):
            without_rg = self.box.grep("needle")
        self.assertEqual(with_rg, self.expected)
        self.assertEqual(without_rg, self.expected)

    def test_pattern_is_literal(self):
        self.assertEqual(self.both("a.c(x)*[y]+?"), [("regex.txt", 1, "a.c(x)*[y]+?")])
        self.assertEqual(self.both("."), [(".gitignore", 1, "*.log"), ("regex.txt", 1, "a.c(x)*[y]+?"),
                                          ("regex.txt", 3, "needle.")])
        self.assertEqual(self.both("-e"), [])
        self.assertEqual(self.both("NEEDLE"), [])

    def test_glob_and_path_filters(self):
        self.assertEqual(self.both("needle", glob="*.py"),
                         [("a-b.py", 1, "needle = 1"), ("sub/deep/c.py", 1, "print('needle')")])
        self.assertEqual(self.both("needle", glob="sub/**/*.py"),
                         [("sub/deep/c.py", 1, "print('needle')")])
        self.assertEqual(self.both("needle", glob="deep/*.py", path="sub"),
                         [("sub/deep/c.py", 1, "print('needle')")])
        self.assertEqual(self.both("needle", "a"), [("a/b.txt", 1, "x needle")])
        self.assertEqual(self.both("needle", "a.txt"), [("a.txt", 1, "needle one"), ("a.txt", 3, "needle two")])
        self.assertEqual(self.both("needle", "bin.dat"), [])
        self.assertEqual(self.both("needle", glob="*.{py,txt}"), [])  # no brace expansion

    def test_max_count_caps_results(self):
        self.put("many/m.txt", "".join(f"needle {i}\n" for i in range(50)))
        self.put("many/n.txt", "needle n\n")
        hits = self.both("needle", "many", max_count=10)
        self.assertEqual(hits, [("many/m.txt", i + 1, f"needle {i}") for i in range(10)])
        self.assertEqual(len(self.both("needle", max_count=3)), 3)

    def test_python_search_stops_at_deadline(self):
        with mock.patch.object(sandbox, "USE_RG", False), \
                mock.patch.object(sandbox, "SEARCH_TIMEOUT", 0.0):
            self.assertEqual(self.box.grep("needle"), [])

    def test_bad_arguments(self):
        for args in (("",), ("a\nb",), ("x", "missing"), ("x", ".", None, 0)):
            self.assertRaises(SandboxError, self.box.grep, *args)


if __name__ == "__main__":
    unittest.main()
