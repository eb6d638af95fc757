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
import uuid

import stigmer_pb2 as pb

POLICIES = ("never", "on-write", "always")
SETTINGS = "settings.json"  # in the project's .stigmer folder, and in STIGMER_HOME
FOREGROUND_TIMEOUT = 600.0  # seconds a foreground run waits for an answer by default (a detached one: forever)
COMMAND_TOOL = "execute"
WRITE_TOOLS = ("write_file", "edit_file")
READ_TOOLS = ("read_file", "ls", "glob", "grep")  # never asked about: confined to the workspace and read-only
READ_ONLY = {"ls", "cat", "head", "tail", "wc", "grep", "rg", "find", "pwd", "echo", "which", "stat", "du", "df",
             "diff", "cmp", "cut", "basename", "dirname", "realpath", "whoami", "uname", "true", "false", "test",
             "git"}  # not sort, uniq, file, tree, date, env: each has a way to write, run or change something
GIT_READ_ONLY = {"status", "diff", "log", "show", "blame", "rev-parse", "ls-files", "describe"}
CANCELLED = "cancelled"  # check()'s answer for a call whose wait a cancel ended (never "run it")
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
    if rule.startswith(".") or any(c in rule for c in "/*?["):
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


# ---- commands: the read-only ones, and what a rule matches ----

UNSURE = set("$`#{}~*?[]\\<>\n")  # what the shell would expand, glob, redirect or treat as a comment
WRAPPERS = {"sudo", "command", "exec", "nohup", "time", "nice", "env", "builtin", "doas", "xargs", "timeout"}


