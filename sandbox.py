"""Where the agent's tools run: shell commands and file tools confined to one directory.

One file on purpose, although it is past 800 lines: it is vendored into other repositories alone,
with the standard library only, and a split would make that several files that must travel
together. Its sections: running commands (and the guardian), OS confinement, the file tools.

    from sandbox import FilesystemSandbox, SandboxError, kill_all

    box = FilesystemSandbox("/tmp/work", env={"ANTHROPIC_API_KEY": None}, timeout=60)
    r = box.execute("python -m pytest -q", timeout=300)
    print(r.exit_code, r.timed_out, r.truncated, f"{r.duration:.1f}s")
    print(r.output)                          # stdout, then stderr, for the model
    box.write("notes/todo.md", "- fix the test\\n")
    box.edit("notes/todo.md", "fix", "write", replace_all=False)   # -> 1 replacement
    print(box.read("notes/todo.md", offset=0, limit=50))
    print(box.ls("."), box.glob("**/*.py"), box.grep("def main", glob="*.py"))
    try:
        box.read("../../etc/passwd")
    except SandboxError as e:
        print(e)                             # "../../etc/passwd is outside the workspace ..."
    kill_all()                               # at shutdown: SIGKILL every command still running
    guard_commands()                         # and even if this process is killed with SIGKILL

execute() runs each command with /bin/sh in the workspace, confined by the operating system
unless the sandbox's mode is "full-access" (the constructor's default, today's plain host
execution; the runner chooses "workspace-write" where confinement works):

    box = FilesystemSandbox("/tmp/work", mode="workspace-write", network=False,
                            hide=credential_paths(os.path.expanduser("~")) + ["/home/me/.stigmer"])
    problem = confinement_problem()          # None, or one line: why commands cannot be confined here

- "workspace-write": the workspace and a private /tmp are writable, everything else is
  read-only; the paths in `hide` (credentials, the runner's home) are empty or unreadable;
  the network is off unless network=True.
- "read-only": the same, with the workspace read-only too (write() and edit() refuse).
- Linux uses bubblewrap (`bwrap`, from the distribution): read-only root, the workspace bound,
  a private /tmp, minimal /proc and /dev, a new PID namespace that dies with the command (so a
  background child never outlives it), a new network namespace. macOS uses Seatbelt
  (`sandbox-exec` with the profile seatbelt_profile() writes; untested here). Elsewhere the
  confined modes are refused.

The file tools (ls, read, write, edit, glob, grep) are confined to the root in every mode,
symlinks included. Each execute() is independent: no shell state carries over.
When a command ends (or times out, or is cancelled) its process group is SIGKILLed, and
so is anything it started that left the group (setsid, job control): each command runs
with STIGMER_SANDBOX_RUN=<id> in its environment, and /proc names what still carries it.

Standard library only, so this file can be copied alone into another project.
"""
import dataclasses
import errno
import fcntl
import itertools
import json
import math
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

KILL_GRACE = 2.0        # seconds between SIGTERM and SIGKILL on timeout or cancel
EOF_GRACE = 2.0         # seconds to wait for EOF once the shell has exited (background children)
CANCEL_POLL = 0.05      # seconds between checks of the cancel event while a command runs
READ_CHUNK = 1 << 20    # bytes per os.read from a command's pipes
PIPE_SIZE = 1 << 20     # kernel pipe buffer requested once a command fills the default one
MAX_READ_BYTES = 10 * 1024 * 1024  # read() and edit() refuse larger files
MAX_GREP_BYTES = 50 * 1024 * 1024  # grep skips larger files (rg: --max-filesize); names one: refused
GREP_CHUNK = 1 << 20    # bytes per read while grep scans a file
BINARY_SNIFF = 8192     # read(): a NUL byte in this many leading bytes means "binary"
SEARCH_TIMEOUT = 30.0   # seconds a glob() or grep() may run; then it returns what it found, saying so
MAX_PATTERN = 1000      # characters in a glob pattern (glob, grep's glob)
MAX_SYMLINKS = 40       # symlinks followed on one path, as the kernel allows; more is a loop
HELD_FDS = 64           # directories a file tool keeps open on a deep path; further up it reopens them
USE_RG = True           # grep uses ripgrep when it is on PATH; False forces the Python search
SKIP_DIRS = {".git"}    # glob and grep never descend into these (hidden files are searched)
# Override the host's values (an agent must never get `less`); the sandbox's env and a call's env win.
NON_INTERACTIVE = {"GIT_TERMINAL_PROMPT": "0", "PAGER": "cat", "GIT_PAGER": "cat"}
RUN_MARKER = "STIGMER_SANDBOX_RUN"  # set to a fresh id for each command; finds what left its group
EXECUTION_MARKER = "STIGMER_EXECUTION"  # the execution id, set by the worker: kill_marked finds its commands
PROC_ROOT = "/proc"     # Linux's process table; elsewhere the sweeps find nothing and degrade quietly
SWEEP_ROUNDS = 3        # /proc scans for processes that left the group (they may fork meanwhile)
SANDBOX_MODES = ("read-only", "workspace-write", "full-access")  # what a command may write; names as Codex's
CONFINED_MODES = ("read-only", "workspace-write")  # the modes the operating system enforces
HIDDEN_IN_HOME = (".ssh", ".aws", ".config/gcloud", ".azure", ".kube", ".docker", ".gnupg", ".netrc",
                  ".git-credentials")  # credentials a confined command never sees (credential_paths)
BWRAP = "bwrap"         # Linux: bubblewrap, found on PATH (Debian and Ubuntu: apt install bubblewrap)
SANDBOX_EXEC = "/usr/bin/sandbox-exec"  # macOS: Seatbelt
CONFINED_ENV = {"TMPDIR": "/tmp"}  # inside bubblewrap /tmp is the private, writable temp directory
# A failing confined command whose output says this probably wanted the network: its result says it is off.
NETWORK_FAILURE = re.compile(
    r"could not resolve|temporary failure in name resolution|name or service not known|name resolution|"
    r"nodename nor servname|getaddrinfo|network is unreachable|no route to host|connection refused|"
    r"failed to establish a new connection|unable to resolve host|enotfound|eai_again|couldn't connect|"
    r"failed to connect|connection timed out", re.IGNORECASE)
NETWORK_HINT = ("the network is off for commands in this sandbox ({mode}); if this command needed it, tell the "
                "user: they can allow it with --network (or `network: true` in the agent file)")
PROBE_TIMEOUT = 10.0    # seconds confinement_problem() gives bwrap to show it can make its namespaces

_LIVE = set()           # process-group ids of commands running now, in any sandbox
_LIVE_LOCK = threading.Lock()
_MARKS = set()          # RUN_MARKER values guarded alone (guard_marker), as bytes
_GUARD = None           # the guardian's stdin (a pipe), once guard_commands() has started it
_CONFINEMENT = {}       # what confinement_problem() found, once per process: {"problem": str or None}
_CONFINEMENT_LOCK = threading.Lock()

# The guardian: a child that outlives a SIGKILLed parent. It learns "+PGID MARKER" when a command
# starts and "-PGID" when it ends, "m MARKER" and "u MARKER" for a marker alone (guard_marker); at EOF (its
# parent is gone, however it died) it SIGKILLs what is left: the groups, and every process carrying a marker.
_GUARD_CODE = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
live = {}
marks = set()
for line in sys.stdin.buffer:
    sign, _, rest = line.strip().partition(b" ")
    if sign == b"m":
        marks.add(rest)
    elif sign == b"u":
        marks.discard(rest)
    elif sign[:1] == b"+":
        live[int(sign[1:])] = rest
    elif sign[:1] == b"-":
        live.pop(int(sign[1:]), None)
for pgid in live:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
needles = [b"\0%s=%s\0" % (os.fsencode(sys.argv[1]), m) for m in {*live.values(), *marks} if m]
if needles:
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = b"\0" + f.read()
            if any(n in env for n in needles):
                os.kill(int(name), signal.SIGKILL)
        except (OSError, ValueError):
            pass
"""


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    """What a command did. exit_code is 124 on timeout, 130 on cancel, 128+N on signal N."""
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool
    duration: float
    cancelled: bool = False

    @property
    def output(self) -> str:
        """stdout followed by stderr, as the model should see them."""
        if self.stdout and self.stderr and not self.stdout.endswith("\n"):
            return self.stdout + "\n" + self.stderr
        return self.stdout + self.stderr


class SandboxError(Exception):
    """A refused or invalid request; the message says what to do instead."""

    def __init__(self, message=""):
        super().__init__(_shown(message) if isinstance(message, str) else message)


class SandboxUnavailable(Exception):
    """The service behind a remote sandbox cannot serve the execution (code: auth, quota,
    rate_limit, unreachable, timeout, clone or error); the execution fails with this message."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def kill_all() -> int:
    """SIGKILL every process group started by any sandbox that is still running."""
    with _LIVE_LOCK:  # held while signalling, so no group is reaped (and its id reused) meanwhile
        for pgid in _LIVE:
            _signal_group(pgid, signal.SIGKILL)
        return len(_LIVE)


