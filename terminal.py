"""Showing an execution's events: live text, tool calls and a summary for people, JSON lines for
scripts, and following a log (over any client whose watch() yields pb.Event) through a lost daemon.

    renderer = make_renderer(json_lines=False, no_color=False)
    phase = follow(client, "ex-1a2b3c", renderer, reconnect=lambda: Client(home, endpoint))

Used by runner.py's `run` and `logs`; `--json` prints event_dict(event) per line.

A sub-agent's events (Event.depth > 0: see subagents.py) are shown indented under the task line that started
them, each line led by the sub-agent's name (two may run at once); a sub-agent streams no text, so its turn's
text is shown when the turn ends.
"""
import json
import queue
import signal
import sys
import threading
import time

import stigmer_pb2 as pb
import subagents
from contract import TERMINAL_NAMES, TERMINAL_PHASES, BackendError, BackendUnavailable, as_typed

CANCEL_WAIT = 5.0  # seconds Ctrl-C waits for the execution to confirm it stopped
RECONNECT_WAIT = 60.0  # seconds a follower waits for a daemon that went away
def _int64_fields():
    """Every 64-bit integer field of the contract, which proto3 JSON writes as a string."""
    from google.protobuf.descriptor import FieldDescriptor
    wide = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64)
    return {f.name for m in pb.DESCRIPTOR.message_types_by_name.values() for f in m.fields if f.type in wide}


INT64_FIELDS = _int64_fields()  # read from stigmer.proto's descriptors, so a new field is never missed


