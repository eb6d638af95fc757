"""The agent's tools in a Daytona sandbox: one sandbox per execution, same semantics as the host.

    from daytona_sandbox import create_for_execution, make_client, sweep, DaytonaUnavailable

    box = create_for_execution("exec-1", "runner-a", api_key=KEY, api_url=None, target=None,
                               repo="https://github.com/me/repo", ref="main")
    try:
        print(f"sandbox {box.id} ready in {box.created_in:.1f}s, workspace {box.root}")
        r = box.execute("python -m pytest -q", timeout=300)   # an ExecutionResult, as on the host
        box.edit("src/app.py", "bug", "fix")
        patch = box.patch(max_bytes=512_000)                 # None when the workspace is not git
        print(patch.text if patch else "no git checkout")
    except DaytonaUnavailable as e:                           # auth, quota, rate limit, unreachable
        print(e.code, e)                                      # the execution FAILED, with this reason
    finally:
        box.delete()
    sweep(make_client(KEY, None, None), is_terminal=lambda execution_id: True)

DaytonaSandbox has FilesystemSandbox's methods, results and errors (see sandbox.py), so the
agent cannot tell which one it has. Commands run through Daytona sessions (run asynchronously,
polled), so a timeout keeps the output so far and a cancel stops the command. File tools go
through the SDK's file system API and are confined to the workspace by path: `..` and absolute
paths outside are refused with the host's messages. Symlinks are not resolved (the sandbox
itself is the boundary). A file-level failure is a SandboxError the model can act on; a failure
of the service (auth, quota, rate limit after backoff, unreachable) raises DaytonaUnavailable.

Needs the `daytona` SDK: pip install -e '.[cloud]'. It is imported only when a sandbox is made.
"""
import collections
import posixpath
import random
import shlex
import threading
import time
import uuid

import sandbox
from sandbox import ExecutionResult, SandboxError, SandboxUnavailable, _Capture

LABEL = "stigmer"                  # every sandbox we create carries LABEL=1 ...
LABEL_EXECUTION = "stigmer.execution"  # ... the execution it runs ...
LABEL_RUNNER = "stigmer.runner"    # ... and the runner (worker) that created it
LABEL_KEEP = "stigmer.keep"        # "1": kept for inspection (--keep-sandbox); sweep leaves it alone
CLONE_TOKEN_VARS = ("GITHUB_TOKEN", "GH_TOKEN")  # the first one in env authenticates an https clone
AUTO_STOP_MINUTES = 60             # backstop for a worker that dies: Daytona stops an idle sandbox,
AUTO_DELETE_MINUTES = 0            # and deletes it as soon as it is stopped (ephemeral)
CREATE_TIMEOUT = 120.0             # seconds Daytona may take to start a sandbox
CREATE_ATTEMPTS = 5                # tries on 429 and 5xx before giving up
BACKOFF = 1.0                      # seconds before the first retry; doubles, with jitter
TOOL_ATTEMPTS = 4                  # tries of a toolbox call answered 429, 502, 503 or 504
POLL_FIRST = 0.02                  # seconds between the first polls of a running command ...
POLL_MAX = 0.5                     # ... growing to this
LOG_GRACE = 2.0                    # seconds to wait for the last output lines after the exit code
WORKSPACE = "workspace"            # the workspace directory, under the sandbox user's home
SETUP_TIMEOUT = 600.0              # seconds a clone may take
INSTALL_HINT = "pip install -e '.[cloud]'"

Patch = collections.namedtuple("Patch", "text size truncated binary_files omitted_files")
Patch.__doc__ = """A workspace's change as a git diff: text applies with `git apply`; size is the full
diff's bytes; truncated says files were left out to fit max_bytes (omitted_files names them);
binary_files were changed but are named only, not included."""


class DaytonaUnavailable(SandboxUnavailable):
    """Daytona cannot serve this execution; code is auth, quota, rate_limit, unreachable,
    timeout, clone or error, and the message is one line for a person."""


def _sdk():
    try:
        import daytona
    except ImportError:
        raise DaytonaUnavailable("error", "the daytona SDK is not installed: run "
                                          f"`{INSTALL_HINT}`") from None
    return daytona


