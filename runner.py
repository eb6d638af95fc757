"""Stigmer local runner: a Claude agent works in your workspace; every step streams to a local daemon.

    python runner.py "make the failing test pass"         # run one task in the current directory
    python runner.py run "add a README" --workspace ~/proj --max-turns 20
    python runner.py start --workers 2                    # daemon and workers in the background
    python runner.py list                                 # past runs, newest first
    python runner.py logs ex-1a2b3c -f                    # replay a run, then follow it
    python runner.py stop

Configuration comes from the environment, read once here: MODE (local | cloud), ENV
(development | staging | production: logging only), STIGMER_HOME (~/.stigmer),
STIGMER_BACKEND_ENDPOINT (localhost:50051), SANDBOX_ROOT_DIR (the current directory),
STIGMER_MODEL, ANTHROPIC_API_KEY (asked for with a masked prompt when missing).

The agent's shell runs on this host as you, with your environment minus the model keys:
it is not a security boundary. File tools are confined to the workspace.
"""
import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import namedtuple

HERE = os.path.dirname(os.path.abspath(__file__))
from daemon_client import VERSION  # noqa: E402
MODES = ("local", "cloud")
ENVS = ("development", "staging", "production")
EXIT_CODES = {"COMPLETED": 0, "FAILED": 1, "CANCELLED": 130}
CANCEL_WAIT = 5.0  # seconds Ctrl-C waits for the execution to confirm it stopped
RECONNECT_WAIT = 60.0  # seconds a follower waits for a daemon that went away
START_WAIT = 30.0  # seconds `start` (or a run) waits for the daemon it started to answer
RUN_IDLE_EXIT = 60.0  # seconds a daemon started by a foreground run lingers with nothing to do, then exits
DAEMON_LOCK = "daemon.lock"  # in STIGMER_HOME: flocked by its one daemon (daemon.LOCK_FILE)
START_LOCK = "start.lock"  # in STIGMER_HOME: flocked by the one command starting a daemon
COMMANDS = ("run", "start", "stop", "status", "list", "logs", "cancel", "daemon", "worker")

if __name__ == "__main__":
    sys.modules.setdefault("runner", sys.modules[__name__])  # worker.py imports us by name


def project_secrets():
    """The project's secrets.py, loaded once by models.py."""
    import models
    return models.project_secrets()


def __getattr__(name):  # `runner.stigmer_secrets` and `from runner import stigmer_secrets`, lazily
    if name == "stigmer_secrets":
        return project_secrets()
    raise AttributeError(f"module 'runner' has no attribute {name!r}")


class CliError(Exception):
    """A one-line message for the user and the exit code that goes with it."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


class Config(namedtuple("Config", "mode env home endpoint sandbox_root model environ")):
    """The configuration, read from the environment once at the entry point."""

    @staticmethod
    def load(environ):
        """Read and check the environment once; raises CliError on a bad value."""
        mode = environ.get("MODE", "local").strip().lower() or "local"
        if mode not in MODES:
            raise CliError(f"MODE={environ['MODE']!r} is not a mode: use MODE=local (the default) or MODE=cloud", 2)
        env = environ.get("ENV", "development").strip().lower() or "development"
        if env not in ENVS:
            raise CliError(f"ENV={environ['ENV']!r} is not one of {', '.join(ENVS)}", 2)
        home = os.path.abspath(os.path.expanduser(environ.get("STIGMER_HOME") or "~/.stigmer"))
        return Config(mode=mode, env=env, home=home,
                      endpoint=environ.get("STIGMER_BACKEND_ENDPOINT") or "localhost:50051",
                      sandbox_root=os.path.abspath(environ.get("SANDBOX_ROOT_DIR") or os.getcwd()),
                      model=environ.get("STIGMER_MODEL", ""), environ=dict(environ))

    def require_local(self):
        if self.mode == "cloud":
            raise CliError("MODE=cloud is not available yet (the Daytona and Redis runner is still being built): "
                           "unset MODE or set MODE=local", 2)


def default_model():
    import models
    return models.default_model()


# ---- talking to the daemon ----

class Client:
    """The CLI's gRPC client: the token, the stub and one-line errors."""

    def __init__(self, cfg, endpoint=None):
        import daemon_client
        import stigmer_pb2
        import stigmer_pb2_grpc
        self.pb, self.endpoint = stigmer_pb2, endpoint or cfg.endpoint
        try:
            self.metadata = daemon_client.auth_metadata(daemon_client.read_token(cfg.home))
        except daemon_client.DaemonError as exc:
            raise CliError(str(exc)) from None
        self.channel = daemon_client.client_channel(self.endpoint)
        self.stub = stigmer_pb2_grpc.DaemonStub(self.channel)

    def call(self, method, request, timeout=10.0):
        import grpc
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise CliError(rpc_message(exc, self.endpoint)) from None

    def watch(self, execution_id, after_seq=0, follow=True):
        return self.stub.Watch(self.pb.WatchRequest(execution_id=execution_id, after_seq=after_seq, follow=follow),
                               metadata=self.metadata)