class Renderer:
    """Shows events: JSON lines for scripts, or live text, tool calls and a summary on a terminal."""

    def __init__(self, json_lines, color, spinner):
        self.json_lines, self.spinner_on = json_lines, spinner
        self.color = color
        self.mid_line = False
        self.last_output = time.monotonic()
        self.spinning = False
        self.frame = 0
        self.calls = {}  # (task_call_id, depth, tool_use id) -> the tool's name
        self.show_prompts = False  # show the task of each execution (logs), not only the model's side (run)
        self.cleared = []  # the ContextCleared events seen, for the summary
        self.full = False  # show tool output whole (logs --full, run --verbose), not its first lines
        self.live = set()  # (task_call_id, depth, call id) of the commands whose output was shown as it came
        self.shown_errors = set()  # the messages of the error events shown: the summary does not repeat them
        self.sandbox_id = ""  # the execution's remote sandbox, from its artifact event
        self.on_request = None  # (event) -> None: the foreground terminal's question for an approval request ...
        self.on_answer = None  # ... and (event) -> None for its answer, wherever it came from

    def paint(self, code, text):
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def out(self, text, err=False):
        self.clear_spinner()
        stream = sys.stderr if err else sys.stdout
        stream.write(text)
        stream.flush()
        self.last_output = time.monotonic()

    def newline(self):
        if self.mid_line:
            self.out("\n")
            self.mid_line = False

    def tick(self, running):
        """Called while waiting: shows a spinner after a quiet moment."""
        if not (self.spinner_on and running) or time.monotonic() - self.last_output < 0.4:
            return
        frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
        self.frame += 1
        quiet = time.monotonic() - self.last_output  # how long this step has gone on without a word
        sys.stderr.write(f"\r{self.paint('2', frames[self.frame % len(frames)] + f' working… {quiet:.0f} s')}")
        sys.stderr.flush()
        self.spinning = True

    def clear_spinner(self):
        if self.spinning:
            sys.stderr.write("\r\033[K" if self.color else "\r" + " " * 24 + "\r")
            sys.stderr.flush()
            self.spinning = False

    def event(self, ev):
        kind = ev.WhichOneof("payload")
        if kind == "artifact" and ev.artifact.type == "sandbox":
            self.sandbox_id = ev.artifact.name
        if self.json_lines:
            print(json.dumps(event_dict(ev), ensure_ascii=False), flush=True)
            self._approval_hooks(kind, ev)
            return
        if kind in ("approval_request", "approval"):
            self.newline()
            lead = "    " * ev.depth + (self.paint("35", ev.subagent) + " " if ev.depth else "")
            for line in approval_lines(ev, self.full):
                self.out(lead + self.paint("33" if kind == "approval_request" else "2", line) + "\n")
            self._approval_hooks(kind, ev)
            return
        if ev.depth:
            self.sub_event(ev, kind)
        elif kind == "text":
            self.out(ev.text.text)
            self.mid_line = not ev.text.text.endswith("\n")
        elif kind == "tool_call":
            self.newline()
            self.tool_call(ev)
        elif kind == "tool_result":
            self.tool_result(ev)
        elif kind == "output":
            self.live_output(ev)
        elif kind == "error" and ev.error.code.endswith("_retry"):  # asked again: a note, not a failure
            self.newline()
            self.out(self.paint("2", f"↻ {ev.error.message}") + "\n", err=True)
        elif kind == "error":
            self.newline()
            self.out(self.paint("31", f"✗ {ev.error.message}") + "\n", err=True)
            self.shown_errors.add(ev.error.message)
        elif kind == "prompt" and ev.prompt.source == "task" and self.show_prompts:
            self.newline()
            self.out(self.paint("1", "› " + "\n  ".join(ev.prompt.text.splitlines() or [""])) + "\n")
        elif kind == "skill":
            self.newline()
            self.out(self.paint("36", skill_line(ev.skill)) + "\n")
        elif kind == "context_cleared":
            self.cleared.append(ev.context_cleared)
            self.newline()
            self.out(self.paint("2", cleared_line(ev.context_cleared)) + "\n")
        elif kind == "artifact":
            self.newline()
            self.out(self.paint("35", artifact_line(ev)) + "\n")

    def _approval_hooks(self, kind, ev):
        if kind == "approval_request" and self.on_request is not None:
            self.on_request(ev)
        elif kind == "approval" and self.on_answer is not None:
            self.on_answer(ev)

    def tool_call(self, ev, lead=""):
        """The line of a tool call (LEAD: a sub-agent's indent and name); a task call shows its sub-agent and brief."""
        try:
            args = json.loads(ev.tool_call.input_json)
        except ValueError:
            args = {}
        self.calls[(ev.task_call_id, ev.depth, ev.tool_call.id)] = ev.tool_call.name
        if ev.tool_call.name == "task":
            name, brief = subagents.describe_call(ev.tool_call.input_json)
            shown = f"{name} · {' '.join(brief.split())}"
        else:
            shown = args.get("command") or args.get("path") or args.get("pattern") if isinstance(args, dict) else None
            shown = shown or ev.tool_call.input_json
        self.out(f"{lead}{self.paint('36', '⏺ ' + ev.tool_call.name)} {shown[:200]}\n")

    def live_output(self, ev, lead=""):
        """A running command's output lines, under its tool line as they come."""
        self.newline()
        self.live.add((ev.task_call_id, ev.depth, ev.output.call_id))
        color = "31" if ev.output.stream == "stderr" else "2"
        for line in ev.output.text.splitlines():
            self.out(lead + self.paint(color, "  │ " + (line if self.full else line[:160])) + "\n")

    def tool_result(self, ev, lead="", keep=4):
        """The status line of a tool result and its first KEEP lines of output (none when they were shown live)."""
        r = ev.tool_result
        if (ev.task_call_id, ev.depth, r.id) in self.live:
            keep = 0
        lines = r.output.splitlines()
        name = self.calls.get((ev.task_call_id, ev.depth, r.id))
        status = f"exit {r.exit_code}" if name == "execute" else ("error" if r.is_error else "ok")
        head = f"  ⎿ {status} · {r.duration_ms / 1000:.1f} s" + (" · truncated" if r.truncated else "")
        self.out(lead + self.paint("31" if r.is_error else "2", head) + "\n")
        pad = lead + self.paint("2", "    ")
        if self.full and keep:  # logs --full, run --verbose: the output whole (unless it was shown live)
            keep = len(lines)
        for line in lines[:keep]:
            self.out(pad + self.paint("2", line if self.full else line[:160]) + "\n")
        if len(lines) > keep and keep:
            more = len(lines) - keep
            self.out(pad + self.paint("2", f"… {more} more line{'s' if more > 1 else ''}") + "\n")

    def sub_event(self, ev, kind):
        """A sub-agent's event, indented by its depth and led by its name."""
        lead = "    " * ev.depth + self.paint("35", ev.subagent or "sub-agent") + " "
        if kind == "tool_call":
            self.newline()
            self.tool_call(ev, lead)
        elif kind == "tool_result":
            self.tool_result(ev, lead, keep=2)
        elif kind == "output":
            self.live_output(ev, lead)
        elif kind == "turn" and ev.turn.text.strip():
            self.newline()
            lines = ev.turn.text.strip().splitlines()
            for line in lines[:3]:
                self.out(lead + line[:160] + "\n")
            if len(lines) > 3:
                self.out(lead + self.paint("2", f"… {len(lines) - 3} more lines") + "\n")
        elif kind == "error":
            self.newline()
            retry = ev.error.code.endswith("_retry")
            self.out(lead + (self.paint("2", f"↻ {ev.error.message}") if retry else
                             self.paint("31", f"✗ {ev.error.message}")) + "\n", err=True)
        elif kind == "prompt" and ev.prompt.source == "task" and self.show_prompts:
            self.newline()
            self.out(lead + self.paint("1", "› " + " ".join(ev.prompt.text.split())[:200]) + "\n")
        elif kind == "context_cleared":
            self.newline()
            self.out(lead + self.paint("2", cleared_line(ev.context_cleared)) + "\n")
        elif kind == "skill":
            self.newline()
            self.out(lead + self.paint("36", skill_line(ev.skill)) + "\n")

    def json_line(self, obj):
        print(json.dumps(obj, ensure_ascii=False), flush=True)

    def summary(self, execution, phase_name, elapsed):
        if self.json_lines:  # stdout stays pure JSON; a failure still gets one line on stderr
            self.json_line(summary_dict(execution, phase_name, elapsed))
            if phase_name != "COMPLETED":
                print(f"stigmer: {phase_name.lower()}: {execution.error or 'no reason given'} ({execution.id})",
                      file=sys.stderr)
            return
        self.newline()
        u = execution.usage
        prompt_tokens = u.input_tokens + u.cache_read_tokens + u.cache_write_tokens
        hit = f" ({100 * u.cache_read_tokens // prompt_tokens}% of input)" if prompt_tokens else ""
        mark = {"COMPLETED": self.paint("32", "✓ completed"), "FAILED": self.paint("31", "✗ failed"),
                "CANCELLED": self.paint("33", "■ cancelled")}.get(phase_name, phase_name)
        reason = f": {execution.error}" if execution.error and phase_name != "COMPLETED" and \
            execution.error not in self.shown_errors else ""  # an error shown already is not said twice
        self.out(f"\n{mark}{reason}\n", err=phase_name != "COMPLETED")
        self.out(self.paint("2", f"  {plural(execution.turns, 'turn')} · {u.input_tokens:,} in / {u.output_tokens:,} out tokens · "
                                 f"cache {u.cache_read_tokens:,} read{hit}, {u.cache_write_tokens:,} written · "
                                 f"{elapsed:.1f} s · {execution.spec.model or 'default model'}{agent_part(execution)}"
                                 f"{sandbox_part(execution.spec)} · {execution.id}") + "\n")
        if u.skills:
            self.out(self.paint("2", f"  skills used: {', '.join(u.skills)}") + "\n")
        if self.cleared:
            results = sum(c.results for c in self.cleared)
            times = f" in {len(self.cleared)} steps" if len(self.cleared) > 1 else ""
            self.out(self.paint("2", f"  context: {results} old tool result{'s' if results > 1 else ''} cleared{times} "
                                     f"to stay inside the {self.cleared[-1].window:,}-token window") + "\n")


