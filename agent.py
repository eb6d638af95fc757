"""The tool-use loop: ask the model, run the tools, send the results, repeat.

The worker (worker.py) runs one `Agent` per execution:

    agent = Agent(models.make_model("claude-sonnet-4-5"), FilesystemSandbox(workspace), emit)
    phase, reason, final_text = agent.run("fix the failing test", workspace)

The loop is provider-neutral: it keeps the conversation as models.py's neutral messages
and gets one `models.Reply` per turn. `emit(**payload)` receives each event payload
(text, tool_call, tool_result, usage, error) as a stigmer_pb2 message, already redacted.
Stop conditions (turn and token limits, refusal, cancel, a fatal API error) are
exceptions carrying the final reason. Tool failures are data: they go back to the model
as `is_error` results.
"""
import json
import platform
import threading
import time
from datetime import date

import models
import stigmer_pb2 as pb
from sandbox import SandboxError

DEFAULT_MAX_TURNS = 50  # model turns per execution unless the spec says otherwise
TOOL_OUTPUT_CHARS = 30_000  # tool output sent to the model: head plus tail beyond this
READ_DEFAULT_LINES = 2000  # read_file's default limit
CONTINUE_NOTE = "Your previous reply was cut off by the output token limit. Continue exactly where you stopped."
TOOL_CUT_NOTE = ("Your previous reply was cut off by the output token limit in the middle of a tool call, so the "
                 "tool was not run. Make the call again, smaller: for example write a large file in several parts.")

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

