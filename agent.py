"""The tool-use loop: ask the model, run the tools, send the results, repeat.

The worker (worker.py) runs one `Agent` per execution:

    agent = Agent(models.make_model("claude-sonnet-4-5"), FilesystemSandbox(workspace), emit)
    agent = Agent(model, box, emit, instructions=spec.agent.instructions, project_docs=spec.project_docs)  # an agent
    phase, reason, final_text = agent.run("fix the failing test", workspace)
    agent.run("now add a test", workspace, history=parent_events)   # continue a conversation
    agent = Agent(..., team=subagents.Team(spec.agent.instructions, spec.agent.sub_agents))  # with the task tool

The loop is provider-neutral: it keeps the conversation as models.py's neutral messages
and gets one `models.Reply` per turn. `emit(**payload)` receives each event payload
(prompt, text, turn, tool_call, tool_result, usage, context_cleared, error) as a
stigmer_pb2 message; the worker's emit redacts it (the one redaction point of the log). The agent
redacts only what the model sees: tool output, and the notes that replace cleared results. What
the model writes is made valid text first (a lone surrogate becomes U+FFFD), so that every event
is a valid protobuf string. Those events are the conversation: `rebuild(events)`
turns them back into the messages the next request would send, so that a run can be
resumed from its log, byte for byte (the prompt cache still hits).

With a team (subagents.py) the agent also has the `task` tool: a task call runs a sub-agent, an Agent of its
own over the same sandbox whose events carry its name, its task call's id and its depth (emitted through the
same sink); the task calls of one turn run at the same time. rebuild() leaves sub-agents' events out.

The system prompt (system_prompt()) is the role (an agent's instructions, else DEFAULT_ROLE), the
runner's own part (workspace, OS, date, how to use the tools), then the project's instruction files
(AGENTS.md, CLAUDE.md: pb.ProjectDoc, read by the CLI). It is built once per conversation and kept
byte for byte: a resumed run takes its parent's from the first prompt event.

Near the model's context window (the previous request's input tokens past CLEAR_AT of it)
the oldest tool results are replaced by a short note until the estimate is under CLEAR_TO;
the most recent KEEP_RESULTS stay whole. Stop conditions (turn and token limits, refusal,
cancel, a fatal API error) are exceptions carrying the final reason. Tool failures are
data: they go back to the model as `is_error` results.
"""
import json
import platform
import posixpath
import re
import threading
import time
from datetime import date

import approvals
import models
import skills as skills_mod
import stigmer_pb2 as pb
import subagents
from sandbox import SandboxError

DEFAULT_MAX_TURNS = 50  # model turns per execution unless the spec says otherwise
TOOL_OUTPUT_CHARS = 30_000  # tool output sent to the model: head plus tail beyond this
READ_DEFAULT_LINES = 2000  # read_file's default limit
CONTINUE_NOTE = "Your previous reply was cut off by the output token limit. Continue exactly where you stopped."
TOOL_CUT_NOTE = ("Your previous reply was cut off by the output token limit in the middle of a tool call, so the "
                 "tool was not run. Make the call again, smaller: for example write a large file in several parts.")
CUT_TEXT = "(reply cut off by the output token limit)"  # the assistant text of a cut-off reply that had none
NOT_RUN = "not run: the execution was cancelled"  # the result of a tool call that never ran
NO_OUTPUT = "(no output)"  # what the model gets for an empty tool output
OUTPUT_EVERY = 0.3  # seconds between a running command's output events
OUTPUT_CAP = 64 * 1024  # characters of live output events per command (the tool result has the output the model sees)
OUTPUT_LINE = 4096  # bytes of a line without its end that are sent anyway
CLEAR_AT = 0.80  # share of the context window the previous request may fill before old tool results are cleared
CLEAR_TO = 0.50  # ... clearing goes on until the estimate is under this share
KEEP_RESULTS = 3  # the most recent tool results are never cleared
CHARS_PER_TOKEN = 4  # for estimating what clearing a result saves