def sandbox_label(spec):
    """How an execution's commands were confined, in a few words (`workspace-write, network off`); empty for
    an execution that does not say (submitted by an older client)."""
    if not spec.sandbox_mode:
        return ""
    if spec.sandbox == "daytona":
        return f"Daytona sandbox ({spec.sandbox_mode} recorded)"
    if spec.sandbox_mode == "full-access":
        return "full-access (not confined)"
    return f"{spec.sandbox_mode}, network {'on' if spec.network else 'off'}"


def sandbox_part(spec):
    """` · workspace-write, network off` for the summary line, or nothing."""
    label = sandbox_label(spec)
    return f" · {label}" if label else ""


def agent_part(execution):
    """` · agent NAME` for an execution that runs a named agent, else nothing."""
    return f" · agent {execution.spec.agent.name}" if execution.spec.agent.name else ""


def approval_lines(ev, full=False):
    """The live view's lines for an approval request (what waits, why, a write's diff) or its answer."""
    if ev.WhichOneof("payload") == "approval":
        a = ev.approval
        verdict = "✓ approved" if a.approved else "✗ denied"
        extra = f" · from now on: {a.rule}" if a.always and a.rule else ""
        return [f"{verdict} by {a.by or 'someone'}{': ' + a.reason if a.reason else ''}{extra}"]
    r = ev.approval_request
    what = f"$ {r.command}" if r.command else f"{r.tool} {r.path}".strip()
    lines = [f"⏸ waiting for approval: {what}", f"  {r.reason}; answer here, or: python runner.py approve "
                                                   f"{ev.execution_id} [--always] | deny {ev.execution_id} [REASON]"]
    diff = r.diff.splitlines()
    lines += ["  " + line for line in (diff if full else diff[:20])]
    if len(diff) > 20 and not full:
        lines.append(f"  … {len(diff) - 20} more lines of the change")
    return lines