def rpc_message(exc, endpoint):
    """A one-line message for a failed RPC."""
    import grpc
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"no daemon answers at {endpoint}: start one with `python runner.py start`"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"the daemon at {endpoint} refused our token: it belongs to another STIGMER_HOME, or restarted; "
                "check STIGMER_HOME and STIGMER_BACKEND_ENDPOINT")
    return exc.details() or code.name


def daemon_owner(cfg):
    """The pid of the daemon holding STIGMER_HOME's lock (0: starting, pid not written yet), or None."""
    import home
    return home.lock_holder(os.path.join(cfg.home, DAEMON_LOCK))


def find_daemon(cfg):
    """(Client, DaemonStatus) of the daemon that answers at the endpoint, or None when none does.
    A missing, empty, unreadable or foreign token with no daemon behind it is None too (starting a
    daemon replaces it); with this home's daemon running behind it, a CliError names the fix."""
    import daemon_client
    import grpc
    try:
        daemon_client.read_token(cfg.home)
    except daemon_client.DaemonError as exc:
        owner = daemon_owner(cfg)
        if owner:  # a daemon runs for this home, and we cannot authenticate to it
            path = os.path.join(cfg.home, "daemon.token")
            what = "is missing" if not os.path.lexists(path) else "is unreadable" if "unreadable" in str(exc) \
                else "is empty"
            raise CliError(f"the daemon token {path} {what}, but the daemon of STIGMER_HOME {cfg.home} (pid {owner}) "
                           "is running: run `python runner.py stop`, and the next command starts a fresh one") from None
        return None
    client = Client(cfg)
    try:
        return client, client.stub.Status(client.pb.StatusRequest(), metadata=client.metadata, timeout=2.0)
    except grpc.RpcError as exc:
        client.channel.close()
        owner = daemon_owner(cfg) if exc.code() == grpc.StatusCode.UNAUTHENTICATED else None
        if owner:
            raise CliError(f"the daemon of STIGMER_HOME {cfg.home} (pid {owner}) refused the token in "
                           f"{os.path.join(cfg.home, 'daemon.token')}, which another process overwrote: "
                           "run `python runner.py stop`, and the next command starts a fresh one") from None
        return None


def ensure_daemon(cfg, idle_exit=0.0, out=None):
    """(Client, DaemonStatus) of STIGMER_HOME's daemon, starting one in the background when none runs.
    One command starts it (START_LOCK) and the daemon itself makes sure it is the only one (DAEMON_LOCK);
    IDLE_EXIT > 0: the daemon exits after that many seconds with nothing to do."""
    import home
    found = find_daemon(cfg)
    if found is not None:
        return found
    home.private_home(cfg.home)
    try:
        with home.held(os.path.join(cfg.home, START_LOCK), START_WAIT):
            return start_daemon(cfg, idle_exit, out)
    except home.LockTimeout:
        raise CliError(f"another command has been starting the daemon for {START_WAIT:.0f} s: see "
                       f"{os.path.join(cfg.home, 'logs', 'daemon.log')}") from None


def start_daemon(cfg, idle_exit, out):
    """Start the daemon (the caller holds START_LOCK) and wait until it answers."""
    import home
    found = find_daemon(cfg)
    if found is not None:
        return found
    log_path = os.path.join(cfg.home, "logs", "daemon.log")
    deadline, pid, spawned = time.monotonic() + START_WAIT, None, 0
    while True:
        if (pid is None or not home.pid_alive(pid)) and daemon_owner(cfg) is None:
            if spawned == 3:  # it exits at once: the log says why
                break
            pid = spawn_daemon(cfg, idle_exit)
            spawned += 1
        time.sleep(0.1)
        found = find_daemon(cfg)
        if found is not None:
            if out is not None:
                print(f"daemon started (pid {found[1].pid}) at {cfg.endpoint}", file=out)
            return found
        if time.monotonic() > deadline:
            break
    try:
        with open(log_path, errors="replace") as f:
            tail = f.read().strip().splitlines()[-1:]
    except OSError:
        tail = []
    raise CliError(f"the daemon did not start: {tail[0] if tail else 'no output'} (log: {log_path})")