def make_client(api_key, api_url, target):
    """A daytona.Daytona client; all three settings explicit, so no .env file is read."""
    daytona = _sdk()
    if not api_key:
        raise DaytonaUnavailable("auth", "DAYTONA_API_KEY is not set: export it, or use "
                                         "STIGMER_SANDBOX=filesystem")
    try:
        return daytona.Daytona(daytona.DaytonaConfig(api_key=api_key, api_url=api_url or None,
                                                     target=target or None))
    except daytona.DaytonaError as e:
        raise _unavailable(e, "connect to Daytona") from None


def _unavailable(e, doing):
    """A DaytonaUnavailable for an SDK error e that happened while doing something."""
    daytona = _sdk()
    text = " ".join(str(e).split()) or type(e).__name__
    status = getattr(e, "status_code", None)
    if isinstance(e, daytona.DaytonaAuthenticationError) or status == 401:
        return DaytonaUnavailable("auth", f"Daytona refused the API key ({text}): check "
                                          "DAYTONA_API_KEY and DAYTONA_API_URL")
    if isinstance(e, daytona.DaytonaRateLimitError) or status == 429:
        return DaytonaUnavailable("rate_limit", f"Daytona kept rate-limiting us while trying to "
                                                f"{doing} ({text}): retry later")
    if status == 403 or "quota" in text.lower():
        return DaytonaUnavailable("quota", f"Daytona refused to {doing}: {text} (quota or "
                                           "permissions of this API key)")
    if isinstance(e, daytona.DaytonaConnectionError):
        return DaytonaUnavailable("unreachable", f"Daytona is unreachable ({text}): check the "
                                                 "network and DAYTONA_API_URL")
    if isinstance(e, daytona.DaytonaTimeoutError) or status == 408:
        return DaytonaUnavailable("timeout", f"Daytona timed out trying to {doing}: {text}")
    return DaytonaUnavailable("error", f"Daytona failed to {doing}: {text}")


def _retryable(e, statuses):
    daytona = _sdk()
    status = getattr(e, "status_code", None)
    return isinstance(e, daytona.DaytonaRateLimitError) or status in statuses or \
        (status is None and isinstance(e, daytona.DaytonaConnectionError)
         and not isinstance(e, daytona.DaytonaTimeoutError))


def _with_backoff(call, attempts, statuses, doing):
    """call() retried with exponential backoff and jitter on 429, the given statuses and lost
    connections; other SDK errors and the last failure raise DaytonaUnavailable."""
    daytona = _sdk()
    for attempt in range(attempts):
        try:
            return call()
        except daytona.DaytonaError as e:
            if attempt == attempts - 1 or not _retryable(e, statuses):
                raise _unavailable(e, doing) from None
            wait = _retry_after(e) or BACKOFF * 2 ** attempt
            time.sleep(wait * random.uniform(0.8, 1.2))


def _retry_after(e):
    try:
        return min(float((getattr(e, "headers", None) or {}).get("Retry-After")), 60.0)
    except (TypeError, ValueError):
        return None


# ---- lifecycle ----

def create_for_execution(execution_id, runner_id, *, api_key, api_url, target, snapshot=None,
                         env=None, repo=None, ref=None, timeout=120.0, max_output_bytes=1_000_000,
                         client=None, keep=False):
    """A started sandbox for one execution, its workspace empty or a clone of repo at ref.

    env: variables for every command (a GITHUB_TOKEN or GH_TOKEN there authenticates an https
    clone, and later fetches, through a credential helper that names the variable, never its
    value); timeout: the default for execute(); keep: labelled to be left alone by sweep().
    box.created_in is the seconds creation took. Raises DaytonaUnavailable.
    """
    daytona = _sdk()
    client = client or make_client(api_key, api_url, target)
    params = daytona.CreateSandboxFromSnapshotParams(
        snapshot=snapshot or None, env_vars=dict(env or {}),
        labels={LABEL: "1", LABEL_EXECUTION: str(execution_id), LABEL_RUNNER: str(runner_id),
                **({LABEL_KEEP: "1"} if keep else {})},
        auto_stop_interval=AUTO_STOP_MINUTES, auto_delete_interval=AUTO_DELETE_MINUTES,
        ephemeral=True)
    start = time.monotonic()
    made = _with_backoff(lambda: client.create(params, timeout=CREATE_TIMEOUT), CREATE_ATTEMPTS,
                         range(500, 600), "create a sandbox")
    box = DaytonaSandbox(made, "/", timeout=timeout, max_output_bytes=max_output_bytes)
    try:
        code, out, err = box._run(f"mkdir -p {WORKSPACE} && cd {WORKSPACE} && pwd -P",
                                  SETUP_TIMEOUT)
        if code != 0 or not out.strip().startswith("/"):
            raise DaytonaUnavailable("error", "could not make the workspace directory in the "
                                              f"sandbox: {_last_line(err or out)}")
        box.root = out.strip().splitlines()[-1]
        if repo:
            script = f"git clone --quiet{_clone_credentials(repo, env)} -- {shlex.quote(repo)} ."
            if ref:
                script += f" && git checkout --quiet {shlex.quote(ref)} --"
            code, out, err = box._run(f"cd -- {shlex.quote(box.root)} && {script}",
                                      SETUP_TIMEOUT, env=env)
            if code != 0:
                raise DaytonaUnavailable("clone", f"git clone of {repo}"
                                                  + (f" at {ref}" if ref else "")
                                                  + f" failed: {_last_line(err or out)}")
    except BaseException:
        box.delete()
        raise
    box.created_in = time.monotonic() - start
    return box


