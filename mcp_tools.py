"""MCP servers as the agent's tools, through the official `mcp` SDK (the `mcp` extra).

The CLI decides which servers an execution starts (plan()), every one defined inline in
ExecutionSpec.mcp_servers; the worker starts them (Hub), offers their tools to the agent as
mcp__SERVER__TOOL and calls them:

    servers = mcp_tools.plan(agent_spec, "./.mcp.json", home, declared={"GITHUB_TOKEN"})   # McpError: one line
    hub = mcp_tools.Hub(servers, env, workspace, log_dir, execution_id)
    specs = hub.start(cancelled)     # all at once; tool specs for the model, after the built-in tools
    output, is_error, code, truncated = hub.call("mcp__time__get_current_time", {"timezone": "UTC"}, cancelled)
    hub.close()                      # whatever way the execution ends

Where servers come from: `--mcp-config FILE` (JSON in the `{"mcpServers": {NAME: {...}}}` shape of Claude
Code's `.mcp.json`: `command`, `args`, `env`, `cwd` for stdio; `"type": "http"`, `url`, `headers` for
streamable HTTP; our `timeout` in seconds per tool call) starts every server in it; an agent's
`mcpServers` adds its inline definitions and its bare names, looked up in that file, then in
$STIGMER_HOME/mcp.json. A project's own .mcp.json is never read unless named. `${NAME}` in env, args,
url and headers must name a variable the run declares (its secrets, the agent's envSpec, --env); the
worker fills it in, so secret values never travel in the spec.

A stdio server runs on the worker's host with the workspace as its directory (its `cwd` relative to it),
the execution's shell environment and its own env; it carries the execution's marker, and the sandbox's
guardian kills its process group should the worker die (sandbox.guard_group). Its stderr goes to
$STIGMER_HOME/logs/mcp-EXECUTION-SERVER.log, never to the model. The SDK is imported only when an
execution has servers.
"""
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
from concurrent.futures import Future

import stigmer_pb2 as pb

PREFIX = "mcp__"  # a tool's name: mcp__SERVER__TOOL (Claude Code's convention)
NAME_MAX = 64  # the longest tool name the providers take
NAME_RE = re.compile(r"[^A-Za-z0-9_-]")  # characters a provider refuses in a tool name
START_TIMEOUT = 30.0  # seconds a server may take to start and answer initialize
CALL_TIMEOUT = 120.0  # seconds a tool call may take unless its server says otherwise
TIMEOUT_MAX = 86400  # the longest per-call timeout a config may give
STOP_TIMEOUT = 5.0  # seconds the servers get to stop at the end of an execution
STDERR_TAIL = 5  # lines of a server's stderr quoted when it fails to start
CANCEL_POLL = 0.05  # seconds between checks of the cancel event during a call
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
USER_CONFIG = "mcp.json"  # under STIGMER_HOME: servers an agent may name
INSTALL_HINT = "pip install -e '.[mcp]'"


class McpError(Exception):
    """An MCP server cannot be used: one line a person can act on."""


# ---- the CLI: which servers an execution starts ----

def read_config(path):
    """{name: pb.McpServerDefinition} of a .mcp.json-shaped file; McpError naming the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise McpError(f"the MCP config {path} does not exist") from None
    except OSError as e:
        raise McpError(f"cannot read the MCP config {path}: {e.strerror}") from None
    except ValueError as e:
        raise McpError(f"the MCP config {path} is not valid JSON ({e})") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise McpError(f'the MCP config {path} must be an object with "mcpServers": {{NAME: {{...}}}}')
    return {name: from_entry(name, entry, path) for name, entry in servers.items()}


def from_entry(name, entry, where):
    """The pb.McpServerDefinition of one `mcpServers` entry of a config file."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name or ""):
        raise McpError(f"{where}: MCP server name {name!r} must be 1-64 letters, digits, _ or -")
    if not isinstance(entry, dict):
        raise McpError(f"{where}: MCP server {name} must be an object")
    kind = entry.get("type") or ("stdio" if "command" in entry else "http" if "url" in entry else "")
    server = pb.McpServerDefinition(name=name)
    timeout = entry.get("timeout", 0)
    if timeout != 0 and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                         or not math.isfinite(timeout) or not 1 <= timeout <= TIMEOUT_MAX):
        raise McpError(f"{where}: MCP server {name}'s timeout must be a number of seconds from 1 to {TIMEOUT_MAX:,}")
    server.call_timeout_seconds = math.ceil(timeout)
    tools = entry.get("enabledTools", entry.get("enabled_tools", []))
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        raise McpError(f"{where}: MCP server {name}'s enabledTools must be a list of tool names")
    server.enabled_tools.extend(tools)
    if kind == "stdio":
        command, args, env = entry.get("command"), entry.get("args", []), entry.get("env", {})
        if not isinstance(command, str) or not command.strip():
            raise McpError(f"{where}: MCP server {name} needs a command")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise McpError(f"{where}: MCP server {name}'s args must be a list of strings")
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise McpError(f"{where}: MCP server {name}'s env must map names to strings")
        server.stdio.command, server.stdio.working_dir = command, str(entry.get("cwd") or "")
        server.stdio.args.extend(args)
        server.stdio.env_placeholders.update(env)
    elif kind == "sse":
        raise McpError(f"{where}: MCP server {name} is an SSE server, which this runner does not reach: use its "
                       "streamable HTTP endpoint (\"type\": \"http\")")
    elif kind in ("http", "streamable-http", "streamableHttp"):
        url, headers = entry.get("url"), entry.get("headers", {})
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise McpError(f"{where}: MCP server {name} needs an http:// or https:// url")
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise McpError(f"{where}: MCP server {name}'s headers must map names to strings")
        server.http.url = url
        server.http.headers.update(headers)
    else:
        raise McpError(f"{where}: MCP server {name} needs a command (stdio) or \"type\": \"http\" with a url")
    return server


