"""Tests for agents as Stigmer defines them (agents.py): agent files and their validation, the lookup order,
AGENTS.md, the system prompt, the variables an agent declares, and `--agent` end to end through the CLI
with a real daemon, worker and the anthropic SDK against the fake model.

    python -m unittest test_agents -v
"""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import unittest

from unittest import mock

import agent
import agents
import stigmer_pb2 as pb
import worker
from test_cli import Pty
from test_cloud import CloudCase
from test_runner import CliCase
from test_worker import drain
from testsupport import (FAKE_KEY, HERE, FakeAnthropic, assert_one_line, files_containing, run_cli, text_step,
                         tool_step, wait_for)
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

EXAMPLE = os.path.join(HERE, "examples", "agents", "code-reviewer.yaml")

# Stigmer's own example, examples/agents/support-bot.yaml in stigmer/stigmer, byte for byte.
SUPPORT_BOT = """apiVersion: agentic.stigmer.ai/v1
kind: Agent
metadata:
  name: support-bot
  labels:
    team: customer-success
    environment: production
spec:
  instructions: |
    You are a helpful customer support agent for a SaaS company.
    
    Your responsibilities:
    - Answer customer questions politely and accurately
    - Check GitHub issues for known problems
    - Escalate complex issues to human support
    - Provide links to documentation when relevant
    
    Be concise but friendly. Always verify information before responding.
  
  mcpServers:
    - github      # Access GitHub repositories and issues
    - filesystem  # Read documentation files
    - slack       # Post to support channel if needed
  
  config:
    model: claude-3-5-sonnet-20241022
    temperature: "0.7"
    max_tokens: "2000"
"""

HEAD = "apiVersion: agentic.stigmer.ai/v1\nkind: Agent\nmetadata:\n  name: {name}\nspec:\n"


def agent_text(name="helper", spec="  instructions: You help with whatever the task is.\n"):
    return HEAD.format(name=name) + spec


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


