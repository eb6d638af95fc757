"""Workers forked from a process that has imported the model SDKs already: a worker then starts in about
0.1 s of CPU instead of the second or more that `import anthropic` alone costs.

    child = forkserver.spawn(["worker", ...], env, {0: stdin_r, 1: log, 2: log})   # Popen-like, or None
    python forkserver.py                           # the server itself (spawn starts it when none is up)

One server per user and installation (its key: this Python, this checkout and this file, the SDKs' files,
the PYTHON* and locale variables, and what a child would inherit from the server rather than its caller:
hard limits, nice, CPUs, groups, cgroup), listening on a Unix socket in a private directory
(TMPDIR/stigmer-UID, 0700, checked: a directory that is not ours and private is never used). It answers
only its own user (SO_PEERCRED), and only a caller that sees what it sees (the same namespaces and root)
and is not an agent's command (a sandbox marker in its environment block): a confined process never gets
an unconfined child. It holds no key and no secret: it is started with a few plain variables
(server_env), and a worker's secrets travel as today, in a pipe (secrets.py secrets_pipe) whose end is
passed through the socket and closed by the server as soon as it has forked. It imports no module of
this project but the secrets.py the SDKs pull in (and retires when that changes), so a forked worker runs
the code on disk.

A forked child becomes `python runner.py ARGS` as the caller would have started it: its own session, the
caller's environment, working directory, umask and resource limits, the caller's fds at their numbers and
nothing else. The caller gets its pid and a pidfd (race-free signals; readable when it exits) and, from the
server, its exit status; the child runs only once the caller has said go (a caller that gave up gets no
twin). When no server is up, spawn starts one in the background and returns None at once
(that worker is started as before); the next worker is forked. The server leaves after IDLE_EXIT seconds
with no request and no live child. STIGMER_FORKSERVER=0 turns it off. Linux only (pidfd, SCM_RIGHTS).
"""
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OFF_VAR = "STIGMER_FORKSERVER"  # 0: workers are started as new processes, never forked
IDLE_VAR = "STIGMER_FORKSERVER_IDLE"  # seconds a server without requests and children stays (IDLE_EXIT)
IDLE_EXIT = 900.0
SDKS = ("anthropic", "openai", "mcp", "mcp.client.stdio", "mcp.client.streamable_http", "grpc", "google.protobuf",
        "yaml")  # what is imported once (none starts a thread: a fork copies only the thread that forks)
REQUEST_WAIT = 2.0  # seconds a caller has to send its request (it sends it at once)
GO_WAIT = 30.0  # seconds a forked child waits for its caller's go before it leaves
MAX_REQUEST = 16 << 20  # bytes of one request (its environment, mostly)
MAX_FDS = 16
LIMITS = ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_MEMLOCK",
          "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_STACK")
_HEADER = struct.Struct("!I")
GO = b"g"  # the caller's word, once it has the child's pid: until then the child waits (and leaves without it)
MARKERS = ("STIGMER_SANDBOX_RUN", "STIGMER_EXECUTION")  # sandbox.RUN_MARKER, EXECUTION_MARKER: an agent's command
SDK_ENV = ("ANTHROPIC_LOG", "OPENAI_LOG", "PYDANTIC_DISABLE_PLUGINS", "TZ")  # read as the SDKs load (no secret)


def server_env(env):
    """The variables of ENV (a worker's) that shape an interpreter's start (the locale, PYTHON*, and HOME where
    it adds the user's site-packages), and this module's settings: all a server starts with, and its key.
    None of them is a key or a secret."""
    import site
    return {k: v for k, v in env.items() if k.startswith(("LC_", "PYTHON", OFF_VAR)) and k != "PYTHONSTARTUP"
            or k in ("LANG", *SDK_ENV) or k == "HOME" and site.ENABLE_USER_SITE}