SYSTEM_PROMPT = """You are a coding agent working in a workspace directory on the user's machine.

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


class Stop(Exception):
    """Ends the run: carries the final phase and the reason a person reads."""

    def __init__(self, phase, reason, code=""):
        super().__init__(reason)
        self.phase, self.reason, self.code = phase, reason, code


def cancel_stop():
    """The Stop that ends a run the user cancelled."""
    return Stop(pb.CANCELLED, "cancelled by the user", "cancelled")


def cap_output(text, limit=TOOL_OUTPUT_CHARS):
    """Head plus tail of TEXT within LIMIT characters, saying what was cut."""
    if len(text) <= limit:
        return text, False
    head = limit * 2 // 3
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n… {cut} characters cut from the middle of this output …\n{text[-tail:]}", True


class Agent:
    """One execution's conversation with the model and its tools."""

    def __init__(self, model, sandbox, emit, *, max_turns=DEFAULT_MAX_TURNS, max_tokens_total=0,
                 redactor=None, shell_env=None):
        self.model, self.sandbox, self.emit = model, sandbox, emit  # model: e.g. models.AnthropicModel
        self.max_turns = max_turns or DEFAULT_MAX_TURNS
        self.max_tokens_total = max_tokens_total
        self.redactor = redactor
        self.shell_env = shell_env
        self.cancelled = threading.Event()
        self.turns = 0
        self.usage = pb.Usage()

    def cancel(self):
        """Stop the model stream and the running tool; run() then raises Stop(CANCELLED)."""
        self.cancelled.set()
        self.model.close()

    def _redact(self, text):
        return self.redactor.redact(text) if self.redactor else text

    def run(self, prompt, workspace):
        """Run to the end; returns (phase, reason, final_text)."""
        system = SYSTEM_PROMPT.format(workspace=workspace, os=platform.platform(), date=date.today().isoformat())
        messages = [{"role": "user", "text": prompt}]
        try:
            while True:
                reply = self._turn(system, messages)
                if reply.stop in (models.STOP_TOOL_USE, models.STOP_PAUSE):
                    messages.append({"role": "assistant", "text": reply.text, "tool_calls": reply.tool_calls})
                    if reply.stop == models.STOP_TOOL_USE:
                        messages.append({"role": "tool_results", "results": self._run_tools(reply.tool_calls)})
                elif reply.stop == models.STOP_MAX_TOKENS:  # cut off; a cut tool call is dropped, not run
                    messages.append({"role": "assistant", "tool_calls": [],
                                     "text": reply.text or "(reply cut off by the output token limit)"})
                    messages.append({"role": "user", "text": TOOL_CUT_NOTE if reply.tool_calls else CONTINUE_NOTE})
                elif reply.stop == models.STOP_REFUSAL:
                    raise Stop(pb.FAILED, "the model refused this task; its tools were not run", "refusal")
                elif reply.stop == models.STOP_CONTEXT:
                    raise Stop(pb.FAILED, "the conversation no longer fits the model's context window", "context_window")
                else:  # done
                    return pb.COMPLETED, "", self._redact(reply.text)
        except Stop as stop:
            return stop.phase, stop.reason, ""

    def _check_limits(self):
        if self.cancelled.is_set():
            raise cancel_stop()
        if self.turns >= self.max_turns:
            raise Stop(pb.FAILED, f"reached the turn limit ({self.max_turns} turns); raise it with --max-turns", "max_turns")
        spent = self.usage.input_tokens + self.usage.output_tokens + self.usage.cache_read_tokens + self.usage.cache_write_tokens
        if self.max_tokens_total and spent >= self.max_tokens_total:
            raise Stop(pb.FAILED, f"reached the token limit ({spent} of {self.max_tokens_total} tokens)", "max_tokens_total")

    def _turn(self, system, messages):
        """One model turn, streamed to emit; returns the Reply. A failed turn becomes a Stop."""
        self._check_limits()
        self.turns += 1
        try:
            reply = self.model.turn(system, TOOLS, messages, on_text=self._stream_text, cancelled=self.cancelled,
                                    on_retry=self._stream_retry)
        except models.Cancelled:
            raise cancel_stop() from None
        except models.ModelError as exc:
            self.emit(error=pb.Error(code=exc.code, message=exc.message))
            raise Stop(pb.FAILED, exc.message, exc.code) from None
        self._add_usage(reply.usage)
        return reply

    def _stream_text(self, text):
        self.emit(text=pb.TextDelta(text=text))

    def _stream_retry(self, message):
        self.emit(error=pb.Error(code="stream_retry", message=message))

    def _add_usage(self, usage):
        self.usage.input_tokens += usage.input
        self.usage.output_tokens += usage.output
        self.usage.cache_read_tokens += usage.cache_read
        self.usage.cache_write_tokens += usage.cache_write
        self.emit(usage=pb.Usage(input_tokens=self.usage.input_tokens, output_tokens=self.usage.output_tokens,
                                 cache_read_tokens=self.usage.cache_read_tokens,
                                 cache_write_tokens=self.usage.cache_write_tokens))

    def _run_tools(self, calls):
        """Run every tool call of a turn (models.ToolUse); returns all their results for one message."""
        results = []
        for call in calls:
            self.emit(tool_call=pb.ToolCall(id=call.id, name=call.name,
                                            input_json=self._redact(json.dumps(call.input, ensure_ascii=False))))
            if self.cancelled.is_set():
                output, is_error, exit_code, truncated, duration = "not run: the execution was cancelled", True, 130, False, 0.0
            else:
                start = time.monotonic()
                output, is_error, exit_code, truncated = self._call_tool(call.name, call.input)
                duration = time.monotonic() - start
            output, cut = cap_output(self._redact(output))
            self.emit(tool_result=pb.ToolResult(id=call.id, is_error=is_error, exit_code=exit_code, output=output,
                                                truncated=truncated or cut, duration_ms=int(duration * 1000)))
            results.append({"id": call.id, "output": output or "(no output)", "is_error": is_error})
        if self.cancelled.is_set():
            raise cancel_stop()
        return results

    def _call_tool(self, name, args):
        """Run one tool: returns (output, is_error, exit_code, truncated). Never raises for tool failures."""
        if not isinstance(args, dict) or "__malformed__" in args:
            detail = args.get("__malformed__") if isinstance(args, dict) else repr(args)
            return f"not run: the tool input was not a valid JSON object ({detail}); send it again as JSON", True, 2, False
        tool = TOOL_FUNCS.get(name)
        if tool is None:
            return f"unknown tool {name!r}; the tools are: {', '.join(TOOL_FUNCS)}", True, 2, False
        schema = next(t["input_schema"] for t in TOOLS if t["name"] == name)
        problem = check_args(args, schema)
        if problem:
            return f"invalid input for {name}: {problem}", True, 2, False
        try:
            return tool(self, **args)
        except SandboxError as exc:
            return str(exc), True, 1, False
        except (OSError, ValueError) as exc:  # a tool should have said SandboxError; still the model's to handle
            return f"{name} failed: {type(exc).__name__}: {exc}", True, 1, False

    def _execute(self, command, timeout=None):
        timeout = min(float(timeout), 600.0) if timeout else None
        result = self.sandbox.execute(command, timeout=timeout, env=self.shell_env, cancel=self.cancelled)
        parts = [result.output.rstrip("\n")]
        if result.exit_code != 0:
            parts.append(f"[exit code {result.exit_code}]")
        return "\n".join(p for p in parts if p), result.exit_code != 0, result.exit_code, result.truncated

    def _read(self, path, offset=0, limit=None):
        text = self.sandbox.read(path, offset=offset, limit=limit or READ_DEFAULT_LINES)
        lines = text.splitlines()
        numbered = "\n".join(f"{offset + i + 1}\t{line}" for i, line in enumerate(lines))
        return numbered or "(empty file or no lines in that range)", False, 0, False

    def _write(self, path, content):
        self.sandbox.write(path, content)
        return f"wrote {len(content.encode())} bytes to {path}", False, 0, False

    def _edit(self, path, old_string, new_string, replace_all=False):
        count = self.sandbox.edit(path, old_string, new_string, replace_all=replace_all)
        return f"replaced {count} occurrence{'s' if count != 1 else ''} in {path}", False, 0, False

    def _ls(self, path="."):
        return "\n".join(self.sandbox.ls(path)) or "(empty directory)", False, 0, False

    def _glob(self, pattern, path="."):
        return "\n".join(self.sandbox.glob(pattern, path)) or "(no matches)", False, 0, False

    def _grep(self, pattern, path=".", glob=None):
        hits = self.sandbox.grep(pattern, path, glob=glob)
        return "\n".join(f"{p}:{n}:{line}" for p, n, line in hits) or "(no matches)", False, 0, False


TOOL_FUNCS = {"execute": Agent._execute, "read_file": Agent._read, "write_file": Agent._write,
              "edit_file": Agent._edit, "ls": Agent._ls, "glob": Agent._glob, "grep": Agent._grep}
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict}


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
