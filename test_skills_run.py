"""Agent Skills in a run, through the CLI against the fake model: the catalogue in the system prompt, reading a
skill outside the workspace, its script run by path, writes refused, the `skill` event, skillRefs, --no-skills,
the budget, and a byte-identical request prefix."""

import json
import os
import shutil
import stat
import subprocess
import unittest

import skills
from test_runner import CliCase
from testsupport import text_step, tool_step
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

PDF_BODY = "# Filling PDF forms\n\nRun scripts/fill.sh with the form's name.\n"


def make_skill(root, name, description, body="Follow these steps.\n", script=None):
    """A skill folder ROOT/NAME; SCRIPT: the text of an executable scripts/fill.sh. Returns the folder."""
    folder = os.path.join(root, name)
    os.makedirs(os.path.join(folder, "scripts"), exist_ok=True)
    with open(os.path.join(folder, "SKILL.md"), "w") as f:
        f.write(f"---\nname: {name}\ndescription: {description}\n---\n{body}")
    if script is not None:
        path = os.path.join(folder, "scripts", "fill.sh")
        with open(path, "w") as f:
            f.write(script)
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return folder


class SkillRunTest(CliCase):
    """The workspace is a folder of a git repository whose root holds the skills, so they are outside it."""

    def setUp(self):
        super().setUp()
        self.repo = self.workspace
        os.makedirs(os.path.join(self.repo, ".git"))
        self.workspace = os.path.join(self.repo, "app")
        os.makedirs(self.workspace)
        self.env["SANDBOX_ROOT_DIR"] = self.workspace
        self.pdf = make_skill(os.path.join(self.repo, ".agents", "skills"), "pdf", "Fill in PDF forms.",
                              PDF_BODY, script="#!/bin/sh\necho \"filled $1 in $(basename \"$(pwd)\")\"\n")
        make_skill(os.path.join(self.workspace, ".agents", "skills"), "lint", "Near, lint the project.")
        make_skill(os.path.join(self.repo, ".claude", "skills"), "lint", "Far, lint something else.")
        make_skill(os.path.join(self.repo, ".claude", "skills"), "Bad-Name", "Breaks the naming rule.")

    def system(self, n=0):
        return self.fake.requests[n]["system"][0]["text"]

    def test_a_skill_outside_the_workspace_is_offered_read_run_and_kept_read_only(self):
        skill_md = os.path.join(self.pdf, "SKILL.md")
        self.fake.reset([
            tool_step(("read_file", {"path": skill_md}), ("ls", {"path": self.pdf})),
            tool_step(("execute", {"command": f"{self.pdf}/scripts/fill.sh form-a"}),
                      ("glob", {"pattern": "**/*.sh", "path": self.pdf}),
                      ("grep", {"pattern": "Filling", "path": self.pdf})),
            tool_step(("write_file", {"path": skill_md, "content": "gone"}),
                      ("edit_file", {"path": "../.agents/skills/pdf/SKILL.md", "old_string": "Filling",
                                     "new_string": "Emptying"}),
                      ("read_file", {"path": "../.agents/skills/pdf/SKILL.md"})),
            text_step("Filled the form."),
        ])
        proc, events = self.run_task("fill in form-a")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        bad = os.path.join(self.repo, ".claude", "skills", "Bad-Name", "SKILL.md")
        self.assertIn(f"stigmer: warning: skill {bad} is skipped: name must be lowercase", proc.stderr)

        system = self.system()
        self.assertIn(skills.CATALOGUE_HEAD, system)
        self.assertIn(f"\n- pdf: Fill in PDF forms. ({skill_md})", system)
        self.assertIn("\n- lint: Near, lint the project. (", system)  # the nearest of two with one name
        self.assertNotIn("Far,", system)
        self.assertNotIn("Bad-Name", system)
        self.assertLess(system.index("- lint:"), system.index("- pdf:"))  # sorted by name
        for request in self.fake.requests[1:]:  # the prefix stays byte-identical across requests
            self.assertEqual(request["system"], self.fake.requests[0]["system"])
            self.assertEqual(request["tools"], self.fake.requests[0]["tools"])

        results = {e["id"]: e for e in events if e["kind"] == "tool_result"}
        calls = [e for e in events if e["kind"] == "tool_call"]
        out = [results[c["id"]] for c in calls]
        self.assertIn("Filling PDF forms", out[0]["output"])
        self.assertFalse(out[0]["is_error"])
        self.assertEqual(out[1]["output"].split("\n"), ["SKILL.md", "scripts/"])
        self.assertEqual(out[2]["output"], "filled form-a in app")  # run by path, in the workspace
        self.assertEqual(out[3]["output"], os.path.join(self.pdf, "scripts", "fill.sh"))
        self.assertEqual(out[4]["output"], f"{skill_md}:5:# Filling PDF forms")
        for refused in out[5:7]:
            self.assertTrue(refused["is_error"])
            self.assertIn("is in the folder of skill pdf, which is read-only", refused["output"])
        with open(skill_md) as f:
            self.assertIn("Filling PDF forms", f.read())
        self.assertFalse(out[7]["is_error"])

        used = [e for e in events if e["kind"] == "skill"]  # one event, on the first read only
        self.assertEqual([(e["name"], e["path"]) for e in used], [("pdf", skill_md)])
        summary = json.loads(proc.stdout.splitlines()[-1])
        self.assertEqual(summary["skills_used"], ["pdf"])
        (row,) = [json.loads(line) for line in self.cli("list", "--json").stdout.splitlines()]
        self.assertEqual(row["skills_used"], ["pdf"])
        self.assertEqual([s["name"] for s in row["spec"]["skills"]], ["lint", "pdf"])
        text = self.cli("logs", row["id"])
        self.assertIn(f"◆ skill pdf ({skill_md})", text.stdout)

    def test_a_skill_under_the_hidden_runner_home_runs_confined(self):
        home_skill = make_skill(os.path.join(self.home, "skills"), "home-skill", "From the runner's home.",
                                script="#!/bin/sh\necho home skill ran\n")
        self.addCleanup(shutil.rmtree, os.path.dirname(home_skill))
        self.fake.reset([tool_step(("execute", {"command": f"{home_skill}/scripts/fill.sh; ls {self.home}"}),
                                   ("read_file", {"path": os.path.join(home_skill, "SKILL.md")})),
                         text_step("done")])
        proc, events = self.run_task("--sandbox-mode", "workspace-write", "go")
        if "cannot be confined" in proc.stderr:
            self.skipTest(proc.stderr.strip())
        self.assertEqual(proc.returncode, 0, proc.stderr)
        result, read = [e for e in events if e["kind"] == "tool_result"]
        self.assertIn("Follow these steps.", read["output"])  # the file tools read it too, the home hidden
        self.assertTrue(result["output"].startswith("home skill ran\n"), result["output"])
        self.assertNotIn("stigmer.db", result["output"])  # the rest of the home stays hidden

    def test_agent_skill_refs_choose_exactly_those_and_a_missing_one_stops_the_run(self):
        extra = make_skill(os.path.join(self.repo, "team-skills"), "extra", "By path from the agent file.")
        agents_dir = os.path.join(self.workspace, ".stigmer", "agents")
        os.makedirs(agents_dir)
        with open(os.path.join(agents_dir, "filler.yaml"), "w") as f:
            f.write("apiVersion: agentic.stigmer.ai/v1\nkind: Agent\nmetadata: {name: filler}\nspec:\n"
                    "  instructions: You fill in forms for the team.\n"
                    f"  skillRefs: [pdf, {os.path.relpath(extra, agents_dir)}]\n")
        with open(os.path.join(agents_dir, "lost.yaml"), "w") as f:
            f.write("apiVersion: agentic.stigmer.ai/v1\nkind: Agent\nmetadata: {name: lost}\nspec:\n"
                    "  instructions: You fill in forms for the team.\n  skillRefs: [pdf, nowhere]\n")
        self.fake.reset([text_step("ok")])
        proc = self.cli("--agent", "filler", "go")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("Bad-Name", proc.stderr)  # only the named skills matter
        system = self.system()
        self.assertIn("\n- extra: By path from the agent file. (", system)
        self.assertIn("\n- pdf: ", system)
        self.assertNotIn("- lint:", system)

        proc = self.cli("--agent", "lost", "go")
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stderr.count("\n"), 1, proc.stderr)
        self.assertIn("stigmer: skill nowhere was not found", proc.stderr)
        self.assertEqual(len(self.fake.requests), 1)  # no run reached the model

    def test_no_skills_and_an_empty_catalogue_leave_the_request_as_it_was(self):
        self.fake.reset([text_step("ok"), text_step("ok")])
        self.assertEqual(self.cli("--no-skills", "go").returncode, 0)
        bare = os.path.join(self.tmp, "bare")
        os.makedirs(bare)
        self.assertEqual(self.cli("--workspace", bare, "go").returncode, 0)
        with_flag, without = self.system(0), self.system(1)
        self.assertNotIn("Skills", with_flag)
        self.assertEqual(with_flag.replace(self.workspace, "WS"), without.replace(bare, "WS"))

    def test_over_the_budget_descriptions_are_cut_then_skills_left_out(self):
        for n in range(6):
            make_skill(os.path.join(self.workspace, ".agents", "skills"), f"long-{n}", "word " * 150)
        self.fake.reset([text_step("ok"), text_step("ok")])
        window = int((len(skills.CATALOGUE_HEAD) + 1200) / 0.08)  # a budget 1,200 characters past the heading
        proc = self.cli("go", env=dict(self.env, STIGMER_CONTEXT_WINDOW=str(window)))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("descriptions are cut to", proc.stderr)
        self.assertNotIn("left out", proc.stderr)
        catalogue = self.system(0)[self.system(0).index(skills.CATALOGUE_HEAD):]
        self.assertLessEqual(len(catalogue), int(window * 0.08))
        self.assertEqual(catalogue.count("\n- "), 8)
        self.assertIn("…", catalogue)

        window = int((len(skills.CATALOGUE_HEAD) + 500) / 0.08)
        proc = self.cli("go", env=dict(self.env, STIGMER_CONTEXT_WINDOW=str(window)))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("left out (", proc.stderr)
        catalogue = self.system(1)[self.system(1).index(skills.CATALOGUE_HEAD):]
        self.assertLessEqual(len(catalogue), int(window * 0.08))
        self.assertLess(catalogue.count("\n- "), 8)
        self.assertIn("- lint:", catalogue)  # left out from the end of the sorted list
        self.assertNotIn("- pdf:", catalogue)

    def test_the_example_agent_uses_the_example_skill(self):
        here = os.path.dirname(os.path.abspath(__file__))
        skill = os.path.join(here, "examples", "skills", "changelog")
        work = os.path.join(self.tmp, "project")
        os.makedirs(work)
        git = ["git", "-c", "user.email=dev@example.com", "-c", "user.name=Dev"]
        for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "First release"], ["tag", "v1"],
                     ["commit", "-q", "--allow-empty", "-m", "Add the export button"]):
            subprocess.run(git + args, cwd=work, check=True, capture_output=True)
        self.fake.reset([
            tool_step(("read_file", {"path": os.path.join(skill, "SKILL.md")})),
            tool_step(("execute", {"command": os.path.join(skill, "scripts", "commits.sh")})),
            text_step("## Unreleased\n\n### Added\n- An export button"),
        ])
        proc, events = self.run_task("--agent", os.path.join(here, "examples", "agents", "release-notes.yaml"),
                                     "--workspace", work, "write the entry for the next release")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(f"\n- changelog: Writes a CHANGELOG.md entry for the changes since the last release tag, "
                      f"from the git history. Use it when", self.system())
        self.assertNotIn("- pdf:", self.system())  # the agent names its skills: only those
        results = [e["output"] for e in events if e["kind"] == "tool_result"]
        self.assertIn("Run `scripts/commits.sh` from this folder", results[0])
        self.assertRegex(results[1], r"^- Add the export button \([0-9a-f]{7,}\)$")  # since the tag only
        self.assertEqual([e["name"] for e in events if e["kind"] == "skill"], ["changelog"])


if __name__ == "__main__":
    unittest.main()