def _clone_credentials(repo, env):
    """git clone options that answer an https clone's password prompt with $GITHUB_TOKEN (or
    $GH_TOKEN) when env has it; the value stays in the environment, out of the command line."""
    name = next((n for n in CLONE_TOKEN_VARS if (env or {}).get(n)), None)
    if name is None or not repo.startswith("https://"):
        return ""
    helper = (f'!f() {{ test "$1" = get || return 0; echo username=x-access-token; '
              f'echo "password=${name}"; }}; f')
    return " -c " + shlex.quote(f"credential.helper={helper}")


def sweep(client, is_terminal):
    """Delete our sandboxes (by label) whose executions is_terminal(execution_id) says are over,
    except those kept with --keep-sandbox; returns the ids deleted. Run it at worker start and
    now and then."""
    daytona = _sdk()
    found = _with_backoff(lambda: list(client.list(daytona.ListSandboxesQuery(labels={LABEL: "1"}))),
                          TOOL_ATTEMPTS, (502, 503, 504), "list sandboxes")
    deleted = []
    for made in found:
        labels = made.labels or {}
        execution_id = labels.get(LABEL_EXECUTION)
        if execution_id and labels.get(LABEL_KEEP) != "1" and is_terminal(execution_id):
            DaytonaSandbox(made, "/").delete()
            deleted.append(made.id)
    return deleted


def _last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


# ---- the sandbox ----