TOOLS = [
    {"name": "execute",
     "description": "Run a shell command (bash -c semantics via /bin/sh) in the workspace directory and return its "
                    "exit code, stdout and stderr. Each call is a fresh shell: cd and variables do not persist. "
                    "stdin is closed, so interactive programs get EOF; pass flags such as --yes. Background "
                    "processes are killed when the command returns. Default timeout 120 s (max 600).",
     "input_schema": {"type": "object", "properties": {
         "command": {"type": "string", "description": "The shell command line."},
         "timeout": {"type": "number", "description": "Seconds before the command is killed (default 120, max 600)."}},
         "required": ["command"]}},
    {"name": "read_file",
     "description": "Read a UTF-8 text file in the workspace. Returns lines prefixed with their 1-based number and a "
                    "tab; the prefix is not part of the file. Use offset (0-based line) and limit for large files. "
                    "Binary files and files over 10 MB are refused.",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string", "description": "Path relative to the workspace (or absolute inside it)."},
         "offset": {"type": "integer", "description": "First line to return, 0-based (default 0)."},
         "limit": {"type": "integer", "description": f"Most lines to return (default {READ_DEFAULT_LINES})."}},
         "required": ["path"]}},
    {"name": "write_file",
     "description": "Create or overwrite a file in the workspace with the given content (UTF-8). Parent "
                    "directories are created. Prefer edit_file for changing part of an existing file.",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string", "description": "Path relative to the workspace."},
         "content": {"type": "string", "description": "The whole new content of the file."}},
         "required": ["path", "content"]}},
    {"name": "edit_file",
     "description": "Replace an exact string in a file. old_string must match the file exactly (whitespace "
                    "included, no line-number prefixes) and be unique unless replace_all is true. Returns how "
                    "many replacements were made.",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string", "description": "Path relative to the workspace."},
         "old_string": {"type": "string", "description": "The exact text to replace."},
         "new_string": {"type": "string", "description": "The replacement text (must differ)."},
         "replace_all": {"type": "boolean", "description": "Replace every occurrence (default false)."}},
         "required": ["path", "old_string", "new_string"]}},
    {"name": "ls",
     "description": "List a directory in the workspace, sorted; directories end with /.",
     "input_schema": {"type": "object", "properties": {
         "path": {"type": "string", "description": "Directory relative to the workspace (default .)."}}}},
    {"name": "glob",
     "description": "Find files by glob pattern, e.g. **/*.py, relative to path. Returns workspace-relative paths.",
     "input_schema": {"type": "object", "properties": {
         "pattern": {"type": "string", "description": "Glob pattern; ** matches any depth."},
         "path": {"type": "string", "description": "Directory to search from (default .)."}},
         "required": ["pattern"]}},
    {"name": "grep",
     "description": "Search file contents for a literal string (not a regex). Returns path:line:text matches, "
                    "capped at 1000; binary files are skipped.",
     "input_schema": {"type": "object", "properties": {
         "pattern": {"type": "string", "description": "The literal text to find."},
         "path": {"type": "string", "description": "File or directory to search (default .)."},
         "glob": {"type": "string", "description": "Only files matching this glob, e.g. *.py."}},
         "required": ["pattern"]}},
]

DEFAULT_ROLE = "You are a coding agent working in a workspace directory on the user's machine."
SYSTEM_PROMPT = """{role}

Workspace: {workspace}
OS: {os}
Date: {date}

How to work well:
- Explore before you change: ls, glob and grep to find things, read_file before editing.
- Use edit_file for targeted changes (old_string copied exactly from read_file output, without the line-number prefix); write_file for new files.
- Run commands with execute to build, test and check your work. Each command runs in a fresh shell in the workspace; stdin is closed.
- Paths are relative to the workspace; file tools cannot reach outside it.
- When a tool fails, read the error and adjust; do not repeat the same call unchanged.
- When the task is done, reply with a short summary of what you changed and how you verified it."""
AGENT_ROLE = "{instructions}\n\nYou work in a workspace directory on the user's machine, with tools to run commands and to read and edit files."
PROJECT_DOCS_HEAD = ("# Project instructions\n\nThe files below hold instructions from the project and from the "
                     "user, the most general first. Follow them where they apply; where two disagree, the later "
                     "one wins, and the user's request wins over all of them.")


def system_prompt(workspace, instructions="", project_docs=(), skills=()):
    """The system prompt of a new conversation: the role (INSTRUCTIONS, an agent's, in place of DEFAULT_ROLE),
    the runner's own part (workspace, OS, date, how to use the tools), the PROJECT_DOCS (pb.ProjectDoc,
    in order), then the catalogue of SKILLS (none: no section). The same inputs give the same bytes, on any day
    but its date line."""
    role = AGENT_ROLE.format(instructions=instructions.strip()) if instructions.strip() else DEFAULT_ROLE
    text = SYSTEM_PROMPT.format(role=role, workspace=workspace, os=platform.platform(), date=date.today().isoformat())
    docs = [d for d in project_docs if d.text.strip()]
    if docs:
        text += "\n\n" + PROJECT_DOCS_HEAD + "".join(
            f"\n\n## {d.path}{' (cut to fit)' if d.truncated else ''}\n\n{d.text.strip()}" for d in docs)
    if skills:
        text += "\n\n" + skills_mod.catalogue(skills)
    return text