def plan(agent, config_path, home, declared):
    """The servers an execution starts ([pb.McpServerDefinition], inline, names unique, in order: --mcp-config's,
    then the agent's), checked: a name nothing defines, a docker server, or a ${NAME} that DECLARED (the run's
    secret and variable names; None: not checked) does not hold is an McpError before the run."""
    config = read_config(config_path) if config_path else {}
    chosen = dict(config)
    user = None
    for server in (agent.mcp_servers if agent is not None else ()):
        if server.WhichOneof("server_type") == "docker":
            raise McpError(f"MCP server {server.name} is a docker server, which this runner does not start: "
                           "define it with a command (stdio) or a url (http)")
        if server.WhichOneof("server_type") is None:
            if server.name in config:
                found = config[server.name]
            else:
                if user is None:
                    path = os.path.join(home, USER_CONFIG)
                    user = read_config(path) if os.path.exists(path) else {}
                if server.name not in user:
                    where = f"{config_path} or " if config_path else ""
                    raise McpError(f"the agent names the MCP server {server.name}, which is not defined in "
                                   f"{where}{os.path.join(home, USER_CONFIG)}: define it there (the .mcp.json "
                                   "shape) or pass a file with --mcp-config")
                found = user[server.name]
            merged = pb.McpServerDefinition()
            merged.CopyFrom(found)
            if server.enabled_tools:
                del merged.enabled_tools[:]
                merged.enabled_tools.extend(server.enabled_tools)
            server = merged
        chosen[server.name] = server
    for server in chosen.values() if declared is not None else ():  # None: names only (`agents` lists problems)
        missing = sorted(placeholders(server) - set(declared))
        if missing:
            raise McpError(f"MCP server {server.name} uses ${{{missing[0]}}}, which this run does not declare: pass "
                           f"--secret {missing[0]} (a secret) or --env {missing[0]}=VALUE, or declare it in the "
                           "agent's envSpec")
    return list(chosen.values())


def placeholders(server):
    """The ${NAME} names SERVER's env, args, url and headers use."""
    texts = []
    if server.WhichOneof("server_type") == "stdio":
        texts += list(server.stdio.args) + list(server.stdio.env_placeholders.values()) + [server.stdio.command]
    elif server.WhichOneof("server_type") == "http":
        texts += [server.http.url] + list(server.http.headers.values()) + list(server.http.query_params.values())
    return {m for t in texts for m in PLACEHOLDER.findall(t)}


def fill(text, values):
    """TEXT with each ${NAME} replaced by VALUES[NAME] ("" when the worker does not have it)."""
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), text)


# ---- the worker: one execution's servers ----

def tool_name(server, tool, taken=()):
    """mcp__SERVER__TOOL, made of the characters the providers take, at most NAME_MAX long (a longer one is cut
    and ends with a digest of the whole, so that two long names stay apart; so does one that cleaning made equal
    to a name in TAKEN: a.b and a_b)."""
    name = NAME_RE.sub("_", f"{PREFIX}{server}__{tool}")
    if len(name) > NAME_MAX or name in taken:
        digest = hashlib.sha256(f"{server}\0{tool}".encode()).hexdigest()[:8]
        name = name[:NAME_MAX - 9] + "_" + digest
    return name


