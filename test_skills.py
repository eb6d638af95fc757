"""Tests for skills.py: discovery order, name clashes, symlinks and the standard's validation rules."""

import os
import tempfile
import unittest

import skills
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)


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

    def test_checked_files_are_cached_in_the_home_until_they_change(self):
        folder = make(os.path.join(self.work, ".agents", "skills"), "pdf", fm("pdf", "first"))
        first = skills.discover(self.work, self.home)
        cache = os.path.join(self.home, skills.CACHE_FILE)
        self.assertEqual(os.stat(cache).st_mode & 0o777, 0o600)
        self.assertEqual(skills.discover(self.work, self.home), first)  # from the cache
        with open(cache) as f:
            self.assertIn('"first"', f.read())
        with open(os.path.join(folder, "SKILL.md"), "w") as f:  # changed: checked again
            f.write(fm("pdf", "second, and longer") + "body\n")
        usable, _ = skills.discover(self.work, self.home)
        self.assertEqual(usable[0].description, "second, and longer")
        with open(cache, "w") as f:  # a damaged cache is checked again, not trusted
            f.write("{not json")
        usable, _ = skills.discover(self.work, self.home)
        self.assertEqual(usable[0].description, "second, and longer")
        with open(os.path.join(folder, "SKILL.md"), "w") as f:
            f.write(fm("PDF", "now broken"))
        _, skipped = skills.discover(self.work, self.home)
        self.assertIn("lowercase", skipped[0].problems[0])

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