class TempDir(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="stigmer-agents-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)


# Every problem an agent file can have: (file text, what the one line says, the line it names).
BAD_FILES = [
    ("apiVersion: [unclosed\n", "not valid YAML", 2),
    ("", "the file is empty", 0),
    ("- just\n- a list\n", "must be a mapping", 1),
    ("apiVersion: agentic.stigmer.ai/v2\nkind: Agent\nmetadata: {name: a}\nspec: {instructions: long enough text}\n",
     "apiVersion must be agentic.stigmer.ai/v1", 1),
    ("apiVersion: agentic.stigmer.ai/v1\nkind: Workflow\nmetadata: {name: a}\nspec: {instructions: long enough text}\n",
     "kind must be Agent", 2),
    (agent_text(spec="  instructions: You help with whatever the task is.\n  mcpServer: [github]\n"),
     "spec.mcpServer: unknown field: did you mean mcpServers?", 7),
    (agent_text(spec="  instructions: You help with whatever the task is.\n  colour: blue\n"),
     "spec.colour: unknown field: the fields are description", 7),
    (agent_text(spec="  instructions: [a, b]\n"), "spec.instructions must be text, not a list", 6),
    (agent_text(spec="  instructions: You help with whatever the task is.\n  mcpServers: github\n"),
     "spec.mcpServers must be a list", 7),
    (agent_text(spec="  instructions: You help with whatever the task is.\n  envSpec:\n    data:\n      N: {value: 5}\n"),
     "spec.envSpec.data.N.value must be text, not a number (quote it", 9),
    (agent_text(name="Code_Reviewer"), "metadata.name 'Code_Reviewer' breaks Stigmer's rule", 4),
    (agent_text(name="a" * 64), "at most 63 characters", 4),
    (agent_text(name="-x"), "breaks Stigmer's rule", 4),
    (agent_text(spec="  instructions: too short\n"), "spec.instructions must be at least 10 characters (got 9)", 6),
    (agent_text(spec="  instructions: " + "x" * 10_001 + "\n"), "at most 10,000 characters (got 10,001)", 6),
    (agent_text(spec="  description: no instructions\n"), "spec: missing instructions", 5),
    (HEAD.format(name="a").replace("metadata:\n  name: a\n", "metadata: {}\n") + "  instructions: long enough text\n",
     "metadata: missing name", 3),
    (agent_text(spec="  instructions: You help with whatever the task is.\n  envSpec:\n    data:\n"
                     "      TOKEN: {isSecret: true, value: abc123}\n"), "a secret's value does not belong", 9),
    (agent_text(spec="  instructions: You help with whatever the task is.\n  mcpServers:\n"
                     "    - name: gh\n      stdio: {command: x}\n      http: {url: 'http://h'}\n"),
     "give one of stdio, http and docker, not stdio and http", 8),
    (agent_text(spec="  instructions: You help with whatever the task is.\n  subAgents:\n"
                     "    - name: s\n      instructions: does one small thing\n      mcpServers: [github]\n"),
     "github is not one of spec.mcpServers", 10),
    (agent_text(spec="  instructions: You help with whatever the task is.\n  config: {temperature: hot}\n"),
     "spec.config.temperature must be a number", 7),
    (agent_text(spec="  instructions: You help with whatever the task is.\n  config: {network: 'yes'}\n"),
     "spec.config.network must be true or false", 7),
]


class AgentFileTest(TempDir):
    def load(self, text):
        return agents.load(write(os.path.join(self.tmp, "agent.yaml"), text))

    def test_stigmers_own_example_reads_unchanged(self):
        spec = self.load(SUPPORT_BOT)
        self.assertEqual(spec.name, "support-bot")
        self.assertEqual(dict(spec.labels), {"team": "customer-success", "environment": "production"})
        self.assertTrue(spec.instructions.startswith("You are a helpful customer support agent"))
        self.assertEqual([(s.name, s.WhichOneof("server_type")) for s in spec.mcp_servers],
                         [("github", None), ("filesystem", None), ("slack", None)])  # names of servers defined elsewhere
        self.assertEqual((spec.config.model, spec.config.temperature, spec.config.max_tokens),
                         ("claude-3-5-sonnet-20241022", 0.7, 2000))
        self.assertEqual(agents.unsupported(spec), [])
        self.assertFalse(spec.config.network)  # commands get the network only when a file says so

    def test_config_network_lets_commands_use_the_network(self):
        spec = self.load(agent_text(spec="  instructions: You help with whatever the task is.\n"
                                         "  config: {model: openai/gpt-4.1, network: true}\n"))
        self.assertEqual((spec.config.model, spec.config.network), ("openai/gpt-4.1", True))

    def test_inline_definitions_skill_refs_and_sub_agents_are_carried(self):
        spec = self.load(agent_text(spec="""  instructions: You help with whatever the task is.
  mcp_servers:                      # the proto's spelling is accepted too
    - github
    - name: files
      stdio: {command: python, args: [-m, files_server], envPlaceholders: {ROOT: "${DOCS_ROOT}"}, workingDir: /tmp}
      enabledTools: [read, list]
    - name: search
      http: {url: "https://mcp.example.com/search", headers: {Authorization: "Bearer ${SEARCH_TOKEN}"},
             timeoutSeconds: 10}
    - name: box
      docker: {image: "ghcr.io/org/mcp:1", volumes: [{hostPath: /a, containerPath: /b, readOnly: true}],
               ports: [{hostPort: 8080, containerPort: 80}]}
  skillRefs: [code-review, {slug: testing, version: stable, scope: platform, kind: skill}]
  subAgents:
    - name: researcher
      description: finds things
      instructions: Look things up and report them briefly.
      mcpServers: [search]
      mcpToolSelections: {search: {enabledTools: [query]}}
      skillRefs: [notes]
"""))
        servers = {s.name: s for s in spec.mcp_servers}
        self.assertEqual(list(servers), ["github", "files", "search", "box"])
        self.assertEqual(servers["files"].WhichOneof("server_type"), "stdio")
        self.assertEqual(list(servers["files"].stdio.args), ["-m", "files_server"])
        self.assertEqual(dict(servers["files"].stdio.env_placeholders), {"ROOT": "${DOCS_ROOT}"})
        self.assertEqual(list(servers["files"].enabled_tools), ["read", "list"])
        self.assertEqual(servers["search"].http.timeout_seconds, 10)
        self.assertEqual(servers["box"].docker.volumes[0].read_only, True)
        self.assertEqual(servers["box"].docker.ports[0].container_port, 80)
        self.assertEqual([(r.slug, r.version, r.kind) for r in spec.skill_refs],
                         [("code-review", "", ""), ("testing", "stable", "skill")])
        (sub,) = spec.sub_agents
        self.assertEqual((sub.name, list(sub.mcp_servers), list(sub.mcp_tool_selections["search"].enabled_tools),
                          [r.slug for r in sub.skill_refs]), ("researcher", ["search"], ["query"], ["notes"]))
        self.assertEqual(agents.unsupported(spec), [])  # sub-agents, skills and MCP servers run
        again = pb.ExecutionSpec.FromString(pb.ExecutionSpec(agent=spec).SerializeToString()).agent
        self.assertEqual(again, spec)  # everything travels in the execution

    def test_every_problem_is_one_line_naming_the_file_and_line(self):
        for text, needle, line in BAD_FILES:
            with self.subTest(needle=needle):
                with self.assertRaises(agents.AgentError) as caught:
                    self.load(text)
                message = str(caught.exception)
                self.assertIn(needle, message)
                self.assertEqual(len(message.splitlines()), 1, message)
                where = agents.display(os.path.join(self.tmp, "agent.yaml"))
                self.assertTrue(message.startswith(f"{where}:{line}: " if line else f"{where}: "), message)

    def test_the_example_agent_is_valid_and_runnable(self):
        spec = agents.load(EXAMPLE)
        self.assertEqual(spec.name, "code-reviewer")
        self.assertEqual(agents.unsupported(spec), [])
        data = spec.env_spec.data
        self.assertEqual((data["GITHUB_TOKEN"].is_secret, data["GITHUB_TOKEN"].value), (True, ""))
        self.assertEqual((data["REVIEW_STYLE"].is_secret, data["REVIEW_STYLE"].value), (False, "concise"))


class LookupTest(TempDir):
    """A name: .stigmer/agents/NAME.yaml from the workspace up to the git root, nearest first, then STIGMER_HOME."""

    def setUp(self):
        super().setUp()
        self.outside = os.path.join(self.tmp, "outside")
        self.root = os.path.join(self.outside, "repo")
        self.workspace = os.path.join(self.root, "pkg", "app")
        self.home = os.path.join(self.tmp, "home")
        os.makedirs(os.path.join(self.root, ".git"))
        os.makedirs(self.workspace)

    def place(self, folder, name, description):
        text = agent_text(name, f"  description: {description}\n  instructions: You help with whatever the task is.\n")
        return write(os.path.join(folder, name + ".yaml"), text)

    def resolve(self, name):
        return agents.resolve(name, self.workspace, self.home)

    def error_of(self, name):
        with self.assertRaises(agents.AgentError) as caught:
            self.resolve(name)
        return str(caught.exception)

    def test_nearest_first_up_to_the_git_root_then_stigmer_home(self):
        home_file = self.place(os.path.join(self.home, "agents"), "helper", "from home")
        self.place(os.path.join(self.outside, ".stigmer", "agents"), "helper", "above the git root")
        self.assertEqual(self.resolve("helper").source, home_file)  # above the root is not looked at
        root_file = self.place(os.path.join(self.root, ".stigmer", "agents"), "helper", "at the root")
        self.assertEqual(self.resolve("helper").source, root_file)
        mid_file = self.place(os.path.join(self.root, "pkg", ".stigmer", "agents"), "helper", "in pkg")
        self.assertEqual(self.resolve("helper").description, "in pkg")
        near_file = self.place(os.path.join(self.workspace, ".stigmer", "agents"), "helper", "in the workspace")
        self.assertEqual(self.resolve("helper").source, near_file)
        listed = agents.discover(self.workspace, self.home)
        self.assertEqual([item["file"] for item in listed], [near_file, mid_file, root_file, home_file])
        self.assertEqual([item["shadowed_by"] for item in listed], [None, near_file, near_file, near_file])

    def test_a_path_is_read_as_it_is_and_a_missing_name_says_where_it_looked(self):
        path = self.place(self.tmp, "elsewhere", "by path")
        self.assertEqual(self.resolve(path).description, "by path")
        with self.assertRaises(agents.AgentError) as caught:
            self.resolve("nobody")
        message = str(caught.exception)
        self.assertIn("no agent named nobody", message)
        self.assertNotIn("did you mean", message)
        self.place(os.path.join(self.home, "agents"), "code-reviewer", "a reviewer")
        self.assertIn("no agent named code-reviewr: did you mean code-reviewer?", self.error_of("code-reviewr"))
        for folder in agents.search_dirs(self.workspace, self.home):
            self.assertIn(agents.display(folder), message)
        with self.assertRaises(agents.AgentError) as caught:
            self.resolve(os.path.join(self.tmp, "missing.yaml"))
        self.assertIn("does not exist", str(caught.exception))
        with self.assertRaises(agents.AgentError) as caught:
            self.resolve("Not A Name")
        self.assertIn("is not an agent name", str(caught.exception))

    def test_a_file_found_by_name_must_carry_that_name(self):
        write(os.path.join(self.workspace, ".stigmer", "agents", "helper.yaml"), agent_text("other"))
        with self.assertRaises(agents.AgentError) as caught:
            self.resolve("helper")
        self.assertIn("metadata.name is other but the file is named helper", str(caught.exception))
        (item,) = agents.discover(self.workspace, self.home)
        self.assertEqual(len(item["problems"]), 1)

    def test_a_parsed_agent_is_kept_until_its_file_changes(self):
        path = self.place(os.path.join(self.workspace, ".stigmer", "agents"), "helper", "first")
        self.assertEqual(self.resolve("helper").description, "first")
        (entry,) = os.listdir(os.path.join(self.home, agents.CACHE_DIR))
        entry = os.path.join(self.home, agents.CACHE_DIR, entry)
        self.assertEqual(os.stat(entry).st_mode & 0o777, 0o600)
        with open(entry, "rb") as f:
            stamp, _, body = f.read().partition(b"\n")
        with open(entry, "wb") as f:  # the same stamp, another spec: what a kept entry gives back
            f.write(stamp + b"\n" + pb.AgentSpec(name="helper", description="from the cache").SerializeToString())
        self.assertEqual(self.resolve("helper").description, "from the cache")
        self.place(os.path.join(self.workspace, ".stigmer", "agents"), "helper", "second, changed")
        self.assertEqual(self.resolve("helper").description, "second, changed")  # a changed file is read again
        with open(entry, "rb") as f:
            stamp = f.read().partition(b"\n")[0]
        with open(entry, "wb") as f:
            f.write(stamp + b"\n\xff\xff")  # the right stamp, a damaged spec: the file is read again
        self.assertEqual(self.resolve("helper").description, "second, changed")
        write(path, agent_text("helper", "  instructions: short\n"))  # a problem is found whatever the cache holds
        with self.assertRaises(agents.AgentError):
            self.resolve("helper")

    def test_outside_git_only_the_workspace_itself(self):
        plain = os.path.join(self.tmp, "plain", "ws")
        os.makedirs(plain)
        self.place(os.path.join(self.tmp, "plain", ".stigmer", "agents"), "helper", "above, no git")
        self.assertEqual(agents.search_dirs(plain, self.home),
                         [os.path.join(plain, ".stigmer", "agents"), os.path.join(self.home, "agents")])
        with self.assertRaises(agents.AgentError):
            agents.resolve("helper", plain, self.home)


class ProjectDocsTest(TempDir):
    """AGENTS.md from the git root down to the workspace (CLAUDE.md where a directory has none), the user's first."""

    def setUp(self):
        super().setUp()
        self.root = os.path.join(self.tmp, "repo")
        self.workspace = os.path.join(self.root, "a", "b")
        self.home = os.path.join(self.tmp, "home")
        os.makedirs(os.path.join(self.root, ".git"))
        os.makedirs(self.workspace)
        os.makedirs(self.home)

    def test_order_root_first_nearest_last_claude_md_as_fallback(self):
        write(os.path.join(self.home, "AGENTS.md"), "user: always answer in English\n")
        write(os.path.join(self.root, "AGENTS.md"), "root: run make test\n")
        write(os.path.join(self.root, "CLAUDE.md"), "root claude: not read, AGENTS.md is there\n")
        write(os.path.join(self.root, "a", "CLAUDE.md"), "a: claude only\n")
        write(os.path.join(self.workspace, "AGENTS.md"), "b: the nearest\n")
        write(os.path.join(self.tmp, "AGENTS.md"), "above the git root: not read\n")
        docs, warnings = agents.project_docs(self.workspace, self.home)
        self.assertEqual([d.path for d in docs], [os.path.join(self.home, "AGENTS.md"),
                                                  os.path.join(self.root, "AGENTS.md"),
                                                  os.path.join(self.root, "a", "CLAUDE.md"),
                                                  os.path.join(self.workspace, "AGENTS.md")])
        self.assertEqual([d.text for d in docs], ["user: always answer in English", "root: run make test",
                                                  "a: claude only", "b: the nearest"])
        self.assertEqual(warnings, [])
        prompt = agent.system_prompt(self.workspace, project_docs=docs)
        positions = [prompt.index(d.text) for d in docs]
        self.assertEqual(positions, sorted(positions))
        self.assertLess(prompt.index("How to work well"), positions[0])

    def test_the_cap_keeps_the_nearest_and_names_what_it_cut(self):
        line = "x" * 99 + "\n"
        write(os.path.join(self.home, "AGENTS.md"), "user\n" + line * 10)  # ~1 KB: left out
        write(os.path.join(self.root, "AGENTS.md"), "root\n" + line * 100)  # 10 KB: cut
        write(os.path.join(self.workspace, "AGENTS.md"), "near\n" + line * 250)  # 25 KB: whole
        docs, warnings = agents.project_docs(self.workspace, self.home)
        self.assertEqual([os.path.basename(os.path.dirname(d.path)) for d in docs], ["repo", "b"])
        self.assertEqual(sum(len(d.text.encode()) for d in docs) <= agents.PROJECT_DOC_CAP, True)
        self.assertEqual([d.truncated for d in docs], [True, False])
        self.assertTrue(docs[0].text.startswith("root\n") and docs[0].text.endswith("x"))  # cut at a line's end
        self.assertEqual(len(warnings), 2)
        self.assertIn(agents.display(os.path.join(self.root, "AGENTS.md")) + " was cut", warnings[0])
        self.assertIn(agents.display(os.path.join(self.home, "AGENTS.md")), warnings[1])
        self.assertIn("left out", warnings[1])

    def test_outside_git_the_workspace_alone(self):
        plain = os.path.join(self.tmp, "plain")
        os.makedirs(plain)
        write(os.path.join(self.tmp, "AGENTS.md"), "above: not read\n")
        write(os.path.join(plain, "AGENTS.md"), "here\n")
        docs, _ = agents.project_docs(plain, self.home)
        self.assertEqual([d.text for d in docs], ["here"])


class SystemPromptTest(unittest.TestCase):
    def test_instructions_take_the_place_of_the_default_role_and_the_runners_part_stays(self):
        default = agent.system_prompt("/w")
        mine = agent.system_prompt("/w", "You are a careful code reviewer who never edits files.")
        self.assertTrue(default.startswith(agent.DEFAULT_ROLE))
        self.assertTrue(mine.startswith("You are a careful code reviewer who never edits files.\n"))
        self.assertNotIn(agent.DEFAULT_ROLE, mine)
        runners_part = default[len(agent.DEFAULT_ROLE):]
        self.assertIn(runners_part.strip(), mine)  # workspace, OS, date and the tool rules, unchanged
        self.assertEqual(mine, agent.system_prompt("/w", "You are a careful code reviewer who never edits files."))


class EnvironmentTest(unittest.TestCase):
    def spec(self):
        return agents.load(EXAMPLE)

    def test_values_come_from_env_flags_then_the_environment_then_the_file(self):
        spec = self.spec()
        secrets, unset = agents.fill_environment(spec, {}, {})
        self.assertEqual((secrets, unset, spec.env_spec.data["REVIEW_STYLE"].value), (["GITHUB_TOKEN"], [], "concise"))
        spec = self.spec()
        agents.fill_environment(spec, {"REVIEW_STYLE": "thorough", "GITHUB_TOKEN": "ghp_x"}, {})
        self.assertEqual(spec.env_spec.data["REVIEW_STYLE"].value, "thorough")
        self.assertEqual(spec.env_spec.data["GITHUB_TOKEN"].value, "")  # a secret's value never enters the spec
        spec = self.spec()
        agents.fill_environment(spec, {"REVIEW_STYLE": "thorough"}, {"REVIEW_STYLE": "terse", "EXTRA": "1"})
        self.assertEqual((spec.env_spec.data["REVIEW_STYLE"].value, spec.env_spec.data["EXTRA"].value), ("terse", "1"))
        with self.assertRaises(agents.AgentError) as caught:
            agents.fill_environment(self.spec(), {}, {"GITHUB_TOKEN": "ghp_x"})
        self.assertIn("sets a secret", str(caught.exception))

    def test_env_flags_refuse_what_looks_secret(self):
        import secrets as project_secrets  # the project's module, which shadows the standard library's here
        self.assertEqual(agents.parse_env_args(["A=1", "B=x=y"], project_secrets.looks_secret), {"A": "1", "B": "x=y"})
        for bad in ("A", "1A=x", "API_TOKEN=abc"):
            with self.subTest(bad=bad), self.assertRaises(agents.AgentError):
                agents.parse_env_args([bad], project_secrets.looks_secret)


def agent_home_env(case):
    """The case's environment without a model key: a prompt for one would be an error, not a hang."""
    env = {k: v for k, v in case.env.items() if k != "ANTHROPIC_API_KEY"}
    return env


class CliValidationTest(CliCase):
    """Each problem stops `run --agent` with one line and exit 2, before any key prompt or model call."""
    share_home = False  # it checks that nothing was stored in the home

    def test_every_problem_is_one_line_exit_2_before_any_prompt(self):
        env = agent_home_env(self)  # no key and no terminal: a key prompt would fail with another message
        for n, (text, needle, _) in enumerate(BAD_FILES[:8] + BAD_FILES[10:16]):
            path = write(os.path.join(self.workspace, f"bad{n}.yaml"), text)
            with self.subTest(needle=needle):
                proc = self.cli("--agent", path, "do it", env=env)
                assert_one_line(self, proc, 2, needle, f"bad{n}.yaml")
        for args, needle in ((["--agent", "nobody"], "no agent named nobody"),
                             (["--agent", "./missing.yaml"], "does not exist"),
                             (["--agent", "Bad Name"], "is not an agent name"),
                             (["--agent", EXAMPLE, "--env", "API_TOKEN=x"], "looks like a secret")):
            with self.subTest(needle=needle):
                assert_one_line(self, self.cli(*args, "do it", env=env), 2, needle)
        self.assertEqual(self.fake.requests, [])
        self.assertFalse(os.path.exists(os.path.join(self.home, "stigmer.db")))  # nothing was submitted

    def test_servers_defined_nowhere_are_refused_by_name(self):
        path = write(os.path.join(self.workspace, "support-bot.yaml"), SUPPORT_BOT)
        proc = self.cli("--agent", path, "help a customer", env=agent_home_env(self))
        assert_one_line(self, proc, 2, "names the MCP server github, which is not defined in", "mcp.json",
                        "--mcp-config")
        self.assertEqual(self.fake.requests, [])

    def test_stigmer_agent_names_the_agent_too(self):
        env = dict(agent_home_env(self), STIGMER_AGENT="nobody")
        assert_one_line(self, self.cli("do it", env=env), 2, "no agent named nobody")


class AgentRunTest(CliCase):
    """The example code reviewer, end to end against the fake model."""
    fresh = True  # it looks at what a first run leaves in STIGMER_HOME

    GITHUB = "ghp_fakeGithubTokenForTheReviewer123"
    script = [tool_step(("execute", {"command": "echo style=$REVIEW_STYLE gh=$GITHUB_TOKEN; sleep 0.5"})),
              text_step("Reviewed: no findings.")]

    def setUp(self):
        super().setUp()
        os.makedirs(os.path.join(self.workspace, ".git"))
        write(os.path.join(self.workspace, "AGENTS.md"), "Project rule: run the tests with make check.\n")
        shutil.copy(EXAMPLE, write(os.path.join(self.workspace, ".stigmer", "agents", "code-reviewer.yaml"), ""))

    def test_the_example_runs_and_travels_with_its_execution(self):
        env = dict(self.env, GITHUB_TOKEN=self.GITHUB)
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "--json", "--agent", "code-reviewer",
                                 "review the last commit"], env=env, cwd=self.workspace, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        argv_hits = []
        while proc.poll() is None:  # while it runs, no process carries the secret in its argv
            for entry in os.listdir("/proc"):
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if self.GITHUB.encode() in f.read():
                            argv_hits.append(entry)
                except OSError:
                    continue
            time.sleep(0.05)
        out, err = proc.communicate()
        self.assertEqual(proc.returncode, 0, err)
        self.assertEqual(argv_hits, [])
        lines = [json.loads(line) for line in out.splitlines()]
        run, events, summary = lines[0], lines[1:-1], lines[-1]
        self.assertEqual((run["agent"], summary["agent"]), ("code-reviewer", "code-reviewer"))
        system = self.fake.requests[0]["system"][0]["text"]
        self.assertTrue(system.startswith("You are a careful code reviewer."))  # in place of the default role
        self.assertNotIn(agent.DEFAULT_ROLE, system)
        self.assertIn("Project rule: run the tests with make check.", system)
        self.assertIn("How to work well", system)
        self.assertEqual(events[0]["agent"], "code-reviewer")  # the first event (PENDING) names it
        (prompt,) = [e for e in events if e["kind"] == "prompt"]
        self.assertEqual(prompt["project_docs"], [os.path.join(self.workspace, "AGENTS.md")])
        (result,) = [e for e in events if e["kind"] == "tool_result"]
        self.assertIn("style=concise gh=[REDACTED:GITHUB_TOKEN]", result["output"])
        listed = self.cli("list", "--json")
        (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
        self.assertEqual(row["spec"]["agent"]["name"], "code-reviewer")
        self.assertEqual(row["spec"]["agent"]["env_spec"]["data"]["GITHUB_TOKEN"],
                         {"value": "", "is_secret": True, "description": agents.load(EXAMPLE).env_spec.data[
                             "GITHUB_TOKEN"].description})
        self.assertIn("GITHUB_TOKEN", row["spec"]["secret_names"])
        self.assertIn("code-reviewer", self.cli("list").stdout)
        self.assertIn(self.GITHUB, env.values())
        for where in (out + err, json.dumps(self.fake.requests)):
            self.assertNotIn(self.GITHUB, where)
        self.assertEqual(files_containing(self.GITHUB, self.home, self.workspace), [])
        with sqlite3.connect(os.path.join(self.home, "stigmer.db")) as db:  # the database, row by row
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                for row in db.execute(f"SELECT * FROM {table}"):
                    self.assertNotIn(self.GITHUB.encode(), repr(row).encode())

    def test_no_terminal_names_every_missing_variable(self):
        write(os.path.join(self.workspace, ".stigmer", "agents", "needs.yaml"), agent_text("needs", """  instructions: You help with whatever the task is.
  envSpec:
    data:
      GITHUB_TOKEN: {isSecret: true, description: a token for the API}
      DEPLOY_KEY: {isSecret: true}
      REGION: {description: where to deploy}
"""))
        proc = self.cli("--agent", "needs", "go")
        assert_one_line(self, proc, 2, "the agent needs needs", "DEPLOY_KEY", "GITHUB_TOKEN (a token for the API)",
                        "REGION (where to deploy)", "no terminal", "export DEPLOY_KEY=... GITHUB_TOKEN=...",
                        "--env REGION=...")
        self.assertEqual(self.fake.requests, [])

    def test_a_declared_secret_is_asked_for_on_a_terminal_with_its_description(self):
        term = Pty(["--agent", "code-reviewer", "review it"], self.env, self.workspace)
        self.addCleanup(term.kill)
        wait_for(lambda: "(GITHUB_TOKEN): " in term.screen, what="the prompt for GITHUB_TOKEN")
        self.assertIn("GitHub token that can read the repository's pull requests, input hidden (GITHUB_TOKEN): ", term.screen)
        term.type(self.GITHUB + "\n")
        self.assertEqual(term.wait(), 0, term.screen)
        self.assertNotIn(self.GITHUB, term.screen)  # not echoed, and redacted from the output
        self.assertIn("gh=[REDACTED:GITHUB_TOKEN]", json.dumps(self.fake.requests))
        self.assertEqual(files_containing(self.GITHUB, self.home, self.workspace), [])


class ResumeTest(CliCase):
    """resume and -c keep the parent's agent, its settings and its system prompt, byte for byte."""
    share_home = False  # it lists the home's executions

    GITHUB = "ghp_fakeTokenForTheResumedReviewer1"
    script = [tool_step(("execute", {"command": "echo style=$REVIEW_STYLE"})), text_step("First review."),
              tool_step(("execute", {"command": "echo style=$REVIEW_STYLE gh=$GITHUB_TOKEN"})),
              text_step("Second review.")]

    def test_resume_keeps_the_agent_and_a_byte_identical_prefix(self):
        os.makedirs(os.path.join(self.workspace, ".git"))
        write(os.path.join(self.workspace, "AGENTS.md"), "Rule one.\n")
        env = dict(self.env, GITHUB_TOKEN=self.GITHUB)
        proc = self.cli("--json", "--agent", EXAMPLE, "--env", "REVIEW_STYLE=thorough", "review", env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        parent = json.loads(proc.stdout.splitlines()[0])["execution_id"]
        write(os.path.join(self.workspace, "AGENTS.md"), "Rule two, added later.\n")  # not read again
        assert_one_line(self, self.cli("-c", "--agent", "other", "again", env=env), 2, "keeps its agent")
        assert_one_line(self, self.cli("-c", "--env", "REVIEW_STYLE=terse", "again", env=env), 2, "keeps its agent")
        proc = self.cli("--json", "-c", "and the tests?", env=dict(env, STIGMER_AGENT="nobody"))  # the parent's wins
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        self.assertEqual((lines[0]["agent"], lines[-1]["agent"]), ("code-reviewer", "code-reviewer"))
        first, resumed = self.fake.requests[1], self.fake.requests[2]
        self.assertEqual(json.dumps(resumed["system"]), json.dumps(first["system"]))
        self.assertEqual(json.dumps(resumed["tools"]), json.dumps(first["tools"]))
        strip = lambda messages: json.loads(json.dumps(messages).replace(', "cache_control": {"type": "ephemeral"}', ""))  # noqa: E731
        self.assertEqual(strip(resumed["messages"][:len(first["messages"])]), strip(first["messages"]))
        self.assertIn("Rule one.", resumed["system"][0]["text"])
        self.assertNotIn("Rule two", resumed["system"][0]["text"])
        (result,) = [e for e in lines if e.get("kind") == "tool_result"]
        self.assertEqual(result["output"], "style=thorough gh=[REDACTED:GITHUB_TOKEN]")  # settings and secrets kept
        rows = [json.loads(line) for line in self.cli("list", "--json").stdout.splitlines()]
        self.assertEqual([(r["spec"]["parent_id"], r["spec"]["agent"]["name"]) for r in rows],
                         [(parent, "code-reviewer"), ("", "code-reviewer")])
        self.assertEqual(files_containing(self.GITHUB, self.home, self.workspace), [])


class DefaultAgentTest(CliCase):
    """Without an agent nothing changes but the project's instructions, which --no-project-doc leaves out."""
    share_home = False  # it writes the home's AGENTS.md

    script = [tool_step(("execute", {"command": "echo mode=$MODE_SETTING"})), text_step("done")]

    def test_the_default_agent_reads_agents_md_and_env_sets_a_variable(self):
        os.makedirs(os.path.join(self.workspace, ".git"))
        write(os.path.join(self.workspace, "CLAUDE.md"), "Claude rule: be brief.\n")
        write(os.path.join(self.home, "AGENTS.md"), "User rule: British spelling.\n")
        proc, events = self.run_task("--env", "MODE_SETTING=fast", "do it")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        system = self.fake.requests[0]["system"][0]["text"]
        self.assertTrue(system.startswith(agent.DEFAULT_ROLE))
        self.assertLess(system.index("User rule: British spelling."), system.index("Claude rule: be brief."))
        (prompt,) = [e for e in events if e["kind"] == "prompt"]
        self.assertEqual(prompt["project_docs"], [os.path.join(self.home, "AGENTS.md"),
                                                  os.path.join(self.workspace, "CLAUDE.md")])
        (result,) = [e for e in events if e["kind"] == "tool_result"]
        self.assertEqual(result["output"], "mode=fast")
        self.assertEqual(events[0]["agent"], "")  # the built-in agent has no name

        proc, events = self.run_task("--no-project-doc", "again")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        system = self.fake.requests[-1]["system"][0]["text"]
        self.assertNotIn("User rule", system)
        self.assertNotIn("Claude rule", system)
        self.assertNotIn("# Project instructions", system)
        (prompt,) = [e for e in events if e["kind"] == "prompt"]
        self.assertEqual(prompt["project_docs"], [])


class CloudAgentTest(CloudCase):
    """The example agent in cloud mode: the run's own worker on Redis; nothing secret reaches Redis."""

    GITHUB = "ghp_fakeTokenForTheCloudReviewer12"
    script = [tool_step(("execute", {"command": "echo style=$REVIEW_STYLE gh=$GITHUB_TOKEN"})),
              text_step("Reviewed in the cloud.")]

    def test_the_example_agent_runs_in_cloud_mode(self):
        workspace = self.workspace("repo")
        os.makedirs(os.path.join(workspace, ".git"))
        write(os.path.join(workspace, "AGENTS.md"), "Cloud project rule: keep it short.\n")
        env = dict(self.env, GITHUB_TOKEN=self.GITHUB)
        proc = run_cli(["--json", "--agent", EXAMPLE, "--workspace", workspace, "review it"], env, timeout=120,
                       cwd=workspace)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        self.assertEqual((lines[0]["mode"], lines[0]["agent"], lines[-1]["agent"]), ("cloud", "code-reviewer",
                                                                                      "code-reviewer"))
        events = [e for e in lines if "seq" in e]
        self.assertEqual(events[0]["agent"], "code-reviewer")
        system = self.fake.requests[0]["system"][0]["text"]
        self.assertTrue(system.startswith("You are a careful code reviewer."))
        self.assertIn("Cloud project rule: keep it short.", system)
        (result,) = [e for e in events if e["kind"] == "tool_result"]
        self.assertEqual(result["output"], "style=concise gh=[REDACTED:GITHUB_TOKEN]")
        execution = self.log.get(events[0]["execution_id"])
        self.assertEqual(execution.spec.agent.name, "code-reviewer")  # the worker needed no file
        r = self.log.r
        for key in r.scan_iter(self.prefix + "*"):  # no secret value anywhere in Redis
            kind = r.type(key)
            value = {b"string": lambda: r.get(key), b"hash": lambda: r.hgetall(key),
                     b"stream": lambda: r.xrange(key), b"zset": lambda: r.zrange(key, 0, -1),
                     b"list": lambda: r.lrange(key, 0, -1), b"set": lambda: r.smembers(key)}[kind]()
            self.assertNotIn(self.GITHUB.encode(), repr(value).encode(), key)
        self.assertEqual(files_containing(self.GITHUB, self.home, workspace), [])


class AgentWorkerTest(unittest.TestCase):
    """The worker turns the spec's agent into the agent it runs: instructions, model settings, variables."""

    def setUp(self):
        self.workspace = tempfile.mkdtemp(prefix="stigmer-ws-")
        self.addCleanup(shutil.rmtree, self.workspace, ignore_errors=True)
        self.fake = FakeAnthropic([tool_step(("execute", {"command": "echo region=$REGION"})),
                                   text_step("done")]).start()
        self.addCleanup(self.fake.stop)
        env = mock.patch.dict(os.environ, {"ANTHROPIC_API_KEY": FAKE_KEY, "ANTHROPIC_BASE_URL": self.fake.url})
        env.start()
        self.addCleanup(env.stop)
        self.w = worker.Worker(environ=os.environ, capacity=1, model="claude-fake", runner_id="r-agents")
        self.addCleanup(self.w.stop, flush=0)

    def run_spec(self, execution_id, spec):
        self.w.assigned(pb.Execution(id=execution_id, spec=spec, last_seq=2))
        return drain(self.w, execution_id)

    def test_the_agent_in_the_spec_is_the_agent_that_runs(self):
        the_agent = pb.AgentSpec(name="deployer", instructions="You deploy things, carefully and slowly.",
                                 config=pb.AgentConfig(temperature=0.25, max_tokens=1234))
        the_agent.env_spec.data["REGION"].value = "eu-west-1"
        docs = [pb.ProjectDoc(path="/repo/AGENTS.md", text="Deploy only on Tuesdays.")]
        events = self.run_spec("ex-agent", pb.ExecutionSpec(prompt="deploy", workspace=self.workspace, agent=the_agent,
                                                            project_docs=docs))
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED)
        body = self.fake.requests[0]
        self.assertTrue(body["system"][0]["text"].startswith("You deploy things, carefully and slowly."))
        self.assertIn("## /repo/AGENTS.md\n\nDeploy only on Tuesdays.", body["system"][0]["text"])
        self.assertEqual(body["max_tokens"], 1234)
        self.assertNotIn("temperature", body)  # the Messages API of the anthropic SDK takes none
        (result,) = [e.tool_result for e in events if e.HasField("tool_result")]
        self.assertEqual(result.output, "region=eu-west-1")
        (prompt,) = [e.prompt for e in events if e.HasField("prompt")]
        self.assertEqual(list(prompt.project_docs), ["/repo/AGENTS.md"])

    def test_chat_completions_get_the_agents_temperature_and_output_limit(self):
        import models
        chat = models.OpenAIChatModel("gpt-fake")
        body = chat.request("sys", [], [{"role": "user", "text": "hi"}])
        self.assertNotIn("temperature", body)
        chat.temperature, chat.max_output_tokens = 0.25, 1234
        body = chat.request("sys", [], [{"role": "user", "text": "hi"}])
        self.assertEqual((body["temperature"], body["max_completion_tokens"]), (0.25, 1234))

    def test_a_server_that_cannot_start_fails_the_execution_before_any_model_call(self):
        spec = pb.ExecutionSpec(prompt="go", workspace=self.workspace)
        spec.mcp_servers.add(name="gone").stdio.command = os.path.join(self.workspace, "no-such-server")
        events = self.run_spec("ex-mcp", spec)
        (error,) = [e.error for e in events if e.HasField("error")]
        self.assertEqual(error.code, "mcp")
        self.assertIn("MCP server gone failed to start", error.message)
        self.assertEqual(events[-1].phase.phase, pb.FAILED)
        self.assertEqual(self.fake.requests, [])


class AgentsCommandTest(CliCase):
    """`agents` lists what a run here can use; `agents show` prints one, secret values never."""
    fresh = True  # it looks for agents in a home with none

    def test_list_and_show_in_text_and_json(self):
        os.makedirs(os.path.join(self.workspace, ".git"))
        shutil.copy(EXAMPLE, write(os.path.join(self.workspace, ".stigmer", "agents", "code-reviewer.yaml"), ""))
        write(os.path.join(self.workspace, ".stigmer", "agents", "support-bot.yaml"), SUPPORT_BOT)
        write(os.path.join(self.home, "agents", "broken.yaml"), agent_text("broken", "  instructions: short\n"))
        env = dict(self.env, GITHUB_TOKEN="ghp_neverShownAnywhere123")
        rows = [json.loads(line) for line in self.cli("agents", "--json", env=env).stdout.splitlines()]
        self.assertEqual([r["name"] for r in rows], ["code-reviewer", "support-bot", "broken"])
        self.assertEqual(rows[0]["problems"], [])
        self.assertIn("agent support-bot: the agent names the MCP server github, which is not defined in",
                      rows[1]["problems"][0])
        self.assertIn("at least 10 characters", rows[2]["problems"][0])
        text = self.cli("agents", env=env)
        self.assertEqual(text.returncode, 0, text.stderr)
        self.assertIn("code-reviewer  Reviews the changes", text.stdout)
        self.assertIn("! agent support-bot", text.stdout)

        shown = self.cli("agents", "show", "code-reviewer", env=env)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        import yaml
        resource = yaml.safe_load(shown.stdout)
        self.assertEqual(resource["metadata"], {"name": "code-reviewer", "labels": {"team": "platform"}})
        self.assertEqual(resource["spec"]["envSpec"]["data"]["GITHUB_TOKEN"]["isSecret"], True)
        self.assertIn("# secret GITHUB_TOKEN: set", shown.stdout)
        as_json = json.loads(self.cli("agents", "show", "code-reviewer", "--json", env=env).stdout)
        self.assertEqual(as_json["spec"]["instructions"], agents.load(EXAMPLE).instructions)
        self.assertEqual(as_json["secrets"], {"GITHUB_TOKEN": "set"})
        with open(write(os.path.join(self.tmp, "shown.yaml"), shown.stdout.replace("# ", "#"))) as f:
            self.assertIn("apiVersion: agentic.stigmer.ai/v1", f.read())
        self.assertEqual(agents.load(os.path.join(self.tmp, "shown.yaml")).instructions, as_json["spec"]["instructions"])
        for out in (text.stdout, shown.stdout, json.dumps(rows), json.dumps(as_json)):
            self.assertNotIn("ghp_neverShownAnywhere123", out)
        assert_one_line(self, self.cli("agents", "show", "nobody"), 2, "no agent named nobody")

    def test_none_found_says_where_to_put_one(self):
        proc = self.cli("agents")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("no agents found in", proc.stdout)
        self.assertIn(os.path.join(".stigmer", "agents"), proc.stdout)


if __name__ == "__main__":
    unittest.main()
