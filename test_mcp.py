"""MCP servers as the agent's tools, through the CLI against the fake model: a stdio and a streamable-HTTP server
written with the SDK's own server API (testsupport_mcp_server.py), and a third-party server from PyPI."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import unittest

from test_cloud import CloudCase
from test_runner import CliCase
from testsupport import HERE, free_port, pid_alive, reap, run_cli, run_workers, text_step, tool_step, wait_for
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

# Not imported here: the SDK's import sets up logging, and every test module is loaded in one process first.
SKIP = unittest.skipIf(importlib.util.find_spec("mcp") is None, "the mcp SDK is not installed: pip install -e '.[mcp]'")
SERVER = os.path.join(HERE, "testsupport_mcp_server.py")
TOKEN = "mcp-secret-token-4f9a2c77e1"


def stdio_server(**extra):
    return {"command": sys.executable, "args": [SERVER, "stdio"], **extra}


@SKIP
class GuardedStartTest(unittest.TestCase):
    """A stdio server whose start is cancelled while its process group is still being looked for (its exec under
    way) is killed, and its marker withdrawn from the guardian."""

    def test_a_cancel_while_the_group_is_looked_for_leaves_no_server(self):
        import asyncio
        from unittest import mock

        import mcp_tools
        import sandbox
        from mcp.client.stdio import StdioServerParameters, stdio_client
        marker = f"mcp-test-{os.getpid()}-{time.monotonic_ns()}"
        real = sandbox.marked_pids
        looked = []

        def not_yet(value, name=sandbox.RUN_MARKER):  # the server's exec still under way: not found for a while
            looked.append(value)
            return [] if len(looked) < 40 else real(value, name)

        async def main():
            params = StdioServerParameters(command="sleep", args=["60"],
                                           env={sandbox.RUN_MARKER: marker, "PATH": os.environ["PATH"]})
            groups = {}

            async def serve():
                async with mcp_tools._guarded(stdio_client(params), marker, groups, "t"):
                    await asyncio.sleep(60)
            task = asyncio.ensure_future(serve())
            while not looked:
                await asyncio.sleep(0.005)
            self.assertTrue(real(marker))  # the server runs
            task.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await task
            for _ in range(500):  # gone while the loop goes on (the hub's loop outlives a server's start)
                if not real(marker):
                    break
                await asyncio.sleep(0.01)
            return groups, real(marker)
        self.addCleanup(lambda: [os.kill(pid, signal.SIGKILL) for pid in real(marker)])
        with mock.patch.object(sandbox, "marked_pids", not_yet):
            groups, left = asyncio.run(main())
        self.assertEqual(left, [])
        self.assertEqual(groups, {})
        self.assertNotIn(os.fsencode(marker), sandbox._MARKS)


@SKIP
class StdioServerTest(CliCase):
    """A stdio server from --mcp-config: its tools offered, called, their results, errors and limits."""
    slow = True  # among the longest: testsupport_parallel starts it first
    share_home = False  # its daemon is started with a short runner grace (setUp)

    def setUp(self):
        super().setUp()
        self.env["STIGMER_RUNNER_GRACE"] = "1"  # the class's daemon ends a killed worker's run in a second

    def config(self, servers):
        path = os.path.join(self.tmp, "mcp.json")
        with open(path, "w") as f:
            json.dump({"mcpServers": servers}, f)
        return path

    def test_tools_are_offered_after_the_built_in_ones_called_and_their_results_redacted(self):
        path = self.config({"t": stdio_server(env={"MCP_TEST_TOKEN": "${MCP_TEST_TOKEN}"})})
        self.fake.reset([
            tool_step(("mcp__t__echo", {"text": "hello", "token": True}), ("mcp__t__add", {"a": 2, "b": 3})),
            tool_step(("mcp__t__fail", {"why": "testing"}), ("mcp__t__echo", {"text": 5})),
            text_step("done"),
        ])
        env = dict(self.env, MCP_TEST_TOKEN=TOKEN)
        proc, events = self.run_task("--mcp-config", path, "--secret", "MCP_TEST_TOKEN", "use the server", env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        names = [t["name"] for t in self.fake.requests[0]["tools"]]
        builtin = names.index("task")
        self.assertEqual(names[builtin + 1:], ["mcp__t__add", "mcp__t__crash", "mcp__t__echo", "mcp__t__fail",
                                               "mcp__t__picture", "mcp__t__slow"])  # after the built-in tools, sorted
        echo = next(t for t in self.fake.requests[0]["tools"] if t["name"] == "mcp__t__echo")
        self.assertIn("Say TEXT back", echo["description"])
        self.assertEqual(echo["input_schema"]["required"], ["text"])
        for request in self.fake.requests[1:]:  # the prefix stays byte-identical with servers attached
            self.assertEqual((request["system"], request["tools"]), (self.fake.requests[0]["system"],
                                                                      self.fake.requests[0]["tools"]))
        (started,) = [e for e in events if e["kind"] == "artifact" and e["type"] == "mcp"]
        self.assertEqual(started["notes"], "t: 6 tools (stigmer-test-server 1.2.3)")
        results = {e["id"]: e for e in events if e["kind"] == "tool_result"}
        calls = [(c["name"], results[c["id"]]) for c in events if c["kind"] == "tool_call"]
        self.assertEqual(calls[0][1]["output"], "echo: hello token=[REDACTED:MCP_TEST_TOKEN]")
        self.assertEqual(json.loads(calls[1][1]["output"]), {"sum": 5})
        self.assertTrue(calls[2][1]["is_error"])
        self.assertTrue(calls[3][1]["is_error"])  # the server refused a bad input: an error result, not a crash
        self.assertNotIn(TOKEN, json.dumps(self.fake.requests) + proc.stdout + proc.stderr)
        log = os.path.join(self.home, "logs", f"mcp-{events[0]['execution_id']}-t.log")
        self.assertEqual(os.stat(log).st_mode & 0o777, 0o600)  # its stderr: in the home's logs, private
        text = self.cli("logs", events[0]["execution_id"])
        self.assertIn("mcp__t__echo", text.stdout)

    def test_an_image_goes_to_the_model_as_an_image_and_again_on_resume(self):
        import base64

        from testsupport_mcp_server import PICTURE
        path = self.config({"t": stdio_server()})
        self.fake.reset([tool_step(("mcp__t__picture", {"format": "png"}), ("mcp__t__picture", {"format": "bmp"})),
                         text_step("a picture")])
        proc, events = self.run_task("--mcp-config", path, "draw")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        png, bmp = [e for e in events if e["kind"] == "tool_result"]
        self.assertEqual((png["output"], [i["media_type"] for i in png["images"]]), ("here it is", ["image/png"]))
        self.assertIn("[image (image/bmp, about", bmp["output"])  # not a type the APIs take: a note
        self.assertEqual(bmp["images"], [])
        wanted = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                              "data": base64.b64encode(PICTURE + b"png").decode()}}
        (sent,) = [b for b in self.tool_results(1) if b["tool_use_id"] == png["id"]]
        self.assertEqual(sent["content"], [{"type": "text", "text": "here it is"}, wanted])
        self.fake.reset([text_step("still the picture")])
        resumed = self.cli("resume", events[0]["execution_id"], "and now?")
        self.assertEqual(resumed.returncode, 0, resumed.stderr)
        (again,) = [b for b in self.tool_results_in(self.fake.requests[0]) if b["tool_use_id"] == png["id"]]
        self.assertEqual(again["content"], sent["content"])  # rebuilt from the log, byte for byte

    def tool_results_in(self, body):
        return [b for m in body["messages"] if m["role"] == "user" and isinstance(m["content"], list)
                for b in m["content"] if b.get("type") == "tool_result"]

    def test_a_projects_own_mcp_json_starts_nothing_unless_named(self):
        marker = os.path.join(self.tmp, "started")
        with open(os.path.join(self.workspace, ".mcp.json"), "w") as f:
            json.dump({"mcpServers": {"evil": {"command": "/bin/sh", "args": ["-c", f"touch {marker}"]}}}, f)
        self.fake.reset([text_step("done")])
        proc = self.cli("go")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertFalse(os.path.exists(marker))
        self.assertEqual([t for t in self.fake.requests[0]["tools"] if t["name"].startswith("mcp__")], [])

    def test_a_slow_call_times_out_and_a_dead_server_is_an_error_the_agent_goes_on_from(self):
        path = self.config({"t": stdio_server(timeout=1)})
        self.fake.reset([
            tool_step(("mcp__t__slow", {"seconds": 30})),
            tool_step(("mcp__t__echo", {"text": "still here"})),
            tool_step(("mcp__t__crash", {})),
            tool_step(("mcp__t__echo", {"text": "after"}), ("execute", {"command": "echo built-in still works"})),
            text_step("done"),
        ])
        started = time.monotonic()
        proc, events = self.run_task("--mcp-config", path, "go")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertLess(time.monotonic() - started, 25)  # not the 30 s the call would take
        outputs = [(e["is_error"], e["output"]) for e in events if e["kind"] == "tool_result"]
        self.assertEqual(outputs[0], (True, "mcp__t__slow timed out after 1 s (MCP server t)"))
        self.assertEqual(outputs[1], (False, "echo: still here"))
        self.assertTrue(outputs[2][0])
        self.assertIn("MCP server t stopped", outputs[2][1])
        self.assertTrue(outputs[3][0])
        self.assertIn("MCP server t", outputs[3][1])
        self.assertEqual(outputs[4], (False, "built-in still works"))

    def test_a_server_that_fails_to_start_fails_the_run_with_its_name_and_stderr(self):
        path = self.config({"broken": stdio_server(env={"MCP_TEST_FAIL_START": "1"})})
        proc = self.cli("--mcp-config", path, "go")
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("MCP server broken failed to start", proc.stderr)
        self.assertIn("cannot open its database", proc.stderr)
        self.assertEqual(self.fake.requests, [])  # before the first model request

    def test_no_server_outlives_a_cancel_ctrl_c_or_a_killed_worker(self):
        path = self.config({"t": stdio_server()})
        for how in ("cancel", "ctrl-c", "kill -9"):
            with self.subTest(how=how):
                pidfile = os.path.join(self.tmp, f"pid-{how.replace(' ', '')}")
                self.fake.reset([tool_step(("mcp__t__slow", {"seconds": 60, "pidfile": pidfile})),
                                 text_step("done")])
                proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "--json", "--mcp-config",
                                         path, "go"], env=self.env, cwd=self.workspace, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
                self.addCleanup(reap, proc)
                wait_for(lambda: os.path.exists(pidfile) and os.path.getsize(pidfile), what="the server's pid")
                with open(pidfile) as f:
                    server = int(f.read())
                execution_id = json.loads(proc.stdout.readline())["execution_id"]
                if how == "cancel":
                    self.assertEqual(self.cli("cancel", execution_id).returncode, 0)
                elif how == "ctrl-c":
                    proc.send_signal(signal.SIGINT)
                else:  # the run's worker: the server's parent
                    with open(f"/proc/{server}/stat") as f:
                        worker = int(f.read().rsplit(")", 1)[1].split()[1])
                    self.assertEqual(run_workers(self.home), [worker])
                    os.kill(worker, signal.SIGKILL)
                wait_for(lambda: not pid_alive(server), timeout=30, what=f"the server gone after {how}")
                proc.wait(timeout=60)


@SKIP
class HttpAgentAndThirdPartyTest(CliCase):
    """A streamable-HTTP server (one per class), an agent's mcpServers, the errors before a run, and a server from
    PyPI that was not written here."""
    slow = True  # among the longest: testsupport_parallel starts it first

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.port = free_port()
        cls.http = subprocess.Popen([sys.executable, SERVER, "http", str(cls.port)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=dict(os.environ, MCP_TEST_TOKEN=TOKEN))
        cls.addClassCleanup(reap, cls.http)
        import socket

        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", cls.port)) == 0
        wait_for(listening, what="the HTTP MCP server")

    def config(self, servers):
        path = os.path.join(self.tmp, "mcp.json")
        with open(path, "w") as f:
            json.dump({"mcpServers": servers}, f)
        return path

    def agent(self, name, servers_yaml):
        folder = os.path.join(self.workspace, ".stigmer", "agents")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            f.write(f"apiVersion: agentic.stigmer.ai/v1\nkind: Agent\nmetadata: {{name: {name}}}\nspec:\n"
                    f"  instructions: You use the tools of your MCP servers.\n  mcpServers:\n{servers_yaml}")

    def test_a_streamable_http_server(self):
        path = self.config({"web": {"type": "http", "url": f"http://127.0.0.1:{self.port}/mcp",
                                    "headers": {"X-Token": "${MCP_TEST_TOKEN}"}}})
        self.fake.reset([tool_step(("mcp__web__echo", {"text": "over http", "token": True}),
                                   ("mcp__web__add", {"a": 40, "b": 2})), text_step("done")])
        proc, events = self.run_task("--mcp-config", path, "--secret", "MCP_TEST_TOKEN", "go",
                                     env=dict(self.env, MCP_TEST_TOKEN=TOKEN))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        outputs = [e["output"] for e in events if e["kind"] == "tool_result"]
        self.assertEqual(outputs[0], "echo: over http token=[REDACTED:MCP_TEST_TOKEN]")
        self.assertEqual(json.loads(outputs[1]), {"sum": 42})
        self.assertNotIn(TOKEN, json.dumps(self.fake.requests))

    def test_an_agents_inline_and_named_servers(self):
        with open(os.path.join(self.home, "mcp.json"), "w") as f:  # the user's servers, by name
            json.dump({"mcpServers": {"web": {"type": "http", "url": f"http://127.0.0.1:{self.port}/mcp"}}}, f)
        self.addCleanup(os.remove, os.path.join(self.home, "mcp.json"))
        self.agent("both", f"""    - name: local
      stdio: {{command: {sys.executable}, args: [{SERVER}, stdio]}}
      enabledTools: [echo]
    - web