def parts(command):
    """The simple commands of COMMAND (split on |, ||, &&, ;, &), each a list of words; None when the shell would
    read it otherwise than plain words (a subshell, a redirection, an unclosed quote)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""  # a # is judged by UNSURE (the shell starts a comment only at a word's start)
    try:
        tokens = list(lexer)
    except ValueError:
        return None
    found, part = [], []
    for token in tokens + [";"]:
        if token and set(token) <= set("|&;()<>"):
            if token not in CHAIN:
                return None
            if part:
                found.append(part)
            part = []
        else:
            part.append(token)
    return found


def read_only(command):
    """True only when COMMAND surely changes nothing: each of its parts a READ_ONLY command, named bare, with
    read-only arguments, and nothing in it the shell would expand, glob, redirect or substitute."""
    outside = re.sub(r"'[^']*'", "''", command)  # in single quotes the shell expands nothing
    if not command.strip() or any(c in UNSURE for c in outside):
        return False
    found = parts(command)
    return bool(found) and all(_read_only_part(p) for p in found)


def _read_only_part(words):
    name, args = words[0], words[1:]
    if name not in READ_ONLY:
        return False  # a path (./cat, /tmp/ls) or VAR=value is not a name on the list either
    if any(a.startswith(WRITING_OPTIONS) for a in args):
        return False
    if name == "find":
        return not any(a in FIND_WRITES or a.startswith(("-fprint", "-fls", "-exec", "-ok")) for a in args)
    if name == "rg":
        return not any(a.startswith(("--pre", "--hostname-bin", "-z", "--search-zip")) for a in args)
    if name == "git":
        if not args or args[0].startswith("-"):
            return False  # an option before the subcommand (-c, --config-env, -C, --namespace ...): not judged
        risky = ("--ext-diff", "--textconv", "--output", "--exec", "--upload-pack", "-O", "--open-files-in-pager")
        return args[0] in GIT_READ_ONLY and not any(a.startswith(risky) for a in args[1:])
    return True


def _command_words(words):
    """WORDS without the wrappers that run another command (sudo, env, time ...), its name bare, its short options
    one letter each: rm -fr and /bin/rm -r -f read alike."""
    while words and (os.path.basename(words[0]) in WRAPPERS or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0])):
        words = words[1:]
        while words and words[0].startswith("-"):
            words = words[1:]
    if not words:
        return []
    out = [os.path.basename(words[0])]
    for w in words[1:]:
        out += [f"-{c}" for c in w[1:]] if re.fullmatch(r"-[A-Za-z]{2,}", w) else [w]
    return out


def _command_matches(pattern, command, deny):
    """Whether the rule's words PATTERN cover COMMAND. A deny rule: any part of it (the first word equal, the rule's
    other words all in the part, in any order); a command the shell would read otherwise than words is denied when
    the rule's command name appears in it at all. An allow rule: every part starts with the rule's words, and the
    shell would expand or redirect nothing."""
    want = _command_words(pattern)
    found = parts(command)
    if deny:
        if found is None or any(c in "$`" for c in command):
            return re.search(rf"(^|[^\w-]){re.escape(want[0])}([^\w-]|$)", command) is not None
        return any(_part_has(_command_words(p), want) for p in found)
    if not found or any(c in UNSURE - set("*?[~") for c in command):
        return False
    return all(_command_words(p)[:len(want)] == want for p in found)


def _part_has(words, want):
    return bool(words) and words[0] == want[0] and all(w in words[1:] for w in want[1:])


def clean_path(path, root):
    """PATH as the workspace-relative path a rule is matched against (an absolute one under ROOT made relative,
    . and .. resolved); None for a path outside the workspace."""
    if not isinstance(path, str) or not path:
        return None
    if path.startswith("/"):
        root = (root or "").rstrip("/")
        if not root or not (path == root or path.startswith(root + "/")):
            return None
        path = path[len(root):].lstrip("/") or "."
    path = os.path.normpath(path)
    return None if path == ".." or path.startswith("../") else path


def _matches(rule, tool, command, path, deny=False):
    """Whether RULE covers the call (TOOL, its COMMAND, its workspace-relative PATH); DENY: as a deny rule."""
    kind, pattern = parse_rule(rule)
    if kind == "tool":
        return fnmatch.fnmatchcase(tool, pattern)
    if kind == "command":
        return tool == COMMAND_TOOL and _command_matches(pattern, command, deny)
    if tool not in WRITE_TOOLS or path is None:
        return deny and tool in WRITE_TOOLS  # a write outside the workspace: refused by the sandbox anyway
    import sandbox
    return sandbox._glob_regex(pattern.removeprefix("./")).match(path) is not None


def answered_by(approval):
    """Who answered how (a pb.Approval), for a person: "approved by me on /dev/pts/3 (pid 42)"."""
    return f"{'approved' if approval.approved else 'denied'} by {approval.by or 'someone'}"


def track(event, waiting, answered):
    """Apply one EVENT to WAITING ({request id: its tool call's id}, in order) and ANSWERED ({request id: who
    answered}): a request waits from its approval_request to its approval event, or to its call's tool_result
    (a cancel, or a timeout seen first)."""
    kind = event.WhichOneof("payload")
    if kind == "approval_request":
        r = event.approval_request
        waiting[r.id] = r.call_id or r.id
    elif kind == "approval":
        waiting.pop(event.approval.id, None)
        answered[event.approval.id] = answered_by(event.approval)
    elif kind == "tool_result" and waiting:
        for request_id in [rid for rid, call in waiting.items() if call == event.tool_result.id]:
            del waiting[request_id]


def waiting_calls(events):
    """(waiting, answered) as track() leaves them after an execution's EVENTS, in seq order."""
    waiting, answered = {}, {}
    for event in events:
        track(event, waiting, answered)
    return waiting, answered


def pick(execution_id, request_id, waiting, answered):
    """The request an answer is for: REQUEST_ID, else the one waiting (more than one: ApprovalError naming them);
    ApprovalError when it was answered already or none waits."""
    if not request_id:
        if len(waiting) > 1:
            raise ApprovalError(f"{len(waiting)} calls of {execution_id} wait for approval: name one with --request "
                                f"({', '.join(waiting)})")
        request_id = next(iter(waiting), "")
    if request_id in answered:
        raise ApprovalError(f"that call of {execution_id} was already answered ({answered[request_id]})")
    if request_id not in waiting:
        raise ApprovalError(f"{execution_id} has no tool call waiting for approval"
                            + (f" with request id {request_id}" if request_id else ""))
    return request_id


# ---- the worker: the gate every tool call passes ----

SUBCOMMANDS = {"git", "npm", "pnpm", "yarn", "npx", "cargo", "go", "docker", "kubectl", "pip", "pip3", "uv", "poetry",
               "gh", "make", "terraform", "helm", "apt", "apt-get", "brew", "dotnet", "mvn", "gradle", "systemctl"}


def command_prefix(command):
    """The words an "always" answer covers for COMMAND (its first part's): its first word, and the second too for a
    tool whose second word is a subcommand (git commit, npm install: SUBCOMMANDS)."""
    found = parts(command)
    words = _command_words(found[0]) if found else []
    if not words:
        return []
    if len(words) > 1 and os.path.basename(words[0]) in SUBCOMMANDS and not words[1].startswith("-"):
        return words[:2]
    return words[:1]