def skill_line(used):
    """The live view's line for a skill the agent took up (a `skill` event)."""
    return f"◆ skill {used.name} ({used.path})"


def cleared_line(cleared):
    """One line about a ContextCleared event."""
    return (f"⟲ cleared {cleared.results} old tool result{'s' if cleared.results > 1 else ''} to save context "
            f"({cleared.tokens_before:,} → ~{cleared.tokens_after:,} of {cleared.window:,} tokens)")


def artifact_line(ev):
    """One line for an artifact event in the live view (the whole of it is in --json)."""
    a = ev.artifact
    if a.type == "patch":
        files = a.text.count("\ndiff --git ") + a.text.startswith("diff --git ")
        what = f"{files} file{'s' if files != 1 else ''} changed, {a.size:,} bytes" if a.text else "no changes"
        extra = f" · {a.notes}" if a.notes and a.text else ""
        return as_typed(f"⎘ patch: {what}{extra} · python runner.py logs {ev.execution_id} --patch > "
                        f"{a.name or 'change.patch'}")
    if a.type == "sandbox":
        return f"▣ sandbox {a.name}" + (f" · {a.notes}" if a.notes else "")
    if a.type == "mcp":
        return f"⚙ MCP servers started: {a.notes or a.name}"
    return f"⎘ {a.type} {a.name}" + (f" · {a.notes}" if a.notes else "")


def make_renderer(json_lines, no_color):
    """Text wherever stdout goes (JSON lines only when asked); colour and the spinner only on a terminal."""
    terminal = sys.stdout.isatty() and sys.stderr.isatty()
    return Renderer(json_lines, terminal and not no_color, spinner=not json_lines and terminal)


def stopped_watching(renderer, execution_id):
    """Ctrl-C on a watcher: clear the spinner and say that the run itself goes on."""
    renderer.clear_spinner()
    renderer.newline()
    print(as_typed(f"stigmer: stopped watching; {execution_id} keeps running (follow it again with "
                   f"`python runner.py logs {execution_id} -f`, stop it with `python runner.py cancel {execution_id}`)"),
          file=sys.stderr, flush=True)