def spawn_daemon(cfg, idle_exit):
    """Start `runner.py daemon` detached from us (not our child: it may outlive this command),
    recorded in logs/daemon.pid, which it keeps locked while it lives; returns its pid."""
    import subprocess

    import home
    logs = os.path.join(cfg.home, "logs")
    os.makedirs(logs, mode=0o700, exist_ok=True)
    pid_fd = home.lock(os.path.join(logs, "daemon.pid"), timeout=2.0)
    log_fd = home.private_open(os.path.join(logs, "daemon.log"), os.O_WRONLY | os.O_APPEND)
    try:
        args = [sys.executable, os.path.join(HERE, "runner.py"), "daemon"]
        args += ["--idle-exit", f"{idle_exit:g}"] if idle_exit else []
        # sh starts it in the background and exits: the daemon is re-parented, and keeps pid_fd's lock
        sh = subprocess.Popen(["/bin/sh", "-c", '"$@" >&2 & echo $!', "sh", *args], env=without_keys(cfg.environ),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_fd,
                              pass_fds=(pid_fd,), start_new_session=True)
        pid = int(sh.stdout.readline())
        sh.stdout.close()
        sh.wait()
        home.write_record(pid_fd, pid)
        return pid
    finally:
        os.close(pid_fd)
        os.close(log_fd)


def open_log(cfg):
    """(client, embedded): the running daemon, or a short-lived embedded one over the same STIGMER_HOME
    so that past runs can be listed and replayed when no daemon is running."""
    found = find_daemon(cfg)
    if found is not None:
        return found[0], None
    if daemon_owner(cfg) is not None:
        raise CliError(f"the daemon of STIGMER_HOME {cfg.home} does not answer at {cfg.endpoint}: "
                       "see `python runner.py status`")
    if not os.path.exists(os.path.join(cfg.home, "stigmer.db")):
        raise CliError(f"no executions yet in {cfg.home}: run one with python runner.py \"your task\"")
    import daemon
    deadline = time.monotonic() + START_WAIT
    while True:
        try:
            embedded = daemon.serve(cfg.home, "127.0.0.1:0")
            return Client(cfg, endpoint=embedded.endpoint), embedded
        except daemon.DaemonRunning as exc:  # another command's short-lived one, or a daemon starting
            found = find_daemon(cfg)
            if found is not None:
                return found[0], None
            if time.monotonic() > deadline:
                raise CliError(str(exc)) from None
        except daemon.DaemonError as exc:
            raise CliError(str(exc)) from None


# ---- processes: workers and background services ----

def worker_env(cfg, secrets, endpoint):
    """The environment of a worker: the user's, the secrets, and where the daemon is."""
    env = project_secrets().child_env(secrets, base=cfg.environ)
    env.update(STIGMER_HOME=cfg.home, STIGMER_BACKEND_ENDPOINT=endpoint, MODE=cfg.mode, PYTHONUNBUFFERED="1")
    return env


def without_keys(environ):
    """ENVIRON minus every provider key: what the daemon gets."""
    keys = {var for p in project_secrets().PROVIDERS.values() for var in (p.env_var, *p.alt_env_vars)}
    return {k: v for k, v in environ.items() if k not in keys}


def spawn(args, env, log_path, pipe_stdin=False, pid_path=None):
    """Start `python runner.py ARGS` in its own session, output appended to LOG_PATH (0600)
    (stdin a pipe we hold when PIPE_STDIN, else /dev/null). PID_PATH: a pid file the child
    keeps locked while it lives (see home.live_pid)."""
    import subprocess

    import home
    os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
    log = home.private_open(log_path, os.O_WRONLY | os.O_APPEND)
    pid_fd = home.lock(pid_path, timeout=2.0) if pid_path else None
    try:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), *args], env=env,
                                stdin=subprocess.PIPE if pipe_stdin else subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True,
                                pass_fds=(pid_fd,) if pid_fd is not None else ())
        if pid_fd is not None:
            home.write_record(pid_fd, proc.pid)
        return proc
    finally:
        os.close(log)
        if pid_fd is not None:
            os.close(pid_fd)


def gather_secrets(cfg, names):
    """The model key plus NAMES, prompting on the terminal for what is missing."""
    mod = project_secrets()
    try:
        return mod.gather(("anthropic",), names, environ=cfg.environ,
                                      warn=lambda m: print(f"stigmer: warning: {m}", file=sys.stderr))
    except mod.PromptCancelled:
        raise CliError("cancelled at the key prompt", 130) from None
    except mod.SecretError as exc:
        raise CliError(str(exc), 2) from None


def stop_process(proc, timeout=5.0):
    """SIGTERM a child we started, then SIGKILL it after TIMEOUT seconds."""
    import subprocess
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pid_files(cfg):
    logs = os.path.join(cfg.home, "logs")
    return sorted(os.path.join(logs, n) for n in os.listdir(logs) if n.endswith(".pid")) if os.path.isdir(logs) else []