def _tail(path, lines=STDERR_TAIL):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return " | ".join(line.strip() for line in f.read().splitlines()[-lines:] if line.strip())
    except OSError:
        return ""


IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")  # what the model APIs take
IMAGE_MAX = 3 << 20  # bytes of images one result may carry to the model; past it, a note


def result_text(result):
    """(text, is_error, images) for the model from a CallToolResult: text blocks joined, structured content as
    JSON, images as [(media type, bytes)] (IMAGE_TYPES, IMAGE_MAX in all), a note for what cannot be shown (other
    images, audio, binary resources)."""
    import base64
    import binascii
    parts, images, room = [], [], IMAGE_MAX
    for block in result.content or ():
        kind = getattr(block, "type", "")
        mime = getattr(block, "mimeType", None) or getattr(block, "mime_type", None) or ""
        if kind == "image" and mime in IMAGE_TYPES:
            try:
                data = base64.b64decode(block.data, validate=True)
            except (binascii.Error, ValueError, TypeError):
                data = None
            if data is not None and len(data) <= room:
                images.append((mime, data))
                room -= len(data)
                continue
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            inner = block.resource
            parts.append(getattr(inner, "text", None) or f"[resource {inner.uri}: binary, not shown]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}]")
        else:
            size = len(getattr(block, "data", "") or "") * 3 // 4
            parts.append(f"[{kind} ({mime}, about {size:,} bytes): not shown]")
    structured = getattr(result, "structuredContent", None)
    if structured is None:
        structured = getattr(result, "structured_content", None)
    if structured is not None and not parts:
        parts.append(json.dumps(structured, ensure_ascii=False))
    return "\n".join(parts), bool(getattr(result, "isError", False) or getattr(result, "is_error", False)), images