def plural(n, word):
    """`1 turn`, `2 turns`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def run_dict(execution, mode, endpoint):
    """The first object of `run --json`: what runs where."""
    spec = execution.spec
    return {"kind": "run", "execution_id": execution.id, "model": spec.model, "agent": spec.agent.name,
            "workspace": spec.workspace, "mode": mode, "endpoint": endpoint, "prompt": spec.prompt,
            "sandbox_mode": spec.sandbox_mode, "network": spec.network}


def summary_dict(execution, phase_name, elapsed):
    """The last object of `run --json`: how it ended."""
    u = execution.usage
    return {"kind": "summary", "execution_id": execution.id, "model": execution.spec.model,
            "agent": execution.spec.agent.name, "phase": phase_name, "sandbox_mode": execution.spec.sandbox_mode,
            "network": execution.spec.network, "turns": execution.turns,
            "usage": {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
                      "cache_read_tokens": u.cache_read_tokens, "cache_write_tokens": u.cache_write_tokens},
            "skills_used": list(u.skills), "duration_s": round(elapsed, 3), "final_text": execution.final_text,
            "error": execution.error}


def event_dict(ev):
    """An Event as a flat JSON-ready dict: execution_id, seq, time, kind, on a sub-agent's event the sub-agent
    fields (subagent, task_call_id, depth; absent on the execution's own agent's), and the payload's fields."""
    from google.protobuf.json_format import MessageToDict
    kind = ev.WhichOneof("payload")
    body = MessageToDict(getattr(ev, kind), preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True) if kind else {}
    nested = {"subagent": ev.subagent, "task_call_id": ev.task_call_id, "depth": ev.depth} if ev.depth else {}
    if kind == "usage" and not body["skills"]:  # a usage event names skills once the agent has read one
        del body["skills"]
    return {"execution_id": ev.execution_id, "seq": ev.seq, "time": ev.time, "kind": kind, **nested,
            **json_ints(body)}


def json_ints(value):
    """VALUE (from MessageToDict) with our int64 fields as numbers, as a JSON reader expects."""
    if isinstance(value, dict):
        return {k: int(v) if k in INT64_FIELDS and isinstance(v, str) else json_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ints(v) for v in value]
    return value


def execution_dict(ex):
    """An Execution as a JSON-ready dict, int64 fields as numbers, the skills its agent read as skills_used; the
    files of its skills (uploaded to a remote sandbox) are left out, their paths kept."""
    from google.protobuf.json_format import MessageToDict
    if any(s.files for s in ex.spec.skills):
        ex = type(ex).FromString(ex.SerializeToString())
        for skill in ex.spec.skills:
            for f in skill.files:
                f.ClearField("data")
    shown = json_ints(MessageToDict(ex, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))
    shown["skills_used"] = list(ex.usage.skills)
    return shown


def print_executions(executions, json_lines, phase=None):
    """`list`: one JSON object per execution per line, or a table newest first (PHASE: what was asked for)."""
    if json_lines:
        for ex in executions:
            print(json.dumps(execution_dict(ex), ensure_ascii=False))
        return
    if not executions:
        print(as_typed(f"no {phase} executions (see all with `python runner.py list`)" if phase
                       else "no executions yet: run one with python runner.py \"your task\""))
        return
    now = time.time()
    width = max([len(ex.spec.model) for ex in executions] + [5])
    agents = max([len(ex.spec.agent.name) for ex in executions] + [5])
    print(f"{'ID':<18} {'PHASE':<10} {'AGE':>6} {'TURNS':>5} {'TOKENS':>8}  {'MODEL':<{width}}  {'AGENT':<{agents}}  "
          f"{'CONTINUES':<18} PROMPT")
    for ex in executions:
        age = now - ex.created_at
        age_s = f"{age:.0f}s" if age < 90 else f"{age / 60:.0f}m" if age < 5400 else f"{age / 3600:.0f}h"
        tokens = ex.usage.input_tokens + ex.usage.output_tokens
        print(f"{ex.id:<18} {pb.Phase.Name(ex.phase):<10} {age_s:>6} {ex.turns:>5} {tokens:>8}  "
              f"{ex.spec.model or '-':<{width}}  {ex.spec.agent.name or '-':<{agents}}  {ex.spec.parent_id or '-':<18} "
              f"{ex.spec.prompt.splitlines()[0][:60] if ex.spec.prompt else ''}"
              + ("  (ended; not stored yet: the disk is full)" if ex.not_stored else "")
              + (f"  (waiting for approval: python runner.py approve {ex.id})" if ex.waiting_approvals else ""))


