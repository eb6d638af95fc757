"""Tests for sandbox.py and daytona_sandbox.py: real subprocesses in temporary directories.

    python -m unittest test_sandbox -v

The behaviour both sandboxes share (the *Behaviour mixins) runs against FilesystemSandbox and
against DaytonaSandbox (the real daytona SDK and a loopback stand-in of Daytona's HTTP API that
runs the commands for real, see testsupport_daytona.py). Host-only tests (process groups,
setsid sweeps, FIFOs, symlinks, rg) run against FilesystemSandbox alone. The execute()
behaviour runs in every mode: full-access, and confined by the real `bwrap` in workspace-write
and read-only (skipped, saying why, where bwrap cannot run); ConfinementTest checks what the
confinement keeps out. Processes are found by a unique tag in their command line, since a
confined command sees the pids of its own PID namespace.
"""
import concurrent.futures
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
import uuid
from unittest import mock

import sandbox
import stigmer_pb2 as pb
from sandbox import ExecutionResult, FilesystemSandbox, SandboxError
from testsupport import PongServer, pid_alive, running, sleep_tag, survivors
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

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
    mode = "full-access"  # FilesystemSandbox's mode in this case's sandboxes

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name
        self.root = os.path.join(self.tmp, "work")
        self.box = self.make_sandbox(self.root)

    def make_sandbox(self, root, **kwargs):
        return FilesystemSandbox(root, **{"mode": self.mode, **kwargs})

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def put(self, rel, data):
        full = self.path(rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
        return full


class ExecuteBehaviour:
    """execute() as every sandbox must do it."""

    def test_echo_exit_codes_and_output(self):
        r = self.box.execute("echo hello; echo oops >&2; exit 3")
        self.assertIsInstance(r, ExecutionResult)
        self.assertEqual((r.exit_code, r.stdout, r.stderr), (3, "hello\n", "oops\n"))
        self.assertEqual(r.output, "hello\noops\n")
        self.assertFalse(r.timed_out or r.truncated or r.cancelled)
        self.assertEqual(self.box.execute("true").exit_code, 0)
        self.assertEqual(self.box.execute("printf x; echo y >&2").output, "x\ny\n")

    def test_environment_layers_and_removal(self):
        host = {"HOST_ONLY": "host", "HIDE_ME": "secret", "PAGER": "less", "GIT_PAGER": "less -R",
                "GIT_TERMINAL_PROMPT": "1"}
        show = 'echo "$PAGER|$GIT_PAGER|$GIT_TERMINAL_PROMPT"'
        with mock.patch.dict(os.environ, host):
            box = self.make_sandbox(self.root, env={"A": "box", "B": "box", "HIDE_ME": None})
            r = box.execute('echo "$A $B $HOST_ONLY ${HIDE_ME-unset}"', env={"B": "call"})
            self.assertEqual(r.stdout, "box call host unset\n")
            r = box.execute('echo "${A-unset} $PAGER"', env={"A": None, "PAGER": "more"})
            self.assertEqual(r.stdout, "unset more\n")
            # The non-interactive defaults override what the host set...
            self.assertEqual(box.execute(show).stdout, "cat|cat|0\n")
            # ...but a sandbox-level env wins over them, and a call's env over that.
            box = self.make_sandbox(self.root, env={"PAGER": "most", "GIT_TERMINAL_PROMPT": "1"})
            self.assertEqual(box.execute(show).stdout, "most|cat|1\n")
            self.assertEqual(box.execute(show, env={"PAGER": "more", "GIT_PAGER": None}).stdout,
                             "more||1\n")

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
            self.make_sandbox(self.root, timeout=0)
        with self.assertRaises(SandboxError):
            self.make_sandbox(self.root, max_output_bytes=0)

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
        box = self.make_sandbox(self.root, timeout=0.5)
        r = box.execute("sleep 30")
        self.assertTrue(r.timed_out)
        self.assertIn("timed out after 0.5 s", r.stderr)

    def test_background_child_holding_pipes_does_not_hang(self):
        tag = sleep_tag()
        t = time.monotonic()
        r = self.box.execute(f"sleep {tag} & echo started $!")
        self.assertLess(time.monotonic() - t, HANG)
        self.assertEqual(r.exit_code, 0)
        self.assertFalse(r.timed_out)
        self.assertTrue(r.stdout.startswith("started "))
        self.assertEqual(survivors(tag), [], "background sleep survived")

    def test_detached_background_child_is_killed_after_normal_exit(self):
        tag = sleep_tag()
        r = self.box.execute(f"sleep {tag} >/dev/null 2>&1 & echo $!")
        self.assertEqual(r.exit_code, 0)
        self.assertTrue(r.stdout.strip().isdigit())
        self.assertEqual(survivors(tag), [], "background sleep survived")

    def test_timeout_kills_whole_process_tree(self):
        tag = sleep_tag()
        script = textwrap.dedent(f"""
            import subprocess, sys, time
            subprocess.Popen(["sleep", "{tag}"])
            print("ready", flush=True)
            time.sleep(60)
        """)
        self.put("tree.py", script)
        r = self.box.execute(f"{sys.executable} tree.py {tag}", timeout=2)
        self.assertTrue(r.timed_out)
        self.assertEqual(r.stdout, "ready\n")  # the child and grandchild were running
        self.assertEqual(survivors(tag), [], "the child or the grandchild survived")

    def test_sigterm_trap_gets_sigkill(self):
        tag = sleep_tag()
        self.put("stubborn.py", "import signal, time\n"
                                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                "print('ready', flush=True)\n"
                                "time.sleep(60)\n")
        t = time.monotonic()
        r = self.box.execute(f"exec {sys.executable} stubborn.py {tag}", timeout=2)
        self.assertLess(time.monotonic() - t, HANG)
        self.assertEqual((r.exit_code, r.timed_out, r.stdout), (124, True, "ready\n"))
        self.assertEqual(survivors(tag), [])

    def test_stdin_is_closed(self):
        # Give this process an open stdin that never ends (under CI it is /dev/null, where
        # an inherited stdin would pass too): a command that inherited it would wait forever.
        read_end, write_end = os.pipe()
        saved = os.dup(0)
        os.dup2(read_end, 0)
        try:
            r = self.box.execute("cat; echo done", timeout=3)
        finally:
            os.dup2(saved, 0)
            for fd in (saved, read_end, write_end):
                os.close(fd)
        self.assertEqual((r.exit_code, r.stdout, r.timed_out), (0, "done\n", False))

    def test_output_below_at_and_just_over_the_limit(self):
        box = self.make_sandbox(self.root)  # the default 1 MB
        for size, cut in ((900_000, False), (1_000_000, False), (1_000_001, True)):
            with self.subTest(size=size):
                r = box.execute(f"head -c {size} /dev/zero | tr '\\0' a")
                self.assertEqual(r.truncated, cut)
                if cut:
                    self.assertEqual(r.stdout, "a" * 500_000 + "\n… 1 bytes omitted …\n" + "a" * 500_000)
                else:
                    self.assertEqual(r.stdout, "a" * size)

    def test_huge_output_is_truncated_to_head_and_tail(self):
        box = self.make_sandbox(self.root, max_output_bytes=100_000)
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
        tag = sleep_tag()
        r = self.box.execute(f"echo $! >/dev/null; sleep {tag} & echo $!; wait", cancel=cancel)
        self.assertLess(time.monotonic() - t, HANG)
        self.assertEqual((r.exit_code, r.cancelled, r.timed_out), (130, True, False))
        self.assertIn("cancelled", r.stderr)
        self.assertTrue(r.stdout.strip().isdigit())
        self.assertEqual(survivors(tag), [], "cancelled sleep survived")
        r = self.box.execute("echo never", cancel=cancel)  # already set: nothing runs
        self.assertEqual((r.exit_code, r.cancelled, r.stdout), (130, True, ""))


class PathBehaviour:
    """Paths outside the workspace, by `..` or absolute, are refused by every file tool."""

    def test_dotdot_and_absolute_paths_outside_are_refused(self):
        outside = os.path.join(self.tmp, "outside")
        os.makedirs(outside, exist_ok=True)
        with open(os.path.join(outside, "secret.txt"), "w") as f:
            f.write("needle outside\n")
        box = self.box
        for path in ("../x", "../outside/secret.txt", "/etc/passwd", "sub/../../x", self.tmp):
            with self.subTest(path=path):
                for call in (lambda: box.read(path), lambda: box.write(path, "x"),
                             lambda: box.edit(path, "needle", "pin"), lambda: box.ls(path),
                             lambda: box.glob("*", path), lambda: box.grep("needle", path)):
                    with self.assertRaises(SandboxError) as cm:
                        call()
                    self.assertIn("outside the workspace", str(cm.exception))
        for pattern in ("../*", "/etc/*"):
            with self.assertRaises(SandboxError) as cm:
                box.glob(pattern)
            self.assertIn("relative", str(cm.exception))
        self.assertEqual(sorted(os.listdir(self.tmp)), ["outside", "work"])
        with open(os.path.join(outside, "secret.txt")) as f:
            self.assertEqual(f.read(), "needle outside\n")

    def test_dotted_names_and_absolute_paths_inside_are_fine(self):
        for name in ("foo..bar.txt", "[...slug]/page.tsx", "a/../dots...", self.path("abs.txt")):
            with self.subTest(name=name):
                self.box.write(name, "one two\n")
                self.assertEqual(self.box.read(name), "one two\n")
                self.assertEqual(self.box.edit(name, "two", "three"), 1)
                self.assertEqual(self.box.read(name), "one three\n")
        self.assertEqual(self.box.ls(), ["[...slug]/", "abs.txt", "dots...", "foo..bar.txt"])
        self.assertEqual(self.box.ls(self.root), self.box.ls("."))
        self.assertEqual(self.box.glob("*..*"), ["[...slug]", "dots...", "foo..bar.txt"])
        self.assertEqual(self.box.grep("three", "[...slug]"), [("[...slug]/page.tsx", 1, "one three")])
        self.assertEqual(self.box.grep("three", self.path("foo..bar.txt")),
                         [("foo..bar.txt", 1, "one three")])


class FileToolsBehaviour:
    """ls, read, write, edit and glob as every sandbox must do them."""

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

    def test_write_refuses_a_directory_path(self):
        for path in ("newdir/", "newdir/.", "sub/newdir/", "./"):
            with self.subTest(path=path):
                with self.assertRaises(SandboxError) as cm:
                    self.box.write(path, "x")
                self.assertIn("names a directory", str(cm.exception))
        self.assertEqual(os.listdir(self.root), [])

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

    def test_edit_in_a_file_with_mixed_line_endings(self):
        # The first line ends in LF, later ones in CRLF: an LF old still finds the CRLF lines.
        self.put("m.txt", b"first\nsecond\r\nthird\r\n")
        self.assertEqual(self.box.edit("m.txt", "second\nthird\n", "2\n3\n"), 1)
        with open(self.path("m.txt"), "rb") as f:
            self.assertEqual(f.read(), b"first\n2\r\n3\r\n")
        # Where the LF text itself occurs, it is what is replaced, as given.
        self.assertEqual(self.box.edit("m.txt", "first\n2", "one\ntwo"), 1)
        with open(self.path("m.txt"), "rb") as f:
            self.assertEqual(f.read(), b"one\ntwo\r\n3\r\n")
        self.put("c.txt", b"a\r\nb\r\nc\nd\n")
        self.assertEqual(self.box.edit("c.txt", "a\nb\n", "x\n"), 1)
        self.assertEqual(self.box.edit("c.txt", "c\nd\n", "y\n"), 1)
        with open(self.path("c.txt"), "rb") as f:
            self.assertEqual(f.read(), b"x\r\ny\n")

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

    def test_pathological_glob_returns(self):
        # As a backtracking regex, this pattern against this name takes hours.
        self.put("a" * 60, "needle\n")
        pattern = "*a" * 14 + "b"
        results = {}

        def calls():
            results["glob"] = self.box.glob(pattern)
            results["deep glob"] = self.box.glob("**/" + pattern)
            results["grep"] = self.box.grep("needle", glob=pattern)
        worker = threading.Thread(target=calls, daemon=True)
        worker.start()
        worker.join(HANG)
        self.assertFalse(worker.is_alive(), "a glob pattern froze the search")
        for what, found in results.items():
            with self.subTest(what):
                self.assertTrue(found == [] or getattr(found, "cut_off", None), found)
        self.assertEqual(self.box.glob("*a" * 14), ["a" * 60])  # the same matcher still matches
        self.assertEqual(self.box.glob("*a*a*" + "?" * 57), ["a" * 60])
        self.assertEqual(self.box.glob("a*a*a?"), ["a" * 60])


class GrepBehaviour:
    """grep as every sandbox must do it; both() is grep (the host runs rg and Python)."""

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

    def test_python_search_results(self):
        self.assertEqual(self.both("needle"), self.expected)

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

    def test_bad_arguments(self):
        for args in (("",), ("a\nb",), ("x", "missing"), ("x", ".", None, 0)):
            self.assertRaises(SandboxError, self.box.grep, *args)

    def test_git_file_is_searched_git_directory_is_not(self):
        self.put("sub/.git", "gitdir: ../.git/modules/needle\n")  # a submodule's or worktree's
        self.assertIn(("sub/.git", 1, "gitdir: ../.git/modules/needle"), self.both("needle"))
        self.assertNotIn(".git/config", [h[0] for h in self.both("needle")])


class ExecuteTest(ExecuteBehaviour, SandboxCase):
    slow = True  # among the longest: testsupport_parallel starts it first
    def test_root_is_created_resolved_and_the_cwd(self):
        link = os.path.join(self.tmp, "link")
        os.symlink(self.root, link)
        box = FilesystemSandbox(link)
        self.assertEqual(box.root, os.path.realpath(self.root))
        self.assertEqual(box.execute("pwd").stdout.strip(), box.root)
        box2 = FilesystemSandbox(os.path.join(self.tmp, "new", "dir"))
        self.assertTrue(os.path.isdir(box2.root))

    def test_setsid_child_is_found_and_killed(self):
        t = time.monotonic()
        r = self.box.execute("setsid sleep 30 & echo $!")  # holds the pipes, in its own session
        self.assertLess(time.monotonic() - t, HANG)
        self.assertFalse(alive(int(r.stdout)), "the setsid'd sleep survived")
        self.assertIn("1 background process had left the process group", r.stderr)
        self.assertIn("and was killed", r.stderr)
        r = self.box.execute(  # holds nothing; the shell waits until setsid has run
            "setsid sh -c 'echo > started; exec sleep 30' >/dev/null 2>&1 & "
            "while [ ! -e started ]; do sleep 0.01; done; echo $!")
        self.assertLess(r.duration, 1.5)
        self.assertFalse(alive(int(r.stdout)), "the detached setsid'd sleep survived")
        self.assertIn("and was killed", r.stderr)
        r = self.box.execute("setsid sleep 30 >/dev/null 2>&1 & echo $!; sleep 30", timeout=1)
        self.assertTrue(r.timed_out)
        self.assertFalse(alive(int(r.stdout)), "the setsid'd sleep survived the timeout")
        self.assertNotIn("left the process group", self.box.execute("echo plain").stderr)

    def test_untraceable_escapee_is_reported_not_claimed_killed(self):
        # env -i drops the marker the sandbox tracks, so this one cannot be found: say so.
        r = self.box.execute("env -i setsid sleep 30 & echo $!")
        pid = int(r.stdout)
        self.addCleanup(lambda: os.kill(pid, signal.SIGKILL) if alive(pid) else None)
        self.assertTrue(alive(pid))
        self.assertIn("still holds the output and was left running", r.stderr)
        self.assertNotIn("so they were killed", r.stderr)

    def test_capture_keeps_exact_head_and_tail_at_every_size_and_chunking(self):
        for read_chunk in (0, 1, 1 << 20):  # 0 and 1 make the tail trim itself at every chance
            with mock.patch.object(sandbox, "READ_CHUNK", read_chunk):
                for limit in (1, 2, 7, 10):
                    for total in range(3 * limit + 3):
                        data = bytes(range(65, 65 + total))
                        for step in (1, 3, max(1, total)):
                            cap = sandbox._Capture(limit)
                            for i in range(0, total, step):
                                cap.add(data[i:i + step])
                            text, cut = cap.result()
                            if total <= limit:
                                want = data.decode()
                            else:
                                head = limit // 2
                                want = (data[:head].decode() + f"\n… {total - limit} bytes omitted …\n"
                                        + data[total - (limit - head):].decode())
                            self.assertEqual((text, cut), (want, total > limit),
                                             (read_chunk, limit, total, step))

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


class PathRulesTest(PathBehaviour, SandboxCase):
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


class FileToolsTest(FileToolsBehaviour, SandboxCase):
    def test_write_failure_leaves_old_file_whole(self):
        self.put("keep.txt", "original\n")
        with mock.patch("sandbox.os.fsync", side_effect=OSError(28, "No space left on device")):
            with self.assertRaises(SandboxError) as cm:
                self.box.write("keep.txt", "new content\n")
        self.assertIn("no space left", str(cm.exception))
        with open(self.path("keep.txt")) as f:
            self.assertEqual(f.read(), "original\n")
        self.assertEqual(os.listdir(self.root), ["keep.txt"])

    def test_os_and_pattern_errors_become_sandbox_errors(self):
        self.put("afile", "text\n")
        cases = {
            "read below a file": (lambda: self.box.read("afile/x"), "is a file, not a directory"),
            "edit below a file": (lambda: self.box.edit("afile/x", "a", "b"), "is a file, not a directory"),
            "write below a file": (lambda: self.box.write("afile/child", "x"), "is a file, not a directory"),
            "write deeper below": (lambda: self.box.write("afile/a/b", "x"), "is a file, not a directory"),
            "ls below a file": (lambda: self.box.ls("afile/x"), "does not exist"),
            "grep below a file": (lambda: self.box.grep("x", "afile/x"), "does not exist"),
            "glob range": (lambda: self.box.glob("[z-a]"), "bad character range"),
            "glob range in a path": (lambda: self.box.glob("**/[z-a].py"), "bad character range"),
            "grep glob range": (lambda: self.box.grep("text", glob="[z-a]"), "bad character range"),
            "grep path glob range": (lambda: self.box.grep("text", glob="d/[z-a]"), "bad character range"),
        }
        for what, (call, words) in cases.items():
            with self.subTest(what):
                with self.assertRaises(SandboxError) as cm:
                    call()
                self.assertIn(words, str(cm.exception))

    def test_unreadable_file_and_directory(self):
        secret = self.put("locked.txt", "text\n")
        os.makedirs(self.path("locked_dir"))
        for p in (secret, self.path("locked_dir")):
            os.chmod(p, 0)
            self.addCleanup(os.chmod, p, 0o700)
        real_open, real_scandir, real_openat2 = os.open, os.scandir, sandbox._openat2
        locked_dir = os.stat(self.path("locked_dir")).st_ino

        def locked(path):  # a name relative to a directory fd, or an fd to list
            if isinstance(path, int):
                return os.fstat(path).st_ino == locked_dir
            return os.path.basename(os.fsdecode(path)) in ("locked.txt", "locked_dir")

        def denied(real, at):  # root ignores modes: refuse as a non-root user would be refused
            def call(*args, **kwargs):
                if locked(args[at]):
                    raise PermissionError(errno.EACCES, "Permission denied", args[at])
                return real(*args, **kwargs)
            return call
        with mock.patch("sandbox.os.open", denied(real_open, 0)), \
                mock.patch("sandbox.os.scandir", denied(real_scandir, 0)), \
                mock.patch("sandbox._openat2", denied(real_openat2, 1)):
            for call in (lambda: self.box.read("locked.txt"), lambda: self.box.edit("locked.txt", "t", "T"),
                         lambda: self.box.grep("text", "locked.txt"), lambda: self.box.ls("locked_dir"),
                         lambda: self.box.write("locked_dir/new.txt", "x")):
                with self.assertRaises(SandboxError) as cm:
                    call()
                self.assertIn("permission denied", str(cm.exception))
            with mock.patch.object(sandbox, "USE_RG", False):
                self.assertEqual(self.box.grep("text"), [])  # skipped in a search, as rg does

    def test_fifo_is_refused_and_skipped_without_blocking(self):
        fifo = self.path("pipe")
        os.mkfifo(fifo)
        self.put("a.txt", "needle\n")
        results = []

        def calls():
            for call in (lambda: self.box.grep("needle", "pipe"), lambda: self.box.read("pipe"),
                         lambda: self.box.edit("pipe", "a", "b")):
                try:
                    call()
                    results.append("no error")
                except SandboxError as e:
                    results.append(str(e))
            with mock.patch.object(sandbox, "USE_RG", False):
                results.append(self.box.grep("needle"))
            results.append(self.box.grep("needle"))
        worker = threading.Thread(target=calls, daemon=True)
        worker.start()
        worker.join(HANG)
        if worker.is_alive():  # unblock the stuck open so the thread can end
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            self.fail("a file tool blocked on a FIFO")
        for message in results[:3]:
            self.assertIn("not a regular file", message)
        self.assertEqual(results[3:], [[("a.txt", 1, "needle")]] * 2)


class GrepTest(GrepBehaviour, SandboxCase):
    def both(self, *args, **kwargs):
        """grep with the Python search, and with rg when it is installed; asserts they agree."""
        with mock.patch.object(sandbox, "USE_RG", False):
            python = self.box.grep(*args, **kwargs)
        if shutil.which("rg"):
            rg = self.box.grep(*args, **kwargs)
            self.assertEqual(rg, python, "rg and the Python search disagree")
        return python

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

    def test_python_search_stops_at_deadline(self):
        with mock.patch.object(sandbox, "USE_RG", False), \
                mock.patch.object(sandbox, "SEARCH_TIMEOUT", 0.0):
            self.assertEqual(self.box.grep("needle"), [])

    def test_nul_after_the_first_buffer_is_binary_in_both(self):
        # rg 13 finds this NUL only after printing the match, then warns; it must not crash
        # the parser, and the file counts as binary in both searches.
        self.put("late.txt", b"needle\n" + b"x" * 300_000 + b"\0")
        self.put("late2.txt", b"needle\n" * 5 + b"y" * 300_000 + b"\0")  # rg stops at max_count first
        self.assertEqual(self.both("needle"), self.expected)
        for max_count in (1, 3, 5, 6):
            hits = self.both("needle", max_count=max_count)
            self.assertEqual(len(hits), max_count)
            self.assertFalse([h for h in hits if h[0].startswith("late")], hits)
        self.assertEqual(self.both("needle", "late.txt"), [])
        self.assertEqual(self.both("needle", "late2.txt", max_count=2), [])

    def test_odd_file_names(self):
        self.put("new\nline.txt", "needle\n")
        self.put("tab\tand:colon.txt", "a:1:needle\n")
        self.put("caf\xe9.txt".encode("latin-1").decode("utf-8", "surrogateescape"), "needle\n")
        found = self.both("needle")
        for hit in [("new\nline.txt", 1, "needle"), ("tab\tand:colon.txt", 1, "a:1:needle"),
                    ("caf\ufffd.txt", 1, "needle")]:
            self.assertIn(hit, found)

    def test_names_rg_reports_are_opened_beneath_the_root_or_not_at_all(self):
        real_rg = shutil.which("rg")
        if not real_rg:
            self.skipTest("ripgrep (rg) is not installed")
        outside = os.path.join(self.tmp, "outside")
        os.makedirs(outside)
        with open(os.path.join(outside, "secret.txt"), "w") as f:
            f.write("needle outside\n")
        os.symlink(outside, self.path("out_dir"))
        bin_dir = os.path.join(self.tmp, "bin")
        os.makedirs(bin_dir)
        with open(os.path.join(bin_dir, "rg"), "w") as f:  # as an rg led astray by a swapped folder would
            f.write("#!/bin/sh\nprintf '%s\\0' ../outside/secret.txt /etc/passwd out_dir/secret.txt "
                    f"no/such/file '' 'some words'\nexec \"{real_rg}\" \"$@\"\n")
        os.chmod(os.path.join(bin_dir, "rg"), 0o755)
        with mock.patch.dict(os.environ, {"PATH": bin_dir}):
            self.assertEqual(self.box.grep("needle"), self.expected)

    def test_size_cap_and_chunk_boundaries(self):
        self.put("cap/exact.txt", b"needle\n" + b"z" * 56 + b"\n")  # 64 bytes
        self.put("cap/over.txt", b"needle\n" + b"z" * 57 + b"\n")  # 65 bytes
        with mock.patch.object(sandbox, "MAX_GREP_BYTES", 64):
            self.assertEqual(self.both("needle", "cap"), [("cap/exact.txt", 1, "needle")])
            with self.assertRaises(SandboxError) as cm:
                self.box.grep("needle", "cap/over.txt")
            self.assertIn("over grep's 64 bytes limit", str(cm.exception))
        for chunk in (1, 2, 3, 5, 7, 64):
            with self.subTest(chunk=chunk), mock.patch.object(sandbox, "GREP_CHUNK", chunk):
                self.assertEqual(self.both("needle"), sorted(self.expected + [
                    ("cap/exact.txt", 1, "needle"), ("cap/over.txt", 1, "needle")]))
                self.assertEqual(len(self.both("needle", max_count=4)), 4)

    def test_python_search_checks_the_deadline_inside_a_file(self):
        self.put("big.txt", "x\n" * 10_000 + "needle at the end\n")
        clock = iter(range(10**6))  # each look at the clock is one second later
        with mock.patch.object(sandbox, "USE_RG", False), \
                mock.patch.object(sandbox, "SEARCH_TIMEOUT", 5.0), \
                mock.patch.object(sandbox, "GREP_CHUNK", 100), \
                mock.patch("sandbox.time.monotonic", lambda: float(next(clock))):
            self.assertEqual(self.box.grep("needle", "big.txt"), [])


# Swaps two names atomically, over and over, as a process the agent's shell left running could.
SWAPPER = r"""
import ctypes, os, platform, sys
number = {"x86_64": 316, "aarch64": 276}[platform.machine()]  # renameat2
libc = ctypes.CDLL(None, use_errno=True)
a, b = (ctypes.c_char_p(os.fsencode(p)) for p in sys.argv[1:3])
AT_FDCWD, RENAME_EXCHANGE = ctypes.c_int(-100), ctypes.c_uint(2)
first, parent = True, os.getppid()
while os.getppid() == parent:  # ends with the test, however it ends
    if libc.syscall(ctypes.c_long(number), AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
        print("error", ctypes.get_errno(), flush=True)
        sys.exit(1)
    if first:
        print("swapping", flush=True)
        first = False
"""


class RaceTest(SandboxCase):
    """A process swapping a workspace folder with a symlink to an outside folder, while file tools run."""

    def test_symlink_swap_never_crosses_with_openat2(self):
        if not sandbox._openat2_ready():
            self.skipTest("this kernel has no openat2: the walk from directory fds was tested alone")
        self.swap_while_tools_run()

    def test_symlink_swap_never_crosses_with_the_walk(self):
        with mock.patch.dict(sandbox._OPENAT2, ready=False):
            self.swap_while_tools_run()

    def swap_while_tools_run(self):
        import platform
        if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
            self.skipTest("renameat2(RENAME_EXCHANGE) is called by its Linux syscall number")
        outside = os.path.join(self.tmp, "outside")
        os.makedirs(outside)
        for name in ("f.txt", "only_outside.txt"):
            with open(os.path.join(outside, name), "w") as f:
                f.write("OUTSIDE\n")
        self.put("sub/f.txt", "inside\n")
        os.symlink(outside, self.path("swap"))
        swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, self.path("sub"), self.path("swap")],
                                   stdout=subprocess.PIPE, text=True)
        self.addCleanup(swapper.stdout.close)
        self.addCleanup(swapper.wait)
        self.addCleanup(swapper.kill)
        self.assertEqual(swapper.stdout.readline(), "swapping\n")

        def calls(i):
            seen = []
            for k in range(10):
                for call in (lambda: self.box.read("sub/f.txt"),
                             lambda: self.box.write(f"sub/new_{i}_{k}.txt", "written\n"),
                             lambda: self.box.edit("sub/f.txt", "inside", "inside"[::-1]),
                             lambda: self.box.edit("sub/f.txt", "edisni", "inside"),
                             lambda: self.box.ls("sub"),
                             lambda: self.box.glob("*", "sub"),
                             lambda: self.box.grep("OUTSIDE", "sub" if k % 2 else "sub/f.txt")):
                    try:
                        seen.append(call())
                    except SandboxError as e:
                        seen.append(e)
                    except Exception as e:  # reported below, after what crossed
                        seen.append(("unexpected", e))
            return seen

        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            results = [r for seen in pool.map(calls, range(30)) for r in seen]
        if swapper.poll() is not None:
            self.fail("the swapper stopped: " + swapper.stdout.read())
        crossed = [r for r in results if "OUTSIDE" in repr(r) or "only_outside" in repr(r)]
        self.assertEqual(crossed, [], f"{len(crossed)} of {len(results)} calls crossed")
        self.assertEqual([r for r in results if isinstance(r, tuple)], [])
        self.assertEqual(sorted(os.listdir(outside)), ["f.txt", "only_outside.txt"])
        for name in ("f.txt", "only_outside.txt"):
            with open(os.path.join(outside, name)) as f:
                self.assertEqual(f.read(), "OUTSIDE\n")
        # Not vacuous: calls got through, and others were refused while the symlink was in place.
        self.assertIn("inside\n", results)
        self.assertTrue(any(r is None for r in results), "no write got through")
        self.assertTrue(any(isinstance(r, SandboxError) and "outside the workspace" in str(r)
                            for r in results))