class DaytonaSandbox:
    """Runs commands and file tools in the directory root of one Daytona sandbox."""

    def __init__(self, made, root, *, env=None, timeout=120.0, max_output_bytes=1_000_000):
        self.sandbox = made            # the SDK's Sandbox
        self.id = made.id
        self.root = posixpath.normpath(root) if root.startswith("/") else None
        if self.root is None:
            raise SandboxError(f"the workspace must be an absolute path in the sandbox, not {root!r}")
        self.env = sandbox._check_env(env)
        self.timeout = sandbox._check_timeout(timeout)
        if isinstance(max_output_bytes, bool) or not isinstance(max_output_bytes, int) \
                or max_output_bytes < 1:
            raise SandboxError(f"max_output_bytes must be a positive integer, not {max_output_bytes!r}")
        self.max_output_bytes = max_output_bytes
        self.created_in = 0.0
        self._deleted = False
        self._lock = threading.Lock()

    def __repr__(self):
        return f"DaytonaSandbox({self.id!r}, {self.root!r})"

    def view(self, folder):
        """The same sandbox with FOLDER as its root (a skill's folder), for the file tools' reads."""
        return DaytonaSandbox(self.sandbox, folder, timeout=self.timeout, max_output_bytes=self.max_output_bytes)

    def upload(self, folder, files):
        """Put FILES ([(path relative to FOLDER, bytes, executable)]) under FOLDER (an absolute path in the
        sandbox) in one request, give the executable ones their run bits, and make FOLDER read-only."""
        daytona = _sdk()
        uploads = [daytona.FileUpload(source=data, destination=posixpath.join(folder, rel)) for rel, data, _ in files]
        if uploads:
            self._tool(lambda: self.sandbox.fs.upload_files(uploads), "upload skill files", folder, "write")
        runnable = [shlex.quote(posixpath.join(folder, rel)) for rel, _, executable in files if executable]
        script = (f"mkdir -p -- {shlex.quote(folder)}" + (f" && chmod a+x -- {' '.join(runnable)}" if runnable else "")
                  + f" && chmod -R a-w -- {shlex.quote(folder)}")
        code, out, err = self._run(script, SETUP_TIMEOUT)
        if code != 0:
            raise SandboxError(f"could not set up the skills in the sandbox: {_last_line(err or out)}")

    def delete(self):
        """Delete the sandbox (once; a sandbox already gone is fine)."""
        with self._lock:
            if self._deleted:
                return
            self._deleted = True
        daytona = _sdk()
        try:
            _with_backoff(lambda: self.sandbox.delete(), TOOL_ATTEMPTS, (502, 503, 504),
                          "delete a sandbox")
        except DaytonaUnavailable as e:
            if "not found" not in str(e).lower():
                raise
        except daytona.DaytonaNotFoundError:
            pass

    # ---- shell ----

    def execute(self, command, timeout=None, env=None, *, cancel=None, on_output=None) -> ExecutionResult:
        """Run command with /bin/sh in the workspace; never raises because the command failed. (ON_OUTPUT is
        accepted for the host's signature: Daytona's session gives the output when the command ends.)"""
        if not isinstance(command, str) or not command.strip():
            raise SandboxError("command must be a non-empty string")
        if "\0" in command:
            raise SandboxError("command must not contain a NUL byte")
        timeout = self.timeout if timeout is None else sandbox._check_timeout(timeout)
        env = sandbox._check_env(env)
        start = time.monotonic()
        if cancel is not None and cancel.is_set():
            return ExecutionResult(130, "", "cancelled before it started\n", False, False, 0.0, True)
        layers = {}
        for layer in (sandbox.NON_INTERACTIVE, self.env, env):
            layers.update(layer)
        unset = " ".join(f"-u {shlex.quote(k)}" for k, v in sorted(layers.items()) if v is None)
        assign = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(layers.items()) if v is not None)
        script = (f"cd -- {shlex.quote(self.root)} && env {unset} {assign} "
                  f"/bin/sh -c {shlex.quote(command)} </dev/null")
        code, stdout, stderr, outcome = self._session(script, start + timeout, cancel)
        out, err = _Capture(self.max_output_bytes), _Capture(self.max_output_bytes)
        out.add(stdout.encode("utf-8", errors="surrogateescape"))
        err.add(stderr.encode("utf-8", errors="surrogateescape"))
        stdout, out_cut = out.result()
        stderr, err_cut = err.result()
        note = {"timed_out": f"timed out after {timeout:g} s; the command was stopped",
                "cancelled": "cancelled; the command was stopped"}.get(outcome)
        if note:
            stderr += ("\n" if stderr and not stderr.endswith("\n") else "") + f"[{note}]\n"
        code = {"timed_out": 124, "cancelled": 130}.get(outcome, code)
        return ExecutionResult(code, stdout, stderr, outcome == "timed_out", out_cut or err_cut,
                               time.monotonic() - start, outcome == "cancelled")

    def _run(self, script, timeout, env=None):
        """(exit code, stdout, stderr) of a setup script run as given (no cd, no env layers)."""
        if env:
            script = "export " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()
                                          if v is not None) + "; " + script
        code, out, err, outcome = self._session(script, time.monotonic() + timeout, None)
        if outcome:
            raise DaytonaUnavailable("timeout", f"setting up the sandbox took over {timeout:g} s")
        return code, out, err

    def _session(self, script, deadline, cancel):
        """Run script in a fresh session: (exit code, stdout, stderr, outcome), outcome None,
        'timed_out' or 'cancelled'. The session (and so the command) is deleted at the end.

        Daytona logs output line by line and adds a newline to a last unfinished line, so the
        script ends by printing a random marker line to both streams: output that ends with it
        is complete, and the marker tells a real last newline from an added one.
        """
        daytona = _sdk()
        mark = "stigmer-end-" + uuid.uuid4().hex
        # Daytona runs a session command in the session's own shell: the subshell keeps the
        # script's exit, trap and export from reaching that shell.
        wrapped = (f"(\n{script}\n); __stigmer_rc=$?; printf '\\n%s\\n' {mark}; "
                   f"printf '\\n%s\\n' {mark} >&2; (exit $__stigmer_rc)")
        process = self.sandbox.process
        session = "stigmer-" + uuid.uuid4().hex[:16]
        self._tool(lambda: process.create_session(session), "start a command")
        try:
            request = daytona.SessionExecuteRequest(command=wrapped, run_async=True)
            command_id = self._tool(lambda: process.execute_session_command(session, request),
                                    "start a command").cmd_id
            code, outcome, pause = None, None, POLL_FIRST
            while code is None:
                now = time.monotonic()
                if cancel is not None and cancel.is_set():
                    outcome = "cancelled"
                elif now >= deadline:
                    outcome = "timed_out"
                if outcome:
                    break
                wait = min(pause, deadline - now)
                if cancel is not None:
                    cancel.wait(wait)
                else:
                    time.sleep(wait)
                pause = min(pause * 1.5, POLL_MAX)
                code = self._tool(lambda: process.get_session_command(session, command_id),
                                  "follow a command").exit_code
            grace = time.monotonic() + LOG_GRACE
            while True:
                logs = self._tool(lambda: process.get_session_command_logs(session, command_id),
                                  "read a command's output")
                stdout, stderr = logs.stdout or "", logs.stderr or ""
                ending = f"\n{mark}\n"
                done = stdout.endswith(ending) and stderr.endswith(ending)
                if done or outcome or time.monotonic() >= grace:
                    break
                time.sleep(POLL_FIRST)
            return code, stdout.removesuffix(ending), stderr.removesuffix(ending), outcome
        finally:
            try:
                self._tool(lambda: process.delete_session(session), "stop a command")
            except SandboxError:
                pass  # the session is gone already

    def _tool(self, call, doing, path=None, action=None):
        """call() with backoff on 429 and 502-504; a missing or refused file becomes a
        SandboxError naming path, anything else of the service's DaytonaUnavailable."""
        daytona = _sdk()
        try:
            return _with_backoff_raw(call)
        except daytona.DaytonaNotFoundError:
            if path is None:
                raise SandboxError(f"could not {doing}: not found in the sandbox") from None
            raise SandboxError(f"cannot {action} {path}: {path} (or a directory above it) does not "
                               "exist: check it with ls or glob") from None
        except daytona.DaytonaError as e:
            status = getattr(e, "status_code", None)
            if path is not None and status in (400, 403, 409, 422) and not \
                    isinstance(e, daytona.DaytonaAuthenticationError) and "quota" not in str(e).lower():
                why = str(e).split(": ", 1)[-1].strip() or "refused"
                if status == 403:
                    why = "permission denied: check its mode with execute (`ls -l`), or use another path"
                raise SandboxError(f"cannot {action} {path}: {why}") from None
            raise _unavailable(e, doing) from None

    # ---- file tools ----

    def ls(self, path=".") -> list:
        """Sorted names in a directory, directories with a trailing '/'."""
        full = self._resolve(path)
        info = self._info(full)
        if info is None or not info.is_dir:
            raise SandboxError(f"{path} is not a directory" if info else f"{path} does not exist")
        entries = self._tool(lambda: self.sandbox.fs.list_files(full), "list a directory",
                             path, "list")
        return sorted(e.name + "/" if e.is_dir else e.name for e in entries)

    def read(self, path, offset=0, limit=None) -> str:
        """Lines [offset, offset+limit) of a text file, line endings kept."""
        sandbox._check_read_args(offset, limit)
        return sandbox._slice_lines(self._read_text(path, "replace"), offset, limit)

    def write(self, path, content) -> None:
        """Write UTF-8 text, creating parent directories."""
        sandbox._check_write_args(path, content)
        full = self._resolve(path)
        info = self._info(full)
        if info is not None and info.is_dir:
            raise SandboxError(f"{path} is a directory")
        data = content.encode("utf-8", errors="surrogateescape")
        self._tool(lambda: self.sandbox.fs.upload_file(data, full), "write a file", path, "write")

    def edit(self, path, old, new, replace_all=False) -> int:
        """Replace old with new in a file; returns the number of replacements (CRLF kept)."""
        sandbox._check_edit_args(old, new)
        text = self._read_text(path, "surrogateescape")
        text, count = sandbox._replace(text, path, old, new, replace_all)
        data = text.encode("utf-8", errors="surrogateescape")
        full = self._resolve(path)
        self._tool(lambda: self.sandbox.fs.upload_file(data, full), "write a file", path, "write")
        return count

    def glob(self, pattern, path=".", *, cancel=None) -> list:
        """Paths under path matching pattern ('**' spans directories), relative to the root, sorted.

        Hidden files match; .git directories are not entered. Directories match when they hold
        a file (the service lists files only). cancel is taken for FilesystemSandbox's signature:
        the search is one call to the service, which cannot be interrupted.
        """
        sandbox._check_glob_args(pattern)
        base = self._resolve(path)
        info = self._info(base)
        if info is None or not info.is_dir:
            raise SandboxError(f"{path} is not a directory")
        regex = sandbox._glob_regex(pattern)
        found = self._tool(lambda: self.sandbox.fs.search_files(base, "**"), "search files",
                           path, "search")
        names = set()
        for full in found.files or []:
            rel = posixpath.relpath(posixpath.normpath(full), base)
            parts = rel.split("/")
            if rel.startswith("..") or sandbox.SKIP_DIRS.intersection(parts[:-1]):
                continue
            names.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        return sorted(posixpath.relpath(posixpath.join(base, rel), self.root)
                      for rel in names if regex.match(rel))

    def grep(self, pattern, path=".", glob=None, max_count=1000, *, cancel=None) -> list:
        """(path, line number, line) for lines containing pattern literally, sorted.

        Searches hidden files but not .git directories, ignores .gitignore; at most max_count
        results. The service decides what is binary (a NUL in a file's first 512 bytes). cancel
        is taken for FilesystemSandbox's signature (one call to the service, not interrupted).
        """
        sandbox._check_grep_args(pattern, max_count)
        base = self._resolve(path)
        info = self._info(base)
        if info is None:
            raise SandboxError(f"{path} does not exist")
        keep = sandbox._glob_filter(glob)
        if not info.is_dir:
            self._check_regular(info, path)
            if info.size > sandbox.MAX_GREP_BYTES:
                raise sandbox._too_big_to_grep(path, info.size)
        matches = self._tool(lambda: self.sandbox.fs.find_files(base, pattern), "search files",
                             path, "search")
        hits = []
        for m in matches:
            full = posixpath.normpath(m.file)
            rel = posixpath.basename(full) if not info.is_dir else posixpath.relpath(full, base)
            if rel.startswith("..") or sandbox.SKIP_DIRS.intersection(rel.split("/")[:-1]) \
                    or not keep(rel):
                continue
            hits.append((posixpath.relpath(full, self.root), m.line, m.content.removesuffix("\r")))
        return sorted(hits, key=lambda h: (h[0], h[1]))[:max_count]

    # ---- patch ----

    def patch(self, max_bytes=512_000):
        """The git diff of everything changed in the workspace since HEAD (tracked and new
        files; .gitignore respected), or None if the workspace is not a git checkout."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise SandboxError(f"max_bytes must be a positive integer, not {max_bytes!r}")
        out = f"/tmp/stigmer-{uuid.uuid4().hex}.patch"
        script = (
            f"cd -- {shlex.quote(self.root)} && git rev-parse --is-inside-work-tree >/dev/null 2>&1"
            " || exit 3\n"
            # A fresh index read from HEAD has no stat data, so every file is hashed: a copy of
            # the real index could call a same-size edit in the same second unchanged.
            "index=$(mktemp -u) && trap 'rm -f \"$index\"' EXIT && export GIT_INDEX_FILE=$index\n"
            "base=$(git rev-parse --verify -q HEAD || git hash-object -t tree /dev/null)\n"
            "git read-tree \"$base\" && git add -A . && git -c core.quotepath=off"
            f" diff --cached --no-color --no-ext-diff --no-renames \"$base\" > {out}")
        code, _, err = self._run(script, SETUP_TIMEOUT)
        if code == 3:
            return None
        if code != 0:
            raise SandboxError(f"git diff failed in the sandbox: {_last_line(err)}")
        try:
            data = self._tool(lambda: self.sandbox.fs.download_file(out), "read the patch")
        finally:
            self._tool(lambda: self.sandbox.fs.delete_file(out), "remove the patch file")
        return _cap_patch(data.decode("utf-8", errors="replace"), max_bytes)

    # ---- paths ----

    def _resolve(self, path):
        """The normalised absolute path of path, or SandboxError if it is outside the root."""
        if hasattr(path, "__fspath__"):
            path = path.__fspath__()
        if not isinstance(path, str) or not path:
            raise SandboxError(f"path must be a non-empty string, not {path!r}")
        if "\0" in path:
            raise SandboxError("path must not contain a NUL byte")
        full = posixpath.normpath(posixpath.join(self.root, path))  # an absolute path replaces root
        if full != self.root and not full.startswith(self.root.rstrip("/") + "/"):
            raise SandboxError(f"{path} is outside the workspace {self.root}: "
                               "use a path relative to it")
        return full

    def _info(self, full):
        """The service's FileInfo for full, or None if it does not exist."""
        daytona = _sdk()
        try:
            return _with_backoff_raw(lambda: self.sandbox.fs.get_file_info(full))
        except daytona.DaytonaNotFoundError:
            return None
        except daytona.DaytonaError as e:
            if getattr(e, "status_code", None) == 400 and "not a directory" in str(e):
                return None
            raise _unavailable(e, "look at a file") from None

    def _check_regular(self, info, path):
        if (info.mode or "-")[:1] not in ("-", "d"):
            raise SandboxError(f"{path} is not a regular file (a FIFO, socket or device): "
                               "inspect it with execute")

    def _read_text(self, path, errors):
        full = self._resolve(path)
        info = self._info(full)
        if info is None:
            raise SandboxError(f"cannot read {path}: {path} (or a directory above it) does not "
                               "exist: check it with ls or glob")
        if info.is_dir:
            raise SandboxError(f"{path} is a directory: use ls or glob to list it")
        self._check_regular(info, path)
        if info.size > sandbox.MAX_READ_BYTES:
            raise sandbox._too_big_to_read(path, info.size)
        data = self._tool(lambda: self.sandbox.fs.download_file(full), "read a file", path, "read")
        return sandbox._decode_text(path, data, errors)