""")
        self.fake.reset([tool_step(("mcp__local__echo", {"text": "inline"}), ("mcp__web__add", {"a": 1, "b": 1})),
                         text_step("done")])
        proc, events = self.run_task("--agent", "both", "go")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        names = [t["name"] for t in self.fake.requests[0]["tools"] if t["name"].startswith("mcp__")]
        self.assertEqual(names, ["mcp__local__echo", "mcp__web__add", "mcp__web__crash", "mcp__web__echo",
                                 "mcp__web__fail", "mcp__web__picture", "mcp__web__slow"])  # enabledTools narrows; servers in order
        outputs = [e["output"] for e in events if e["kind"] == "tool_result"]
        self.assertEqual(outputs[0], "echo: inline")
        self.assertEqual(json.loads(outputs[1]), {"sum": 2})

    def test_a_sub_agent_gets_the_parents_servers_it_names_narrowed(self):
        self.agent("lead", f"""    - name: local
      stdio: {{command: {sys.executable}, args: [{SERVER}, stdio]}}
  subAgents:
    - name: echoer
      instructions: You echo what you are given with the echo tool.
      mcpServers: [local]
      mcpToolSelections: {{local: {{enabledTools: [echo]}}}}
    - name: plain
      instructions: You answer without any MCP tool at all.