def live_pid(path, wait=1.0):
    """The pid in a pid file while its process runs (it holds the file's lock; no /proc), else None."""
    import home
    return home.live_pid(path, wait)


# ---- rendering ----

class Renderer:
    """Shows events: JSON lines for scripts, or live text, tool calls and a summary on a terminal."""

    def __init__(self, json_lines, color, spinner):
        self.json_lines, self.spinner_on = json_lines, spinner
        self.color = color
        self.mid_line = False
        self.last_output = time.monotonic()
        self.spinning = False
        self.frame = 0
        self.calls = {}  # tool_use id -> (name, input)

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
        sys.stderr.write(f"\r{self.paint('2', frames[self.frame % len(frames)] + ' working…')}")
        sys.stderr.flush()
        self.spinning = True

    def clear_spinner(self):
        if self.spinning:
            sys.stderr.write("\r\033[K" if self.color else "\r" + " " * 12 + "\r")
            sys.stderr.flush()
            self.spinning = False

    def event(self, ev):
        if self.json_lines:
            print(json.dumps(event_dict(ev), ensure_ascii=False), flush=True)
            return
        kind = ev.WhichOneof("payload")
        if kind == "text":
            self.out(ev.text.text)
            self.mid_line = not ev.text.text.endswith("\n")
        elif kind == "tool_call":
            self.newline()
            try:
                args = json.loads(ev.tool_call.input_json)
            except ValueError:
                args = {}
            self.calls[ev.tool_call.id] = ev.tool_call.name
            shown = args.get("command") or args.get("path") or args.get("pattern") if isinstance(args, dict) else None
            shown = shown or ev.tool_call.input_json
            self.out(f"{self.paint('36', '⏺ ' + ev.tool_call.name)} {shown[:200]}\n")
        elif kind == "tool_result":
            r = ev.tool_result
            lines = r.output.splitlines()
            status = f"exit {r.exit_code}" if self.calls.get(r.id) == "execute" else ("error" if r.is_error else "ok")
            head = f"  ⎿ {status} · {r.duration_ms / 1000:.1f} s" + (" · truncated" if r.truncated else "")
            self.out(self.paint("31" if r.is_error else "2", head) + "\n")
            for line in lines[:4]:
                self.out(self.paint("2", f"    {line[:160]}") + "\n")
            if len(lines) > 4:
                more = len(lines) - 4
                self.out(self.paint("2", f"    … {more} more line{'s' if more > 1 else ''}") + "\n")
        elif kind == "error":
            self.newline()
            self.out(self.paint("31", f"✗ {ev.error.message}") + "\n", err=True)

    def summary(self, execution, phase_name, elapsed):
        if self.json_lines:  # stdout stays pure JSON; a failure still gets one line on stderr
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
        reason = f": {execution.error}" if execution.error and phase_name != "COMPLETED" else ""
        self.out(f"\n{mark}{reason}\n", err=phase_name != "COMPLETED")
        self.out(self.paint("2", f"  {execution.turns} turns · {u.input_tokens:,} in / {u.output_tokens:,} out tokens · "
                                 f"cache {u.cache_read_tokens:,} read{hit}, {u.cache_write_tokens:,} written · "
                                 f"{elapsed:.1f} s · {execution.id}") + "\n")


def event_dict(ev):
    """An Event as a flat JSON-ready dict: execution_id, seq, time, kind, and the payload's fields."""
    from google.protobuf.json_format import MessageToDict
    kind = ev.WhichOneof("payload")
    body = MessageToDict(getattr(ev, kind), preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True) if kind else {}
    return {"execution_id": ev.execution_id, "seq": ev.seq, "time": ev.time, "kind": kind, **json_ints(body)}


INT64_FIELDS = {"input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "duration_ms",
                "last_seq", "seq", "max_tokens_total"}  # proto3 JSON writes these as strings


def json_ints(value):
    """VALUE (from MessageToDict) with our int64 fields as numbers, as a JSON reader expects."""
    if isinstance(value, dict):
        return {k: int(v) if k in INT64_FIELDS and isinstance(v, str) else json_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ints(v) for v in value]
    return value


def execution_dict(ex):
    from google.protobuf.json_format import MessageToDict
    return json_ints(MessageToDict(ex, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))


