"""Approvals: which tool calls a person must approve, and the wait for the answer.

    policy = approvals.plan("on-write", allow=["git commit"], deny=["rm -rf"], workspace=ws, home=home)  # CLI
    gate = approvals.Gate(spec.approval, emit, cancelled)                                     # worker
    refusal = gate.check(call)     # None: run it; else the error result the model gets ("denied by rule ...")
    gate.answer(pb.Approval(id=call.id, approved=True, by="me on /dev/pts/3"))               # from any terminal

Policies: `never` (the default: nothing is asked, as before), `on-write` (ask before a command that is not known
to be read-only, before file writes and edits, and before an MCP tool), `always` (ask before every command, write
and MCP tool). Rules, from --allow/--deny, the project's .stigmer/settings.json and $STIGMER_HOME/settings.json:

    git diff            a command whose words start with these (Claude Code's Bash(git diff:*) is read the same)
    Bash(npm test:*)    the same, in Claude Code's spelling
    Write(src/**)       a file write or edit whose path matches the glob (Edit(...) too); a bare glob with a / or *
                        (src/**/*.py, *.lock) means the same
    mcp__github__*      an MCP tool by name (a glob)

A deny rule applies under every policy, `never` included: the call gets an error result and the agent goes on.
An allow rule skips the question. A command is read-only only when every part of it (split on |, &&, ||, ;) is
on READ_ONLY, with no redirection and no command substitution: err on the side of asking.

An answer "always" holds for the rest of the execution and its resumes: for a command, every command that starts
with the same words (its first word, and the second when it is a subcommand: `git commit`); for a write, every
write under the same folder; for an MCP tool, that tool.
"""
import fnmatch
import json
import os
import re
import shlex
import threading

import stigmer_pb2 as pb

POLICIES = ("never", "on-write", "always")
SETTINGS = "settings.json"  # in the project's .stigmer folder, and in STIGMER_HOME
FOREGROUND_TIMEOUT = 600.0  # seconds a foreground run waits for an answer by default (a detached one: forever)
COMMAND_TOOL = "execute"
WRITE_TOOLS = ("write_file", "edit_file")
READ_TOOLS = ("read_file", "ls", "glob", "grep")  # never asked about: confined to the workspace and read-only
READ_ONLY = {"ls", "cat", "head", "tail", "wc", "grep", "rg", "find", "pwd", "echo", "which", "file", "stat",
             "du", "df", "tree", "diff", "cmp", "sort", "uniq", "cut", "basename", "dirname", "realpath", "date",
             "whoami", "uname", "env", "printenv", "true", "false", "test", "git"}
GIT_READ_ONLY = {"status", "diff", "log", "show", "blame", "branch", "rev-parse", "ls-files", "describe"}
FIND_WRITES = {"-exec", "-execdir", "-ok", "-okdir", "-delete", "-fprint", "-fprint0", "-fprintf", "-fls"}
WRITING_OPTIONS = ("--output", "-o")  # git diff --output=FILE, sort -o FILE: a read-only command that writes
CHAIN = {"|", "||", "&&", ";", "&", "\n"}
DIFF_MAX = 8000  # characters of a write's diff shown in its approval request


class ApprovalError(Exception):
    """A policy or a rule that cannot be used: one line."""


# ---- what a run asks about (the CLI) ----

def read_settings(path):
    """(policy or "", allow, deny) of a settings file ({"approval": ..., "allow": [...], "deny": [...]}, or Claude
    Code's {"permissions": {"allow": [...], "deny": [...]}}); a missing file is empty; ApprovalError otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return "", [], []
    except (OSError, ValueError) as e:
        raise ApprovalError(f"cannot read the settings {path}: {e}") from None
    if not isinstance(data, dict):
        raise ApprovalError(f"the settings {path} must be a JSON object")
    lists = data.get("permissions", data) if isinstance(data.get("permissions"), dict) else data
    allow, deny = lists.get("allow", []), lists.get("deny", [])
    for name, rules in (("allow", allow), ("deny", deny)):
        if not isinstance(rules, list) or not all(isinstance(r, str) and r.strip() for r in rules):
            raise ApprovalError(f"{path}: {name} must be a list of rules (strings)")
    policy = data.get("approval", "")
    if policy and policy not in POLICIES:
        raise ApprovalError(f"{path}: approval must be one of {', '.join(POLICIES)} (got {policy!r})")
    return policy, list(allow), list(deny)


def plan(policy, allow, deny, project_dirs, home, timeout):
    """The pb.ApprovalPolicy a run submits: POLICY (else the project's settings', else the user's, else never) and
    the rules of the flags, the project's settings (PROJECT_DIRS: the workspace up to its git root, nearest
    first) and the user's; TIMEOUT in seconds (0: wait for ever)."""
    found_policy, found_allow, found_deny = "", list(allow), list(deny)
    files = [os.path.join(d, ".stigmer", SETTINGS) for d in project_dirs] + ([os.path.join(home, SETTINGS)] if home else [])
    for path in files:
        p, a, d = read_settings(path)
        found_policy = found_policy or p
        found_allow += a
        found_deny += d
    chosen = policy or found_policy or "never"
    if chosen not in POLICIES:
        raise ApprovalError(f"--approval must be one of {', '.join(POLICIES)} (got {chosen!r})")
    for rule in found_allow + found_deny:
        parse_rule(rule)
    return pb.ApprovalPolicy(mode=chosen, allow=list(dict.fromkeys(found_allow)),
                             deny=list(dict.fromkeys(found_deny)), timeout_seconds=float(timeout or 0))