class Stop(Exception):
    """Ends the run: carries the final phase and the reason a person reads."""

    def __init__(self, phase, reason, code=""):
        super().__init__(reason)
        self.phase, self.reason, self.code = phase, reason, code


def cancel_stop():
    """The Stop that ends a run the user cancelled."""
    return Stop(pb.CANCELLED, "cancelled by the user", "cancelled")


class LiveOutput:
    """A running command's output as `output` events for CALL_ID: whole lines, batched every OUTPUT_EVERY seconds
    by a thread that starts with the first chunk, at most OUTPUT_CAP characters (then one note). EMIT is the
    agent's (the worker redacts every event)."""

    def __init__(self, emit, call_id):
        self.emit, self.call_id = emit, call_id
        self.lock = threading.Lock()
        self.pending = {"stdout": bytearray(), "stderr": bytearray()}
        self.sent = 0
        self.done = threading.Event()
        self.thread = None

    def feed(self, stream, data):
        """ON_OUTPUT for the sandbox's execute()."""
        with self.lock:
            self.pending[stream] += data
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="live-output", daemon=True)
                self.thread.start()

    def _loop(self):
        while not self.done.wait(OUTPUT_EVERY):
            self.flush()

    def flush(self):
        """Send the whole lines (and overlong line starts) that came since the last flush."""
        with self.lock:
            batches = []
            for stream, buf in self.pending.items():
                end = buf.rfind(b"\n") + 1 or (len(buf) if len(buf) >= OUTPUT_LINE else 0)
                if end:
                    batches.append((stream, bytes(buf[:end]).decode("utf-8", "replace")))
                    del buf[:end]
        for stream, text in batches:
            if self.sent >= OUTPUT_CAP:
                return
            if self.sent + len(text) > OUTPUT_CAP:
                text = "… live output capped here; the command goes on, and its result has the output\n"
                self.sent = OUTPUT_CAP
            else:
                self.sent += len(text)
            self.emit(output=pb.Output(call_id=self.call_id, stream=stream, text=valid_text(text)))

    def close(self):
        """The command ended: its last lines go too when some went live already (the view stays whole), and a
        command that ended before the first batch sends nothing (its result follows, with the output)."""
        self.done.set()
        if self.thread is not None:
            self.thread.join()
            if self.sent:
                for buf in self.pending.values():
                    if buf and not buf.endswith(b"\n"):
                        buf += b"\n"
                self.flush()


def cap_output(text, limit=TOOL_OUTPUT_CHARS):
    """Head plus tail of TEXT within LIMIT characters, saying what was cut."""
    if len(text) <= limit:
        return text, False
    head = limit * 2 // 3
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n… {cut} characters cut from the middle of this output …\n{text[-tail:]}", True


SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate: no UTF-8 (so no protobuf string) can hold it


def valid_text(text):
    """TEXT with each lone surrogate replaced by U+FFFD (model output and tool output are data, never a crash)."""
    return SURROGATE.sub("\ufffd", text) if SURROGATE.search(text) else text