def follow(client, execution_id, renderer, after_seq=0, follow_live=True, interrupted=None, reconnect=None):
    """Render the execution's events until its terminal phase (or the end of the replay).
    Returns the terminal phase name, or None. The Watch runs on a thread so Ctrl-C stays responsive;
    once INTERRUPTED is set, it waits up to CANCEL_WAIT seconds for the terminal event. If the daemon
    goes away and RECONNECT is given, it waits for the daemon and resumes after the last event shown."""
    import queue

    import grpc
    events = queue.Queue()

    def watch(client, after):
        call = client.watch(execution_id, after_seq=after, follow=follow_live)

        def pump():
            try:
                for ev in call:
                    events.put(ev)
                events.put(None)
            except grpc.RpcError as exc:
                events.put(exc)

        threading.Thread(target=pump, daemon=True).start()
        return call

    call = watch(client, after_seq)
    last_seq, phase, running, deadline = after_seq, None, True, None
    terminal = ("COMPLETED", "FAILED", "CANCELLED")
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
                call.cancel()
                return phase
            continue
        except KeyboardInterrupt:
            call.cancel()
            raise
        if item is None:
            return phase
        if isinstance(item, grpc.RpcError):
            if item.code() == grpc.StatusCode.CANCELLED:
                return phase
            if item.code() == grpc.StatusCode.UNAVAILABLE and reconnect is not None and follow_live:
                client, call = reconnect_watch(reconnect, renderer, lambda c: watch(c, last_seq), interrupted)
                continue
            raise CliError(rpc_message(item, client.endpoint))
        if item.seq == 0:  # a notice from the daemon, not in the log (disk full)
            notice(item, renderer)
            continue
        last_seq = item.seq
        renderer.event(item)
        if item.WhichOneof("payload") == "phase":
            name = client.pb.Phase.Name(item.phase.phase)
            running = name in ("PENDING", "RUNNING")
            if name in terminal:
                phase = name
                renderer.clear_spinner()
                return phase


def notice(ev, renderer):
    """Show a seq-0 notice on stderr; a terminal one (the run ended, its end not stored) ends the CLI."""
    kind = ev.WhichOneof("payload")
    if kind == "phase" and ev.phase.phase in (3, 4, 5):  # COMPLETED, FAILED, CANCELLED
        raise CliError(f"{ev.phase.reason} ({ev.execution_id})")
    if kind == "error":
        renderer.newline()
        renderer.out(f"stigmer: {ev.error.message}\n", err=True)


def reconnect_watch(reconnect, renderer, watch, interrupted=None):
    """Wait up to RECONNECT_WAIT seconds for the daemon to answer again; returns (client, call)."""
    renderer.newline()
    renderer.out(f"stigmer: lost the daemon; waiting up to {RECONNECT_WAIT:.0f} s for it to come back…\n", err=True)
    deadline = time.monotonic() + RECONNECT_WAIT
    while time.monotonic() < deadline:
        if interrupted is not None and interrupted.is_set():
            raise CliError("interrupted while the daemon was away, so the cancel may not have reached it: "
                           "run `python runner.py cancel ID` once it is back", 130)
        time.sleep(0.5)
        client = None
        try:
            client = reconnect()
            client.call("Status", client.pb.StatusRequest(), timeout=2.0)
        except CliError:
            if client is not None:
                client.channel.close()
            continue
        renderer.out("stigmer: reconnected; resuming the log\n", err=True)
        return client, watch(client)
    raise CliError("the daemon did not come back: see `python runner.py status`, then "
                   "`python runner.py logs ID -f` to resume")


def make_renderer(args, cfg):
    tty = sys.stdout.isatty()
    json_lines = getattr(args, "json", False) or not tty
    color = tty and not cfg.environ.get("NO_COLOR")
    return Renderer(json_lines, color, spinner=not json_lines and sys.stderr.isatty())


# ---- commands ----