def parse_rule(rule):
    """(kind, pattern) of a rule: ("command", [words]), ("path", glob) or ("tool", glob); ApprovalError if empty."""
    rule = rule.strip()
    m = re.fullmatch(r"(Bash|Write|Edit)\((.*)\)", rule)
    if m:
        inner = m.group(2).strip()
        if m.group(1) == "Bash":
            inner = inner[:-2] if inner.endswith(":*") else inner
            words = _words(inner)
            if not words:
                raise ApprovalError(f"the rule {rule!r} names no command")
            return "command", words
        return "path", inner or "**"
    if rule.startswith("mcp__") or rule in (COMMAND_TOOL, *WRITE_TOOLS):
        return "tool", rule
    if "/" in rule or "*" in rule or "?" in rule:
        return "path", rule
    words = _words(rule)
    if not words:
        raise ApprovalError(f"the rule {rule!r} is empty")
    return "command", words


def _words(text):
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


# ---- read-only commands ----

def read_only(command):
    """True only when COMMAND surely changes nothing: each part of it (split on |, ||, &&, ;, &) a READ_ONLY command
    with read-only arguments, and no redirection, command substitution or subshell anywhere."""
    if any(mark in command for mark in ("`", "$(", ">", "<", "\n")):
        return False
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:
        return False
    part = []
    for token in tokens + [";"]:
        if token in CHAIN or (token and set(token) <= set("|&;()")):
            if token not in CHAIN:
                return False  # a subshell, or an operator we do not know
            if part and not _read_only_part(part):
                return False
            if not part and token != ";":
                return False
            part = []
        else:
            part.append(token)
    return True


def _read_only_part(words):
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        return False  # VAR=value cmd: an environment we do not judge
    name = os.path.basename(words[0])
    if name not in READ_ONLY:
        return False
    args = words[1:]
    if any(a.startswith(WRITING_OPTIONS) and (a in WRITING_OPTIONS or "=" in a or a.startswith("--output"))
           for a in args):
        return False
    if name == "find":
        return not any(a in FIND_WRITES for a in args)
    if name == "git":
        sub = next((a for a in args if not a.startswith("-")), "")
        return sub in GIT_READ_ONLY and not any(a.startswith(("-c", "--exec-path", "--git-dir")) for a in args)
    if name == "env":
        return not args  # env CMD runs CMD
    return True


def waiting_calls(events):
    """([ids of the tool calls waiting for approval, oldest first], {id: who answered, for a person}) from an
    execution's EVENTS (its own agent's: a sub-agent's calls count too), in seq order."""
    waiting, answered = {}, {}
    for event in events:
        kind = event.WhichOneof("payload")
        if kind == "approval_request":
            waiting[event.approval_request.id] = None
        elif kind == "approval":
            waiting.pop(event.approval.id, None)
            a = event.approval
            answered[a.id] = f"{'approved' if a.approved else 'denied'} by {a.by or 'someone'}"
        elif kind == "tool_result":
            waiting.pop(event.tool_result.id, None)
    return list(waiting), answered


# ---- the worker: the gate every tool call passes ----

SUBCOMMANDS = {"git", "npm", "pnpm", "yarn", "npx", "cargo", "go", "docker", "kubectl", "pip", "pip3", "uv", "poetry",
               "gh", "make", "terraform", "helm", "apt", "apt-get", "brew", "dotnet", "mvn", "gradle", "systemctl"}


def command_prefix(command):
    """The words an "always" answer covers for COMMAND: its first word, and the second too for a tool whose second
    word is a subcommand (git commit, npm install: SUBCOMMANDS)."""
    words = _words(command)
    if not words:
        return []
    if len(words) > 1 and os.path.basename(words[0]) in SUBCOMMANDS and not words[1].startswith("-"):
        return words[:2]
    return words[:1]


def _matches(rule, tool, command, path):
    kind, pattern = parse_rule(rule)
    if kind == "tool":
        return fnmatch.fnmatchcase(tool, pattern)
    if kind == "command":
        return tool == COMMAND_TOOL and _words(command)[:len(pattern)] == pattern
    return tool in WRITE_TOOLS and path is not None and (fnmatch.fnmatchcase(path, pattern)
                                                         or fnmatch.fnmatchcase(path.lstrip("./"), pattern))


