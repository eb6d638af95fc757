"""Stigmer local runner: a Claude agent works in your workspace; every step streams to a local daemon.

    python runner.py "make the failing test pass"         # run one task in the current directory
    git diff | python runner.py "review this"             # piped stdin joins the task as context
    python runner.py run "add a README" --workspace ~/proj --max-turns 20
    python runner.py start --workers 2                    # daemon and workers in the background
    python runner.py list                                 # past runs, newest first
    python runner.py logs ex-1a2b3c -f                    # replay a run, then follow it
    python runner.py stop

Configuration comes from the environment, read once here: STIGMER_MODE or MODE (local |
cloud), STIGMER_ENV or ENV (development | staging | production: logging only),
STIGMER_HOME (~/.stigmer), STIGMER_BACKEND_ENDPOINT (localhost:50051), SANDBOX_ROOT_DIR
(the current directory), STIGMER_MODEL, ANTHROPIC_API_KEY (asked for when missing),
STIGMER_RUNNER_GRACE (15: seconds the daemon waits for a lost runner).

The agent's shell runs on this host as you, with your environment minus the model keys and
variables that look secret (unless named with --secret, or --inherit-env): it is not a
security boundary. File tools are confined to the workspace.
"""
import argparse
import json
import os
import signal
import sys
import time
from collections import namedtuple

# grpc (with daemon_client), stigmer_pb2 and terminal are imported where they are used: `--help` starts at once.
HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("local", "cloud")
ENVS = ("development", "staging", "production")
EXIT_CODES = {"COMPLETED": 0, "FAILED": 1, "CANCELLED": 130}
START_WAIT = 15.0  # seconds `start` waits for the daemon to answer
RUNNER_GRACE = 15.0  # default seconds the daemon waits for a lost runner to come back (STIGMER_RUNNER_GRACE)
INHERIT_ENV_VAR = "STIGMER_INHERIT_ENV"  # 1: the agent's shell gets secret-looking variables too (--inherit-env)
INHERIT_ALL = "*"  # in ExecutionSpec.secret_names: every variable may reach the agent's shell
COMMANDS = ("run", "start", "stop", "status", "list", "logs", "cancel", "daemon", "worker")
USER_COMMANDS = ("status", "list", "logs", "start", "stop", "cancel", "run", "daemon", "worker")  # typo order


def project_secrets():
    """The project's secrets.py, loaded once by models.py."""
    import models
    return models.project_secrets()


def __getattr__(name):  # `runner.stigmer_secrets`, `runner.VERSION`: loaded when first asked for
    if name == "stigmer_secrets":
        return project_secrets()
    if name == "VERSION":
        from daemon_client import VERSION
        return VERSION
    raise AttributeError(f"module 'runner' has no attribute {name!r}")


