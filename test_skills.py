"""Tests for skills.py: discovery order, name clashes, symlinks and the standard's validation rules."""

import os
import tempfile
import unittest

import skills


def make(root, folder, front, body="Do the thing.\n"):
    d = os.path.join(root, folder)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "SKILL.md"), "w") as f:
        f.write(front + body)
    return d


def fm(name, description="Helps with things."):
    return f"---\nname: {name}\ndescription: {description}\n---\n"


class Discovery(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        t = self.tmp.name
        self.repo = os.path.join(t, "repo")
        self.work = os.path.join(self.repo, "sub", "work")
        os.makedirs(os.path.join(self.repo, ".git"))
        os.makedirs(self.work)
        self.home = os.path.join(t, "home")
        self.user = os.path.join(t, "user")
        os.makedirs(self.user)
        old = os.environ.get("HOME")
        os.environ["HOME"] = self.user
        self.addCleanup(lambda: os.environ.__setitem__("HOME", old) if old else os.environ.pop("HOME"))

    def test_nearest_wins_and_all_roots_are_searched(self):
        make(os.path.join(self.work, ".agents", "skills"), "pdf", fm("pdf", "near"))
        make(os.path.join(self.repo, ".claude", "skills"), "pdf", fm("pdf", "far"))
        make(os.path.join(self.repo, ".claude", "skills"), "git-log", fm("git-log"))
        make(os.path.join(self.home, "skills"), "from-home", fm("from-home"))
        make(os.path.join(self.user, ".agents", "skills"), "from-user", fm("from-user"))
        make(os.path.join(self.user, ".claude", "skills"), "from-claude", fm("from-claude"))
        make(os.path.join(self.tmp.name, ".agents", "skills"), "above", fm("above"))
        usable, skipped = skills.discover(self.work, self.home)
        self.assertEqual([s.name for s in usable],
                         ["from-claude", "from-home", "from-user", "git-log", "pdf"])
        self.assertEqual({s.name: s.description for s in usable}["pdf"], "near")
        self.assertEqual(skipped, [])

    def test_symlinked_skill_folder_is_followed(self):
        real = make(self.tmp.name, "linked", fm("linked"))
        root = os.path.join(self.work, ".agents", "skills")
        os.makedirs(root)
        os.symlink(real, os.path.join(root, "linked"))
        usable, _ = skills.discover(self.work, self.home)
        self.assertEqual([s.name for s in usable], ["linked"])


class Validation(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def problems(self, folder, text):
        d = os.path.join(self.tmp.name, folder)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "SKILL.md"), "w") as f:
            f.write(text)
        return skills.check(d).problems

    def test_good_skill_with_optional_and_unknown_fields(self):
        text = ("---\nname: good-one\ndescription: Fine.\nlicense: MIT\ncompatibility: any\n"
                "metadata: {a: b}\nallowed-tools: read\nwhatever: 1\n---\nbody\n")
        self.assertEqual(self.problems("good-one", text), [])

    def test_each_rule(self):
        cases = [
            ("a", "no front matter\n", "front matter"),
            ("b", "---\nname: b\n", "not closed"),
            ("c", "---\n[unclosed\n---\n", "not valid YAML"),
            ("d", "---\n- a list\n---\n", "mapping"),
            ("e", "---\ndescription: x\n---\n", "missing required field: name"),
            ("f", "---\nname: f\n---\n", "missing required field: description"),
            ("Upper", fm("Upper"), "lowercase"),
            ("-lead", fm("-lead"), "hyphen"),
            ("trail-", fm("trail-"), "hyphen"),
            ("dou--ble", fm("dou--ble"), "hyphen"),
            ("x" * 65, fm("x" * 65), "64"),
            ("other", fm("not-other"), "folder's name"),
            ("long", fm("long", "d" * 1025), "1024"),
            ("meta", "---\nname: meta\ndescription: d\nmetadata: 3\n---\n", "metadata"),
        ]
        for folder, text, rule in cases:
            with self.subTest(folder=folder):
                got = self.problems(folder, text)
                self.assertEqual(len(got), 1, got)
                self.assertIn(rule, got[0])

    def test_bad_skill_is_skipped_not_dropped_silently(self):
        root = os.path.join(self.tmp.name, "w", ".agents", "skills")
        make(root, "ok", fm("ok"))
        make(root, "Bad", fm("Bad"))
        os.makedirs(os.path.join(self.tmp.name, "w", ".git"))
        usable, skipped = skills.discover(os.path.join(self.tmp.name, "w"), None)
        self.assertEqual([s.name for s in usable], ["ok"])
        self.assertEqual([os.path.basename(s.folder) for s in skipped], ["Bad"])
        self.assertTrue(skipped[0].path.endswith("Bad/SKILL.md"))


if __name__ == "__main__":
    unittest.main()


class Command(unittest.TestCase):
    """`python runner.py skills` as a user runs it."""

    def test_text_and_json(self):
        import json
        import testsupport
        with tempfile.TemporaryDirectory() as t:
            work = os.path.join(t, "w")
            os.makedirs(os.path.join(work, ".git"))
            root = os.path.join(work, ".agents", "skills")
            make(root, "pdf", fm("pdf", "Fill PDF forms."))
            make(root, "Bad", fm("Bad"))
            home = os.path.join(t, "home")
            os.makedirs(home, mode=0o700)
            env = {**os.environ, "HOME": t, "STIGMER_HOME": home}
            proc = testsupport.run_cli(["skills", "--workspace", work], env)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertIn("pdf", proc.stdout)
            self.assertIn("Fill PDF forms.", proc.stdout)
            self.assertIn("! skipped: name must be lowercase", proc.stdout)
            proc = testsupport.run_cli(["skills", "--json", "--workspace", work], env)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            rows = [json.loads(line) for line in proc.stdout.splitlines()]
            self.assertEqual([(r["name"], bool(r["problems"])) for r in rows], [("pdf", False), ("Bad", True)])
            self.assertTrue(rows[1]["path"].endswith(os.path.join("Bad", "SKILL.md")))