class BadInputTest(SandboxCase):
    """Names that are not UTF-8, text with lone surrogates and very deep paths are data, never a crash."""

    def assertPrintable(self, value):
        """value (a tool's result) fits a protobuf string field: no lone surrogate anywhere."""
        text = value if isinstance(value, str) else repr(value)
        text.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate
        pb.ToolResult(output=text).SerializeToString()

    def test_names_that_are_not_utf8(self):
        raw = os.path.join(os.fsencode(self.root), b"caf\xe9")
        os.makedirs(os.path.join(raw, b"d\xff"))
        with open(os.path.join(raw, b"d\xff", b"notes.txt"), "wb") as f:
            f.write(b"needle\n")
        with open(os.path.join(raw, b"\xfe.txt"), "wb") as f:
            f.write(b"needle too\n")
        listed = self.box.ls()
        self.assertEqual(listed, ["caf\ufffd/"])
        self.assertEqual(self.box.ls("caf\ufffd"), ["d\ufffd/", "\ufffd.txt"])
        self.assertEqual(self.box.glob("**/*"),
                         ["caf\ufffd", "caf\ufffd/d\ufffd", "caf\ufffd/d\ufffd/notes.txt", "caf\ufffd/\ufffd.txt"])
        self.assertEqual(self.box.glob("caf?/d?/*.txt"), ["caf\ufffd/d\ufffd/notes.txt"])
        expected = [("caf\ufffd/d\ufffd/notes.txt", 1, "needle"), ("caf\ufffd/\ufffd.txt", 1, "needle too")]
        for use_rg in (False, True):
            with self.subTest(use_rg=use_rg), mock.patch.object(sandbox, "USE_RG", use_rg):
                self.assertEqual(self.box.grep("needle"), expected)
                self.assertEqual(self.box.grep("needle", glob="*.txt"), expected)
                self.assertEqual(self.box.grep("needle", "caf\ufffd/d\ufffd"), expected[:1])
        for value in (listed, self.box.glob("**/*"), self.box.grep("needle")):
            self.assertPrintable(value)
        # The names the tools printed lead back to the files.
        self.assertEqual(self.box.read("caf\ufffd/d\ufffd/notes.txt"), "needle\n")
        self.assertEqual(self.box.edit("caf\ufffd/\ufffd.txt", "too", "three"), 1)
        with open(os.path.join(raw, b"\xfe.txt"), "rb") as f:
            self.assertEqual(f.read(), b"needle three\n")
        self.box.write("caf\ufffd/d\ufffd/notes.txt", "rewritten\n")
        with open(os.path.join(raw, b"d\xff", b"notes.txt"), "rb") as f:
            self.assertEqual(f.read(), b"rewritten\n")
        self.assertEqual(sorted(os.listdir(raw)), [b"d\xff", b"\xfe.txt"])  # nothing new beside them
        # Two names that print alike: neither is guessed.
        with open(os.path.join(raw, b"\xfd.txt"), "wb") as f:
            f.write(b"other\n")
        with self.assertRaises(SandboxError) as cm:
            self.box.read("caf\ufffd/\ufffd.txt")
        self.assertIn("2 names", str(cm.exception))
        self.assertPrintable(str(cm.exception))

    def test_lone_surrogates_in_arguments(self):
        self.put("a.txt", "text\n")
        for call in (lambda: self.box.read("x\ud800.txt"), lambda: self.box.ls("x\udfff"),
                     lambda: self.box.glob("*\ud800"), lambda: self.box.grep("t\ud800"),
                     lambda: self.box.grep("text", glob="\ud800*"), lambda: self.box.edit("a.txt", "text", "\ud800"),
                     lambda: self.box.write("\ud800/b.txt", "x"), lambda: self.box.write("c.txt", "x\ud800y")):
            try:
                result = call()
            except SandboxError as e:
                result = str(e)
            self.assertPrintable(result)
        self.assertEqual(sorted(os.listdir(self.root)), ["a.txt", "c.txt"])
        with open(self.path("c.txt"), "rb") as f:
            self.assertEqual(f.read(), "x\ufffdy".encode())

    def test_path_2100_levels_deep(self):
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(2100):  # below PATH_MAX only as steps, as a shell's `cd d` loop makes it
            os.mkdir("d", dir_fd=fd)
            fd, parent = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(parent)
        with open(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
            f.write("needle deep\n")
        os.close(fd)
        self.addCleanup(subprocess.run, ["rm", "-rf", self.root])  # shutil.rmtree recurses too deep
        deep = "d/" * 2100 + "deep.txt"
        outcomes = {}
        for what, call in {
            "read": lambda: self.box.read(deep),
            "write": lambda: self.box.write(deep, "needle deep\nmore\n"),
            "edit": lambda: self.box.edit(deep, "more", "less"),
            "ls": lambda: self.box.ls("d/" * 2100),
            "glob": lambda: self.box.glob("**/deep.txt"),
            "grep python": lambda: self.python_grep("needle"),
            "grep": lambda: self.box.grep("needle"),
            "grep a file": lambda: self.box.grep("needle", deep),
        }.items():
            with self.subTest(what):
                try:
                    outcomes[what] = call()
                except SandboxError as e:
                    outcomes[what] = str(e)
                self.assertPrintable(outcomes[what])
        self.assertEqual(outcomes["read"], "needle deep\n")
        self.assertEqual(outcomes["edit"], 1)
        self.assertEqual(outcomes["ls"], ["deep.txt"])
        self.assertEqual(outcomes["glob"], [deep])
        self.assertEqual(outcomes["grep python"], [(deep, 1, "needle deep")])
        self.assertEqual(outcomes["grep a file"], [(deep, 1, "needle deep")])

    def python_grep(self, *args, **kwargs):
        with mock.patch.object(sandbox, "USE_RG", False):
            return self.box.grep(*args, **kwargs)


class StopTest(SandboxCase):
    """A search stops at its time limit or when cancelled, and says so."""

    def setUp(self):
        super().setUp()
        for i in range(30):
            self.put(f"d{i:02}/f.txt", "needle\n")

    def test_cancel_stops_the_walk_and_says_so(self):
        class CancelAfter(threading.Event):  # set once the search has looked at it n times
            def __init__(self, n):
                super().__init__()
                self.n = n

            def is_set(self):
                self.n -= 1
                return self.n < 0 or super().is_set()
        found = self.box.glob("**/*.txt", cancel=CancelAfter(5))
        self.assertLess(len(found), 30)
        self.assertIn("cancelled", found.cut_off)
        with mock.patch.object(sandbox, "USE_RG", False):
            hits = self.box.grep("needle", cancel=CancelAfter(5))
        self.assertLess(len(hits), 30)
        self.assertIn("cancelled", hits.cut_off)
        self.assertIsNone(self.box.glob("**/*.txt", cancel=threading.Event()).cut_off)
        with mock.patch.object(sandbox, "SEARCH_TIMEOUT", 0.0):
            self.assertIn("time limit", self.box.glob("**/*.txt").cut_off)

    def test_cancel_kills_rg(self):
        if not shutil.which("rg"):
            self.skipTest("ripgrep (rg) is not installed")
        bin_dir = os.path.join(self.tmp, "bin")
        os.makedirs(bin_dir)
        pid_file = os.path.join(self.tmp, "rg.pid")
        with open(os.path.join(bin_dir, "rg"), "w") as f:  # an rg that never finishes
            f.write(f'#!/bin/sh\necho $$ > "{pid_file}.tmp"\nmv "{pid_file}.tmp" "{pid_file}"\n'
                    'exec sleep 600\n')
        os.chmod(os.path.join(bin_dir, "rg"), 0o755)
        cancel = threading.Event()
        out = {}
        with mock.patch.dict(os.environ, {"PATH": bin_dir + os.pathsep + os.environ["PATH"]}):
            worker = threading.Thread(target=lambda: out.update(hits=self.box.grep("needle", cancel=cancel)))
            worker.start()
            pid = None
            deadline = time.monotonic() + HANG
            while pid is None and time.monotonic() < deadline:
                try:
                    with open(pid_file) as f:
                        pid = int(f.read())
                except FileNotFoundError:
                    time.sleep(0.01)
            cancel.set()
            worker.join(HANG)
        self.assertFalse(worker.is_alive(), "grep went on after cancel")
        self.assertEqual(out["hits"], [])
        self.assertIn("cancelled", out["hits"].cut_off)
        self.assertFalse(alive(pid), "rg still runs after the search was cancelled")


class WalkOnly:
    """The same tests with openat2 out of the game: every path is resolved by the walk from fds."""

    def setUp(self):
        patch = mock.patch.dict(sandbox._OPENAT2, ready=False)
        patch.start()
        self.addCleanup(patch.stop)
        super().setUp()


class WalkOnlyPathRulesTest(WalkOnly, PathRulesTest):
    pass


class WalkOnlyFileToolsTest(WalkOnly, FileToolsTest):
    pass


class WalkOnlyBadInputTest(WalkOnly, BadInputTest):
    pass


# ---- every mode: full-access above, and confined by the real bwrap ----

class HostExecuteBehaviour:
    """execute() on this host in any mode: SIGTERM first on a timeout, and the markers that find commands."""

    def test_timeout_sends_sigterm_to_the_command_first(self):
        tag = sleep_tag()
        r = self.box.execute(f"trap 'echo got-term; exit 5' TERM; sleep {tag} & wait", timeout=1)
        self.assertEqual((r.exit_code, r.timed_out, r.stdout), (124, True, "got-term\n"))
        self.assertEqual(survivors(tag), [])

    def test_markers_reach_the_command_and_kill_marked_finds_it(self):
        self.assertRegex(self.box.execute(f"echo ${sandbox.RUN_MARKER}").stdout, r"^[0-9a-f]{16}\n$")
        tag, execution = sleep_tag(), "ex-" + uuid.uuid4().hex
        results = []
        runner = threading.Thread(target=lambda: results.append(
            self.box.execute(f"sleep {tag}", env={sandbox.EXECUTION_MARKER: execution})))
        runner.start()
        deadline = time.monotonic() + HANG
        while not running(tag) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertGreaterEqual(sandbox.kill_marked(execution), 1)  # the daemon's sweep after a lost worker
        runner.join(HANG)
        self.assertEqual(results[0].exit_code, 137)
        self.assertEqual(survivors(tag), [])


class ExecuteFullAccessTest(HostExecuteBehaviour, SandboxCase):
    pass


class GuardianTest(unittest.TestCase):
    """The guardian of a process killed with SIGKILL kills what carries a marker it was given (guard_marker), even
    when the process's group was never registered; a marker it was not given, or was told to forget, is left."""

    CHILD = textwrap.dedent("""
        import os, subprocess, sys, time
        import sandbox
        sandbox.guard_commands()
        sandbox.guard_marker("guarded-" + sys.argv[1])
        sandbox.guard_marker("forgotten-" + sys.argv[1])
        sandbox.guard_marker("forgotten-" + sys.argv[1], on=False)
        for pid in filter(str.isdigit, os.listdir("/proc")):  # the guardian: this process's only child yet
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        print(pid, flush=True)
            except OSError:  # a process of another test, gone since the listing
                continue
        for name in ("guarded", "forgotten", "unknown"):
            p = subprocess.Popen(["sleep", "60"], start_new_session=True,
                                 env={**os.environ, sandbox.RUN_MARKER: name + "-" + sys.argv[1]})
            print(p.pid, flush=True)
        time.sleep(60)
    """)

    def test_a_marker_alone_is_enough_for_the_guardian(self):
        tag = uuid.uuid4().hex
        child = subprocess.Popen([sys.executable, "-c", self.CHILD, tag], stdout=subprocess.PIPE, text=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__)))
        self.addCleanup(child.stdout.close)
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        guardian, guarded, forgotten, unknown = [int(child.stdout.readline()) for _ in range(4)]
        for pid in (guarded, forgotten, unknown):
            self.addCleanup(lambda pid=pid: pid_alive(pid) and os.kill(pid, signal.SIGKILL))
        child.kill()
        child.wait()
        self.assertFalse(alive(guardian), "the guardian did not end with its parent")  # so it is done killing
        self.assertFalse(pid_alive(guarded), "the guardian left the marked process running")
        self.assertTrue(pid_alive(forgotten))
        self.assertTrue(pid_alive(unknown))