def print_status(st, processes, endpoint, json_lines, running=(), background=True, sandbox=None):
    """`status`: the daemon's pb.DaemonStatus, our background PROCESSES (name -> pid or None), the RUNNING
    executions, whether the daemon is a BACKGROUND one (`start`) or lives inside a foreground run, and
    SANDBOX: {"mode": the mode a run gets here by default, "confinement": None or why commands cannot be confined}."""
    if json_lines:
        from google.protobuf.json_format import MessageToDict
        status = MessageToDict(st, preserving_proto_field_name=True)
        status["executions_by_phase"] = {k: int(v) for k, v in status.get("executions_by_phase", {}).items()}
        print(json.dumps({**status, "processes": processes, "started_by": ("start" if background else "foreground run") if st.pid else None,
                          "sandbox": sandbox or {},
                          "running": [{"id": ex.id, "prompt": ex.spec.prompt, "sandbox_mode": ex.spec.sandbox_mode,
                                       "network": ex.spec.network, "waiting_approvals": ex.waiting_approvals}
                                      for ex in running]}))
        return
    phases = ", ".join(f"{k.lower()} {v}" for k, v in sorted(st.executions_by_phase.items())) or "none"
    if st.pid:
        where = "" if background else " (started by a foreground run: it exits after a minute with nothing to do)"
        print(f"daemon {st.version} pid {st.pid} at {endpoint}, up {st.uptime_seconds:.0f} s{where}")
    else:  # cloud mode: no daemon, Redis is the backend
        print(f"cloud mode {st.version}: Redis at {endpoint}, up {st.uptime_seconds:.0f} s")
    print(f"runners connected: {st.connected_runners} (free slots {st.free_capacity}); queue: {st.queue_depth}")
    print(f"executions: {phases}")
    if sandbox:
        print(f"commands: {sandbox['mode']} by default" + (f" (cannot be confined here: {sandbox['confinement']})"
                                                           if sandbox.get("confinement") else ""))
    for ex in running:
        print(f"  running {ex.id}  {sandbox_label(ex.spec) or '-'}  "
              f"{json.dumps((ex.spec.prompt.splitlines() or [''])[0][:60], ensure_ascii=False)}"
              + ("  waiting for approval" if ex.waiting_approvals else ""))
    for name, pid in processes.items():
        print(f"  {name}: {'pid ' + str(pid) if pid else 'not running'}")


def show_ancestors(client, execution, renderer):
    """Replay the conversation EXECUTION continues: its parent's events (and theirs), oldest first,
    each execution under a heading (JSON lines: the events only, each names its execution)."""
    chain, parent_id = [], execution.spec.parent_id
    while parent_id and len(chain) < 1000:
        parent = client.get(parent_id)
        chain.append(parent)
        parent_id = parent.spec.parent_id
    for parent in reversed(chain):
        if not renderer.json_lines:
            renderer.newline()
            renderer.out(renderer.paint("2", f"── {parent.id} · {pb.Phase.Name(parent.phase).lower()} ──") + "\n")
        follow(client, parent.id, renderer, follow_live=False)
    if not renderer.json_lines:
        renderer.newline()
        renderer.out(renderer.paint("2", f"── {execution.id} ──") + "\n")