def valid_value(value):
    """A decoded JSON VALUE (a tool call's input) with valid_text applied to its strings and keys."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, list):
        return [valid_value(v) for v in value]
    if isinstance(value, dict):
        return {valid_text(k): valid_value(v) for k, v in value.items()}
    return value


def valid_reply(reply):
    """REPLY (models.Reply) with its text and tool inputs made valid text."""
    calls = [c._replace(input=valid_value(c.input)) for c in reply.tool_calls]
    return reply._replace(text=valid_text(reply.text), tool_calls=calls)


class Agent:
    """One execution's conversation with the model and its tools."""

    def __init__(self, model, sandbox, emit, *, max_turns=DEFAULT_MAX_TURNS, max_tokens_total=0,
                 redactor=None, shell_env=None, context_window=0, instructions="", project_docs=(), team=None,
                 depth=0, subagent="", task_call_id="", skills=None, mcp=None, mcp_filter=None, gate=None):
        self.model, self.sandbox = model, sandbox  # model: e.g. models.AnthropicModel
        self.sink = emit  # the execution's emit, untagged (a sub-agent's events go there too)
        self.depth, self.subagent, self.task_call_id = depth, subagent, task_call_id  # 0, "", "": the execution's own
        self.emit = emit if not depth else (
            lambda **payload: emit(subagent=subagent, task_call_id=task_call_id, depth=depth, **payload))
        self.team = team  # subagents.Team: the sub-agents this agent may start with the task tool; None: no task tool
        self.gate = gate if gate is not None and not gate.quiet() else None  # approvals.Gate; None: nothing asked
        self.mcp = mcp  # mcp_tools.Hub: the execution's MCP servers, their tools after the built-in ones; None: none
        self.mcp_filter = mcp_filter  # {server: tool names or None} this agent may use (a sub-agent's); None: all
        mcp_specs = [t for t in (mcp.specs if mcp else ()) if mcp.allowed(t["name"], mcp_filter)]
        self.mcp_names = {t["name"] for t in mcp_specs}
        self.tool_specs = TOOLS + ([team.spec] if team is not None else []) + mcp_specs
        self.children = set()  # sub-agents running now (task calls), cancelled with this agent
        self.children_lock = threading.Lock()  # not usage_lock: cancel() must never wait on an emit
        self.workspace = ""  # run()'s
        self.instructions = instructions  # an agent's (pb.AgentSpec.instructions); empty: the default role
        self.project_docs = list(project_docs)  # pb.ProjectDoc, for the system prompt of a new conversation
        self.skills = skills  # skills.Shelf: the execution's skills (catalogue, reads, first reads); None: none
        self.context_window = context_window or models.context_window(getattr(model, "model", ""))
        self.context_tokens = 0  # the previous request's input tokens (input + cache read + cache write)
        self.max_turns = max_turns or DEFAULT_MAX_TURNS
        self.max_tokens_total = max_tokens_total
        self.redactor = redactor
        self.shell_env = shell_env
        self.cancelled = threading.Event()
        self.turns = 0
        self.usage = pb.Usage()  # cumulative over the execution: a sub-agent shares its parent's (and the lock)
        self.usage_lock = threading.Lock()

    def cancel(self):
        """Stop the model stream, the running tools and every running sub-agent; run() then raises Stop(CANCELLED)."""
        self.cancelled.set()
        self.model.close()
        with self.children_lock:
            children = list(self.children)
        for child in children:
            child.cancel()

    def _redact(self, text):
        return self.redactor.redact(text) if self.redactor else text

    def run(self, prompt, workspace, history=()):
        """Run to the end; returns (phase, reason, final_text). HISTORY: the events of the conversation this
        run continues (its parent's, and theirs, oldest first); PROMPT is then the next user message."""
        self.workspace = workspace
        system, messages, self.context_tokens = rebuild(history)
        docs = []
        if not system:  # a new conversation (a resumed one keeps its parent's system prompt, byte for byte)
            system = system_prompt(workspace, self.instructions, self.project_docs,
                                   self.skills.skills if self.skills else ())
            docs = [d.path + (" (cut)" if d.truncated else "") for d in self.project_docs if d.text.strip()]
        try:
            self._resume_waiting(history, messages)
        except Stop as stop:
            return stop.phase, stop.reason, ""
        self._say(messages, prompt, "task", system, docs)
        try:
            while True:
                reply = self._turn(system, messages)
                if reply.stop in (models.STOP_TOOL_USE, models.STOP_PAUSE):
                    messages.append({"role": "assistant", "text": reply.text, "tool_calls": reply.tool_calls})
                    if reply.stop == models.STOP_TOOL_USE:
                        messages.append({"role": "tool_results", "results": self._run_tools(reply.tool_calls)})
                elif reply.stop == models.STOP_MAX_TOKENS:  # cut off; a cut tool call is dropped, not run
                    messages.append({"role": "assistant", "tool_calls": [], "text": reply.text or CUT_TEXT})
                    self._say(messages, TOOL_CUT_NOTE if reply.tool_calls else CONTINUE_NOTE, "note")
                elif reply.stop == models.STOP_REFUSAL:
                    raise Stop(pb.FAILED, "the model refused this task; its tools were not run", "refusal")
                elif reply.stop == models.STOP_CONTEXT:
                    if self._fit(messages, force=True):
                        continue  # asked again with old tool results cleared
                    raise Stop(pb.FAILED, "the conversation no longer fits the model's context window", "context_window")
                else:  # done
                    return pb.COMPLETED, "", reply.text
        except Stop as stop:
            return stop.phase, stop.reason, ""

    def _resume_waiting(self, history, messages):
        """The calls of the conversation's last tool turn that were waiting for approval when their run ended (its
        worker died, or it was cancelled): run them now, asking again, before the new message. Their results take
        the place of "not run" (rebuild() reads them from this execution's log the same way)."""
        waiting = awaiting_approval(history)
        if not waiting or not messages or messages[-1]["role"] != "tool_results":
            return
        calls = [c for c in messages[-2]["tool_calls"] if c.id in waiting] if len(messages) > 1 else []
        results = [None] * len(calls)
        for n, call in enumerate(calls):
            self._run_tool(call, n, results)
        if self.cancelled.is_set():
            raise cancel_stop()
        fresh = {r["id"]: r for r in results}
        messages[-1]["results"] = [fresh.get(r["id"], r) for r in messages[-1]["results"]]

    def _say(self, messages, text, kind, system="", docs=()):
        """Add a user message to the conversation and to the log (DOCS: the project files in SYSTEM)."""
        messages.append({"role": "user", "text": text})
        self.emit(prompt=pb.Prompt(text=text, source=kind, system=system, project_docs=docs))

    def _check_limits(self):
        if self.cancelled.is_set():
            raise cancel_stop()
        if self.turns >= self.max_turns:
            raise Stop(pb.FAILED, f"reached the turn limit ({self.max_turns} turn{'s' if self.max_turns != 1 else ''}); "
                                 "raise it with --max-turns", "max_turns")
        spent = self.usage.input_tokens + self.usage.output_tokens + self.usage.cache_read_tokens + self.usage.cache_write_tokens
        if self.max_tokens_total and spent >= self.max_tokens_total:
            raise Stop(pb.FAILED, f"reached the token limit ({spent} of {self.max_tokens_total} tokens)", "max_tokens_total")

    def _turn(self, system, messages):
        """One model turn, streamed to emit; returns the Reply. A failed turn becomes a Stop."""
        self._check_limits()
        self._fit(messages)
        while True:
            try:
                reply = self.model.turn(system, self.tool_specs, messages, on_text=self._stream_text,
                                        cancelled=self.cancelled,
                                        on_retry=self._stream_retry)
                break
            except models.Cancelled:
                raise cancel_stop() from None
            except models.ModelError as exc:
                if exc.code == "context_window" and self._fit(messages, force=True):
                    continue  # asked again with old tool results cleared
                message = valid_text(exc.message)
                self.emit(error=pb.Error(code=exc.code, message=message))
                raise Stop(pb.FAILED, message, exc.code) from None
        self.turns += 1  # a turn is a reply: a request that failed or was cancelled is not counted
        reply = valid_reply(reply)
        self._add_usage(reply.usage)
        u = reply.usage
        self.context_tokens = u.input + u.cache_read + u.cache_write
        self.emit(turn=pb.Turn(number=self.turns, stop=reply.stop, text=reply.text,
                               context_tokens=self.context_tokens))
        return reply

    def _fit(self, messages, force=False):
        """Before a request: when the previous one filled CLEAR_AT of the context window (FORCE: the model
        said the conversation no longer fits), replace the content of the oldest tool results by a note,
        keeping the last KEEP_RESULTS, until the estimate is under CLEAR_TO. True when it cleared any."""
        window = self.context_window
        before = max(self.context_tokens, window) if force else self.context_tokens
        if not window or before < window * CLEAR_AT:
            return False
        calls = {c.id: c for m in messages if m["role"] == "assistant" for c in m["tool_calls"]}
        results = [r for m in messages if m["role"] == "tool_results" for r in m["results"]]
        estimate, cleared = before, []
        for result in results[:max(0, len(results) - KEEP_RESULTS)]:
            if estimate < window * CLEAR_TO:
                break
            note = cleared_note(calls.get(result["id"]), self._redact)
            saved = (len(result["output"]) - len(note)) // CHARS_PER_TOKEN
            saved += sum(len(d) for _, d in result.get("images", ())) // CHARS_PER_TOKEN
            if saved > 0:  # else already cleared, or too short to matter
                result["output"] = note
                result.pop("images", None)
                estimate -= saved
                cleared.append(result["id"])
        if not cleared:
            return False
        self.context_tokens = estimate
        self.emit(context_cleared=pb.ContextCleared(results=len(cleared), tokens_before=before, tokens_after=estimate,
                                                    ids=cleared, window=window))
        return True

    def _stream_text(self, text):
        if not self.depth:  # a sub-agent's text is in its turn events (two at once would interleave deltas)
            self.emit(text=pb.TextDelta(text=valid_text(text)))

    def _stream_retry(self, message, code="stream_retry"):
        """A model call is asked for again (CODE: stream_retry, its reply broke off; api_retry, the API failed in
        a way that may pass): an event, shown as a dim line, so that a slow turn says why."""
        self.emit(error=pb.Error(code=code, message=valid_text(message)))

    def _add_usage(self, usage):
        with self.usage_lock:  # the execution's total (sub-agents add theirs); each usage event is cumulative
            self.usage.input_tokens += usage.input
            self.usage.output_tokens += usage.output
            self.usage.cache_read_tokens += usage.cache_read
            self.usage.cache_write_tokens += usage.cache_write
            self.emit(usage=pb.Usage(input_tokens=self.usage.input_tokens, output_tokens=self.usage.output_tokens,
                                     cache_read_tokens=self.usage.cache_read_tokens,
                                     cache_write_tokens=self.usage.cache_write_tokens, skills=self.usage.skills))

    def _run_tools(self, calls):
        """Run every tool call of a turn (models.ToolUse), in order; a task call starts its sub-agent on a thread and
        the next call goes on, so the task calls of a turn run at the same time. Returns all their results, in
        call order, for one message."""
        results, threads = [None] * len(calls), []
        for n, call in enumerate(calls):
            self.emit(tool_call=pb.ToolCall(id=call.id, name=call.name,
                                            input_json=json.dumps(call.input, ensure_ascii=False)))
            if call.name == subagents.TASK and self.team is not None and not self.cancelled.is_set():
                threads.append(subagents.start(self._run_tool, call, n, results))
            else:
                self._run_tool(call, n, results)
        for thread in threads:
            thread.join()
        if self.cancelled.is_set():
            raise cancel_stop()
        return results

    def _run_tool(self, call, n, results):
        """Run CALL, emit its result event and put its result for the model at RESULTS[N]."""
        if self.cancelled.is_set():
            output, is_error, exit_code, truncated, duration, images = NOT_RUN, True, 130, False, 0.0, ()
        else:
            start = time.monotonic()
            self._call_id = call.id  # for live output (the calls of one agent run one at a time)
            refusal = self.gate.check(call, self._describe, self.emit) if self.gate is not None else None
            more = ()
            if refusal == approvals.CANCELLED or self.cancelled.is_set():  # cancelled while it waited for an answer
                output, is_error, exit_code, truncated = NOT_RUN, True, 130, False
            elif refusal is not None:
                output, is_error, exit_code, truncated = refusal, True, 1, False
            else:
                output, is_error, exit_code, truncated, *more = self._call_tool(call)
            images = more[0] if more else ()  # an MCP tool's images: [(media type, bytes)]
            duration = time.monotonic() - start
        output, cut = cap_output(self._redact(valid_text(output)))
        self.emit(tool_result=pb.ToolResult(id=call.id, is_error=is_error, exit_code=exit_code, output=output,
                                            truncated=truncated or cut, duration_ms=int(duration * 1000),
                                            images=[pb.Image(media_type=m, data=d) for m, d in images]))
        results[n] = {"id": call.id, "output": output or NO_OUTPUT, "is_error": is_error}
        if images:
            results[n]["images"] = list(images)

    def _call_tool(self, call):
        """Run one tool call: returns (output, is_error, exit_code, truncated). Never raises for tool failures."""
        name, args = call.name, call.input
        if not isinstance(args, dict) or "__malformed__" in args:
            detail = args.get("__malformed__") if isinstance(args, dict) else repr(args)
            return f"not run: the tool input was not a valid JSON object ({detail}); send it again as JSON", True, 2, False
        spec = next((t for t in self.tool_specs if t["name"] == name), None)
        if spec is None:
            return f"unknown tool {name!r}; the tools are: {', '.join(t['name'] for t in self.tool_specs)}", True, 2, False
        if name in self.mcp_names:  # the server checks its own input
            return self.mcp.call(name, args, self.cancelled.is_set)
        problem = check_args(args, spec["input_schema"])
        if problem:
            return f"invalid input for {name}: {problem}", True, 2, False
        if name == subagents.TASK:
            return subagents.run_task(self, call)
        tool = TOOL_FUNCS[name]
        try:
            return tool(self, **args)
        except SandboxError as exc:
            return str(exc), True, 1, False
        except (OSError, ValueError) as exc:  # a tool should have said SandboxError; still the model's to handle
            return f"{name} failed: {type(exc).__name__}: {exc}", True, 1, False

    def _execute(self, command, timeout=None):
        timeout = min(float(timeout), 600.0) if timeout else None
        live = LiveOutput(self.emit, getattr(self, "_call_id", ""))
        try:
            result = self.sandbox.execute(command, timeout=timeout, env=self.shell_env, cancel=self.cancelled,
                                          on_output=live.feed)
        finally:
            live.close()
        parts = [result.output.rstrip("\n")]
        if result.exit_code != 0:
            parts.append(f"[exit code {result.exit_code}]")
        return "\n".join(p for p in parts if p), result.exit_code != 0, result.exit_code, result.truncated

    def _describe(self, call):
        """A write's or edit's change to its file as a unified diff (for its approval request)."""
        import difflib

        from sandbox import _replace
        args = call.input
        box, inside = self._box(args["path"])
        try:
            old = box.read(inside)
        except SandboxError:
            old = None
        if call.name == "write_file":
            new = args["content"]
        else:
            new, _ = _replace(old or "", args["path"], args["old_string"], args["new_string"],
                              args.get("replace_all", False))
        return "".join(difflib.unified_diff((old or "").splitlines(True), new.splitlines(True),
                                            "/dev/null" if old is None else f"a/{args['path']}", f"b/{args['path']}"))

    def _box(self, path):
        """(sandbox, path) for a file tool: a skill's folder outside the workspace has a read-only view of its own."""
        return self.skills.route(path) if self.skills else (self.sandbox, path)

    def _check_write(self, path):
        if self.skills:
            self.skills.check_write(path)

    def _read(self, path, offset=0, limit=None):
        box, inside = self._box(path)
        text = box.read(inside, offset=offset, limit=limit or READ_DEFAULT_LINES)
        skill = self.skills.first_read(path) if self.skills else None
        if skill is not None:  # a SKILL.md read for the first time: the log says which skill the agent took up
            with self.usage_lock:
                self.usage.skills.append(skill.name)
            self.emit(skill=pb.SkillUsed(name=skill.name, path=skill.path))
        lines = text.splitlines()
        numbered = "\n".join(f"{offset + i + 1}\t{line}" for i, line in enumerate(lines))
        return numbered or "(empty file or no lines in that range)", False, 0, False

    def _write(self, path, content):
        self._check_write(path)
        self.sandbox.write(path, content)
        return f"wrote {len(content.encode())} bytes to {path}", False, 0, False

    def _edit(self, path, old_string, new_string, replace_all=False):
        self._check_write(path)
        count = self.sandbox.edit(path, old_string, new_string, replace_all=replace_all)
        return f"replaced {count} occurrence{'s' if count != 1 else ''} in {path}", False, 0, False

    def _ls(self, path="."):
        box, inside = self._box(path)
        return "\n".join(box.ls(inside)) or "(empty directory)", False, 0, False

    def _glob(self, pattern, path="."):
        box, inside = self._box(path)
        found = box.glob(pattern, inside, cancel=self.cancelled)
        shown = found if box is self.sandbox else [posixpath.join(box.root, p) for p in found]  # a skill's: whole
        return _search_output(found, "\n".join(shown)), False, 0, False

    def _grep(self, pattern, path=".", glob=None):
        box, inside = self._box(path)
        hits = box.grep(pattern, inside, glob=glob, cancel=self.cancelled)
        shown = (lambda p: p) if box is self.sandbox else (lambda p: posixpath.join(box.root, p))
        return _search_output(hits, "\n".join(f"{shown(p)}:{n}:{line}" for p, n, line in hits)), False, 0, False