def cmd_run(cfg, args):
    cfg.require_local()
    workspace = os.path.abspath(os.path.expanduser(args.workspace)) if args.workspace else cfg.sandbox_root
    if not os.path.isdir(workspace):
        raise CliError(f"the workspace {workspace} does not exist (or is not a directory)", 2)
    prompt = " ".join(args.task).strip()
    if not prompt:
        raise CliError("give the task to run, e.g. python runner.py \"add a --verbose flag\"", 2)
    if args.max_turns < 1 or (args.max_tokens_total or 0) < 0:
        raise CliError("--max-turns must be at least 1 and --max-tokens-total positive", 2)
    mod = project_secrets()
    try:
        names = mod.sandbox_secret_names(args.secret or (), cfg.environ)
    except mod.SecretError as exc:
        raise CliError(str(exc), 2) from None
    embedded = worker = None
    runner_id = ""  # a foreground run's execution is pinned to the worker it spawns
    if args.detach:  # a detached run needs daemon and worker to outlive this command
        found = find_daemon(cfg)
        if found is None:
            cmd_start(cfg, argparse.Namespace(workers=1, secret=args.secret), out=sys.stderr)
    else:
        secrets = gather_secrets(cfg, names)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        # A foreground run shares STIGMER_HOME's daemon, starting one (idling out later) when none runs.
        client, status = ensure_daemon(cfg, idle_exit=RUN_IDLE_EXIT)
        if not args.detach:
            runner_id = f"run-{os.getpid()}-{os.urandom(3).hex()}"
            worker = spawn(["worker", "--capacity", "1", "--exit-with-stdin", "--runner-id", runner_id, "--pinned"],
                           worker_env(cfg, secrets, client.endpoint),
                           os.path.join(cfg.home, "logs", "run-worker.log"), pipe_stdin=True)
            del secrets
        renderer = make_renderer(args, cfg)
        model = args.model or cfg.model or default_model()
        spec = client.pb.ExecutionSpec(prompt=prompt, workspace=workspace, model=model, max_turns=args.max_turns,
                                       secret_names=names, max_tokens_total=args.max_tokens_total or 0,
                                       runner_id=runner_id)
        queued = args.detach and client.call("Status", client.pb.StatusRequest()).queue_depth
        if queued:
            print(f"stigmer: {queued} older execution(s) are queued and run first: see `python runner.py list "
                  "--phase pending`, and `python runner.py cancel ID` to drop one", file=sys.stderr)
        execution = client.call("Submit", client.pb.SubmitRequest(spec=spec), timeout=30.0)
        if args.detach:
            print(json.dumps({"execution_id": execution.id}) if args.json else execution.id)
            return 0
        if not renderer.json_lines:
            where = f"embedded daemon on {client.endpoint}" if embedded else f"daemon at {client.endpoint}"
            renderer.out(renderer.paint("2", f"stigmer · {cfg.mode} · {where} · {workspace} · {model} · "
                                             f"{execution.id}") + "\n", err=True)
        started = time.monotonic()
        interrupted = threading.Event()

        def cancel():
            try:
                live = client if embedded else Client(cfg)  # the daemon may have restarted with a new token
                live.call("Cancel", live.pb.CancelRequest(execution_id=execution.id))
            except CliError as exc:
                print(f"stigmer: could not cancel {execution.id}: {exc}", file=sys.stderr)

        def on_signal(signum, frame):
            if interrupted.is_set():
                raise KeyboardInterrupt  # the second Ctrl-C: quit at once
            interrupted.set()
            threading.Thread(target=cancel, daemon=True).start()  # at once, even if rendering is stuck

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # Ctrl-C, `kill`, a closed terminal
            signal.signal(sig, on_signal)
        try:
            phase = follow(client, execution.id, renderer, interrupted=interrupted,
                           reconnect=None if embedded else lambda: Client(cfg))
        except KeyboardInterrupt:
            return 130
        if not embedded:
            client = Client(cfg)  # the daemon may have restarted (with a new token) while we watched
        final = client.call("Get", client.pb.GetRequest(execution_id=execution.id))
        phase = phase or client.pb.Phase.Name(final.phase)
        if phase in EXIT_CODES:
            renderer.summary(final, phase, time.monotonic() - started)
        return EXIT_CODES.get(phase, 130)
    finally:
        for sig in handlers:  # let the clean-up below finish
            signal.signal(sig, signal.SIG_IGN)
        if worker is not None:
            worker.stdin.close()  # EOF tells the worker to stop and kill its commands
            stop_process(worker, timeout=10)
        if embedded is not None:
            embedded.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def cmd_start(cfg, args, out=None):
    cfg.require_local()
    names = project_secrets().sandbox_secret_names(args.secret or (), cfg.environ)
    secrets = gather_secrets(cfg, names)
    logs = os.path.join(cfg.home, "logs")
    if find_daemon(cfg) is None:
        ensure_daemon(cfg, out=out or sys.stdout)
    else:
        print(f"daemon already running at {cfg.endpoint}", file=out)
    alive = sum(1 for p in pid_files(cfg) if os.path.basename(p).startswith("worker-") and live_pid(p))
    env = worker_env(cfg, secrets, cfg.endpoint)
    started = 0
    for n in range(1, 1000):
        if alive + started >= args.workers:
            break
        path = os.path.join(logs, f"worker-{n}.pid")
        if live_pid(path):
            continue
        spawn(["worker"], env, os.path.join(logs, f"worker-{n}.log"), pid_path=path)
        started += 1
    print(f"{alive + started} worker(s) running ({started} started); logs in {logs}", file=out)
    return 0


def cmd_stop(cfg, args):
    files = pid_files(cfg)
    ordered = [p for p in files if "worker-" in p] + [p for p in files if "worker-" not in p]
    stopped = 0
    for path in ordered:  # workers first, so they can report their last events to the daemon
        pid = live_pid(path)
        if pid:
            stop_pid(pid, lambda: live_pid(path, wait=0))
            stopped += 1
        os.unlink(path)
    owner = daemon_owner(cfg)
    if owner and owner != os.getpid():  # a daemon with no pid file of ours (one inside another command)
        stop_pid(owner, lambda: daemon_owner(cfg))
        stopped += 1
    print(f"stopped {stopped} process(es)" if stopped else "nothing was running")
    return 0