class Selection(unittest.TestCase):
    """skillRefs: by name among those found, or by path; a ref that does not resolve is one line."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.root = os.path.join(self.tmp.name, "skills")
        make(self.root, "pdf", fm("pdf"))
        make(self.root, "Bad", fm("Bad"))
        self.agent_dir = os.path.join(self.tmp.name, "agents")
        make(os.path.join(self.tmp.name, "shared"), "by-path", fm("by-path"))
        self.usable, self.skipped = [skills.check(os.path.join(self.root, "pdf"))], [
            skills.check(os.path.join(self.root, "Bad"))]

    def test_names_and_paths_sorted_by_name(self):
        for ref in ("../shared/by-path", "../shared/by-path/SKILL.md"):
            chosen = skills.select(self.usable, self.skipped, [(r, self.agent_dir) for r in ("pdf", ref, "pdf")])
            self.assertEqual([s.name for s in chosen], ["by-path", "pdf"])

    def test_a_ref_that_does_not_resolve(self):
        for ref, says in (("nowhere", "skill nowhere was not found"), ("Bad", "name must be lowercase"),
                          ("./missing", "there is no SKILL.md in")):
            with self.subTest(ref=ref):
                with self.assertRaises(skills.SkillError) as caught:
                    skills.select(self.usable, self.skipped, [(ref, self.agent_dir)])
                self.assertIn(says, str(caught.exception))
                self.assertNotIn("\n", str(caught.exception))


class Budget(unittest.TestCase):
    def offered(self, n, description):
        return [skills.Skill(f"s-{i}", description, f"/skills/s-{i}/SKILL.md") for i in range(n)]

    def test_within_the_budget_nothing_changes_but_lines_are_joined(self):
        kept, warnings = skills.fit(self.offered(3, "Does\n  things."), 10_000)
        self.assertEqual(([s.description for s in kept], warnings), (["Does things."] * 3, []))

    def test_descriptions_are_cut_to_one_length_first(self):
        chosen = self.offered(4, "x" * 300)
        whole = len(skills.catalogue(chosen))
        kept, (warning,) = skills.fit(chosen, whole - 400)
        self.assertEqual(len(kept), 4)
        self.assertLessEqual(len(skills.catalogue(kept)), whole - 400)
        self.assertGreater(len(skills.catalogue(kept)), whole - 400 - 8)  # the longest cut that fits
        self.assertEqual(len({len(s.description) for s in kept}), 1)
        self.assertTrue(kept[0].description.endswith("…"))
        self.assertIn("descriptions are cut to", warning)

    def test_then_skills_are_left_out_from_the_end(self):
        chosen = self.offered(10, "y" * 300)
        limit = len(skills.CATALOGUE_HEAD) + 3 * 100
        kept, (warning,) = skills.fit(chosen, limit)
        self.assertEqual([s.name for s in kept], [s.name for s in chosen[:len(kept)]])
        self.assertLess(len(kept), 10)
        self.assertLessEqual(len(skills.catalogue(kept)), limit)
        self.assertIn(f"{10 - len(kept)} skills left out (s-{len(kept)}, ", warning)

    def test_the_budget_follows_the_context_window(self):
        self.assertEqual(skills.budget("anthropic/claude-sonnet-4-5"), 16_000)  # 2% of 200k tokens, 4 chars each
        self.assertEqual(skills.budget("ollama/some-local-model"), skills.BUDGET_UNKNOWN)
        self.assertEqual(skills.budget("ollama/some-local-model", 50_000), 4_000)
        self.assertEqual(skills.catalogue([]), "")


class ShelfTest(unittest.TestCase):
    """The worker's side: reads routed into skill folders outside the workspace, writes refused, first reads."""

    def setUp(self):
        import sandbox
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.work = os.path.join(self.tmp.name, "work")
        os.makedirs(self.work)
        self.out = make(os.path.join(self.tmp.name, "skills"), "out", fm("out"))
        self.inside = make(os.path.join(self.work, ".agents", "skills"), "inside", fm("inside"))
        self.box = sandbox.FilesystemSandbox(self.work)
        offered = [skills.check(self.out), skills.check(self.inside)]
        self.shelf = skills.Shelf(offered, self.box)

    def test_routes_writes_and_first_reads(self):
        import sandbox
        view, rel = self.shelf.route(os.path.join(self.out, "SKILL.md"))
        self.assertIsNot(view, self.box)
        self.assertEqual(rel, os.path.join(self.out, "SKILL.md"))
        self.assertIn("Do the thing.", view.read(rel))
        self.assertEqual(self.shelf.route("../skills/out/SKILL.md")[1], rel)  # relative, beside the workspace
        self.assertIs(self.shelf.route(".agents/skills/inside/SKILL.md")[0], self.box)  # inside: the workspace's
        with self.assertRaises(sandbox.SandboxError):  # the view is confined to the skill's folder
            view.read(os.path.join(self.out, "..", "..", "work", ".agents", "skills", "inside", "SKILL.md"))
        with self.assertRaises(sandbox.SandboxError):
            self.shelf.check_write(os.path.join(self.out, "scripts", "new.sh"))
        self.shelf.check_write(".agents/skills/inside/SKILL.md")  # a project's own skill may be edited
        self.assertEqual(self.shelf.first_read(os.path.join(self.out, "SKILL.md")).name, "out")
        self.assertIsNone(self.shelf.first_read("../skills/out/SKILL.md"))  # once
        self.assertEqual(self.shelf.first_read(".agents/skills/inside/SKILL.md").name, "inside")
        self.assertIsNone(self.shelf.first_read(os.path.join(self.out, "other.md")))

    def test_a_symlink_in_the_workspace_to_an_outside_skill_and_a_workspace_inside_a_skill(self):
        import sandbox
        link = os.path.join(self.work, ".agents", "skills", "linked")
        os.symlink(self.out, link)
        shelf = skills.Shelf([skills.check(link)], self.box)
        view, rel = shelf.route(".agents/skills/linked/SKILL.md")  # the catalogue's path, through the link
        self.assertIn("Do the thing.", view.read(rel))
        with self.assertRaises(sandbox.SandboxError):
            shelf.check_write(".agents/skills/linked/SKILL.md")
        inner = os.path.join(self.out, "scripts")  # someone working on a skill, in its folder
        os.makedirs(inner)
        shelf = skills.Shelf([skills.check(self.out)], sandbox.FilesystemSandbox(inner))
        shelf.check_write("fix.sh")  # the workspace wins: writable
        self.assertEqual(shelf.route("fix.sh")[1], "fix.sh")
        with self.assertRaises(sandbox.SandboxError):
            shelf.check_write("../SKILL.md")

    def test_files_for_upload_stay_in_the_folder(self):
        secret = os.path.join(self.tmp.name, "id_key")
        with open(secret, "w") as f:
            f.write("private")
        os.symlink(secret, os.path.join(self.out, "key"))  # a file that leads out
        os.symlink("..", os.path.join(self.out, "up"))  # a folder that leads out
        os.makedirs(os.path.join(self.out, "sub"))
        os.symlink("..", os.path.join(self.out, "sub", "loop"))  # round and round
        self.assertEqual([p for p, _, _ in skills.files(self.out)], ["SKILL.md"])

    def test_a_view_keeps_the_sandboxs_hidden_paths(self):
        import sandbox
        if sandbox.confinement_problem():
            self.skipTest(sandbox.confinement_problem())
        secret = os.path.join(self.out, "token.txt")
        with open(secret, "w") as f:
            f.write("hidden")
        box = sandbox.FilesystemSandbox(self.work, mode="workspace-write", hide=[secret, self.tmp.name])
        view, rel = skills.Shelf([skills.check(self.out)], box).route(secret)
        with self.assertRaises(sandbox.SandboxError) as caught:
            view.read(rel)
        self.assertIn("hidden", str(caught.exception))
        self.assertIn("Do the thing.", view.read("SKILL.md"))


if __name__ == "__main__":
    unittest.main()