class CliError(Exception):
    """A one-line message for the user and the exit code that goes with it."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


class Config(namedtuple("Config", "mode env home endpoint sandbox_root model runner_grace inherit_env environ "
                                  "warnings")):
    """The configuration, read from the environment once at the entry point."""

    @staticmethod
    def load(environ):
        """Read and check the environment once; raises CliError on a bad value. An unknown ENV only warns
        (it sets log verbosity, and ENV is a generic name another tool may have set)."""
        from daemon_client import DEFAULT_ENDPOINT, DEFAULT_HOME
        mode_var, mode = setting(environ, "MODE", "local")
        if mode not in MODES:
            raise CliError(f"{mode_var}={environ[mode_var]!r} is not a mode: use {mode_var}=local (the default) "
                           f"or {mode_var}=cloud", 2)
        env_var, env = setting(environ, "ENV", "development")
        warnings = []
        if env not in ENVS:
            warnings.append(f"{env_var}={environ[env_var]!r} is not one of {', '.join(ENVS)}: logging as development "
                            f"(set STIGMER_ENV to override an unrelated {env_var})")
            env = "development"
        home = os.path.abspath(os.path.expanduser(environ.get("STIGMER_HOME") or DEFAULT_HOME))
        return Config(mode=mode, env=env, home=home,
                      endpoint=environ.get("STIGMER_BACKEND_ENDPOINT") or DEFAULT_ENDPOINT,
                      sandbox_root=os.path.abspath(environ.get("SANDBOX_ROOT_DIR") or os.getcwd()),
                      model=environ.get("STIGMER_MODEL", ""),
                      runner_grace=seconds(environ, "STIGMER_RUNNER_GRACE", RUNNER_GRACE),
                      inherit_env=environ.get(INHERIT_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"),
                      environ=dict(environ), warnings=tuple(warnings))

    def require_local(self):
        if self.mode == "cloud":
            raise CliError("MODE=cloud is not available yet (the Daytona and Redis runner is still being built): "
                           "unset MODE and STIGMER_MODE, or set STIGMER_MODE=local", 2)


def setting(environ, name, default):
    """(variable, lowercased value) of STIGMER_NAME, else NAME, else DEFAULT: the prefixed name wins."""
    for var in (f"STIGMER_{name}", name):
        value = environ.get(var, "").strip().lower()
        if value:
            return var, value
    return name, default


def seconds(environ, name, default):
    """ENVIRON[NAME] as a number of seconds, DEFAULT when unset; raises CliError when it is not one."""
    value = environ.get(name) or str(default)
    try:
        if 0 <= float(value) < float("inf"):
            return float(value)
    except ValueError:
        pass
    raise CliError(f"{name}={value!r} is not a number of seconds: use, for example, {name}={default:g}", 2)


def default_model():
    import models
    return models.default_model()


# ---- the backend ----

def connect(cfg, endpoint=None):
    """A daemon Client for this STIGMER_HOME (raises BackendError)."""
    from daemon_client import Client
    return Client(cfg.home, endpoint or cfg.endpoint)


def find_daemon(cfg):
    """(client, status) for a daemon that answers at the endpoint, or None."""
    from daemon_client import BackendError
    if not os.path.exists(os.path.join(cfg.home, "daemon.token")):
        return None
    client = None
    try:
        client = connect(cfg)
        return client, client.status(timeout=2.0)
    except BackendError:
        if client is not None:
            client.close()
        return None


def open_log(cfg):
    """(client, embedded): the running daemon, or a short-lived embedded one over the same STIGMER_HOME
    so that past runs can be listed and replayed when no daemon is running."""
    found = find_daemon(cfg)
    if found is not None:
        return found[0], None
    if not os.path.exists(os.path.join(cfg.home, "stigmer.db")):
        raise CliError(f"no executions yet in {cfg.home}: run one with python runner.py \"your task\"")
    embedded = serve_embedded(cfg, "127.0.0.1:0")
    return connect(cfg, embedded.endpoint), embedded


def serve_embedded(cfg, endpoint):
    """A daemon inside this process, for this command only."""
    import daemon
    try:
        return daemon.serve(cfg.home, endpoint, runner_grace=cfg.runner_grace)
    except daemon.DaemonError as exc:
        raise CliError(str(exc)) from None


# ---- processes: workers and background services ----

def worker_env(cfg, secrets, endpoint):
    """The environment of a worker: the user's, the secrets, and where the daemon is."""
    env = project_secrets().child_env(secrets, base=cfg.environ)
    env.update(STIGMER_HOME=cfg.home, STIGMER_BACKEND_ENDPOINT=endpoint, MODE=cfg.mode, STIGMER_MODE=cfg.mode,
               STIGMER_ENV=cfg.env, PYTHONUNBUFFERED="1")
    return env


def without_keys(environ):
    """ENVIRON minus every provider key: what the daemon gets."""
    keys = {var for p in project_secrets().PROVIDERS.values() for var in (p.env_var, *p.alt_env_vars)}
    return {k: v for k, v in environ.items() if k not in keys}


def spawn(args, env, log_path, pipe_stdin=False):
    """Start `python runner.py ARGS` in its own session, output appended to LOG_PATH
    (stdin a pipe we hold when PIPE_STDIN, else /dev/null)."""
    import subprocess
    os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), *args], env=env,
                                stdin=subprocess.PIPE if pipe_stdin else subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)


def gather_secrets(cfg, names):
    """The model key plus NAMES, prompting on the terminal for what is missing."""
    mod = project_secrets()
    try:
        return mod.gather(("anthropic",), names, environ=cfg.environ,
                                      warn=lambda m: print(f"stigmer: warning: {m.removeprefix('warning: ')}",
                                                          file=sys.stderr))
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