def _search_output(found, text):
    """A glob's or grep's text for the model, saying so when the search stopped early (its cut_off)."""
    cut_off = getattr(found, "cut_off", None)
    if cut_off:
        return (text + "\n" if text else "") + f"[search {cut_off}]"
    return text or "(no matches)"


TOOL_FUNCS = {"execute": Agent._execute, "read_file": Agent._read, "write_file": Agent._write,
              "edit_file": Agent._edit, "ls": Agent._ls, "glob": Agent._glob, "grep": Agent._grep}
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict}


def cleared_note(call, redact=lambda text: text):
    """What a cleared tool result says instead of its output (CALL: the models.ToolUse, or None)."""
    args = call.input if call is not None and isinstance(call.input, dict) else {}
    if call is None:
        what = "this tool call"
    elif call.name == "execute" and isinstance(args.get("command"), str):
        what = args["command"]
    else:
        what = " ".join([call.name, *(str(args[k]) for k in ("path", "pattern") if k in args)])
    what = redact(what if len(what) <= 200 else what[:200] + "…").replace("`", "'")
    return f"output of `{what}` cleared to save context; run it again if you need it"


def awaiting_approval(events):
    """The ids of the tool calls of the conversation's own agent in EVENTS (oldest first) that asked for approval
    and have neither an answer nor a result: their run ended while they waited."""
    return set(approvals.waiting_calls(e for e in events if not e.depth)[0].values())


