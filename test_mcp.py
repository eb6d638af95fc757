"""MCP servers as the agent's tools, through the CLI against the fake model: a stdio and a streamable-HTTP server
written with the SDK's own server API (testsupport_mcp_server.py), and a third-party server from PyPI."""

import json
import os
import signal
import subprocess
import sys
import time
import unittest

import mcp_tools
from test_runner import CliCase
from testsupport import HERE, free_port, pid_alive, reap, text_step, tool_step, wait_for
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

try:
    import mcp  # noqa: F401
except ImportError:
    mcp = None
SKIP = unittest.skipIf(mcp is None, "the mcp SDK is not installed: pip install -e '.[mcp]'")
SERVER = os.path.join(HERE, "testsupport_mcp_server.py")
TOKEN = "mcp-secret-token-4f9a2c77e1"


def stdio_server(**extra):
    return {"command": sys.executable, "args": [SERVER, "stdio"], **extra}


@SKIP
class StdioServerTest(CliCase):
    """A stdio server from --mcp-config: its tools offered, called, their results, errors and limits."""

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
                                               "mcp__t__slow"])  # after the built-in tools, sorted
        echo = next(t for t in self.fake.requests[0]["tools"] if t["name"] == "mcp__t__echo")
        self.assertIn("Say TEXT back", echo["description"])
        self.assertEqual(echo["input_schema"]["required"], ["text"])
        for request in self.fake.requests[1:]:  # the prefix stays byte-identical with servers attached
            self.assertEqual((request["system"], request["tools"]), (self.fake.requests[0]["system"],
                                                                      self.fake.requests[0]["tools"]))
        (started,) = [e for e in events if e["kind"] == "artifact" and e["type"] == "mcp"]
        self.assertEqual(started["notes"], "t: 5 tools (stigmer-test-server 1.2.3)")
        results = {e["id"]: e for e in events if e["kind"] == "tool_result"}
        calls = [(c["name"], results[c["id"]]) for c in events if c["kind"] == "tool_call"]
        self.assertEqual(calls[0][1]["output"], "echo: hello token=[REDACTED:MCP_TEST_TOKEN]")
        self.assertEqual(json.loads(calls[1][1]["output"]), {"sum": 5})
        self.assertTrue(calls[2][1]["is_error"])
        self.assertTrue(calls[3][1]["is_error"])  # the server refused a bad input: an error result, not a crash
        self.assertNotIn(TOKEN, json.dumps(self.fake.requests) + proc.stdout + proc.stderr)
        with open(os.path.join(self.home, "logs", f"mcp-{events[0]['execution_id']}-t.log")) as f:
            f.read()  # its stderr went to the home's logs, not to the model
        text = self.cli("logs", events[0]["execution_id"])
        self.assertIn("mcp__t__echo", text.stdout)

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
                    self.assertIn(b"worker", open(f"/proc/{worker}/cmdline", "rb").read())
                    os.kill(worker, signal.SIGKILL)
                wait_for(lambda: not pid_alive(server), timeout=30, what=f"the server gone after {how}")
                proc.wait(timeout=60)


if __name__ == "__main__":
    unittest.main()