""")
        self.fake.reset([tool_step(("task", {"description": "[sub] echo it", "subagent_type": "echoer"}),
                                   ("task", {"description": "[plain] answer", "subagent_type": "plain"})),
                         text_step("done")])
        self.fake.routes = {"[sub]": [tool_step(("mcp__local__echo", {"text": "from sub"})), text_step("echoed")],
                            "[plain]": [text_step("answered")]}
        proc, events = self.run_task("--agent", "lead", "go")
        self.assertEqual(proc.returncode, 0, proc.stderr)

        def mcp_tools_of(marker):
            body = next(b for b in self.fake.requests if marker in json.dumps(b["messages"][:1]))
            return [t["name"] for t in body["tools"] if t["name"].startswith("mcp__")]
        self.assertEqual(mcp_tools_of("[sub]"), ["mcp__local__echo"])
        self.assertEqual(mcp_tools_of("[plain]"), [])
        self.assertEqual(len([t for t in self.fake.requests[0]["tools"] if t["name"].startswith("mcp__")]), 6)
        (sub_result,) = [e for e in events if e["kind"] == "tool_result" and e.get("subagent") == "echoer"]
        self.assertEqual(sub_result["output"], "echo: from sub")

    def test_what_cannot_start_is_one_line_before_the_run(self):
        self.agent("unknown", "    - nowhere\n")
        self.agent("docker", "    - name: box\n      docker: {image: example/mcp}\n")
        self.agent("undeclared", f"    - name: t\n      stdio: {{command: {sys.executable}, args: [{SERVER}, stdio], "
                   "envPlaceholders: {TOKEN: '${API_TOKEN}'}}\n")
        bad = os.path.join(self.tmp, "bad.json")
        with open(bad, "w") as f:
            f.write("{not json")
        sse = self.config({"old": {"type": "sse", "url": "http://127.0.0.1:1/sse"}})
        for args, says in ((["--agent", "unknown"], "names the MCP server nowhere, which is not defined"),
                           (["--agent", "docker"], "is a docker server"),
                           (["--agent", "undeclared"], "uses ${API_TOKEN}, which this run does not declare"),
                           (["--mcp-config", bad], "is not valid JSON"),
                           (["--mcp-config", sse], "is an SSE server, which this runner does not reach"),
                           (["--mcp-config", os.path.join(self.tmp, "missing.json")], "does not exist")):
            with self.subTest(args=args):
                proc = self.cli(*args, "go")
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertEqual(proc.stderr.count("\n"), 1, proc.stderr)
                self.assertIn(says, proc.stderr)
        self.assertEqual(self.fake.requests, [])

    def test_the_example_agent_and_config(self):
        if importlib.util.find_spec("mcp_server_time") is None:
            self.skipTest("mcp-server-time is not installed: pip install -e '.[dev]'")
        venv_python = os.path.dirname(sys.executable)  # the examples say `python`: this interpreter's
        env = dict(self.env, PATH=venv_python + os.pathsep + self.env.get("PATH", ""))
        self.fake.reset([tool_step(("mcp__time__get_current_time", {"timezone": "Europe/Berlin"})),
                         text_step("Done: ...")])
        proc, events = self.run_task("--agent", os.path.join(HERE, "examples", "agents", "standup.yaml"), "standup",
                                     env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        names = [t["name"] for t in self.fake.requests[0]["tools"] if t["name"].startswith("mcp__")]
        self.assertEqual(names, ["mcp__time__get_current_time"])  # enabledTools
        (result,) = [e for e in events if e["kind"] == "tool_result"]
        self.assertEqual(json.loads(result["output"])["timezone"], "Europe/Berlin")
        from mcp_tools import read_config
        self.assertEqual(sorted(read_config(os.path.join(HERE, "examples", "mcp", "mcp.json"))), ["github", "time"])

    def test_a_third_party_server_from_pypi(self):
        if importlib.util.find_spec("mcp_server_time") is None:  # the dev extra installs it; written elsewhere
            self.skipTest("mcp-server-time is not installed: pip install -e '.[dev]'")
        path = self.config({"time": {"command": sys.executable, "args": ["-m", "mcp_server_time",
                                                                         "--local-timezone", "UTC"]}})
        self.fake.reset([tool_step(("mcp__time__get_current_time", {"timezone": "Europe/Paris"})),
                         text_step("done")])
        proc, events = self.run_task("--mcp-config", path, "what time is it in Paris")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        (started,) = [e for e in events if e["kind"] == "artifact" and e["type"] == "mcp"]
        self.assertRegex(started["notes"], r"^time: \d+ tools")
        (result,) = [e for e in events if e["kind"] == "tool_result"]
        self.assertFalse(result["is_error"], result["output"])
        self.assertEqual(json.loads(result["output"])["timezone"], "Europe/Paris")


class NamesTest(unittest.TestCase):
    def test_tool_names_the_providers_take(self):
        from mcp_tools import NAME_MAX, tool_name
        self.assertEqual(tool_name("github", "create_issue"), "mcp__github__create_issue")
        self.assertEqual(tool_name("my.server", "do it/now"), "mcp__my_server__do_it_now")
        long_a, long_b = tool_name("s", "x" * 80 + "a"), tool_name("s", "x" * 80 + "b")
        self.assertEqual((len(long_a), len(long_b)), (NAME_MAX, NAME_MAX))
        self.assertNotEqual(long_a, long_b)  # cut, and told apart by a digest of the whole
        self.assertEqual(long_a, tool_name("s", "x" * 80 + "a"))  # the same every time
        self.assertEqual(tool_name("s", "a_b", {"mcp__s__a_b"})[:len("mcp__s__a_b_")], "mcp__s__a_b_")
        self.assertNotEqual(tool_name("s", "a.b", {"mcp__s__a_b"}), "mcp__s__a_b")  # cleaning made them one


class MissingSdkTest(CliCase):
    """Without the mcp SDK, a run with servers fails with the line that says how to install it."""

    def test_the_install_line(self):
        shadow = os.path.join(self.tmp, "shadow", "mcp")
        os.makedirs(shadow)
        with open(os.path.join(shadow, "__init__.py"), "w") as f:
            f.write("raise ImportError('No module named mcp')\n")
        path = os.path.join(self.tmp, "mcp.json")
        with open(path, "w") as f:
            json.dump({"mcpServers": {"t": stdio_server()}}, f)
        env = dict(self.env, PYTHONPATH=os.path.dirname(shadow))
        proc = self.cli("--mcp-config", path, "go", env=env)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("the mcp SDK is not installed: pip install -e '.[mcp]'", proc.stderr)
        self.assertEqual(self.fake.requests, [])


@SKIP
class CloudModeTest(CloudCase):
    """The same through Redis: a foreground run in cloud mode with a stdio server from --mcp-config."""
    script = [tool_step(("mcp__t__echo", {"text": "via redis"})), text_step("done")]

    def test_a_server_in_cloud_mode(self):
        path = os.path.join(self.tmp, "mcp.json")
        with open(path, "w") as f:
            json.dump({"mcpServers": {"t": stdio_server()}}, f)
        proc = run_cli(["--json", "--workspace", self.workspace("ws"), "--mcp-config", path, "go"], self.env,
                       timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        events = [json.loads(line) for line in proc.stdout.splitlines()]
        (result,) = [e for e in events if e.get("kind") == "tool_result"]
        self.assertEqual(result["output"], "echo: via redis")
        self.assertEqual(self.log.get(events[0]["execution_id"]).spec.mcp_servers[0].name, "t")


if __name__ == "__main__":
    unittest.main()