class ConfinedCase(SandboxCase):
    @classmethod
    def setUpClass(cls):
        problem = sandbox.confinement_problem()
        if problem:
            raise unittest.SkipTest(f"bwrap cannot run here, so confinement is not tested: {problem}")


class ExecuteWorkspaceWriteTest(ExecuteBehaviour, HostExecuteBehaviour, ConfinedCase):
    mode = "workspace-write"


class ExecuteReadOnlyTest(ExecuteBehaviour, HostExecuteBehaviour, ConfinedCase):
    mode = "read-only"


class FileToolsWorkspaceWriteTest(FileToolsBehaviour, PathBehaviour, ConfinedCase):
    mode = "workspace-write"


class ConfinementTest(unittest.TestCase):
    """What workspace-write keeps out, with real commands under the real bwrap. The temporary HOME is
    outside /tmp (the sandbox's /tmp is private, which would hide it for the wrong reason)."""

    KEY = "-----BEGIN OPENSSH PRIVATE KEY----- fake-key-for-the-test"
    TOKEN = "daemon-token-" + uuid.uuid4().hex

    @classmethod
    def setUpClass(cls):
        problem = sandbox.confinement_problem()
        if problem:
            raise unittest.SkipTest(f"bwrap cannot run here, so confinement is not tested: {problem}")
        parent = next(d for d in ("/var/tmp", os.path.expanduser("~"), os.getcwd())
                      if os.access(d, os.W_OK) and not os.path.realpath(d).startswith("/tmp/"))
        cls.base = tempfile.mkdtemp(dir=parent, prefix="stigmer-confine-")
        cls.addClassCleanup(shutil.rmtree, cls.base, ignore_errors=True)
        cls.home = os.path.join(cls.base, "home")
        cls.stigmer_home = os.path.join(cls.home, ".stigmer")
        cls.work = os.path.join(cls.base, "work")
        for path, text in (("home/.ssh/id_rsa", cls.KEY), ("home/notes.txt", "visible notes\n"),
                           ("home/.netrc", "machine example.com password hunter2hunter2\n"),
                           ("home/.stigmer/daemon.token", cls.TOKEN), ("work/README", "the project\n")):
            full = os.path.join(cls.base, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(text)
        cls.hide = sandbox.credential_paths(cls.home) + [cls.stigmer_home]
        cls.box = FilesystemSandbox(cls.work, mode="workspace-write", hide=cls.hide)
        cls.online = FilesystemSandbox(cls.work, mode="workspace-write", hide=cls.hide, network=True)
        cls.server = PongServer()
        cls.addClassCleanup(cls.server.close)

    def run_here(self, command, box=None):
        env = {"HOME": self.home, "http_proxy": None, "https_proxy": None, "HTTP_PROXY": None,
               "HTTPS_PROXY": None, "ALL_PROXY": None, "all_proxy": None}
        return (box or self.box).execute(command, env=env, timeout=HANG)

    def test_writing_outside_the_workspace_fails(self):
        for target in (os.path.join(self.home, "planted.txt"), os.path.join(self.base, "planted.txt"),
                       "/etc/stigmer-planted", os.path.join(self.home, ".ssh", "authorized_keys")):
            with self.subTest(target=target):
                r = self.run_here(f"echo planted > {target}")
                self.assertNotEqual(r.exit_code, 0)
                self.assertIn("Read-only file system", r.stderr)
                self.assertFalse(os.path.exists(target))
        name = "stigmer-scratch-" + uuid.uuid4().hex  # /tmp is writable, and private
        r = self.run_here(f"echo scratch > /tmp/{name} && cat /tmp/{name} && echo \"$TMPDIR\"")
        self.assertEqual((r.exit_code, r.stdout), (0, "scratch\n/tmp\n"))
        self.assertFalse(os.path.exists(f"/tmp/{name}"))

    def test_workspace_write_is_visible_on_the_host(self):
        r = self.run_here("mkdir -p out && echo made here > out/result.txt && cat README")
        self.assertEqual((r.exit_code, r.stdout), (0, "the project\n"))
        with open(os.path.join(self.work, "out", "result.txt")) as f:
            self.assertEqual(f.read(), "made here\n")

    def test_credentials_are_hidden(self):
        r = self.run_here(f"cat {self.home}/notes.txt")  # the home itself is readable ...
        self.assertEqual((r.exit_code, r.stdout), (0, "visible notes\n"))
        for command in ("cat ~/.ssh/id_rsa", f"cat {self.home}/.ssh/id_rsa", f"cat {self.home}/.netrc",
                        f"grep -r . {self.home}"):
            with self.subTest(command=command):  # ... its credentials are not
                r = self.run_here(command)
                self.assertNotIn("fake-key", r.output)
                self.assertNotIn("hunter2", r.output)
                if not command.startswith("grep"):
                    self.assertNotEqual(r.exit_code, 0)
        self.assertEqual(self.run_here(f"ls -A {self.home}/.ssh").stdout, "")

    def test_stigmer_home_and_its_token_are_invisible(self):
        r = self.run_here(f"ls -A {self.stigmer_home}; cat {self.stigmer_home}/daemon.token")
        self.assertEqual(r.stdout, "")
        self.assertNotEqual(r.exit_code, 0)
        self.assertNotIn(self.TOKEN, r.output)

    def test_network_is_off_unless_allowed(self):
        url = f"http://127.0.0.1:{self.server.port}/"
        fetch = f"{sys.executable} -c \"import urllib.request; print(urllib.request.urlopen('{url}').read().decode())\""
        clients = [fetch] + ([f"curl -sS --max-time 10 {url}"] if shutil.which("curl") else [])
        for command in clients:
            with self.subTest(command=command.split()[0]):
                r = self.run_here(command)
                self.assertNotEqual(r.exit_code, 0)
                self.assertNotIn("pong", r.stdout)
                self.assertIn("the network is off", r.stderr)
                self.assertIn("--network", r.stderr)
                r = self.run_here(command, self.online)
                self.assertEqual((r.exit_code, r.stdout.strip()), (0, "pong"), r.stderr)
        self.assertNotIn("network is off", self.run_here("exit 3").stderr)  # only when it looks like the network

    def test_a_background_sleep_is_gone_when_the_command_returns(self):
        tags = sleep_tag(), sleep_tag()
        r = self.run_here(f"setsid sleep {tags[0]} >/dev/null 2>&1 & nohup sleep {tags[1]} >/dev/null 2>&1 & "
                          "echo started")
        self.assertEqual((r.exit_code, r.stdout), (0, "started\n"))
        self.assertEqual(running(tags[0]) + running(tags[1]), [])  # at once: the PID namespace has ended

    def test_hidden_paths_inside_and_around_the_workspace(self):
        secret = os.path.join(self.work, "secret.env")
        with open(secret, "w") as f:
            f.write("API=hunter2hunter2\n")
        self.addCleanup(os.unlink, secret)
        box = FilesystemSandbox(self.work, mode="workspace-write", hide=[secret, self.base])
        r = box.execute("cat secret.env; echo x > new.txt && cat README")
        self.assertNotIn("hunter2", r.output)  # a hidden file inside the workspace stays hidden
        self.assertIn("the project", r.stdout)  # the workspace inside a hidden folder stays usable
        self.assertTrue(os.path.exists(os.path.join(self.work, "new.txt")))
        r = box.execute(f"ls -A {self.home}")
        self.assertNotEqual(r.exit_code, 0)  # the rest of the hidden folder is not there

    def test_file_tools_refuse_hidden_paths_inside_the_workspace(self):
        box = FilesystemSandbox(self.home, mode="workspace-write", hide=self.hide)  # the workspace is the home
        for call in (lambda: box.read(".ssh/id_rsa"), lambda: box.ls(".ssh"), lambda: box.write(".netrc", "x"),
                     lambda: box.edit(".stigmer/daemon.token", "daemon", "x"), lambda: box.read(".netrc")):
            with self.assertRaises(SandboxError) as cm:
                call()
            self.assertIn("hidden from the agent", str(cm.exception))
        self.assertEqual(box.read("notes.txt"), "visible notes\n")
        self.assertEqual(box.glob("**/*"), ["notes.txt"])  # not .ssh, .netrc, .stigmer or what they hold
        self.assertEqual(box.grep("e"), [("notes.txt", 1, "visible notes")])  # no hit in the key, netrc or token
        for use_rg in (False, True):
            with mock.patch.object(sandbox, "USE_RG", use_rg):
                self.assertEqual(box.grep("hunter2") + box.grep("fake-key") + box.grep(self.TOKEN), [])
        full = FilesystemSandbox(self.home, mode="full-access", hide=self.hide)  # full-access hides nothing
        self.assertEqual(full.read(".ssh/id_rsa"), self.KEY)

    def test_read_only_paths_are_bound_readable_not_writable(self):
        with tempfile.TemporaryDirectory() as skills:  # under /tmp: invisible unless bound
            with open(os.path.join(skills, "SKILL.md"), "w") as f:
                f.write("a skill\n")
            box = FilesystemSandbox(self.work, mode="workspace-write", read_only=[skills])
            r = box.execute(f"cat {skills}/SKILL.md; echo changed > {skills}/SKILL.md")
            self.assertEqual(r.stdout, "a skill\n")
            self.assertIn("Read-only file system", r.stderr)
            with open(os.path.join(skills, "SKILL.md")) as f:
                self.assertEqual(f.read(), "a skill\n")


class ReadOnlyTest(ConfinedCase):
    mode = "read-only"

    def test_the_workspace_is_not_writable_by_commands_or_file_tools(self):
        self.put("kept.txt", "kept\n")
        r = self.box.execute("cat kept.txt; echo changed > kept.txt; echo new > new.txt")
        self.assertEqual(r.stdout, "kept\n")
        self.assertIn("Read-only file system", r.stderr)
        self.assertEqual(sorted(os.listdir(self.root)), ["kept.txt"])
        for call in (lambda: self.box.write("new.txt", "x"), lambda: self.box.edit("kept.txt", "kept", "x")):
            with self.assertRaises(SandboxError) as cm:
                call()
            self.assertIn("read-only", str(cm.exception))
        with open(self.path("kept.txt")) as f:
            self.assertEqual(f.read(), "kept\n")
        self.assertEqual(self.box.read("kept.txt"), "kept\n")
        self.assertEqual(self.box.execute("echo t > /tmp/t && cat /tmp/t").stdout, "t\n")  # temp stays writable


class ConfinementUnavailableTest(unittest.TestCase):
    """Where commands cannot be confined, the confined modes are refused with the fix; full-access works."""

    def problem(self, **patches):
        with mock.patch.dict(sandbox._CONFINEMENT, clear=True), \
                mock.patch.multiple(sandbox, **(patches or {"PROBE_TIMEOUT": sandbox.PROBE_TIMEOUT})):
            return sandbox.confinement_problem()

    def test_no_bwrap(self):
        with tempfile.TemporaryDirectory() as tmp:
            with mock.patch.dict(sandbox._CONFINEMENT, clear=True), \
                    mock.patch.object(sandbox, "BWRAP", os.path.join(tmp, "bwrap")), \
                    mock.patch.object(sandbox.sys, "platform", "linux"):
                for mode in sandbox.CONFINED_MODES:
                    with self.assertRaises(SandboxError) as cm:
                        FilesystemSandbox(tmp, mode=mode)
                    self.assertIn("apt install bubblewrap", str(cm.exception))
                    self.assertEqual(len(str(cm.exception).splitlines()), 1)
                box = FilesystemSandbox(tmp, mode="full-access")
                self.assertEqual(box.execute("echo plain").stdout, "plain\n")

    def test_bwrap_that_cannot_make_namespaces(self):
        with tempfile.TemporaryDirectory() as tmp:
            fake = os.path.join(tmp, "bwrap")
            with open(fake, "w") as f:
                f.write("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
            os.chmod(fake, 0o755)
            with mock.patch.object(sandbox.sys, "platform", "linux"):
                said = self.problem(BWRAP=fake)
        self.assertIn("No permissions to creating new namespace", said)
        self.assertIn("kernel.unprivileged_userns_clone=1", said)

    def test_other_systems(self):
        with mock.patch.object(sandbox.sys, "platform", "sunos5"):
            self.assertIn("cannot be confined on sunos5", self.problem())
        with mock.patch.object(sandbox.sys, "platform", "darwin"):
            self.assertIn("Seatbelt", self.problem(SANDBOX_EXEC="/nonexistent/sandbox-exec"))

    def test_bad_arguments(self):
        with tempfile.TemporaryDirectory() as tmp:
            for kwargs in ({"mode": "danger"}, {"network": "yes"}, {"hide": "/root/.ssh"}, {"hide": ["relative"]},
                           {"read_only": [None]}):
                with self.subTest(kwargs=kwargs):
                    self.assertRaises(SandboxError, FilesystemSandbox, tmp, **kwargs)


class ConfinementTextTest(unittest.TestCase):
    """The bwrap argv and the Seatbelt profile as text (the Seatbelt path cannot run here: macOS only)."""

    def test_bwrap_argv(self):
        with tempfile.TemporaryDirectory() as tmp:
            home, work = os.path.join(tmp, "home"), os.path.join(tmp, "home", "proj")
            for d in (os.path.join(home, ".ssh"), work):
                os.makedirs(d)
            open(os.path.join(home, ".netrc"), "w").close()
            hide = sandbox.credential_paths(home) + [os.path.join(work, ".env")]
            open(hide[-1], "w").close()
            argv = sandbox.bwrap_argv(work, "workspace-write", ["sh", "-c", "true"], hide=hide)
            text = " ".join(argv)
            self.assertTrue(text.startswith("bwrap --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp "
                                            "--unshare-pid --die-with-parent --unshare-net "))
            # parents first: the hidden ~/.ssh and ~/.netrc, then the workspace, then the .env inside it
            self.assertLess(text.index(f"--tmpfs {home}/.ssh"), text.index(f"--bind {work} {work}"))
            self.assertIn(f"--remount-ro {home}/.ssh --chdir", text)  # sealed after the mounts beneath it
            self.assertLess(text.index(f"--bind {work} {work}"), text.index(f"--ro-bind /dev/null {work}/.env"))
            self.assertIn(f"--ro-bind /dev/null {home}/.netrc", text)
            self.assertNotIn(".aws", text)  # missing paths are not mounted
            self.assertTrue(text.endswith(f"--chdir {work} -- sh -c true"))
            argv = sandbox.bwrap_argv(work, "read-only", ["true"], network=True)
            self.assertNotIn("--unshare-net", argv)
            self.assertIn(f"--ro-bind {work} {work}", " ".join(argv))

    def test_seatbelt_profile(self):
        profile = sandbox.seatbelt_profile("/Users/me/proj", "workspace-write",
                                           hide=["/Users/me/.ssh", '/Users/me/we"ird\\name'],
                                           read_only=["/Users/me/skills"], temp_dirs=("/private/tmp",))
        lines = profile.splitlines()
        self.assertEqual(lines[:4], ["(version 1)", "(allow default)", "(deny file-write*)", "(allow file-write*"])
        self.assertEqual(profile.count("("), profile.count(")"))
        writes = profile[profile.index("(allow file-write*"):profile.index("(deny file-write*\n")]
        self.assertIn('(subpath "/Users/me/proj")', writes)
        self.assertIn('(subpath "/private/tmp")', writes)
        # later rules win: the read-only and hidden denials come after the allowance they narrow
        self.assertLess(profile.index('(allow file-write*'), profile.index('(deny file-write*\n    (subpath "/Users/me/skills"))'))
        hidden = profile[profile.index("(deny file-read* file-write*"):]
        self.assertIn('(subpath "/Users/me/.ssh")', hidden)
        self.assertIn('(subpath "/Users/me/we\\"ird\\\\name"))', hidden)
        self.assertEqual(lines[-1], "(deny network*)")
        read_only = sandbox.seatbelt_profile("/Users/me/proj", "read-only", network=True)
        self.assertNotIn("/Users/me/proj", read_only)
        self.assertNotIn("network", read_only)

    def test_macos_runs_the_command_under_sandbox_exec(self):
        with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(sandbox._CONFINEMENT, {"problem": None}), \
                mock.patch.object(sandbox.sys, "platform", "darwin"):
            box = FilesystemSandbox(tmp, mode="workspace-write", hide=["/Users/me/.ssh"])
            argv = box._command_argv("make test")
        self.assertEqual(argv[:2], [sandbox.SANDBOX_EXEC, "-p"])
        self.assertEqual(argv[3:], ["/bin/sh", "-c", "make test"])
        self.assertIn(f'(subpath "{os.path.realpath(tmp)}")', argv[2])
        self.assertIn('(subpath "/Users/me/.ssh")', argv[2])


# ---- the same behaviour in a Daytona sandbox (the real SDK against the loopback stand-in) ----

class DaytonaCase(SandboxCase):
    """make_sandbox gives a DaytonaSandbox whose workspace is root, in one stand-in sandbox
    per class (the stand-in's sandbox paths are host paths, so the helpers above still work)."""

    @classmethod
    def setUpClass(cls):
        try:
            import daytona
        except ImportError:
            raise unittest.SkipTest("the daytona SDK is not installed: pip install -e '.[cloud]'")
        from testsupport_daytona import FakeDaytona
        cls.fake = FakeDaytona()
        cls.addClassCleanup(cls.fake.close)
        client = daytona.Daytona(daytona.DaytonaConfig(api_key=cls.fake.api_key,
                                                       api_url=cls.fake.api_url, target="local"))
        cls.made = client.create(timeout=30)

    def make_sandbox(self, root, **kwargs):
        import daytona_sandbox
        os.makedirs(root, exist_ok=True)
        return daytona_sandbox.DaytonaSandbox(self.made, root, **kwargs)


class DaytonaExecuteTest(ExecuteBehaviour, DaytonaCase):
    pass


class DaytonaPathTest(PathBehaviour, DaytonaCase):
    pass


class DaytonaFileToolsTest(FileToolsBehaviour, DaytonaCase):
    pass


class DaytonaGrepTest(GrepBehaviour, DaytonaCase):
    def both(self, *args, **kwargs):
        return self.box.grep(*args, **kwargs)


if __name__ == "__main__":
    unittest.main()