def cancel_on_signals(cancel):
    """From now on Ctrl-C, `kill` and a closed terminal run CANCEL on a thread (at once, even if rendering
    is stuck) and set the returned Event; a second one raises KeyboardInterrupt. The caller restores them."""
    interrupted = threading.Event()

    def on_signal(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt  # the second Ctrl-C: quit at once
        interrupted.set()
        threading.Thread(target=cancel, daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    return interrupted


def follow(client, execution_id, renderer, after_seq=0, follow_live=True, interrupted=None, reconnect=None):
    """Render the execution's events until its terminal phase (or the end of the replay).
    Returns the terminal phase name, or None. The watch is read on a thread so Ctrl-C stays responsive;
    once INTERRUPTED is set, it waits up to CANCEL_WAIT seconds for the terminal event. If the backend
    goes away and RECONNECT (returning a new client) is given, it waits for the backend and resumes
    after the last event shown."""
    events = queue.Queue()

    def watch(client, after):
        stream = client.watch(execution_id, after_seq=after, follow=follow_live)

        def pump():
            try:
                for ev in stream:
                    events.put(ev)
                events.put(None)
            except Exception as exc:  # raised again below, on the caller's thread
                events.put(exc)

        threading.Thread(target=pump, daemon=True).start()
        return stream

    stream = watch(client, after_seq)
    last_seq, running, deadline = after_seq, True, None
    while True:
        if interrupted is not None and interrupted.is_set() and deadline is None:
            renderer.newline()
            renderer.out("stigmer: cancelling… (Ctrl-C again to quit at once)\n", err=True)
            deadline = time.monotonic() + CANCEL_WAIT
        try:
            item = events.get(timeout=0.1)
        except queue.Empty:
            renderer.tick(running)
            if deadline and time.monotonic() > deadline:
                stop(stream)
                return None
            continue
        except KeyboardInterrupt:
            stop(stream)
            raise
        if item is None:
            return None
        if isinstance(item, Exception):
            if isinstance(item, BackendUnavailable) and reconnect is not None and follow_live:
                client, stream = reconnect_watch(reconnect, renderer, lambda c: watch(c, last_seq), interrupted)
                continue
            raise item
        if item.seq == 0:  # a notice from the daemon, not in the log (disk full)
            notice(item, renderer)
            continue
        last_seq = item.seq
        renderer.event(item)
        if item.WhichOneof("payload") == "phase":
            name = pb.Phase.Name(item.phase.phase)
            running = name in ("PENDING", "RUNNING")
            if name in TERMINAL_NAMES:
                renderer.clear_spinner()
                return name


def notice(ev, renderer):
    """Show a seq-0 notice on stderr; a terminal one (the run ended, but its end is not stored) is
    raised as a BackendError: the reason, and exit 1."""
    kind = ev.WhichOneof("payload")
    if kind == "phase" and ev.phase.phase in TERMINAL_PHASES:
        raise BackendError(f"{ev.phase.reason} ({ev.execution_id})")
    if kind == "error":
        renderer.newline()
        renderer.out(f"stigmer: {ev.error.message}\n", err=True)


def stop(stream):
    """End a watch early, if it can be ended (a plain iterator needs nothing)."""
    cancel = getattr(stream, "cancel", None)
    if cancel is not None:
        cancel()


def reconnect_watch(reconnect, renderer, watch, interrupted=None):
    """Wait up to RECONNECT_WAIT seconds for the backend to answer again; returns (client, stream)."""
    renderer.newline()
    renderer.out(f"stigmer: lost the daemon; waiting up to {RECONNECT_WAIT:.0f} s for it to come back…\n", err=True)
    deadline = time.monotonic() + RECONNECT_WAIT
    while time.monotonic() < deadline:
        if interrupted is not None and interrupted.is_set():
            renderer.out(as_typed("stigmer: interrupted while the daemon was away, so the cancel may not have reached "
                                  "it: run `python runner.py cancel ID` once it is back\n"), err=True)
            raise KeyboardInterrupt
        time.sleep(0.5)
        client = None
        try:
            client = reconnect()
            client.status(timeout=2.0)
        except BackendError:
            if client is not None:
                client.close()
            continue
        renderer.out("stigmer: reconnected; resuming the log\n", err=True)
        return client, watch(client)
    raise BackendUnavailable("the daemon did not come back: see `python runner.py status`, then "
                             "`python runner.py logs ID -f` to resume")