def kill_marked(value, name=EXECUTION_MARKER) -> int:
    """SIGKILL every process of this user whose environment has NAME=VALUE, and its process
    group; returns how many were found. Finds what a worker killed with SIGKILL left behind
    (its commands carry EXECUTION_MARKER=<execution id>). Linux only: without /proc it finds nothing."""
    found = 0
    for _ in range(SWEEP_ROUNDS):  # a process may fork while we look
        hits = 0
        for pid in marked_pids(value, name):
            if pid == os.getpid():
                continue
            try:
                group = os.getpgid(pid)
            except OSError:
                continue  # gone, or another user's
            hits += 1
            own = group == os.getpgrp()  # never our own group, whatever a command's environment says
            for kill, target in (((os.kill, pid),) if own else ((os.killpg, group), (os.kill, pid))):
                try:
                    kill(target, signal.SIGKILL)
                except OSError:
                    pass
        found += hits
        if not hits:
            break
    return found


def guard_commands():
    """Start the guardian once: should this process die, even by SIGKILL, it kills every command
    still running (their process groups, and what left them carrying RUN_MARKER)."""
    global _GUARD
    with _LIVE_LOCK:
        if _GUARD is None:
            proc = subprocess.Popen([sys.executable, "-c", _GUARD_CODE, RUN_MARKER], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
            _GUARD = proc.stdin
            for pgid in _LIVE:
                _tell_guard(b"+%d" % pgid)
            for mark in _MARKS:
                _tell_guard(b"m " + mark)
        return _GUARD


def guard_group(pgid, marker=""):
    """Count process group PGID (a process this runner started outside execute(), such as an MCP server) among the
    live commands: kill_all() and the guardian kill it, and what carries RUN_MARKER=MARKER. Returns PGID."""
    with _LIVE_LOCK:
        _LIVE.add(pgid)
        _tell_guard(b"+%d %s" % (pgid, os.fsencode(marker)) if marker else b"+%d" % pgid)
    return pgid


def unguard_group(pgid, kill=False):
    """Forget PGID (guard_group's); KILL: SIGKILL the group first (what is left of it)."""
    with _LIVE_LOCK:
        if kill:
            _signal_group(pgid, signal.SIGKILL)
        _LIVE.discard(pgid)
        _tell_guard(b"-%d" % pgid)


def guard_marker(marker, on=True):
    """Have the guardian kill every process carrying RUN_MARKER=MARKER should this process die (ON), or no longer
    (not ON). For a process whose group is not known yet: a child that is still being exec'd shows no environment
    in /proc, so marked_pids() may miss it for a moment, but the guardian looks only once its parent is gone."""
    mark = os.fsencode(marker)
    with _LIVE_LOCK:
        (_MARKS.add if on else _MARKS.discard)(mark)
        _tell_guard((b"m " if on else b"u ") + mark)


def marked_pids(value, name=RUN_MARKER):
    """The pids of this user's processes whose environment has NAME=VALUE (Linux; elsewhere none)."""
    needle = b"\0" + os.fsencode(name) + b"=" + os.fsencode(value) + b"\0"
    found = []
    try:
        pids = [int(n) for n in os.listdir(PROC_ROOT) if n.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"{PROC_ROOT}/{pid}/environ", "rb") as f:
                if needle in b"\0" + f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def _tell_guard(line):
    """One line to the guardian, if there is one (called with _LIVE_LOCK held; a line is one atomic write)."""
    if _GUARD is not None:
        try:
            os.write(_GUARD.fileno(), line + b"\n")
        except OSError:
            pass  # the guardian is gone; kill_all still runs at a normal exit


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


# ---- OS confinement: bubblewrap on Linux, Seatbelt on macOS ----

def credential_paths(home):
    """The credential files and folders under the user's HOME that a confined command never sees."""
    return [os.path.join(home, name) for name in HIDDEN_IN_HOME]


def confinement_problem():
    """None when this host can confine commands (the confined modes work); else one line saying why,
    with the fix. Linux runs bwrap once to find out (user namespaces may be disabled); the answer is kept."""
    with _CONFINEMENT_LOCK:
        if "problem" not in _CONFINEMENT:
            _CONFINEMENT["problem"] = _probe()
        return _CONFINEMENT["problem"]


def _probe():
    if sys.platform == "darwin":
        return None if os.path.exists(SANDBOX_EXEC) else f"{SANDBOX_EXEC} (Seatbelt) is missing on this Mac"
    if not sys.platform.startswith("linux"):
        return f"commands cannot be confined on {sys.platform}: only Linux (bubblewrap) and macOS (Seatbelt) can"
    if shutil.which(BWRAP) is None:
        return (f"commands cannot be confined: bubblewrap ({BWRAP}) is not installed: apt install bubblewrap "
                "(dnf install bubblewrap, pacman -S bubblewrap)")
    argv = bwrap_argv("/", "read-only", ["true"])
    try:
        probe = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=PROBE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"commands cannot be confined: {BWRAP} did not run ({e})"
    if probe.returncode == 0:
        return None
    said = (probe.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"])[-1]
    return (f"commands cannot be confined: {BWRAP} cannot make its namespaces here ({said}); allow unprivileged "
            "user namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 also "
            "kernel.apparmor_restrict_unprivileged_userns=0)")


def bwrap_argv(root, mode, command, *, network=False, hide=(), read_only=()):
    """bubblewrap's argv running COMMAND (an argv list) confined in MODE with ROOT as the workspace: the root
    file system read-only, ROOT writable in workspace-write, a private /tmp, minimal /proc and /dev, a new PID
    namespace that ends with the command (--die-with-parent: and with the runner), no network unless
    NETWORK. Existing paths in HIDE become an empty read-only tmpfs (folders) or unreadable (files); paths in
    READ_ONLY (skill folders, the agent's files) are bound read-only. Mounts go parent first, so a hidden path
    inside the workspace stays hidden and a workspace inside a hidden folder stays visible."""
    argv = [BWRAP, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--unshare-pid", "--die-with-parent"]
    if not network:
        argv.append("--unshare-net")
    mounts = []  # (depth, order at equal depth, arguments): hidden, then read-only, then the workspace
    sealed = []  # hidden folders' tmpfs, made read-only once every mount point inside them exists
    for path in hide:
        real = os.path.realpath(path)
        if os.path.isdir(real):
            mounts.append((real, 0, ["--tmpfs", real]))
            sealed += ["--remount-ro", real]
        elif os.path.lexists(real):
            mounts.append((real, 0, ["--ro-bind", "/dev/null", real]))
    for path in read_only:
        real = os.path.realpath(path)
        if os.path.exists(real):
            mounts.append((real, 1, ["--ro-bind", real, real]))
    root = os.path.realpath(root)
    if root != "/" or mode == "workspace-write":
        mounts.append((root, 2, ["--bind" if mode == "workspace-write" else "--ro-bind", root, root]))
    for _, _, args in sorted(mounts, key=lambda m: (_depth(m[0]), m[1])):
        argv += args
    return argv + sealed + ["--chdir", root, "--", *command]


def _depth(path):
    return 0 if path == "/" else path.count("/")


def seatbelt_profile(root, mode, *, network=False, hide=(), read_only=(), temp_dirs=("/private/tmp",)):
    """The Seatbelt (sandbox-exec) profile for MODE: writes only to ROOT (workspace-write), TEMP_DIRS and the
    terminal devices, never to READ_ONLY; reads and writes of HIDE denied; no network unless NETWORK. Later
    rules win in SBPL, so each denial follows what it narrows."""
    def paths(kind, items, close):
        rules = [f"    ({kind} " + '"' + os.path.realpath(p).replace("\\", "\\\\").replace('"', '\\"') + '")'
                 for p in items]
        return rules[:-1] + [rules[-1] + close] if rules else []
    writable = [*temp_dirs] + ([root] if mode == "workspace-write" else [])
    lines = ["(version 1)", "(allow default)", "(deny file-write*)", "(allow file-write*",
             *paths("subpath", writable, ""),
             '    (literal "/dev/null") (literal "/dev/zero") (literal "/dev/tty") (regex #"^/dev/fd/[0-9]+$"))']
    if read_only:
        lines += ["(deny file-write*", *paths("subpath", read_only, ")")]
    if hide:
        lines += ["(deny file-read* file-write*", *paths("subpath", hide, ")")]
    if not network:
        lines.append("(deny network*)")
    return "\n".join(lines) + "\n"


class _Capture:
    """Keeps the first and last bytes of a stream, counting what falls in between."""

    def __init__(self, limit, tee=None):
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.tee = tee  # tee(data): also given every chunk as it comes (live output)

    def add(self, data):
        if self.tee is not None:
            self.tee(data)
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.tail_limit + READ_CHUNK:  # trim now and then, not per chunk
                del self.tail[: len(self.tail) - self.tail_limit]

    def result(self):
        """(text, truncated): head, a marker saying how much was dropped, then tail."""
        tail = self.tail[max(0, len(self.tail) - self.tail_limit):] if self.tail_limit else b""
        omitted = self.total - len(self.head) - len(tail)
        text = self.head.decode("utf-8", errors="replace")
        if omitted:
            text += f"\n… {omitted} bytes omitted …\n"
        return text + tail.decode("utf-8", errors="replace"), omitted > 0


class FilesystemSandbox:
    """Runs commands and file tools in root_dir on this host; commands confined by the OS unless
    mode is "full-access" (see the module's docstring)."""

    def __init__(self, root_dir, *, env=None, timeout=120.0, max_output_bytes=1_000_000, mode="full-access",
                 network=False, hide=(), read_only=()):
        if mode not in SANDBOX_MODES:
            raise SandboxError(f"mode must be one of {', '.join(SANDBOX_MODES)}, not {mode!r}")
        if not isinstance(network, bool):
            raise SandboxError(f"network must be True or False, not {network!r}")
        for name, paths in (("hide", hide), ("read_only", read_only)):
            if isinstance(paths, str) or any(not isinstance(p, str) or not os.path.isabs(p) or "\0" in p
                                             for p in paths):
                raise SandboxError(f"{name} must be a list of absolute paths, not {paths!r}")
        if mode in CONFINED_MODES:
            problem = confinement_problem()
            if problem:
                raise SandboxError(problem)
        os.makedirs(root_dir, exist_ok=True)
        self.root = os.path.realpath(root_dir)
        self.env = _check_env(env)
        self.timeout = _check_timeout(timeout)
        if isinstance(max_output_bytes, bool) or not isinstance(max_output_bytes, int) \
                or max_output_bytes < 1:
            raise SandboxError(f"max_output_bytes must be a positive integer, not {max_output_bytes!r}")
        self.max_output_bytes = max_output_bytes
        self.mode, self.network = mode, network
        self.hide, self.read_only = tuple(hide), tuple(read_only)
        self._hidden_real = tuple(os.path.realpath(p) for p in hide)  # the file tools refuse these too
        self._bwrap = mode in CONFINED_MODES and sys.platform != "darwin"

    def __repr__(self):
        return f"FilesystemSandbox({self.root!r}, mode={self.mode!r})"

    def view(self, folder):
        """A sandbox over FOLDER (a skill's, outside the root) for the file tools' reads: confined to it, with
        this one's mode, hidden paths and limits. The caller uses it to read, never to execute or write."""
        real = os.path.realpath(folder)
        hide = [h for h in self.hide if not (real + os.sep).startswith(os.path.realpath(h).rstrip(os.sep) + os.sep)]
        return FilesystemSandbox(folder, timeout=self.timeout, max_output_bytes=self.max_output_bytes,
                                 mode=self.mode, network=self.network, hide=hide)  # what hides FOLDER itself: not

    def _check_writable(self, path):
        if self.mode == "read-only":
            raise SandboxError(f"cannot write {path}: this sandbox is read-only (sandbox mode read-only); "
                               "say what you would change instead")

    def _command_argv(self, command):
        """The argv that runs command in this sandbox's mode; None: the plain shell (full-access)."""
        shell = ["/bin/sh", "-c", command]
        if self.mode == "full-access":
            return None
        if self._bwrap:
            return bwrap_argv(self.root, self.mode, shell, network=self.network, hide=self.hide,
                              read_only=self.read_only)
        temp = ("/private/tmp", "/private/var/folders", os.path.realpath(tempfile.gettempdir()))
        profile = seatbelt_profile(self.root, self.mode, network=self.network, hide=self.hide,
                                   read_only=self.read_only, temp_dirs=temp)
        return [SANDBOX_EXEC, "-p", profile, *shell]

    # ---- shell ----

    def execute(self, command, timeout=None, env=None, *, cancel=None, on_output=None) -> ExecutionResult:
        """Run command with the shell in the root; never raises because the command failed. ON_OUTPUT(stream,
        data), when given, gets each chunk of stdout ("stdout") and stderr ("stderr") as it comes."""
        if not isinstance(command, str) or not command.strip():
            raise SandboxError("command must be a non-empty string")
        if "\0" in command:
            raise SandboxError("command must not contain a NUL byte")
        timeout = self.timeout if timeout is None else _check_timeout(timeout)
        environment = self._environment(_check_env(env))
        argv = self._command_argv(command)
        marker = os.urandom(8).hex()
        environment[os.fsencode(RUN_MARKER)] = marker.encode()
        start = time.monotonic()
        if cancel is not None and cancel.is_set():
            return ExecutionResult(130, "", "cancelled before it started\n", False, False, 0.0, True)
        out_r, out_w = os.pipe()  # our own pipes: cheaper than Popen's file objects
        err_r, err_w = os.pipe()
        info_r, info_w = os.pipe() if self._bwrap else (None, None)  # bwrap tells its namespace's init
        if info_w is not None:
            argv[1:1] = ["--info-fd", str(info_w)]
        # Its own process group, and its own session (no terminal to reach) when this process has a terminal.
        # Without one, a process group alone: a new session costs a new scheduler autogroup, which doubles
        # the time a short command takes on a busy machine.
        group = {"process_group": 0} if sys.version_info >= (3, 11) and not _has_terminal() \
            else {"start_new_session": True}
        try:
            proc = subprocess.Popen(argv or command, shell=argv is None, cwd=self.root, env=environment,
                                    stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                                    pass_fds=(info_w,) if info_w is not None else (), **group)
        except OSError as e:  # e.g. the workspace was deleted, or no file descriptors left
            for fd in (out_r, out_w, err_r, err_w, info_r, info_w):
                if fd is not None:
                    os.close(fd)
            return ExecutionResult(127, "", f"could not start the command: {e}\n",
                                   False, False, time.monotonic() - start)
        os.close(out_w)
        os.close(err_w)
        pid = proc.pid  # also the id of the command's process group
        ns_init = None
        if info_w is not None:
            os.close(info_w)
            ns_init = _namespace_init(info_r)  # closes info_r
        with _LIVE_LOCK:
            _LIVE.add(pid)
            _tell_guard(b"+%d %s" % (pid, marker.encode()))
        out = _Capture(self.max_output_bytes, on_output and (lambda data: on_output("stdout", data)))
        err = _Capture(self.max_output_bytes, on_output and (lambda data: on_output("stderr", data)))
        # In bubblewrap nothing can leave: the PID namespace ends, everything in it killed, before bwrap exits.
        sweeper = _Sweeper(pid, marker, start, active=not self._bwrap)
        try:
            # In bubblewrap, SIGTERM goes to the command's processes but not to bwrap's own two: the PID
            # namespace ends with them, so the command would lose the grace it has outside.
            terminate = (lambda: _terminate_group(pid, spare_bwrap=True)) if self._bwrap else None
            outcome, abandoned = _pump(pid, {out_r: out, err_r: err}, start + timeout, cancel,
                                       sweeper.sweep, terminate)
        finally:
            # The shell is exited but not yet reaped, so its pid (the group id) cannot have
            # been reused: this SIGKILL reaches only what this command started.
            with _LIVE_LOCK:
                _signal_group(pid, signal.SIGKILL)
                _LIVE.discard(pid)
                _tell_guard(b"-%d" % pid)
            try:
                sweeper.sweep()  # what left the group (setsid, job control) and still runs
            finally:
                os.close(out_r)
                os.close(err_r)
                proc.wait()
                if ns_init is not None:  # bwrap exits before its namespace's init: wait until all have ended
                    _wait_fd(ns_init, EOF_GRACE)
                    os.close(ns_init)
        stdout, out_cut = out.result()
        stderr, err_cut = err.result()
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        notes = [{"timed_out": f"timed out after {timeout:g} s; its process group was killed",
                  "cancelled": "cancelled; its process group was killed",
                  "lingering": f"background processes still held the output {EOF_GRACE:g} s after "
                               "the shell exited, so they were killed"}.get(outcome)]
        if sweeper.killed:
            notes.append(f"{_count(sweeper.killed, 'background process')} had left the process "
                         "group (setsid or job control) and " + ("was" if sweeper.killed == 1 else
                                                                  "were") + " killed")
        if sweeper.failed:
            notes.append(f"{_count(sweeper.failed, 'background process')} left the process group "
                         "and could not be killed")
        if abandoned:
            if outcome == "lingering":
                notes[0] = (f"background processes still held the output {EOF_GRACE:g} s after the "
                            "shell exited; those found were killed")
            notes.append("a process outside the command's process group (which changed its "
                         "environment or user) still holds the output and was left running")
        for note in filter(None, notes):
            stderr += ("\n" if stderr and not stderr.endswith("\n") else "") + f"[{note}]\n"
        code = {"timed_out": 124, "cancelled": 130}.get(outcome, code)
        if code and outcome is None and self.mode != "full-access" and not self.network \
                and NETWORK_FAILURE.search(stdout + stderr):
            stderr += ("\n" if stderr and not stderr.endswith("\n") else "") + \
                f"[{NETWORK_HINT.format(mode=self.mode)}]\n"
        return ExecutionResult(code, stdout, stderr, outcome == "timed_out", out_cut or err_cut,
                               time.monotonic() - start, outcome == "cancelled")

    def _environment(self, env):
        # Bytes throughout: copying os.environ's raw dict is ~40x cheaper than dict(os.environ).
        merged = dict(getattr(os.environb, "_data", None) or os.environb)
        for layer in (NON_INTERACTIVE, CONFINED_ENV if self._bwrap else {}, self.env, env):
            for name, value in layer.items():
                if value is None:
                    merged.pop(os.fsencode(name), None)
                else:
                    merged[os.fsencode(name)] = os.fsencode(value)
        return merged

    # ---- file tools ----
    # Each tool turns OSError and a bad glob's re.error into SandboxError saying what to do. Every
    # file is reached through a directory fd found by _resolve (or _open): see "paths" below.

    def ls(self, path=".") -> list:
        """Sorted names in a directory, directories with a trailing '/'."""
        fd, _ = self._open_dir(path)
        try:
            with os.scandir(fd) as it:
                return sorted(_shown(e.name) + "/" if _is_dir(e) else _shown(e.name) for e in it)
        except OSError as e:
            raise _os_error(e, path, "list") from None
        finally:
            os.close(fd)

    def read(self, path, offset=0, limit=None) -> str:
        """Lines [offset, offset+limit) of a text file, line endings kept."""
        _check_read_args(offset, limit)
        return _slice_lines(self._read_text(path, "replace"), offset, limit)

    def write(self, path, content) -> None:
        """Write UTF-8 text atomically, creating parent directories and keeping permissions."""
        _check_write_args(path, content)
        self._check_writable(path)
        self._write_bytes(path, _encode(content))

    def edit(self, path, old, new, replace_all=False) -> int:
        """Replace old with new in a file; returns the number of replacements.

        In a file with CRLF line endings (anywhere in it), an old written with LF endings that
        does not occur as given is matched with CRLF endings, and new is written with them.
        """
        _check_edit_args(old, new)
        self._check_writable(path)
        text = self._read_text(path, "surrogateescape")  # undecodable bytes survive the round trip
        text, count = _replace(text, path, old, new, replace_all)
        self._write_bytes(path, _encode(text))
        return count

    def glob(self, pattern, path=".", *, cancel=None) -> list:
        """Paths under path matching pattern ('**' spans directories), relative to the root, sorted.

        Hidden files match; .git directories and symlinked directories are not entered;
        symlinks that resolve outside the root are left out. The search stops at SEARCH_TIMEOUT
        seconds or once cancel (a threading.Event) is set; the list's cut_off then says so.
        """
        _check_glob_args(pattern)
        match = _glob_regex(pattern).match
        stop = _Stop(cancel)
        fd, base = self._open_dir(path, real=True)
        found = _Found()
        try:
            for rel, _, entry in _walk(fd, stop, dirs=True):
                if match(_shown(rel)) and (not entry.is_symlink() or self._stays_inside(_join(base, rel))):
                    found.append(_shown(_join(base, rel)))
        finally:
            os.close(fd)
        found = _Found(sorted(f for f in found if self._visible(os.path.join(self.root, f))))
        found.cut_off = stop.why
        return found

    def grep(self, pattern, path=".", glob=None, max_count=1000, *, cancel=None) -> list:
        """(path, line number, line) for lines containing pattern literally, sorted.

        Searches hidden files but not .git directories (a .git file is searched), ignores
        .gitignore, and skips symlinks, non-regular files (FIFOs, devices), binary files (a
        NUL byte anywhere, as rg decides) and files over MAX_GREP_BYTES. Naming such a file as
        path is an error, except a binary one, which has no hits. At most max_count results; a
        search running past SEARCH_TIMEOUT seconds, or cancelled, returns what it found in the
        files it finished, and the list's cut_off says so.
        """
        _check_grep_args(pattern, max_count)
        keep = _glob_filter(glob)
        stop = _Stop(cancel)
        needle = _encode(pattern)
        try:  # O_NONBLOCK: a FIFO cannot block the open; fstat then refuses it
            fd, base = self._open(path, os.O_RDONLY | os.O_NONBLOCK, real=True)
        except OSError as e:
            raise self._dir_error(e, path, "search") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISDIR(st.st_mode):
                _check_regular(st, path)
                if st.st_size > MAX_GREP_BYTES:
                    raise _too_big_to_grep(path, st.st_size)
                with open(os.dup(fd), "rb", buffering=0) as f:
                    found = _grep_file(f, needle, max_count, stop) or []
                hits = [(_shown(base), number, line) for number, line in found]
            else:
                rg = shutil.which("rg") if USE_RG else None
                search = self._grep_rg if rg else self._grep_python
                hits = search(rg, needle, fd, base, glob, keep, max_count, stop)
        finally:
            os.close(fd)
        hits = _Found(sorted((h for h in hits if self._visible(os.path.join(self.root, h[0]))),
                             key=lambda h: (h[0], h[1])))
        hits.cut_off = stop.why
        return hits

    def _grep_python(self, _, needle, fd, base, glob, keep, max_count, stop):
        hits, everything = [], glob is None
        for rel, dir_fd, entry in _walk(fd, stop, dirs=False):
            if not everything and not keep(_shown(rel)):
                continue
            try:
                file_fd = os.open(entry.name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=dir_fd)
            except OSError:
                continue  # unreadable, or swapped for a symlink since the listing: skipped, as rg does
            hits += _grep_open_file(file_fd, needle, max_count - len(hits), stop, _join(base, rel))
            if len(hits) >= max_count:
                break
        return hits

    def _grep_rg(self, rg, needle, fd, base, glob, keep, max_count, stop):
        """rg names the files that hold needle; each is then searched here, through an fd found by
        _open as every file tool's is. So rg decides nothing but which files to look at: should a
        folder be swapped for a symlink while rg walks (rg opens directories by path), what it read
        out there is never shown, and a name it reports is opened beneath the root or not at all."""
        cmd = [rg, "--no-config", "--files-with-matches", "--null", "--fixed-strings", "--no-messages",
               "--hidden", "--no-ignore", "--no-mmap", "--sort", "path", "--encoding", "none",
               "--max-filesize", str(MAX_GREP_BYTES)]
        if glob and re.fullmatch(r"[^/\[\]{}\\!^]+", glob):
            cmd += ["--glob", _encode(glob)]  # a plain basename pattern: let rg pre-filter; `keep` decides
        for name in sorted(SKIP_DIRS):
            cmd += ["--glob", "!" + name + "/"]  # the trailing '/': directories only
        cmd += [b"-e", needle, "--", "."]
        # rg starts in the directory fd itself (Linux), not in a path that could be swapped meanwhile.
        pinned = os.path.isdir(f"/proc/self/fd/{fd}")
        proc = subprocess.Popen(cmd, cwd=f"/proc/self/fd/{fd}" if pinned else os.path.join(self.root, base),
                                pass_fds=(fd,) if pinned else (), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        done = threading.Event()
        watcher = threading.Thread(target=_stop_process, args=(proc, stop, done), daemon=True)
        watcher.start()
        hits, pending = [], b""
        try:
            while len(hits) < max_count and not stop():
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                *names, pending = (pending + chunk).split(b"\0")
                for name in names:
                    rel = os.path.normpath(os.fsdecode(name))
                    if rel == "." or rel.startswith("..") or os.path.isabs(rel) or not keep(_shown(rel)) \
                            or stop():
                        continue
                    try:
                        file_fd, _ = self._open(_join(base, rel), os.O_RDONLY | os.O_NONBLOCK)
                    except (OSError, SandboxError):
                        continue  # gone, or not beneath the root by that name: not searched
                    hits += _grep_open_file(file_fd, needle, max_count - len(hits), stop, _join(base, rel))
                    if len(hits) >= max_count:
                        break
        finally:
            done.set()
            proc.kill()
            proc.stdout.close()
            proc.wait()
            watcher.join()
        return hits

    # ---- paths ----
    # How a file tool finds its file without being raced. A path is checked and used in one go:
    # _resolve walks it from a directory fd on the root, one openat(O_NOFOLLOW) per component,
    # following a symlink by hand only while it stays beneath the root, and hands back a directory
    # fd and a name in it; the tool then opens, stats or renames that name relative to the fd.
    # Nothing is looked up by path string after the check, so a folder swapped for a symlink to
    # the outside between the check and the use leads nowhere. Where the kernel has openat2,
    # _open asks it for the same (RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) in one call. The root
    # itself is opened by its path: whoever could swap it could also write outside the workspace.

    def _relative(self, path):
        """path as a path relative to the root, or SandboxError (bad path, or outside the root)."""
        if isinstance(path, os.PathLike):
            path = os.fspath(path)
        if not isinstance(path, str) or not path:
            raise SandboxError(f"path must be a non-empty string, not {path!r}")
        if "\0" in path:
            raise SandboxError("path must not contain a NUL byte")
        try:
            path.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise SandboxError(f"path {_shown(path)!r} is not valid text (it holds a lone surrogate)") from None
        if not path.startswith("/"):
            return path
        for real in (path, os.path.realpath(path)):  # realpath: an alias of the root, as macOS's /tmp
            if real == self.root or real.startswith(self.root.rstrip("/") + "/"):
                return real[len(self.root):].lstrip("/") or "."  # resolved beneath the root, below
        raise self._outside(path)

    def _outside(self, path):
        return _Outside(f"{path} is outside the workspace {self.root}: use a path relative to it")

    def _open_root(self):
        return os.open(self.root, _DIR_FLAGS)

    def _resolve(self, path, *, create=False):
        """(dir_fd, name, rel) for path beneath the root: dir_fd is an open directory (the caller
        closes it), name an entry in it that was not a symlink when looked at ('.' for the directory
        itself; it may not exist) and rel the real path relative to the root. Symlinks are followed
        only while they stay beneath the root (else _Outside); a name shown with U+FFFD finds the
        one entry that prints so. create makes missing directories. Raises SandboxError or OSError."""
        todo = _parts(self._relative(path))[::-1]  # a stack: the next component is last
        chain = _Chain(self._open_root())
        names, missing, links, name = [], [], 0, "."
        try:
            while todo:
                part = todo.pop()
                if part == "..":
                    if missing:
                        missing.pop()
                    elif chain.pop():
                        names.pop()
                    else:
                        raise self._outside(path)
                    name = "."
                    continue
                if missing:  # below a directory that does not exist: nothing to look at
                    missing.append(part)
                    continue
                target = None
                if todo:  # a directory to enter
                    try:
                        chain.push(os.open(part, _DIR_FLAGS, dir_fd=chain.top))
                        names.append(part)
                        name = "."
                        continue
                    except OSError as e:
                        if e.errno == errno.ENOENT:
                            found = _printed_as(chain.top, part, path)
                            if found is not None:
                                todo.append(found)
                            else:
                                missing.append(part)
                            continue
                        if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                            raise
                        target = _readlink(part, chain.top)
                        if target is None:
                            raise
                else:  # the last component: a symlink to follow, or the name to hand back
                    try:
                        target = os.readlink(part, dir_fd=chain.top)
                    except OSError as e:
                        if e.errno == errno.ENOENT:
                            found = _printed_as(chain.top, part, path)
                            if found is not None:
                                todo.append(found)
                                continue
                        elif e.errno != errno.EINVAL:  # EINVAL: not a symlink
                            raise
                    if target is None:
                        name = part
                        continue
                links += 1
                if links > MAX_SYMLINKS:
                    raise SandboxError(f"{path} is a symlink loop")
                if target.startswith("/"):
                    if not (target == self.root or target.startswith(self.root.rstrip("/") + "/")):
                        raise self._outside(path)
                    chain.reset()
                    names = []
                    target = target[len(self.root):]
                todo.extend(_parts(target)[::-1])
                name = "."
            would_be = "/".join(names + missing + ([name] if name != "." else [])) or "."
            if not self._visible(os.path.join(self.root, would_be)):
                raise SandboxError(f"{path} is hidden from the agent in this sandbox (credentials, the runner's "
                                   "home): leave it alone, or ask the user")
            if missing and not create:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
            if create and missing:
                if name != ".":
                    missing.append(name)
                name = missing.pop() if missing[-1:] else "."
                for part in missing:
                    try:
                        os.mkdir(part, dir_fd=chain.top)
                    except FileExistsError:
                        pass  # made meanwhile: it is opened without following a symlink all the same
                    chain.push(os.open(part, _DIR_FLAGS, dir_fd=chain.top))
                    names.append(part)
            rel = "/".join(names + ([name] if name != "." else [])) or "."
            return chain.detach(), name, rel
        finally:
            chain.close()

    def _open(self, path, flags, *, real=False):
        """(fd, rel): path opened with flags beneath the root, a last symlink followed while it stays
        beneath it; rel is its real path relative to the root, or None unless real is asked for."""
        if _openat2_ready() and not real and (self.mode == "full-access" or not self.hide):  # else _resolve checks
            rel = "/".join(_parts(self._relative(path))) or "."  # as _resolve reads it: "a//b/." is a/b
            root = self._open_root()
            try:
                return _openat2(root, rel, flags | os.O_CLOEXEC), None
            except OSError as e:  # EXDEV: a symlink out, or an absolute one; _resolve says which
                # ENOENT: a/.. where a does not exist, or a name printed with U+FFFD, is _resolve's too
                if e.errno not in (errno.EXDEV, errno.ELOOP, errno.ENAMETOOLONG, errno.EAGAIN) and not (
                        e.errno == errno.ENOENT and ("\ufffd" in rel or ".." in rel.split("/"))):
                    raise
            finally:
                os.close(root)
        for _ in range(3):
            dir_fd, name, rel = self._resolve(path)
            try:
                return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd), rel
            except OSError as e:
                if e.errno != errno.ELOOP or name == ".":
                    raise
            finally:
                os.close(dir_fd)
        raise SandboxError(f"{path} keeps changing into a symlink: try again once it settles")

    def _open_dir(self, path, real=False):
        """(fd, rel) of the directory path (rel as in _open), or SandboxError."""
        try:
            return self._open(path, os.O_RDONLY | os.O_DIRECTORY, real=real)
        except OSError as e:
            raise self._dir_error(e, path, "list") from None

    def _dir_error(self, e, path, action):
        if e.errno == errno.ENOTDIR:
            try:
                os.close(self._open(path, _PROBE_FLAGS)[0])
                return SandboxError(f"{path} is not a directory: read it with read_file")
            except (OSError, SandboxError):
                pass  # a file above it: nothing by that name
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return SandboxError(f"{path} does not exist")
        return _os_error(e, path, action)

    def _stays_inside(self, rel):
        """False if the symlink at rel leads outside the root (a loop or a dangling link inside is in)."""
        try:
            os.close(self._resolve(rel)[0])
        except _Outside:
            return False
        except (OSError, SandboxError):
            pass
        return True

    def _visible(self, full):
        """False for a path under one of the hidden paths (confined modes only: full-access hides nothing)."""
        if self.mode == "full-access" or not self.hide:
            return True
        real = os.path.realpath(full)
        return not any(real == h or real.startswith(h.rstrip(os.sep) + os.sep) for h in self._hidden_real)

    def _read_text(self, path, errors):
        try:
            fd, _ = self._open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise _os_error(e, path, "read") from None
        try:
            st = os.fstat(fd)
            _check_regular(st, path)
            if st.st_size > MAX_READ_BYTES:
                raise _too_big_to_read(path, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        with open(fd, "rb") as f:
            try:
                data = f.read(MAX_READ_BYTES + 1)
            except OSError as e:
                raise _os_error(e, path, "read") from None
        return _decode_text(path, data, errors)

    def _write_bytes(self, path, data):
        """data into the file path (a temporary file beside it, then a rename), all by fd."""
        for _ in range(3):
            try:
                dir_fd, name, _ = self._resolve(path, create=True)
            except OSError as e:
                raise _os_error(e, path, "write") from None
            try:
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    st = None
                if st is not None and stat.S_ISLNK(st.st_mode):
                    continue  # a symlink appeared since it was looked at: resolve it again
                if name == "." or st is not None and stat.S_ISDIR(st.st_mode):
                    raise SandboxError(f"{path} is a directory")
                _atomic_write(dir_fd, name, data, None if st is None else st.st_mode & 0o7777)
                return
            except OSError as e:
                raise _os_error(e, path, "write") from None
            finally:
                os.close(dir_fd)
        raise SandboxError(f"{path} keeps changing into a symlink: try again once it settles")


# ---- helpers ----

def _pump(pid, streams, deadline, cancel, sweep, terminate=None):
    """Read the pipes in streams (fd -> _Capture) until EOF and the shell's exit; returns
    (outcome, abandoned): outcome is None, 'timed_out', 'cancelled' or 'lingering', abandoned
    is True if something still held a pipe when we gave up. sweep() kills what left the group;
    terminate() (default: SIGTERM to the group) asks the command to stop on a timeout or cancel.
    Leaves the shell unreaped, so its group id stays reserved."""
    poller = select.poll()
    for fd in streams:
        poller.register(fd, select.POLLIN)
    small = set(streams)  # pipes still at the kernel's default size
    try:
        pidfd = os.pidfd_open(pid)
        poller.register(pidfd, select.POLLIN)
    except (AttributeError, OSError):  # no pidfd (old kernel): check the shell on each wake-up
        pidfd = None
    exited, outcome, kill_at, eof_by, give_up_at, backoff = False, None, None, None, None, 1e-4
    try:
        while streams or not exited:
            now = time.monotonic()
            if outcome is None and cancel is not None and cancel.is_set():
                outcome = "cancelled"
            elif outcome is None and now >= deadline:
                outcome = "timed_out"
            if outcome in ("cancelled", "timed_out") and kill_at is None and give_up_at is None:
                (terminate or (lambda: _signal_group(pid, signal.SIGTERM)))()
                kill_at = now + KILL_GRACE
            if exited and streams and eof_by is None:
                eof_by = now + EOF_GRACE
            if give_up_at is None and ((kill_at and now >= kill_at) or (eof_by and now >= eof_by)):
                if outcome is None:
                    outcome = "lingering"
                _signal_group(pid, signal.SIGKILL)
                sweep()  # a setsid'd child may be what holds the pipes
                kill_at, eof_by = None, math.inf
                give_up_at = now + 1.0  # something outside the group may hold the pipes
            if give_up_at is not None and now >= give_up_at:
                break
            wake = min(t for t in (deadline if outcome is None else None, kill_at, eof_by,
                                   give_up_at, math.inf) if t is not None) - now
            if cancel is not None and outcome is None:
                wake = min(wake, CANCEL_POLL)
            if pidfd is None and not exited:
                wake = min(wake, 0.05 if streams else backoff)
                backoff = min(backoff * 2, 0.05)
            for fd, _ in poller.poll(max(0, math.ceil(wake * 1000))):
                if fd == pidfd:
                    exited = True
                    poller.unregister(pidfd)
                    continue
                data = os.read(fd, READ_CHUNK)
                if data:
                    streams[fd].add(data)
                    if fd in small and len(data) >= 65536:  # a chatty command: fewer wake-ups
                        small.discard(fd)
                        _grow_pipe(fd)
                else:
                    poller.unregister(fd)
                    del streams[fd]
            if pidfd is None and not exited:
                exited = os.waitid(os.P_PID, pid,
                                   os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return outcome, bool(streams)


def _namespace_init(info_fd):
    """A pidfd of the init of bwrap's PID namespace, from the JSON bwrap writes to --info-fd (INFO_FD, which
    is closed here); None when unknown. When it exits, every process of the namespace has ended."""
    data = b""
    try:
        while True:
            chunk = os.read(info_fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(info_fd)
    try:
        child = int(json.loads(data)["child-pid"])
        handle = os.pidfd_open(child)
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return None  # bwrap failed before making it, or it has gone already (or no pidfds)
    try:  # the pid is still that init (not reused): pid 1 of its own namespace
        with open(f"{PROC_ROOT}/{child}/status", "rb") as f:
            if re.search(rb"^NSpid:\s+\d+\s+1\s*$", f.read(), re.MULTILINE):
                return handle
    except OSError:
        pass
    os.close(handle)
    return None


def _has_terminal():
    """True when this process has a controlling terminal (a command in its session could open /dev/tty)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _wait_fd(fd, timeout):
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.poll(int(timeout * 1000))


def _terminate_group(group, spare_bwrap):
    """SIGTERM every process in the process group GROUP; with SPARE_BWRAP, not bwrap itself (the group's
    leader) nor the init of its PID namespace (the leader's child), whose exit would SIGKILL the rest at once.
    Without /proc, the whole group."""
    try:
        pids = [int(n) for n in os.listdir(PROC_ROOT) if n.isdigit()]
    except OSError:
        pids = None
    if pids is None or not spare_bwrap:
        return _signal_group(group, signal.SIGTERM)
    for pid in pids:
        try:
            with open(f"{PROC_ROOT}/{pid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
            if int(fields[2]) != group or pid == group or int(fields[1]) == group:
                continue
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours


_NS_LAST_PID = None     # an fd kept open on /proc/sys/kernel/ns_last_pid: pread is ~10x cheaper
_NS_LAST_PID_LOCK = threading.Lock()


def _last_pid():
    """The pid most recently handed out in this pid namespace, or None if unknown."""
    global _NS_LAST_PID
    if _NS_LAST_PID is None:
        with _NS_LAST_PID_LOCK:
            if _NS_LAST_PID is None:
                try:
                    _NS_LAST_PID = os.open(f"{PROC_ROOT}/sys/kernel/ns_last_pid", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    _NS_LAST_PID = -1
    if _NS_LAST_PID < 0:
        return None
    try:
        return int(os.pread(_NS_LAST_PID, 32, 0))
    except (OSError, ValueError):
        return None


class _Sweeper:
    """Finds and SIGKILLs the processes a command started that left its process group.

    Everything the command starts inherits RUN_MARKER=<this run's id> in its environment, so
    /proc/PID/environ names them even after setsid or a double fork re-parented them. Only
    pids allocated since the shell started are read (about none for most commands), unless
    the command ran long enough that pids may have wrapped. A process that replaced its
    environment (env -i) or runs as another user is not found.
    """

    def __init__(self, group, marker, start, active=True):
        self.group, self.start, self.active = group, start, active
        self.needle = os.fsencode(RUN_MARKER) + b"=" + marker.encode() + b"\0"
        self.killed = self.failed = 0
        self._seen = set()

    def sweep(self):
        for _ in range(SWEEP_ROUNDS if self.active else 0):
            found = 0
            for pid in self._candidates():
                found += self._kill_if_ours(pid)
            if not found:
                return

    def _candidates(self):
        first, last = self.group, _last_pid()
        if last == first and time.monotonic() - self.start < 1.0:
            return []  # no process was created since the shell: nothing can have escaped
        try:
            names = os.listdir(PROC_ROOT)
        except OSError:
            return []
        pids = (int(n) for n in names if n.isdigit())
        if last is None or time.monotonic() - self.start >= 1.0:  # pids may have wrapped round
            return [p for p in pids if p != first]
        if last > first:
            return [p for p in pids if first < p <= last]
        return [p for p in pids if p > first or p <= last]

    def _kill_if_ours(self, pid):
        """1 if pid carries our marker outside our group and was signalled (or could not be)."""
        if pid in self._seen or not self._ours(pid):
            return 0
        try:
            handle = os.pidfd_open(pid)  # pins the process: its pid cannot be reused under us
        except (AttributeError, OSError):
            handle = None
        try:
            if handle is not None and not self._ours(pid):
                return 0  # it exited between the two looks
            self._seen.add(pid)
            try:
                if handle is not None:
                    signal.pidfd_send_signal(handle, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
                self.killed += 1
            except ProcessLookupError:
                pass
            except OSError:
                self.failed += 1
            return 1
        finally:
            if handle is not None:
                os.close(handle)

    def _ours(self, pid):
        try:
            with open(f"{PROC_ROOT}/{pid}/environ", "rb") as f:
                if b"\0" + self.needle not in b"\0" + f.read():
                    return False
            with open(f"{PROC_ROOT}/{pid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            return False  # gone, or another user's
        # A zombie is harmless; a member of the group was SIGKILLed already.
        return fields[0] not in (b"Z", b"X") and int(fields[2]) != self.group


def _grow_pipe(fd):
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)  # Linux only
    except OSError:
        pass  # the default buffer works, only with more wake-ups


# ---- file tools' helpers: fds, the walk, stopping, names ----

_O_PATH = getattr(os, "O_PATH", 0)  # Linux: a directory fd only to walk through, needing no read permission
_DIR_FLAGS = (_O_PATH or os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PROBE_FLAGS = _O_PATH | os.O_CLOEXEC if _O_PATH else os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_OPENAT2 = {"ready": None, "call": None}  # set up on first use (Linux 5.6+; not under every seccomp filter)
_RESOLVE = 0x08 | 0x02  # RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS (linux/openat2.h)
_SYS_OPENAT2 = 437      # one number on every architecture below (the syscall table was unified in 5.1)
_SYS_OPENAT2_MACHINES = {"x86_64", "amd64", "aarch64", "arm64", "riscv64", "ppc64le", "ppc64", "s390x",
                         "loongarch64", "armv7l", "armv6l", "i686", "i386"}


def _openat2_ready():
    """True once openat2 answered like a kernel that has it; it is asked once per process."""
    if _OPENAT2["ready"] is None:
        _OPENAT2["ready"] = False
        if sys.platform.startswith("linux"):
            import platform
            if platform.machine().lower() in _SYS_OPENAT2_MACHINES:
                try:
                    import ctypes
                except ImportError:  # a Python built without ctypes: the walk does it all
                    return False
                libc = ctypes.CDLL(None, use_errno=True)
                call = libc.syscall
                call.restype = ctypes.c_long
                call.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
                how = (ctypes.c_uint64 * 3)(os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, _RESOLVE)
                fd = call(_SYS_OPENAT2, -100, b".", ctypes.addressof(how), ctypes.sizeof(how))  # AT_FDCWD
                if fd >= 0:
                    os.close(fd)
                    _OPENAT2["call"] = (call, ctypes)
                    _OPENAT2["ready"] = True
    return _OPENAT2["ready"]


def _openat2(dir_fd, path, flags):
    """openat2(dir_fd, path, {flags, 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS}): an fd, or OSError
    (EXDEV when the path or a symlink in it leads out of dir_fd, ELOOP, ENOENT, ...)."""
    call, ctypes = _OPENAT2["call"]
    how = (ctypes.c_uint64 * 3)(flags, 0, _RESOLVE)
    fd = call(_SYS_OPENAT2, dir_fd, os.fsencode(path), ctypes.addressof(how), ctypes.sizeof(how))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


class _Outside(SandboxError):
    """A path, or a symlink on it, leads outside the root."""


class _Chain:
    """The directories from a root down to where a walk is, as open fds: '..' goes back up this
    chain, never through the kernel's idea of a parent. Only the HELD_FDS newest stay open (a path
    2,000 levels deep must not exhaust the process's fds); going back into a closed one reopens it
    through its child's '..' and checks that it is the same directory as before."""

    def __init__(self, root_fd):
        self.fds, self.ids = [root_fd], [None]

    @property
    def top(self):
        return self.fds[-1]

    def push(self, fd):
        self.fds.append(fd)
        self.ids.append(None)
        old = len(self.fds) - 1 - HELD_FDS
        if old > 0 and self.fds[old] is not None:  # the root (0) stays open
            st = os.fstat(self.fds[old])
            self.ids[old] = (st.st_dev, st.st_ino)
            os.close(self.fds[old])
            self.fds[old] = None

    def pop(self):
        """Back to the parent directory; False at the root. OSError if the parent changed meanwhile."""
        if len(self.fds) == 1:
            return False
        child = self.fds.pop()
        self.ids.pop()
        try:
            if self.fds[-1] is None:
                fd = os.open("..", _DIR_FLAGS, dir_fd=child)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != self.ids[-1]:
                    os.close(fd)
                    raise OSError(errno.ESTALE, "a directory was moved while a file tool walked it")
                self.fds[-1] = fd
        finally:
            os.close(child)
        return True

    def reset(self):
        """Back to the root."""
        while len(self.fds) > 1:
            fd = self.fds.pop()
            self.ids.pop()
            if fd is not None:
                os.close(fd)

    def detach(self):
        """The current directory's fd, now the caller's to close."""
        fd = self.fds.pop()
        self.ids.pop()
        return fd

    def close(self):
        for fd in self.fds:
            if fd is not None:
                os.close(fd)
        self.fds, self.ids = [], []


def _walk(top_fd, stop, dirs):
    """Depth-first (rel, dir_fd, entry) below the directory top_fd, in sorted name order (that of
    `rg --sort path`): entry is an os.DirEntry in the directory dir_fd (valid until the next item).
    Skips SKIP_DIRS, enters no symlink, and ends once stop() is true. Iterative, so depth is no limit."""
    chain = _Chain(os.dup(top_fd))
    levels = [(_listing(top_fd), "")]
    try:
        while levels:
            entries, prefix = levels[-1]
            entry = next(entries, None)
            if entry is None:
                levels.pop()
                if levels:
                    try:
                        chain.pop()
                    except OSError:
                        return  # a directory moved under the walk: stop, never look outside
                continue
            if stop():
                return
            rel = prefix + entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                if entry.name in SKIP_DIRS:
                    continue
                if dirs:
                    yield rel, chain.top, entry
                try:  # a real fd, to list it: O_NOFOLLOW, in case it became a symlink since the listing
                    fd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=chain.top)
                except OSError:
                    continue
                chain.push(fd)
                levels.append((_listing(fd), rel + "/"))
            elif dirs or entry.is_file(follow_symlinks=False):
                yield rel, chain.top, entry
    finally:
        chain.close()


def _listing(fd):
    """An iterator over the entries of the open directory fd, sorted by name; empty if unreadable."""
    try:
        with os.scandir(fd) as it:
            return iter(sorted(it, key=lambda e: e.name))
    except OSError:
        return iter(())


def _parts(path):
    return [p for p in path.split("/") if p not in ("", ".")]


def _join(base, rel):
    return rel if base == "." else base + "/" + rel


def _readlink(name, dir_fd):
    """The target of the symlink name in dir_fd, or None if it is not a symlink."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


def _printed_as(dir_fd, part, path):
    """The one name in dir_fd that the file tools print as part (a name that is not UTF-8, shown with
    U+FFFD), or None; SandboxError if several print alike."""
    if "\ufffd" not in part:
        return None
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        with os.scandir(fd) as it:
            names = [e.name for e in it if e.name != part and _shown(e.name) == part]
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(names) > 1:
        raise SandboxError(f"{path}: {len(names)} names in that folder print as {part!r} (they are "
                           "not UTF-8); rename them with execute, e.g. `mv` with a shell glob")
    return names[0] if names else None


def _shown(text):
    """text fit for the model, JSON and protobuf: each undecodable byte of a file name (a lone
    surrogate, from os's surrogateescape) and any other lone surrogate becomes U+FFFD."""
    if text.isascii():
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_ESCAPE = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # lone surrogates surrogateescape cannot write


def _encode(text):
    """The UTF-8 bytes of text; surrogate-escaped bytes (read from a file) are written back as they
    were, any other lone surrogate (from model text) as U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return _NOT_ESCAPE.sub("\ufffd", text).encode("utf-8", "surrogateescape")


class _Found(list):
    """A search's results; cut_off says why the search stopped early (None: it finished)."""
    cut_off = None


class _Stop:
    """Called during a search: true once SEARCH_TIMEOUT has passed or cancel is set; why says which."""

    def __init__(self, cancel):
        self.deadline = time.monotonic() + SEARCH_TIMEOUT
        self.cancel = cancel
        self.why = None

    def __call__(self):
        if self.why is None:
            if self.cancel is not None and self.cancel.is_set():
                self.why = "cancelled: the results are partial"
            elif time.monotonic() > self.deadline:
                self.why = f"stopped at the {SEARCH_TIMEOUT:g} s time limit: the results are partial"
        return self.why is not None


def _stop_process(proc, stop, done):
    """Kill proc once stop() is true, unless done is set first (a thread, beside a search)."""
    while not done.wait(CANCEL_POLL):
        if stop():
            proc.kill()
            return


def _check_regular(st, shown):
    """SandboxError unless st is a regular file's."""
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory: use ls or glob to list it" if stat.S_ISDIR(st.st_mode) else \
            "not a regular file (a FIFO, socket or device): inspect it with execute"
        raise SandboxError(f"{shown} is {kind}")


def _grep_open_file(fd, needle, room, stop, rel):
    """grep's hits [(shown rel, line number, line)] in the open file fd, which this closes; none for
    what is not a regular file, is too big, binary or unfinished."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_GREP_BYTES:
            return []
        with open(fd, "rb", buffering=0, closefd=False) as f:
            found = _grep_file(f, needle, room, stop)
    except OSError:
        return []
    finally:
        os.close(fd)
    if not found:
        return []
    shown = _shown(rel)
    return [(shown, number, line) for number, line in found]


def _os_error(e, path, action):
    """A SandboxError for an OSError from a file tool, with what to do about it."""
    why = {
        errno.ENOENT: f"{path} (or a directory above it) does not exist: check it with ls or glob",
        errno.ENOTDIR: f"part of {path} is a file, not a directory: check the path with ls",
        errno.EEXIST: f"part of {path} is a file, not a directory: check the path with ls",
        errno.EISDIR: f"{path} is a directory",
        errno.EACCES: "permission denied: check its mode with execute (`ls -l`), or use another path",
        errno.EPERM: "operation not permitted: check its mode and flags with execute (`ls -l`)",
        errno.ENOSPC: "no space left on the device: free some space and try again",
        errno.EDQUOT: "disk quota exceeded: free some space and try again",
        errno.EROFS: "the file system is read-only: write somewhere else",
        errno.ENAMETOOLONG: "a name in the path is too long: use a shorter one",
        errno.ELOOP: f"{path} is a symlink loop",
        errno.ESTALE: "a directory on the path was moved meanwhile: try again",
        errno.EMFILE: "too many open files in the runner: try again",
    }.get(e.errno, e.strerror or str(e))
    return SandboxError(f"cannot {action} {path}: {why}")


def _grep_file(f, needle, room, stop):
    """[(line number, line)] for at most room lines of the open file f holding needle; None if
    the file holds a NUL anywhere (binary) or the search stopped before its end."""
    hits, carry, line_no = [], b"", 1
    while True:
        chunk = f.read(GREP_CHUNK)
        if b"\0" in chunk:
            return None
        buf = carry + chunk if carry else chunk
        end = len(buf) if not chunk else buf.rfind(b"\n") + 1  # whole lines; the rest waits
        if len(hits) < room and end:
            pos, counted_to = buf.find(needle, 0, end), 0
            while pos != -1 and len(hits) < room:
                start = buf.rfind(b"\n", 0, pos) + 1
                stop_at = buf.find(b"\n", pos, end)
                stop_at = end if stop_at == -1 else stop_at
                line_no += buf.count(b"\n", counted_to, start)
                counted_to = start
                hits.append((line_no, _line_text(buf[start:stop_at])))
                pos = buf.find(needle, stop_at + 1, end)
            line_no += buf.count(b"\n", counted_to, end)
        if not chunk:
            return hits
        carry = buf[end:]
        if stop():
            return None  # unfinished, so not known to be text


# ---- argument checks and text rules shared with other sandboxes (daytona_sandbox.py) ----

def _check_read_args(offset, limit):
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise SandboxError(f"offset must be a non-negative integer, not {offset!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise SandboxError(f"limit must be a non-negative integer or None, not {limit!r}")


def _slice_lines(text, offset, limit):
    """Lines [offset, offset+limit) of text, line endings kept; only \n splits lines."""
    lines = text.split("\n")
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    end = None if limit is None else offset + limit
    return "".join(lines[offset:end])


def _too_big_to_read(path, size):
    return SandboxError(f"{path} is {_size(size)}, over the {_size(MAX_READ_BYTES)} "
                        "limit: use execute with head, tail, sed -n or grep")


def _too_big_to_grep(path, size):
    return SandboxError(f"{path} is {_size(size)}, over grep's "
                        f"{_size(MAX_GREP_BYTES)} limit: use execute with grep or rg")


def _decode_text(path, data, errors):
    """The text of a file's bytes, or SandboxError if it is too big or looks binary."""
    if len(data) > MAX_READ_BYTES:
        raise SandboxError(f"{path} grew past the {_size(MAX_READ_BYTES)} limit while being "
                           "read: use execute with head, tail, sed -n or grep")
    if b"\0" in data[:BINARY_SNIFF]:
        raise SandboxError(f"{path} looks binary ({_size(len(data))}): "
                           "inspect it with execute, e.g. `file` or `xxd | head`")
    return data.decode("utf-8", errors=errors)


def _check_write_args(path, content):
    if not isinstance(content, str):
        raise SandboxError(f"content must be a string, not {type(content).__name__}")
    if isinstance(path, str) and (path.endswith(("/", os.sep))
                                  or os.path.basename(path) in (".", "..")):
        raise SandboxError(f"{path} names a directory (it ends with '/' or a dot entry): "
                           "give the path of a file, such as dir/notes.md")


def _check_edit_args(old, new):
    if not isinstance(old, str) or not isinstance(new, str):
        raise SandboxError("old and new must be strings")
    if not old:
        raise SandboxError("old must not be empty: to create or overwrite a file use write")
    if old == new:
        raise SandboxError("old and new are the same, so there is nothing to change")


def _replace(text, path, old, new, replace_all):
    """(new text, replacements) for edit(); CRLF files keep CRLF (see FilesystemSandbox.edit)."""
    if "\n" in old and "\r\n" not in old and "\r\n" in text and old not in text:
        crlf_old = _to_crlf(old)
        if crlf_old in text:
            old, new = crlf_old, _to_crlf(new)
    count = text.count(old)
    if count == 0:
        raise SandboxError(f"old text not found in {path}{_near_miss_hint(text, old)}")
    if count > 1 and not replace_all:
        raise SandboxError(f"old text occurs {count} times in {path}: include more surrounding "
                           "lines to make it unique, or pass replace_all=True")
    text = text.replace(old, new) if replace_all else text.replace(old, new, 1)
    return text, count if replace_all else 1


def _check_glob_args(pattern):
    if not isinstance(pattern, str) or not pattern:
        raise SandboxError("pattern must be a non-empty string such as '**/*.py'")
    if pattern.startswith("/") or ".." in pattern.split("/"):
        raise SandboxError(f"pattern {pattern!r} must be relative: pass the directory as path")


def _check_grep_args(pattern, max_count):
    if not isinstance(pattern, str) or not pattern:
        raise SandboxError("pattern must be a non-empty string")
    if "\n" in pattern or "\0" in pattern:
        raise SandboxError("pattern must be on one line (grep matches within a line)")
    if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
        raise SandboxError(f"max_count must be a positive integer, not {max_count!r}")


def _check_timeout(timeout):
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not timeout > 0 or timeout == math.inf:
        raise SandboxError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def _check_env(env):
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise SandboxError(f"env must be a dict of name -> str or None, not {type(env).__name__}")
    for name, value in env.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise SandboxError(f"invalid environment variable name {name!r}")
        if value is not None and (not isinstance(value, str) or "\0" in value):
            raise SandboxError(f"env[{name!r}] must be a string (or None to remove it)")
    return dict(env)


def _atomic_write(dir_fd, name, data, mode):
    """Write data to a temporary file beside name in the directory dir_fd, then rename it over name;
    mode (the old file's permissions) is kept, if given."""
    tmp = f".{name[:40]}.{os.getpid()}.{os.urandom(4).hex()}.tmp"  # short, so a long name still fits
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                 dir_fd=dir_fd)  # umask applies to new files
    try:
        with open(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise


def _to_crlf(s):
    return s.replace("\r\n", "\n").replace("\n", "\r\n")


def _near_miss_hint(text, old):
    """Say why old almost matched, when only whitespace or a trailing newline differs."""
    if old.endswith("\n") and old.rstrip("\r\n") in text:
        return (": it matches without its trailing newline (the file may end there); "
                "drop the newline from old and new")
    squash = lambda s: re.sub(r"\s+", " ", s).strip()
    if squash(old) and squash(old) in squash(text):
        return (": it matches only if whitespace is ignored, so check indentation, tabs versus "
                "spaces and trailing spaces; read the file and copy the exact text")
    return ": read the file and copy the exact text, including indentation"


def _count(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def _size(n):
    return f"{n} bytes" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1 << 20 \
        else f"{n / (1 << 20):.1f} MB"


def _line_text(raw):
    return raw.removesuffix(b"\r").decode("utf-8", errors="replace")


def _is_dir(entry):
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop
        return False


# Glob patterns become regexes that cannot backtrack catastrophically. A segment 'A*B*C' (A, B, C
# fixed-width: literals, '?', classes) is matched greedily from the left: B at its first place after
# A, inside an atomic group, so a failure later never retries it, and C at the segment's end. Runs
# of segments between '**'s are placed the same way, at their first fit. Leftmost is always right
# for fixed-width parts, so no alternative needs trying: a match costs about (path length x pattern
# length), however many wildcards. (Atomic groups are emulated with a lookahead and a backreference,
# as fnmatch does, for Python 3.10.)

def _glob_regex(pattern):
    """Compile a glob: '*' and '?' stay within one path segment, '**' spans segments."""
    if len(pattern) > MAX_PATTERN:
        raise SandboxError(f"pattern is {len(pattern)} characters, over the {MAX_PATTERN}-character "
                           "limit: use a shorter one")
    atomic = _atomic_groups()
    parts = pattern.split("/")
    segment = lambda i: _segment_regex(parts[i], atomic) + ("" if i == len(parts) - 1 else "/")
    out, i = [], 0
    while i < len(parts) and parts[i] != "**":
        out.append(segment(i))
        i += 1
    while i < len(parts):  # at a '**'
        while i < len(parts) and parts[i] == "**":
            i += 1
        if i == len(parts):
            out.append(".*")
            break
        j = i
        while j < len(parts) and parts[j] != "**":
            j += 1
        run = "(?:[^/]*/)*?" + "".join(segment(k) for k in range(i, j))
        out.append(atomic(run) if j < len(parts) else run)
        i = j
    return _compile_glob("".join(out), pattern)


def _atomic_groups():
    """A function wrapping a regex in an atomic group (one that is never backtracked into)."""
    count = itertools.count()

    def atomic(body):
        name = f"g{next(count)}"
        return f"(?=(?P<{name}>{body}))(?P={name})"
    return atomic


def _compile_glob(regex, pattern):
    try:
        return re.compile(regex + r"\Z", re.DOTALL)
    except re.error as e:
        raise SandboxError(f"invalid glob pattern {pattern!r}: {e.msg} (a range in [...] must go "
                           "upward, as in [a-z]); fix the pattern") from None


def _segment_regex(part, atomic):
    chunks, i = [[]], 0  # the fixed-width runs between the '*'s
    while i < len(part):
        c = part[i]
        if c == "*":
            chunks.append([])
            while i + 1 < len(part) and part[i + 1] == "*":
                i += 1
        elif c == "?":
            chunks[-1].append("[^/]")
        elif c == "[" and part.find("]", i + 2) != -1:
            j = part.find("]", i + 2)  # a ']' right after '[' is a member, as in fnmatch
            body = part[i + 1:j]
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            chunks[-1].append("(?!/)[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = j
        else:
            chunks[-1].append(re.escape(c))
        i += 1
    if len(chunks) == 1:
        return "".join(chunks[0])
    middle = "".join(atomic("[^/]*?" + "".join(chunk)) for chunk in chunks[1:-1])
    return "".join(chunks[0]) + middle + "[^/]*" + "".join(chunks[-1])


def _glob_filter(glob):
    """grep's file filter: a glob without '/' matches the file name, else the path under path."""
    if glob is None:
        return lambda rel: True
    if not isinstance(glob, str) or not glob:
        raise SandboxError("glob must be a non-empty pattern such as '*.py', or None")
    if "/" not in glob:
        if len(glob) > MAX_PATTERN:
            raise SandboxError(f"glob is {len(glob)} characters, over the {MAX_PATTERN}-character limit")
        name = _compile_glob(_segment_regex(glob, _atomic_groups()), glob)
        return lambda rel: name.match(rel.rsplit("/", 1)[-1]) is not None
    regex = _glob_regex(glob)
    return lambda rel: regex.match(rel) is not None