def rebuild(events):
    """The conversation recorded by EVENTS (pb.Event of one execution and its ancestors, oldest first) as
    (system_text, neutral messages, the last request's context tokens): what the next request would send,
    before its new user message. Sub-agents' events (depth > 0) are not part of it. A tool call with no result (the run was cancelled or lost) gets a "not
    run" result; a turn that never ended (no turn event) is left out; cleared results stay cleared."""
    system, messages, tokens = "", [], 0
    open_turn, results, cleared, calls = None, {}, set(), {}

    def close_turn():  # the results of the open tool turn, in the order of its calls
        nonlocal open_turn
        if open_turn is not None and open_turn["tool_calls"]:
            messages.append({"role": "tool_results", "results": [
                results.get(c.id) or {"id": c.id, "output": NOT_RUN, "is_error": True} for c in open_turn["tool_calls"]]})
        open_turn = None

    for event in events:
        if event.depth:
            continue  # a sub-agent's: its conversation is its own
        kind = event.WhichOneof("payload")
        if kind == "prompt":
            close_turn()
            system = system or event.prompt.system
            messages.append({"role": "user", "text": event.prompt.text})
        elif kind == "turn":
            close_turn()
            turn = event.turn
            tokens = turn.context_tokens
            if turn.stop in (models.STOP_TOOL_USE, models.STOP_PAUSE, models.STOP_DONE, models.STOP_MAX_TOKENS):
                text = turn.text or (CUT_TEXT if turn.stop == models.STOP_MAX_TOKENS else "")
                if turn.stop == models.STOP_DONE and not text:
                    continue  # an empty final answer is no message
                messages.append({"role": "assistant", "text": text, "tool_calls": []})
                if turn.stop == models.STOP_TOOL_USE:
                    open_turn = messages[-1]
        elif kind == "tool_call" and open_turn is not None:
            call = event.tool_call
            try:
                args = json.loads(call.input_json)
            except ValueError:
                args = {"__malformed__": "the logged input is not JSON"}
            calls[call.id] = models.ToolUse(call.id, call.name, args)
            open_turn["tool_calls"].append(calls[call.id])
        elif kind == "tool_result":
            r = event.tool_result
            results[r.id] = {"id": r.id, "output": r.output or NO_OUTPUT, "is_error": r.is_error}
            if r.images:
                results[r.id]["images"] = [(i.media_type, i.data) for i in r.images]
        elif kind == "context_cleared":
            cleared.update(event.context_cleared.ids)
            tokens = event.context_cleared.tokens_after
    close_turn()
    for message in messages:
        for result in message.get("results", ()):
            if result["id"] in cleared:
                result["output"] = cleared_note(calls.get(result["id"]))
                result.pop("images", None)
    return system, messages, tokens


def check_args(args, schema):
    """What is wrong with ARGS against a flat JSON schema, or None."""
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        return f"missing required field{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"
    unknown = [k for k in args if k not in props]
    if unknown:
        return f"unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} (expected {', '.join(props)})"
    for key, value in args.items():
        want = props[key]["type"]
        ok = isinstance(value, _JSON_TYPES[want]) and not (want in ("integer", "number") and isinstance(value, bool))
        if not ok:
            return f"{key} must be {'an' if want[0] in 'aeiou' else 'a'} {want}, got {type(value).__name__}"
    return None