def args_path(call):
    return call.input.get("path", "") if isinstance(call.input, dict) and isinstance(call.input.get("path"), str) else ""


class Gate:
    """One execution's approvals: its policy and rules, the answers "always" added, and the calls waiting. Shared
    by the execution's agent and its sub-agents. EMIT writes the request and answer events; CANCELLED() ends a wait."""

    def __init__(self, policy, emit, cancelled=lambda: False, history=(), root=""):
        self.mode = policy.mode or "never"
        self.allow, self.deny = list(policy.allow), list(policy.deny)
        self.timeout = policy.timeout_seconds or None
        self.emit, self.cancelled = emit, cancelled
        self.root = root  # the workspace: a write's path is matched relative to it
        self.lock = threading.Lock()
        self.waiting = {}  # request id -> [threading.Event, pb.Approval or None]
        self.rules = {}  # request id -> the rule an "always" answer to it adds
        for event in history:  # "always" answers of the conversation's earlier executions hold here too
            if event.WhichOneof("payload") == "approval" and event.approval.approved and event.approval.rule:
                self.allow.append(event.approval.rule)

    def quiet(self):
        """True when no call can be stopped or asked about (never, and no deny rule): check() is not needed."""
        return self.mode == "never" and not self.deny

    def check(self, call, describe, emit=None):
        """None when CALL (models.ToolUse) may run; else the error result it gets. DESCRIBE(call) -> (command, path,
        diff) says what it would do (the diff of a write, for the request). EMIT: the asking agent's (a sub-agent's
        tags its request and answer events with its name), else the execution's."""
        tool, args = call.name, call.input if isinstance(call.input, dict) else {}
        if tool in READ_TOOLS or tool == "task":
            return None
        command = args.get("command", "") if tool == COMMAND_TOOL else ""
        path = clean_path(args.get("path"), self.root) if tool in WRITE_TOOLS else None
        for rule in self.deny:
            if _matches(rule, tool, command, path, deny=True):
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
        return self._ask(call, tool, command, path, why, describe, emit or self.emit)

    def _ask(self, call, tool, command, path, why, describe, emit):
        diff = ""
        if tool in WRITE_TOOLS:
            try:
                diff = describe(call)[:DIFF_MAX]
            except Exception as e:  # noqa: BLE001 - what it would change is for the person; the ask goes on
                diff = f"(the change cannot be shown: {e})"
        slot = [threading.Event(), None, emit]
        if tool == COMMAND_TOOL:
            rule = shlex.join(command_prefix(command)) if len(parts(command) or ()) == 1 else ""  # a chain: no rule
        elif tool in WRITE_TOOLS and path:
            folder = os.path.dirname(path)
            rule = f"Write({folder}/**)" if folder else f"Write({path})"  # a top-level file: that file only
        else:
            rule = tool if tool not in WRITE_TOOLS else ""
        request_id = f"{call.id}.{uuid.uuid4().hex[:8]}"  # two calls may share an id (a provider that gives none)
        with self.lock:
            self.waiting[request_id] = slot
            self.rules[request_id] = rule
        emit(approval_request=pb.ApprovalRequest(
            id=request_id, call_id=call.id, tool=tool, command=command, path=path or args_path(call), diff=diff,
            reason=why, input_json=json.dumps(call.input, ensure_ascii=False)[:DIFF_MAX]))
        try:
            waited = 0.0
            while not slot[0].wait(0.1):
                waited += 0.1
                if self.cancelled():
                    return CANCELLED  # never "run it": the agent sees its cancel and ends the run
                if self.timeout and waited >= self.timeout:
                    self.answer(pb.Approval(id=request_id, approved=False, by="timeout",
                                            reason=f"no answer within {self.timeout:g} s"))
        finally:
            with self.lock:
                self.waiting.pop(request_id, None)
                self.rules.pop(request_id, None)
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
        slot[2](approval=approval)
        slot[0].set()
        return True

    def _always_rule(self, request_id):
        """The rule an "always" answer to REQUEST_ID adds (see the module's docstring); "" when there is none."""
        return self.rules.get(request_id, "")

    def pending(self):
        with self.lock:
            return [rid for rid, slot in self.waiting.items() if slot[1] is None]