def stop_pid(pid, alive):
    """SIGTERM PID, then SIGKILL it if alive() still says so 10 s later."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive():
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def cmd_status(cfg, args):
    found = find_daemon(cfg)
    procs = {os.path.basename(p)[:-4]: live_pid(p, wait=0.2) for p in pid_files(cfg)}
    if found is None:
        raise CliError(f"no daemon answers at {cfg.endpoint}: start one with `python runner.py start`")
    client, st = found
    if args.json:
        from google.protobuf.json_format import MessageToDict
        status = MessageToDict(st, preserving_proto_field_name=True)
        status["executions_by_phase"] = {k: int(v) for k, v in status.get("executions_by_phase", {}).items()}
        print(json.dumps({**status, "processes": procs}))
        return 0
    phases = ", ".join(f"{k.lower()} {v}" for k, v in sorted(st.executions_by_phase.items())) or "none"
    print(f"daemon {st.version} pid {st.pid} at {client.endpoint}, up {st.uptime_seconds:.0f} s")
    print(f"runners connected: {st.connected_runners} (free slots {st.free_capacity}); queue: {st.queue_depth}")
    print(f"executions: {phases}")
    for name, pid in procs.items():
        print(f"  {name}: {'pid ' + str(pid) if pid else 'not running'}")
    return 0


def cmd_list(cfg, args):
    client, embedded = open_log(cfg)
    try:
        return list_executions(client, args)
    finally:
        if embedded:
            embedded.stop()


def list_executions(client, args):
    phase = client.pb.Phase.Value(args.phase.upper()) if args.phase else 0
    resp = client.call("List", client.pb.ListRequest(phase=phase, limit=args.limit))
    if args.json:
        for ex in resp.executions:
            print(json.dumps(execution_dict(ex), ensure_ascii=False))
        return 0
    if not resp.executions:
        print("no executions yet: run one with python runner.py \"your task\"")
        return 0
    now = time.time()
    print(f"{'ID':<18} {'PHASE':<10} {'AGE':>6} {'TURNS':>5} {'TOKENS':>8}  PROMPT")
    for ex in resp.executions:
        age = now - ex.created_at
        age_s = f"{age:.0f}s" if age < 90 else f"{age / 60:.0f}m" if age < 5400 else f"{age / 3600:.0f}h"
        tokens = ex.usage.input_tokens + ex.usage.output_tokens
        print(f"{ex.id:<18} {client.pb.Phase.Name(ex.phase):<10} {age_s:>6} {ex.turns:>5} {tokens:>8}  "
              f"{ex.spec.prompt.splitlines()[0][:60] if ex.spec.prompt else ''}")
    return 0


def cmd_logs(cfg, args):
    client, embedded = open_log(cfg)
    try:
        client.call("Get", client.pb.GetRequest(execution_id=args.id))  # NOT_FOUND becomes a one-line error
        renderer = make_renderer(args, cfg)
        follow(client, args.id, renderer, follow_live=args.follow and embedded is None,
               reconnect=lambda: Client(cfg))
        renderer.newline()
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if embedded:
            embedded.stop()


def cmd_cancel(cfg, args):
    client = Client(cfg)
    ex = client.call("Cancel", client.pb.CancelRequest(execution_id=args.id))
    phase = client.pb.Phase.Name(ex.phase)
    print(f"{ex.id}: cancel requested; its runner is stopping it" if phase == "RUNNING" else f"{ex.id}: {phase}")
    return 0


def cmd_daemon(cfg, args):
    import daemon
    return daemon.main(["--endpoint", cfg.endpoint] + (["--allow-remote"] if args.allow_remote else []) +
                       (["--idle-exit", str(args.idle_exit)] if args.idle_exit else []))


def cmd_worker(cfg, args):
    cfg.require_local()
    import logging

    import worker
    level = {"development": logging.DEBUG, "staging": logging.INFO, "production": logging.WARNING}[cfg.env]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "anthropic", "grpc"):  # they log whole requests
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
    os.environ.update(gather_secrets(cfg, []))  # asks only for a missing key; it lives in memory and env only
    model = cfg.model or default_model()
    print(f"stigmer worker {VERSION} · mode {cfg.mode} · endpoint {cfg.endpoint} · sandbox root {cfg.sandbox_root} · "
          f"model {model} · capacity {args.capacity}", file=sys.stderr, flush=True)
    import daemon_client
    return worker.serve(worker.Worker(capacity=args.capacity, mode=cfg.mode, model=model,
                                      runner_id=args.runner_id or None, pinned=args.pinned),
                        daemon_client.DaemonLink(cfg.endpoint, cfg.home), exit_with_stdin=args.exit_with_stdin)


def parser():
    p = argparse.ArgumentParser(prog="stigmer", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:4]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"stigmer {VERSION}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a task (the default command)",
                         epilog='example: python runner.py run "fix the failing test" --workspace ~/proj')
    run.add_argument("task", nargs="+", help="what the agent should do")
    run.add_argument("--workspace", help="directory the agent works in (default: SANDBOX_ROOT_DIR or .)")
    run.add_argument("--model", help="model id (default: STIGMER_MODEL or the newest Sonnet)")
    run.add_argument("--max-turns", type=int, default=50, help="most model turns (default 50)")
    run.add_argument("--max-tokens-total", type=int, help="stop after this many tokens in all")
    run.add_argument("--secret", action="append", metavar="NAME", help="pass env var NAME to the agent's shell, redacted")
    run.add_argument("--json", action="store_true", help="one JSON object per event per line")
    run.add_argument("--detach", action="store_true", help="submit to the background daemon and print the id")

    start = sub.add_parser("start", help="run the daemon and workers in the background",
                           epilog="example: python runner.py start --workers 2")
    start.add_argument("--workers", type=int, default=1, help="how many workers (default 1)")
    start.add_argument("--secret", action="append", metavar="NAME", help="a secret the workers' shells may see")
    sub.add_parser("stop", help="stop the background daemon and workers", epilog="example: python runner.py stop")
    status = sub.add_parser("status", help="report on the daemon and workers",
                            epilog="example: python runner.py status --json")
    status.add_argument("--json", action="store_true")
    lst = sub.add_parser("list", help="list executions, newest first", epilog="example: python runner.py list --phase failed")
    lst.add_argument("--json", action="store_true", help="one JSON object per execution per line")
    lst.add_argument("--phase", choices=["pending", "running", "completed", "failed", "cancelled"])
    lst.add_argument("--limit", type=int, default=20)
    logs = sub.add_parser("logs", help="replay an execution's events", epilog="example: python runner.py logs ex-1a2b -f")
    logs.add_argument("id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep following until it ends")
    logs.add_argument("--json", action="store_true")
    cancel = sub.add_parser("cancel", help="cancel an execution", epilog="example: python runner.py cancel ex-1a2b")
    cancel.add_argument("id")
    dmn = sub.add_parser("daemon", help="run the daemon in the foreground",
                         epilog="example: STIGMER_BACKEND_ENDPOINT=localhost:50052 python runner.py daemon")
    dmn.add_argument("--allow-remote", action="store_true", help="allow a non-loopback STIGMER_BACKEND_ENDPOINT")
    dmn.add_argument("--idle-exit", type=float, default=0, help=argparse.SUPPRESS)  # a foreground run's daemon
    wrk = sub.add_parser("worker", help="run a worker in the foreground",
                         epilog="example: ANTHROPIC_API_KEY=... python runner.py worker --capacity 4")
    wrk.add_argument("--capacity", type=int, default=2, help="executions at once (default 2)")
    wrk.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)
    wrk.add_argument("--runner-id", help=argparse.SUPPRESS)  # a foreground run's own worker: its id ...
    wrk.add_argument("--pinned", action="store_true", help=argparse.SUPPRESS)  # ... and it takes only that run's
    return p


def main(argv=None):
    """The CLI; returns the exit code. From the command line (ARGV None) it exits the process itself."""
    if argv is None:
        code = run_cli(sys.argv[1:])
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            pass
        os._exit(code)  # every file is flushed and closed by now; skip the gRPC runtime's ~50 ms teardown
    return run_cli(argv)


def run_cli(argv):
    """Parse ARGV and run the command; returns the exit code."""
    args = list(argv)
    if args and args[0] not in COMMANDS and not args[0].startswith("-"):
        args.insert(0, "run")
    elif args and args[0].startswith("-") and args[0] not in ("-h", "--help", "--version") and "run" not in args[:1]:
        args.insert(0, "run")
    p = parser()
    if not args:
        p.print_help()
        return 2
    try:
        parsed = p.parse_args(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    handlers = {"run": cmd_run, "start": cmd_start, "stop": cmd_stop, "status": cmd_status, "list": cmd_list,
                "logs": cmd_logs, "cancel": cmd_cancel, "daemon": cmd_daemon, "worker": cmd_worker}
    try:
        cfg = Config.load(os.environ)
        return handlers[parsed.command](cfg, parsed)
    except CliError as exc:
        print(f"stigmer: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("stigmer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