class Gate:
    """One execution's approvals: its policy and rules, the answers "always" added, and the calls waiting. Shared
    by the execution's agent and its sub-agents. EMIT writes the request and answer events; CANCELLED() ends a wait."""

    def __init__(self, policy, emit, cancelled, history=()):
        self.mode = policy.mode or "never"
        self.allow, self.deny = list(policy.allow), list(policy.deny)
        self.timeout = policy.timeout_seconds or None
        self.emit, self.cancelled = emit, cancelled
        self.lock = threading.Lock()
        self.waiting = {}  # request id -> [threading.Event, pb.Approval or None]
        self.rules = {}  # request id -> the rule an "always" answer to it adds
        for event in history:  # "always" answers of the conversation's earlier executions hold here too
            if event.WhichOneof("payload") == "approval" and event.approval.approved and event.approval.rule:
                self.allow.append(event.approval.rule)

    def quiet(self):
        """True when no call can be stopped or asked about (never, and no deny rule): check() is not needed."""
        return self.mode == "never" and not self.deny

    def check(self, call, describe):
        """None when CALL (models.ToolUse) may run; else the error result it gets. DESCRIBE(call) -> (command, path,
        diff) says what it would do (the diff of a write, for the request)."""
        tool, args = call.name, call.input if isinstance(call.input, dict) else {}
        if tool in READ_TOOLS or tool == "task":
            return None
        command = args.get("command", "") if tool == COMMAND_TOOL else ""
        path = args.get("path") if tool in WRITE_TOOLS else None
        for rule in self.deny:
            if _matches(rule, tool, command, path):
                return f"denied by rule {rule!r}: do not try this again; find another way or ask the user"
        if self.mode == "never":
            return None
        with self.lock:
            allowed = list(self.allow)
        if any(_matches(rule, tool, command, path) for rule in allowed):
            return None
        if self.mode == "on-write" and tool == COMMAND_TOOL and read_only(command):
            return None
        why = {"always": "the approval policy is always: every command and write is asked about",
               "on-write": "the approval policy is on-write" + (
                   ": this command is not known to be read-only" if tool == COMMAND_TOOL else
                   ": this writes a file" if tool in WRITE_TOOLS else ": an MCP tool may change things")}[self.mode]
        return self._ask(call, tool, command, path, why, describe)

    def _ask(self, call, tool, command, path, why, describe):
        diff = ""
        if tool in WRITE_TOOLS:
            try:
                diff = describe(call)[:DIFF_MAX]
            except Exception as e:  # noqa: BLE001 - what it would change is for the person; the ask goes on
                diff = f"(the change cannot be shown: {e})"
        slot = [threading.Event(), None]
        if tool == COMMAND_TOOL:
            rule = shlex.join(command_prefix(command))
        elif tool in WRITE_TOOLS:
            folder = os.path.dirname(os.path.normpath(path or "."))
            rule = f"Write({folder}/**)" if folder and folder != "." else "Write(*)"
        else:
            rule = tool
        with self.lock:
            self.waiting[call.id] = slot
            self.rules[call.id] = rule
        self.emit(approval_request=pb.ApprovalRequest(
            id=call.id, tool=tool, command=command, path=path or "", diff=diff, reason=why,
            input_json=json.dumps(call.input, ensure_ascii=False)[:DIFF_MAX]))
        try:
            waited = 0.0
            while not slot[0].wait(0.1):
                waited += 0.1
                if self.cancelled():
                    return None  # the agent sees its cancel and ends the run
                if self.timeout and waited >= self.timeout:
                    self.answer(pb.Approval(id=call.id, approved=False, by="timeout",
                                            reason=f"no answer within {self.timeout:g} s"))
        finally:
            with self.lock:
                self.waiting.pop(call.id, None)
                self.rules.pop(call.id, None)
        answer = slot[1]
        if answer.approved:
            if answer.rule:
                with self.lock:
                    self.allow.append(answer.rule)
            return None
        return f"the user denied this call{': ' + answer.reason if answer.reason else ''}; do not try it again " \
               "unchanged: find another way or ask the user"

    def answer(self, approval):
        """Take APPROVAL for its request (the first answer only: False for a later one or an unknown request);
        writes the approval event, with the rule an "always" answer adds."""
        with self.lock:
            slot = self.waiting.get(approval.id)
            if slot is None or slot[1] is not None:
                return False
            if approval.always and approval.approved and not approval.rule:
                approval.rule = self._always_rule(approval.id)
            slot[1] = approval
        self.emit(approval=approval)
        slot[0].set()
        return True

    def _always_rule(self, request_id):
        """The rule an "always" answer to REQUEST_ID adds (see the module's docstring); "" when there is none."""
        return self.rules.get(request_id, "")

    def pending(self):
        with self.lock:
            return [rid for rid, slot in self.waiting.items() if slot[1] is None]