def socket_path(env):
    """Where the server for a worker with ENV listens, or None when there can be none here (not Linux, no
    private directory of ours, a path too long for a Unix socket)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open") or not hasattr(socket, "send_fds"):
        return None
    import importlib.util
    import resource
    uid = os.getuid()
    folder = os.path.join(env.get("TMPDIR") or "/tmp", f"stigmer-{uid}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
    except OSError:
        return None
    import stat
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        return None
    # What a forked child inherits from the server rather than from its caller, so must be the caller's: the
    # hard limits, the scheduling priority, the CPUs, the groups and the cgroup (whose end would end it too).
    try:
        with open("/proc/self/cgroup") as f:
            cgroup = f.read()
    except OSError:
        cgroup = ""
    parts = [sys.executable, HERE, os.stat(__file__).st_mtime_ns, sys.version, sorted(server_env(env).items()),
             [resource.getrlimit(getattr(resource, n))[1] for n in LIMITS], os.getpriority(os.PRIO_PROCESS, 0),
             sorted(os.sched_getaffinity(0)), sorted(os.getgroups()), cgroup]
    for name in ("anthropic", "openai", "mcp"):
        try:
            spec = importlib.util.find_spec(name)
            parts.append([spec.origin, os.stat(spec.origin).st_mtime_ns] if spec and spec.origin else None)
        except (ImportError, ValueError, OSError):
            parts.append(None)
    key = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]
    path = os.path.join(folder, f"forkserver-{key}.sock")
    return path if len(path.encode()) < 100 else None


# ---- the caller's side ----

class Child:
    """A forked worker, as much of subprocess.Popen as a spawner uses: pid, args, stdin, returncode, poll(),
    wait(), send_signal(), terminate(), kill()."""

    def __init__(self, args, pid, pidfd, conn):
        self.args, self.pid, self.stdin, self.returncode = args, pid, None, None  # stdin: set by the spawner
        self._pidfd, self._conn = pidfd, conn

    def poll(self):
        return self.wait(0) if self.returncode is None and self._exited(0) else self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if not self._exited(timeout):
                import subprocess
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = self._status()
            os.close(self._pidfd)
            self._conn.close()
        return self.returncode

    def __del__(self):  # never waited for (a background worker left running): our two fds go, quietly
        if self.returncode is None and self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
            self._conn.close()

    def _exited(self, timeout):
        import select
        return bool(select.select([self._pidfd], [], [], timeout)[0])

    def _status(self):
        """The exit status the server reports once it has reaped the child (255 if it cannot say)."""
        self._conn.settimeout(5.0)
        data = b""
        try:
            while not data.endswith(b"\n"):
                more = self._conn.recv(64)
                if not more:
                    break
                data += more
            return int(data.split()[1])
        except (OSError, ValueError, IndexError):
            return 255

    def send_signal(self, sig):
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def spawn(args, env, fds):
    """`python runner.py ARGS` forked from the server, with environment ENV, this process's working directory,
    umask and resource limits, and FDS ({fd number in the child: an fd of ours}; the caller keeps and closes
    its own). Returns a Child, or None when the caller should start
    the process itself: off, none possible here, none up yet (then one is started for the next time), or it
    failed. Never raises for a server that is away or broken."""
    if env.get(OFF_VAR, "1") == "0" or any(m in env or m in os.environ for m in MARKERS):
        return None  # off, or inside an agent's command: its sweep finds what it starts by the environment block
    path = socket_path(env)
    if path is None:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(10.0)
        conn.connect(path)
    except OSError:
        conn.close()
        start_server(path, env)
        return None
    pidfds = []
    try:
        if _peer(conn)[1] != os.getuid():
            raise OSError("the socket is not our server's")
        umask = os.umask(0o077)
        os.umask(umask)
        import resource
        request = json.dumps({"args": list(args), "env": dict(env), "cwd": os.getcwd(), "umask": umask,
                              "limits": {n: resource.getrlimit(getattr(resource, n)) for n in LIMITS},
                              "ignored": [int(s) for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
                                          if signal.getsignal(s) == signal.SIG_IGN],
                              "fds": list(fds)}).encode()
        socket.send_fds(conn, [_HEADER.pack(len(request))], list(fds.values()))  # the fds with the header
        conn.sendall(request)
        reply, pidfds, _, _ = socket.recv_fds(conn, 4096, 1)
        pid = int(json.loads(reply)["pid"]) if reply else 0
        if not pid or len(pidfds) != 1:
            raise OSError("the fork server did not fork")
        os.set_inheritable(pidfds[0], False)
        conn.sendall(GO)  # the child waits for this: a caller that gave up (and starts its own) gets no twin
    except (OSError, ValueError, KeyError, TypeError):
        conn.close()
        for fd in pidfds:
            os.close(fd)
        return None
    return Child(list(args), pid, pidfds[0], conn)


def _peer(conn):
    """(pid, uid) of the process at the other end of the Unix socket CONN (SO_PEERCRED)."""
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[:2]


def start_server(path, env):
    """Start a server for PATH in the background, unless one is up or starting (it holds PATH.lock)."""
    import fcntl
    import subprocess
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # up, or starting
    try:
        log = os.open(path[:-len(".sock")] + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError:
        os.close(fd)
        return
    try:  # sh starts it in the background and exits: the server is not our child (it outlives us)
        subprocess.run(["/bin/sh", "-c", '"$@" &', "sh", sys.executable, os.path.abspath(__file__), path],
                       env=server_env(env), stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                       start_new_session=True, check=False, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pass
    finally:
        os.close(log)
        os.close(fd)  # the server takes the lock itself; a second one started meanwhile finds it taken and leaves


# ---- the server ----

def serve(path):
    """Serve forks on PATH until IDLE_EXIT seconds pass with no request and no live child."""
    import fcntl
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another server has it
    idle_exit = float(os.environ.get(IDLE_VAR) or IDLE_EXIT)
    for name in SDKS:
        try:
            __import__(name)
        except Exception:  # not installed (an optional extra), or broken: a worker reports it as today
            pass
    # A thread started by an import would not be copied by a fork, and could hold a lock the child then needs:
    # such a server forks nothing (its callers start their workers themselves) until it idles out.
    single = len(os.listdir("/proc/self/task")) == 1
    if not single:
        print(f"stigmer fork server: an import started a thread; forking nothing ({path})", file=sys.stderr)
    # What the SDKs imported from this checkout (they import the standard `secrets`, and this directory's
    # secrets.py comes first, as in any worker): should one change on disk, this server is out of date.
    here = os.path.realpath(HERE) + os.sep
    ours = {m.__file__: _mtime(m.__file__) for m in list(sys.modules.values())
            if os.path.realpath(getattr(m, "__file__", None) or "/").startswith(here)}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o077)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    bound = _inode(path)  # our socket file (another server may replace it: then it is not ours to remove)
    listener.listen(64)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    children = {}  # pidfd -> (pid, the caller's connection)
    last = time.monotonic()
    accepting = True

    def retire():
        """Take no more requests (our socket file goes, if still ours, and the lock, so that a new server can
        start), but report on the children still running."""
        nonlocal accepting
        accepting = False
        sel.unregister(listener)
        listener.close()
        if _inode(path) == bound:
            os.unlink(path)
        os.close(lock)

    try:
        while children or accepting and time.monotonic() - last < idle_exit:
            timeout = None if children else max(0.1, idle_exit - (time.monotonic() - last))
            for key, _ in sel.select(timeout=timeout):
                if key.data is None:
                    try:
                        conn, _ = listener.accept()
                    except OSError:  # out of fds, say: this caller starts its worker itself
                        continue
                    last = time.monotonic()
                    if not single:
                        conn.close()
                        continue
                    if any(_mtime(f) != t for f, t in ours.items()):
                        retire()  # out of date: its caller starts the worker itself, and a new server
                        conn.close()
                        break
                    forked = _fork(conn, listener, children)
                    if forked:
                        children[forked[0]] = forked[1:]
                        sel.register(forked[0], selectors.EVENT_READ, "child")
                    else:
                        conn.close()
                else:
                    pidfd = key.fd
                    pid, conn = children.pop(pidfd)
                    sel.unregister(pidfd)
                    _, status = os.waitpid(pid, 0)
                    try:
                        conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                    except OSError:
                        pass  # the caller is gone: nobody to tell
                    conn.close()
                    os.close(pidfd)
                    last = time.monotonic()
            if accepting and _inode(path) != bound:
                retire()  # our socket file was removed or replaced: no request can reach us
    finally:
        if accepting:
            retire()
    return 0


def _same_world(pid):
    """Whether process PID sees what this server sees (the same namespaces and root) and is not an agent's
    command (which carries a sandbox marker in its environment block): only such a caller may have a child
    forked, which would see the server's world, unconfined."""
    try:
        for ns in ("mnt", "net", "pid", "user", "ipc", "uts", "cgroup"):
            if os.stat(f"/proc/{pid}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino:
                return False
        if os.stat(f"/proc/{pid}/root").st_ino != os.stat("/proc/self/root").st_ino:
            return False
        with open(f"/proc/{pid}/environ", "rb") as f:
            block = b"\0" + f.read()
    except OSError:
        return False
    return not any(b"\0" + m.encode() + b"=" in block for m in MARKERS)


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _inode(path):
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _fork(conn, listener, children):
    """Read one request from CONN and fork its child: (pidfd, pid, conn), or None for a refused request."""
    try:
        pid, uid = _peer(conn)
        if uid != os.getuid() or not _same_world(pid):
            return None  # not our user, or a process confined (or an agent's command) asking to get out
        deadline = time.monotonic() + REQUEST_WAIT  # one slow caller holds up the others this long at most
        conn.settimeout(REQUEST_WAIT)
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, MAX_FDS)
    except OSError:
        return None

    def more_of(n):
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        return conn.recv(n)
    try:
        while 0 < len(data) < _HEADER.size:
            more = more_of(_HEADER.size)
            if not more:
                break
            data += more
        if len(data) < _HEADER.size:
            raise ValueError("no request")
        size = _HEADER.unpack_from(data)[0]
        if size > MAX_REQUEST:
            raise ValueError("too large")
        while len(data) < _HEADER.size + size:
            more = more_of(min(1 << 20, _HEADER.size + size - len(data)))
            if not more:
                raise ValueError("cut short")
            data += more
        request = json.loads(data[_HEADER.size:])
        targets = [int(t) for t in request["fds"]]
        if len(targets) != len(fds) or len(set(targets)) != len(targets) or min(targets, default=0) < 0:
            raise ValueError("fds")
        pid = os.fork()
    except (OSError, ValueError, KeyError, TypeError):  # refused, or no fork: nothing of the caller's kept
        for fd in fds:
            os.close(fd)
        return None
    if pid == 0:
        try:
            caller = conn.detach()
            for sock in (listener, *(c for _, c in children.values())):
                sock.detach()  # closed below with every other fd; never closed again by their objects
            import select
            if not select.select([caller], [], [], GO_WAIT)[0] or os.read(caller, 1) != GO:
                os._exit(0)  # the caller gave up (and starts the process itself): no twin
            _become(request, dict(zip(targets, fds)))
        except BaseException:
            import traceback
            try:
                os.write(2, f"stigmer fork server: the child could not start\n{traceback.format_exc()}".encode())
            except OSError:
                pass
        finally:
            os._exit(127)
    for fd in fds:  # the child holds them now: a lock, a pipe's end, the secrets must not stay here
        os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        os.kill(pid, signal.SIGKILL)  # it waits for a go that will not come; unknown to anyone, it must not run
        os.waitpid(pid, 0)
        return None
    try:
        socket.send_fds(conn, [json.dumps({"pid": pid}).encode()], [pidfd])
    except OSError:
        pass  # the caller left: it sends no go, and the child leaves
    return pidfd, pid, conn