def live_pid(path):
    """The pid in a pid file if that process is still one of ours, else None."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, ValueError):
        return None
    return pid if b"runner.py" in cmdline and not zombie else None


# ---- commands ----

def read_prompt(task, stdin):
    """The prompt: the TASK words; `-` or no task reads it from STDIN (when that is not a terminal);
    a task with piped STDIN gets the piped text appended as context, as `llm` does."""
    words = list(task)
    from_stdin = words == ["-"] or (not words and not stdin.isatty())
    piped = "" if from_stdin or stdin.isatty() or not readable_pipe(stdin) else stdin.read()
    if from_stdin:
        prompt = stdin.read().strip()
    else:
        prompt = " ".join(words).strip()
        if prompt and piped.strip():
            prompt = f"{prompt}\n\n{piped.rstrip()}"
    if not prompt:
        raise CliError("the prompt is empty: give the task, e.g. python runner.py \"add a --verbose flag\", "
                       "or pipe it in: echo \"add a --verbose flag\" | python runner.py", 2)
    return prompt


def readable_pipe(stream):
    """True when STREAM is a pipe or a file (something piped or redirected in), not /dev/null or a socket."""
    import stat
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def cmd_run(cfg, args):
    cfg.require_local()
    import stigmer_pb2 as pb
    import terminal
    from daemon_client import BackendError
    workspace = os.path.abspath(os.path.expanduser(args.workspace)) if args.workspace else cfg.sandbox_root
    if not os.path.isdir(workspace):
        raise CliError(f"the workspace {workspace} does not exist (or is not a directory)", 2)
    prompt = read_prompt(args.task, sys.stdin)
    if args.max_turns < 1:
        raise CliError(f"--max-turns must be at least 1 (got {args.max_turns})", 2)
    if (args.max_tokens_total or 0) < 0:
        raise CliError(f"--max-tokens-total must be positive (got {args.max_tokens_total})", 2)
    mod = project_secrets()
    try:
        names = mod.sandbox_secret_names(args.secret or (), cfg.environ)
    except mod.SecretError as exc:
        raise CliError(str(exc), 2) from None
    shell_names = names + [INHERIT_ALL] if args.inherit_env or cfg.inherit_env else names
    found = find_daemon(cfg)
    embedded = worker = None
    if found is None and args.detach:  # a detached run needs daemon and worker to outlive this command
        cmd_start(cfg, argparse.Namespace(workers=1, secret=args.secret), out=sys.stderr)
        found = find_daemon(cfg)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        if found is None:
            embedded = serve_embedded(cfg, cfg.endpoint)
            client, status = connect(cfg, embedded.endpoint), None
        else:
            client, status = found
        if status is None or status.connected_runners == 0:
            secrets = gather_secrets(cfg, names)
            worker = spawn(["worker", "--capacity", "1", "--exit-with-stdin"],
                           worker_env(cfg, secrets, client.endpoint),
                           os.path.join(cfg.home, "logs", "run-worker.log"), pipe_stdin=True)
            del secrets
        renderer = terminal.make_renderer(args.json, cfg.environ.get("NO_COLOR"))
        model = args.model or cfg.model or default_model()
        spec = pb.ExecutionSpec(prompt=prompt, workspace=workspace, model=model, max_turns=args.max_turns,
                                secret_names=shell_names, max_tokens_total=args.max_tokens_total or 0)
        queued = client.status().queue_depth
        if queued:
            print(f"stigmer: {queued} older execution(s) are queued and run first: see `python runner.py list "
                  "--phase pending`, and `python runner.py cancel ID` to drop one", file=sys.stderr)
        execution = client.submit(spec)
        if args.detach:
            print(json.dumps({"execution_id": execution.id}) if args.json else execution.id)
            return 0
        if renderer.json_lines:
            renderer.json_line(terminal.run_dict(execution, cfg.mode, client.endpoint))
        else:
            where = f"embedded daemon on {client.endpoint}" if embedded else f"daemon at {client.endpoint}"
            renderer.out(renderer.paint("2", f"stigmer · {cfg.mode} · {where} · {workspace} · {model} · "
                                             f"{execution.id}") + "\n", err=True)
        started = time.monotonic()

        def cancel():
            try:
                live = client if embedded else connect(cfg)  # the daemon may have restarted with a new token
                live.cancel(execution.id)
            except BackendError as exc:
                print(f"stigmer: could not cancel {execution.id}: {exc}", file=sys.stderr)

        interrupted = terminal.cancel_on_signals(cancel)  # the handlers saved above are restored below
        try:
            phase = terminal.follow(client, execution.id, renderer, interrupted=interrupted,
                                    reconnect=None if embedded else lambda: connect(cfg))
        except KeyboardInterrupt:
            return 130
        if not embedded:
            client = connect(cfg)  # the daemon may have restarted (with a new token) while we watched
        final = client.get(execution.id)
        phase = phase or pb.Phase.Name(final.phase)
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
    found = find_daemon(cfg)
    if found is None:
        proc = spawn(["daemon"], without_keys(cfg.environ), os.path.join(logs, "daemon.log"))
        with open(os.path.join(logs, "daemon.pid"), "w") as f:
            f.write(str(proc.pid))
        deadline = time.monotonic() + START_WAIT
        while found is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = open(os.path.join(logs, "daemon.log"), errors="replace").read().strip().splitlines()[-1:]
                raise CliError(f"the daemon did not start: {tail[0] if tail else 'no output'} "
                               f"(log: {os.path.join(logs, 'daemon.log')})")
            time.sleep(0.1)
            found = find_daemon(cfg)
        print(f"daemon started (pid {proc.pid}) at {cfg.endpoint}", file=out)
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
        proc = spawn(["worker"], env, os.path.join(logs, f"worker-{n}.log"))
        with open(path, "w") as f:
            f.write(str(proc.pid))
        started += 1
    print(f"{alive + started} worker(s) running ({started} started); logs in {logs}", file=out)
    return 0


def cmd_stop(cfg, args):
    from terminal import plural
    found = find_daemon(cfg)
    running = running_executions(found[0]) if found else []
    if running and not args.force:
        listing = "\n".join(f"  {line}" for line in describe(running))
        if not sys.stdin.isatty():
            raise CliError(f"{plural(len(running), 'execution')} running; `stop` would cancel them:\n{listing}\n"
                           "run `python runner.py stop --force` to cancel them and stop")
        print(f"{plural(len(running), 'execution')} running; stopping cancels them:\n{listing}", file=sys.stderr)
        if not confirm("cancel them and stop? [y/N] "):
            raise CliError("nothing stopped", 1)
    for ex, line in zip(running, describe(running)):  # cancel first, so the log says who stopped them
        found[0].cancel(ex.id)
        print(f"cancelled {line}")
    files = pid_files(cfg)
    ordered = [p for p in files if "worker-" in p] + [p for p in files if "worker-" not in p]
    stopped = []
    for path in ordered:  # workers first, so they can report their last events to the daemon
        pid = live_pid(path)
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while live_pid(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            if live_pid(path):
                os.kill(pid, signal.SIGKILL)
            stopped.append(os.path.basename(path)[:-4])
        os.unlink(path)
    if stopped:
        print(f"stopped {len(stopped)} process(es): {', '.join(stopped)}")
    elif found:
        print(f"the daemon at {found[0].endpoint} (pid {found[1].pid}) belongs to a foreground "
              "`python runner.py` run and ends with it" + (" now that its run is cancelled" if running else ""))
    else:
        print("nothing was running")
    return 0


def running_executions(client):
    """The executions a daemon is running now."""
    import stigmer_pb2 as pb
    return list(client.list(pb.RUNNING, 1000))


def describe(executions):
    """`ex-… "first line of the prompt"` per execution."""
    return [f"{ex.id}  {json.dumps((ex.spec.prompt.splitlines() or [''])[0][:60], ensure_ascii=False)}"
            for ex in executions]


def confirm(question):
    """Ask QUESTION on the terminal; True for yes."""
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def cmd_status(cfg, args):
    found = find_daemon(cfg)
    procs = {os.path.basename(p)[:-4]: live_pid(p) for p in pid_files(cfg)}
    if found is None:
        raise CliError(f"no daemon answers at {cfg.endpoint}: start one with `python runner.py start`")
    import terminal
    client, status = found
    terminal.print_status(status, procs, client.endpoint, args.json, running=running_executions(client),
                          background=procs.get("daemon") == status.pid)
    return 0


def cmd_list(cfg, args):
    import stigmer_pb2 as pb
    import terminal
    client, embedded = open_log(cfg)
    try:
        terminal.print_executions(client.list(pb.Phase.Value(args.phase.upper()) if args.phase else 0, args.limit),
                                  args.json, phase=args.phase)
        return 0
    finally:
        if embedded:
            embedded.stop()


def cmd_logs(cfg, args):
    client, embedded = open_log(cfg)
    try:
        import terminal
        client.get(args.id)  # an unknown id becomes a one-line error
        renderer = terminal.make_renderer(args.json, cfg.environ.get("NO_COLOR"))
        try:
            terminal.follow(client, args.id, renderer, follow_live=args.follow and embedded is None,
                            reconnect=lambda: connect(cfg))
        except KeyboardInterrupt:
            terminal.stopped_watching(renderer, args.id)
            return 130
        renderer.newline()
        return 0
    finally:
        if embedded:
            embedded.stop()


def cmd_cancel(cfg, args):
    import stigmer_pb2 as pb
    ex = connect(cfg).cancel(args.id)
    phase = pb.Phase.Name(ex.phase)
    print(f"{ex.id}: cancel requested; its runner is stopping it" if phase == "RUNNING" else f"{ex.id}: {phase}")
    return 0


def cmd_daemon(cfg, args):
    import daemon
    return daemon.run(cfg.home, args.endpoint or cfg.endpoint, allow_remote=args.allow_remote,
                      runner_grace=cfg.runner_grace)


def cmd_worker(cfg, args):
    cfg.require_local()
    import logging

    import daemon_client
    import worker
    from daemon_client import VERSION
    level = {"development": logging.DEBUG, "staging": logging.INFO, "production": logging.WARNING}[cfg.env]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "anthropic", "grpc"):  # they log whole requests
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
    os.environ.update(gather_secrets(cfg, []))  # asks only for a missing key; it lives in memory and env only
    model = cfg.model or default_model()
    print(f"stigmer worker {VERSION} · mode {cfg.mode} · endpoint {cfg.endpoint} · sandbox root {cfg.sandbox_root} · "
          f"model {model} · capacity {args.capacity}", file=sys.stderr, flush=True)
    return worker.serve(worker.Worker(capacity=args.capacity, mode=cfg.mode, model=model),
                        daemon_client.DaemonLink(cfg.endpoint, cfg.home), exit_with_stdin=args.exit_with_stdin)


DAEMON_EXAMPLES = """examples (python daemon.py takes the same arguments):
  STIGMER_HOME=/tmp/st python runner.py daemon --endpoint 127.0.0.1:50052   # state elsewhere, another port
  STIGMER_RUNNER_GRACE=60 python runner.py daemon --endpoint 0.0.0.0:50051 --allow-remote   # from other machines"""