def _with_backoff_raw(call):
    """call() retried on 429 and 502-504 like _with_backoff, but SDK errors pass through."""
    daytona = _sdk()
    for attempt in range(TOOL_ATTEMPTS):
        try:
            return call()
        except daytona.DaytonaError as e:
            if attempt == TOOL_ATTEMPTS - 1 or not _retryable(e, (502, 503, 504)):
                raise
            time.sleep((_retry_after(e) or BACKOFF * 2 ** attempt) * random.uniform(0.8, 1.2))


def _cap_patch(text, max_bytes):
    """A Patch of text with binary files named instead of included, cut at whole files to fit
    max_bytes; notes go before the first diff, where `git apply` ignores them."""
    chunks, current = [], None
    for line in text.splitlines(keepends=True):
        if line.startswith("diff --git "):
            current = [line]
            chunks.append(current)
        elif current is not None:
            current.append(line)
    kept, binary, omitted, used = [], [], [], 0
    for chunk in chunks:
        body = "".join(chunk)
        name = _patch_path(chunk[0])
        if any(line.startswith(("Binary files ", "GIT binary patch")) for line in chunk):
            binary.append(name)
            continue
        size = len(body.encode("utf-8"))
        if used + size > max_bytes:
            omitted.append(name)
            continue
        kept.append(body)
        used += size
    notes = []
    if binary:
        notes.append(f"# stigmer: binary files changed, not included: {', '.join(binary)}\n")
    if omitted:
        notes.append(f"# stigmer: patch capped at {max_bytes} bytes; left out: "
                     f"{', '.join(omitted)}\n")
    return Patch("".join(notes + kept), len(text.encode("utf-8")), bool(omitted), binary, omitted)


def _patch_path(header):
    """The b/ path of a 'diff --git a/x b/x' line (good enough for a note)."""
    rest = header[len("diff --git "):].rstrip("\n")
    half = rest.find(" b/")
    return rest[half + 3:] if half != -1 else rest