class Hub:
    """One execution's MCP servers: started together on an event loop of their own, stopped together."""

    def __init__(self, servers, env, workspace, log_dir, marker, *, remote=False):
        self.servers = list(servers)
        # The execution's shell environment (None: a variable the shell must not have): fills ${NAME}, and is a stdio
        # server's environment, over the SDK's few defaults (HOME, PATH, ...).
        self.env = {k: v for k, v in env.items() if v is not None}
        self.workspace, self.log_dir, self.marker, self.remote = workspace, log_dir, marker, remote
        self.tools = {}  # our name -> (server name, the server's tool name)
        self.specs = []  # tool specs for the model, in a stable order: servers as listed, each one's tools by name
        self.by_server = {}  # server name -> its tool specs
        self.sessions, self.info, self.dead, self.groups = {}, {}, {}, {}
        self.timeouts = {s.name: float(s.call_timeout_seconds or CALL_TIMEOUT) for s in self.servers}
        self.loop = self.thread = self.stopping = None
        self.closed = False

    def start(self, cancelled=None):
        """Start every server at once and list their tools; returns the tool specs. Raises McpError naming a
        server that could not start or answer within START_TIMEOUT (the others are stopped then)."""
        if self.remote:
            stdio = [s.name for s in self.servers if s.WhichOneof("server_type") == "stdio"]
            if stdio:
                raise McpError(f"MCP server {stdio[0]} is a stdio server, which needs the filesystem sandbox (it runs "
                               "on the runner's host): HTTP servers work with any sandbox")
        try:
            import asyncio
            import mcp  # noqa: F401 - the SDK, imported only for an execution with servers
        except ImportError:
            raise McpError(f"this execution has MCP servers, but the mcp SDK is not installed: {INSTALL_HINT}") from None
        self.loop = asyncio.new_event_loop()
        self.stopping = asyncio.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mcp", daemon=True)
        self.thread.start()
        ready = {s.name: Future() for s in self.servers}  # a server's tools listed, or why it failed (thread-safe)
        self.tasks = asyncio.run_coroutine_threadsafe(self._spawn(ready), self.loop).result()
        deadline = time.monotonic() + START_TIMEOUT
        try:
            for server in self.servers:
                future = ready[server.name]
                while True:
                    try:
                        future.result(timeout=CANCEL_POLL)
                        break
                    except TimeoutError:
                        if cancelled is not None and cancelled():
                            raise McpError("cancelled while the MCP servers were starting") from None
                        if time.monotonic() > deadline:
                            tail = _tail(self._log(server.name))
                            raise McpError(f"MCP server {server.name} did not start within {START_TIMEOUT:.0f} s"
                                           + (f"; its stderr: {tail}" if tail else "")) from None
                    except McpError:
                        raise
                    except Exception as e:  # noqa: BLE001 - whatever the transport raised: the server failed
                        tail, reason = _tail(self._log(server.name)), _reason(e)
                        if "connection closed" in reason.lower():
                            reason = "it exited (or closed its output) before answering initialize"
                        raise McpError(f"MCP server {server.name} failed to start: {reason}"
                                       + (f"; its stderr: {tail}" if tail else "")) from None
        except BaseException:
            self.close()
            raise
        self.specs = [spec for server in self.servers for spec in self.by_server[server.name]]
        return self.specs

    async def _spawn(self, ready):
        import asyncio
        return [asyncio.ensure_future(self._serve(s, ready[s.name])) for s in self.servers]

    async def _shutdown(self):
        """Stop every server: those still starting at once, the others by their stop event, then whatever is left
        by cancelling it, each task awaited so that its transport closes (its process, its files)."""
        import asyncio
        self.stopping.set()
        tasks = getattr(self, "tasks", [])
        for server, task in zip(self.servers, tasks):
            if server.name not in self.sessions:
                task.cancel()  # still starting (or failed): nothing to wait for
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=STOP_TIMEOUT)

    def _log(self, name):
        return os.path.join(self.log_dir, f"mcp-{self.marker}-{name}.log")

    async def _serve(self, server, ready):
        """Hold SERVER's connection from start to stop: ready gets its tools (or the failure)."""
        from contextlib import AsyncExitStack

        from mcp import ClientSession
        try:
            async with AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport(server, stack))
                session = await stack.enter_async_context(ClientSession(read, write))
                init = await session.initialize()
                listed = await session.list_tools()
                self.sessions[server.name] = session
                wanted = set(server.enabled_tools)
                tools = sorted((t for t in listed.tools if not wanted or t.name in wanted), key=lambda t: t.name)
                own = self.by_server[server.name] = []
                for tool in tools:
                    name = tool_name(server.name, tool.name, {spec["name"] for spec in own})
                    self.tools[name] = (server.name, tool.name)
                    schema = getattr(tool, "inputSchema", None) or getattr(tool, "input_schema", None) or {}
                    own.append({"name": name, "description": (tool.description or tool.name)[:4000],
                                       "input_schema": schema if isinstance(schema, dict) else {"type": "object"}})
                about = getattr(init, "serverInfo", None) or getattr(init, "server_info", None)
                label = f"{getattr(about, 'name', '')} {getattr(about, 'version', '')}".strip() if about else ""
                self.info[server.name] = (len(tools), label)
                if not ready.done():
                    ready.set_result(True)
                await self.stopping.wait()
        except BaseException as e:  # noqa: BLE001 - ends the server: its calls say so from now on
            self.dead[server.name] = _reason(e)
            if not ready.done():
                ready.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
            if not isinstance(e, Exception):
                raise

    def _transport(self, server, stack):
        """The SDK's transport context for SERVER (stdio or streamable HTTP), ${NAME} filled from self.env."""
        kind = server.WhichOneof("server_type")
        if kind == "stdio":
            from mcp.client.stdio import StdioServerParameters, stdio_client

            import sandbox
            cfg = server.stdio
            env = {**self.env, **{k: fill(v, self.env) for k, v in cfg.env_placeholders.items()},
                   sandbox.EXECUTION_MARKER: self.marker, sandbox.RUN_MARKER: f"mcp-{self.marker}-{server.name}"}
            cwd = os.path.join(self.workspace, cfg.working_dir) if cfg.working_dir else self.workspace
            import home
            home.private_dirs(self.log_dir)
            fd = home.private_open(self._log(server.name), os.O_WRONLY | os.O_APPEND)
            errlog = stack.enter_context(os.fdopen(fd, "a", encoding="utf-8"))
            params = StdioServerParameters(command=fill(cfg.command, self.env),
                                           args=[fill(a, self.env) for a in cfg.args], env=env, cwd=cwd)
            return _guarded(stdio_client(params, errlog=errlog), env[sandbox.RUN_MARKER], self.groups, server.name)
        import httpx2

        from mcp.client.streamable_http import streamable_http_client
        cfg = server.http
        url = fill(cfg.url, self.env)
        if cfg.query_params:
            from urllib.parse import urlencode
            url += ("&" if "?" in url else "?") + urlencode({k: fill(v, self.env) for k, v in cfg.query_params.items()})
        client = httpx2.AsyncClient(headers={k: fill(v, self.env) for k, v in cfg.headers.items()},
                                    timeout=float(cfg.timeout_seconds or 30))
        return streamable_http_client(url, http_client=client)

    def allowed(self, name, only):
        """Whether the tool NAME may be offered under ONLY ({server: tool names or None for all}; None: any)."""
        if only is None:
            return True
        server, tool = self.tools[name]
        return server in only and (only[server] is None or tool in only[server])

    def call(self, name, args, cancelled=None):
        """Call the tool NAME (mcp__SERVER__TOOL) with ARGS: (output, is_error, exit_code, truncated) and, when the
        server answered, its images; never raising for the server's failures: a dead server, a timeout and a
        cancel are error results."""
        import asyncio
        server, tool = self.tools[name]
        if self.closed:
            return f"{name} was not called: the execution's MCP servers are stopped", True, 1, False
        if server in self.dead:
            return f"MCP server {server} is not running any more ({self.dead[server]}): its tools cannot be used", \
                True, 1, False
        timeout = self.timeouts[server]
        future = asyncio.run_coroutine_threadsafe(
            self.sessions[server].call_tool(tool, args, read_timeout_seconds=timeout), self.loop)
        deadline = time.monotonic() + timeout + 1.0
        while True:
            try:
                result = future.result(timeout=CANCEL_POLL)
                break
            except TimeoutError:
                if cancelled is not None and cancelled():
                    future.cancel()
                    return "not run: the execution was cancelled", True, 130, False
                if time.monotonic() > deadline:
                    future.cancel()
                    return f"{name} timed out after {timeout:.0f} s (MCP server {server})", True, 124, False
            except Exception as e:  # noqa: BLE001 - the session's error: a timeout, a dead server, a refusal
                reason = _reason(e)
                if server in self.dead or "connection closed" in reason.lower():
                    self.dead.setdefault(server, "it closed its connection")
                    return f"MCP server {server} stopped during the call ({self.dead[server]})", True, 1, False
                if "timed out" in reason.lower() or "timeout" in type(e).__name__.lower():
                    return f"{name} timed out after {timeout:.0f} s (MCP server {server})", True, 124, False
                return f"{name} failed (MCP server {server}): {reason}", True, 1, False
        text, is_error, images = result_text(result)
        return text, is_error, 1 if is_error else 0, False, images

    def notes(self):
        """One line per server for the log: its tools and version."""
        return "; ".join(f"{s.name}: {self.info[s.name][0]} tool{'s' if self.info[s.name][0] != 1 else ''}"
                         + (f" ({self.info[s.name][1]})" if self.info[s.name][1] else "")
                         for s in self.servers if s.name in self.info)

    def close(self):
        """Stop every server (a stdio server's whole process group), whatever state they are in; once."""
        if self.closed or self.loop is None:
            return
        self.closed = True
        import asyncio
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout=3 * STOP_TIMEOUT)
        except BaseException:  # noqa: BLE001 - a server that would not stop: its process group is killed below
            pass
        import sandbox
        for group in list(self.groups.values()):
            sandbox.unguard_group(group, kill=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(STOP_TIMEOUT)
        if not self.loop.is_running():
            self.loop.close()


def _reason(e):
    """One line for an exception from the SDK or a transport (task groups wrap the cause)."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


class _guarded:
    """An async context around the SDK's stdio_client that has the sandbox's guardian kill the server should the
    worker die, even by kill -9: by its RUN_MARKER from before it starts, and by its process group once found."""

    FIND_TRIES = 50  # x 10 ms: how long the server's group is looked for (its exec may still be under way)

    def __init__(self, inner, marker, groups, name):
        self.inner, self.marker, self.groups, self.name = inner, marker, groups, name

    async def __aenter__(self):
        import asyncio

        import sandbox
        sandbox.guard_marker(self.marker)
        try:
            streams = await self.inner.__aenter__()
        except BaseException:
            sandbox.guard_marker(self.marker, on=False)
            raise
        try:
            for _ in range(self.FIND_TRIES):
                pids = sandbox.marked_pids(self.marker)
                if pids:
                    self.groups[self.name] = sandbox.guard_group(min(pids), self.marker)
                    break
                await asyncio.sleep(0.01)
        except BaseException:  # cancelled while looking (the hub stops): the server must not outlive this
            await self.__aexit__(*sys.exc_info())
            raise
        return streams

    async def __aexit__(self, *exc):
        try:
            return await self.inner.__aexit__(*exc)
        finally:
            import sandbox
            group = self.groups.pop(self.name, None)
            if group is not None:
                sandbox.unguard_group(group, kill=True)
            sandbox.kill_marked(self.marker, sandbox.RUN_MARKER)  # what the group missed, or all when not found
            sandbox.guard_marker(self.marker, on=False)