def _become(request, fds):
    """In the forked child: become `python runner.py ARGS` as the caller would have started it."""
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in request.get("ignored", ()):
        signal.signal(sig, signal.SIG_IGN)
    # The caller's fds at their numbers (first moved above every number in play), then nothing else open.
    top = max([*fds, *fds.values(), 2]) + 1
    high = {target: os.dup2(fd, top + n, inheritable=False) for n, (target, fd) in enumerate(fds.items())}
    for target, fd in high.items():
        os.dup2(fd, target, inheritable=True)
    low = 0
    for fd in sorted(high) + [max(os.sysconf("SC_OPEN_MAX"), top + len(high) + 1)]:
        if fd > low:  # (closerange(n, n) would close every fd from n up)
            os.closerange(low, fd)
        low = fd + 1
    import io
    import resource
    os.umask(int(request["umask"]))
    for name, (soft, hard) in request.get("limits", {}).items():
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (ValueError, OSError, AttributeError):
            pass
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()  # the caller's TZ
    os.chdir(request["cwd"])
    # stdio as `python -u` makes it (a worker's environment says PYTHONUNBUFFERED=1)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), errors="surrogateescape",
                                 newline="\n") if 0 in high else None
    for n, name, errors in ((1, "stdout", "strict"), (2, "stderr", "backslashreplace")):
        raw = io.FileIO(n, "w", closefd=False) if n in high else open(os.devnull, "wb", buffering=0)
        stream = io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), errors=errors,
                                  write_through=unbuffered, line_buffering=not unbuffered and n == 2)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    runner = os.path.join(HERE, "runner.py")
    sys.argv = [runner, *request["args"]]
    sys.orig_argv = [sys.executable, *sys.argv]  # what a re-execution runs (secrets.reexec_without_secrets)
    import runpy
    try:
        runpy.run_path(runner, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