def parser():
    p = argparse.ArgumentParser(prog="stigmer", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:4]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="store_true", help="show the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a task (the default command)",
                         epilog='example: python runner.py run "fix the failing test" --workspace ~/proj')
    run.add_argument("task", nargs="*", help="what the agent should do; `-` or none reads it from stdin "
                                             "(piped stdin after a task is added as context)")
    run.add_argument("--workspace", help="directory the agent works in (default: SANDBOX_ROOT_DIR or .)")
    run.add_argument("--model", help="model id (default: STIGMER_MODEL or the newest Sonnet)")
    run.add_argument("--max-turns", type=int, default=50, help="most model turns (default 50)")
    run.add_argument("--max-tokens-total", type=int, help="stop after this many tokens in all")
    run.add_argument("--secret", action="append", metavar="NAME", help="pass env var NAME to the agent's shell, redacted")
    run.add_argument("--inherit-env", action="store_true",
                     help=f"let variables that look secret (names with KEY, TOKEN, SECRET, PASSWORD, CREDENTIAL) "
                          f"reach the agent's shell, still redacted (or {INHERIT_ENV_VAR}=1)")
    run.add_argument("--json", action="store_true",
                     help="JSON lines: a run object, one object per event, then a summary object")
    run.add_argument("--detach", action="store_true", help="submit to the background daemon and print the id")

    start = sub.add_parser("start", help="run the daemon and workers in the background",
                           epilog="example: python runner.py start --workers 2")
    start.add_argument("--workers", type=int, default=1, help="how many workers (default 1)")
    start.add_argument("--secret", action="append", metavar="NAME", help="a secret the workers' shells may see")
    stop = sub.add_parser("stop", help="stop the background daemon and workers (running executions are cancelled)",
                          epilog="example: python runner.py stop --force")
    stop.add_argument("--force", action="store_true", help="cancel running executions without asking")
    status = sub.add_parser("status", help="report on the daemon and workers",
                            epilog="example: python runner.py status --json")
    status.add_argument("--json", action="store_true", help="one JSON object")
    lst = sub.add_parser("list", help="list executions, newest first", epilog="example: python runner.py list --phase failed")
    lst.add_argument("--json", action="store_true", help="one JSON object per execution per line")
    lst.add_argument("--phase", choices=["pending", "running", "completed", "failed", "cancelled"])
    lst.add_argument("--limit", type=int, default=20)
    logs = sub.add_parser("logs", help="replay an execution's events", epilog="example: python runner.py logs ex-1a2b -f")
    logs.add_argument("id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep following until it ends")
    logs.add_argument("--json", action="store_true", help="one JSON object per event per line")
    cancel = sub.add_parser("cancel", help="cancel an execution", epilog="example: python runner.py cancel ex-1a2b")
    cancel.add_argument("id")
    dmn = sub.add_parser("daemon", help="run the daemon in the foreground (also: python daemon.py)",
                         epilog=DAEMON_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    dmn.add_argument("--endpoint", metavar="HOST:PORT",
                     help="where to listen (default: STIGMER_BACKEND_ENDPOINT or localhost:50051)")
    dmn.add_argument("--allow-remote", action="store_true", help="allow a non-loopback endpoint")
    wrk = sub.add_parser("worker", help="run a worker in the foreground",
                         epilog="example: ANTHROPIC_API_KEY=... python runner.py worker --capacity 4")
    wrk.add_argument("--capacity", type=int, default=2, help="executions at once (default 2)")
    wrk.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)
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
    implicit_run = bool(args) and args[0] not in COMMANDS and args[0] not in ("-h", "--help", "--version")
    if implicit_run:
        args.insert(0, "run")
    p = parser()
    if not args:
        if not sys.stdin.isatty():  # `echo "task" | python runner.py`: the prompt comes from stdin
            args = ["run"]
        else:
            p.print_help()
            return 2
    try:
        parsed = p.parse_args(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    from daemon_client import VERSION, BackendError  # after `--help`, which needs neither
    if parsed.version:
        print(f"stigmer {VERSION}")
        return 0
    handlers = {"run": cmd_run, "start": cmd_start, "stop": cmd_stop, "status": cmd_status, "list": cmd_list,
                "logs": cmd_logs, "cancel": cmd_cancel, "daemon": cmd_daemon, "worker": cmd_worker}
    try:
        if implicit_run and "--" not in args:
            refuse_near_miss(parsed.task)
        cfg = Config.load(os.environ)
        for warning in cfg.warnings:
            print(f"stigmer: warning: {warning}", file=sys.stderr)
        return handlers[parsed.command](cfg, parsed)
    except CliError as exc:
        print(f"stigmer: {exc}", file=sys.stderr)
        return exc.code
    except BackendError as exc:
        print(f"stigmer: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stigmer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


def refuse_near_miss(task):
    """Raise a usage error when TASK is one word that looks like a mistyped command (`stauts`, `lst`):
    running it would cost a model call. `run WORD` or `-- WORD` runs such a task on purpose."""
    words = " ".join(task).split()
    if len(words) != 1:
        return
    command = near_miss(words[0])
    if command:
        raise CliError(f"did you mean `{command}`? (`{words[0]}` is not a command; to run it as a task, use "
                       f"`python runner.py run {words[0]}` or `python runner.py -- {words[0]}`)", 2)


def near_miss(word):
    """The command WORD is a prefix of or within edit distance 2 of, closest first; else None."""
    word = word.lower()
    if not word.isidentifier():
        return None
    scored = sorted((0 if command.startswith(word) else edit_distance(word, command), n, command)
                    for n, command in enumerate(USER_COMMANDS))
    distance, _, command = scored[0]
    return command if distance <= 2 else None


def edit_distance(a, b):
    """Levenshtein distance, with a swap of two neighbours counted as one edit (`stauts`)."""
    rows = [list(range(len(b) + 1))]
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (ca != cb)))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


if __name__ == "__main__":
    sys.exit(main())
