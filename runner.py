"""Stigmer local runner: an agent (Claude, OpenAI, Gemini, Ollama...) works in your workspace; every step
streams to a local daemon.

    python runner.py "make the failing test pass"         # run one task in the current directory
    git diff | python runner.py "review this"             # piped stdin joins the task as context
    python runner.py run "add a README" --workspace ~/proj --max-turns 20
    python runner.py --model openai/gpt-4.1 "fix the lint errors"   # or gemini/..., ollama/qwen3:8b
    python runner.py start --workers 2                    # daemon and workers in the background
    python runner.py list                                 # past runs, newest first
    python runner.py logs ex-1a2b3c -f                    # replay a run, then follow it
    STIGMER_SANDBOX=daytona python runner.py run "fix the test" --repo https://github.com/me/app
    python runner.py logs ex-1a2b3c --patch > change.patch   # what it changed, for git apply
    python runner.py resume ex-1a2b3c "now add a test"    # continue a run's conversation
    python runner.py -c "now add a test"                  # continue the latest run in this directory
    python runner.py stop

Configuration comes from the environment, read once here: STIGMER_MODE or MODE (local | cloud),
STIGMER_ENV or ENV (development | staging | production: logging only), STIGMER_HOME (~/.stigmer),
STIGMER_BACKEND_ENDPOINT (localhost:50051), SANDBOX_ROOT_DIR (the current directory),
STIGMER_MODEL (provider/model or a bare claude-/gpt-/gemini- name), the chosen provider's key
(ANTHROPIC_API_KEY, OPENAI_API_KEY or GEMINI_API_KEY: asked for with a masked prompt when missing; Ollama
needs none), base URLs (ANTHROPIC_BASE_URL, OPENAI_BASE_URL, GEMINI_BASE_URL, OLLAMA_HOST),
STIGMER_RUNNER_GRACE (15: seconds the daemon waits for a lost runner), STIGMER_SANDBOX (filesystem | daytona:
where commands run; daytona needs DAYTONA_API_KEY, and takes DAYTONA_API_URL, DAYTONA_TARGET, DAYTONA_SNAPSHOT),
STIGMER_CONTEXT_WINDOW (the model's context window in tokens, for clearing old tool results; default from
the table in models.py). Cloud mode only: REDIS_URL, STIGMER_REDIS_PREFIX (stigmer:), STIGMER_LEASE_TTL (15),
STIGMER_CLAIM_IDLE (10), STIGMER_RETENTION (604800 seconds).

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
SANDBOXES = ("filesystem", "daytona")  # STIGMER_SANDBOX: the host, or one Daytona sandbox per execution
ENVS = ("development", "staging", "production")
EXIT_CODES = {"COMPLETED": 0, "FAILED": 1, "CANCELLED": 130}
START_WAIT = 30.0  # seconds `start` (or a run) waits for the daemon it started to answer
RUN_IDLE_EXIT = 60.0  # seconds a daemon started by a foreground run lingers with nothing to do, then exits
DAEMON_LOCK = "daemon.lock"  # in STIGMER_HOME: flocked by its one daemon (daemon.LOCK_FILE)
START_LOCK = "start.lock"  # in STIGMER_HOME: flocked by the one command starting a daemon
RUNNER_GRACE = 15.0  # default seconds the daemon waits for a lost runner to come back (STIGMER_RUNNER_GRACE)
INHERIT_ENV_VAR = "STIGMER_INHERIT_ENV"  # 1: the agent's shell gets secret-looking variables too (--inherit-env)
INHERIT_ALL = "*"  # in ExecutionSpec.secret_names: every variable may reach the agent's shell
COMMANDS = ("run", "resume", "start", "stop", "status", "list", "logs", "cancel", "daemon", "worker")
USER_COMMANDS = ("status", "list", "logs", "start", "stop", "cancel", "run", "resume", "daemon",
                 "worker")  # the order a near miss is matched in
SANDBOXES = ("filesystem", "daytona")
REDIS_SETTINGS = (  # cloud mode: (variable, redis_backend setting, default seconds)
    ("STIGMER_LEASE_TTL", "lease_ttl", 15.0),  # a dead worker's execution fails about this long after
    ("STIGMER_CLAIM_IDLE", "claim_idle", 10.0),  # a queue entry read but never taken is reclaimed after
    ("STIGMER_RETENTION", "retention", 7 * 24 * 3600.0),  # finished executions and their logs are kept
)


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


class Daytona(namedtuple("Daytona", "api_key api_url target snapshot")):
    """Daytona settings: DAYTONA_API_KEY, DAYTONA_API_URL, DAYTONA_TARGET, DAYTONA_SNAPSHOT (None when unset)."""

    def __repr__(self):
        return (f"Daytona(api_key={'***' if self.api_key else None}, api_url={self.api_url!r}, "
                f"target={self.target!r}, snapshot={self.snapshot!r})")


class Config(namedtuple("Config", "mode env home endpoint sandbox_root model runner_grace environ sandbox daytona "
                                  "redis_url redis_prefix redis_settings context_window inherit_env warnings",
                        defaults=("", "", {}, 0, False, ()))):
    """The configuration, read from the environment once at the entry point."""

    @staticmethod
    def load(environ):
        """Read and check the environment once; raises CliError on a bad value. An unknown ENV only warns
        (it sets log verbosity, and ENV is a generic name another tool may have set)."""
        from daemon_client import DEFAULT_ENDPOINT, DEFAULT_HOME
        mode_var, mode = setting(environ, "MODE", "local")
        if mode not in MODES:
            raise CliError(f"{mode_var}={environ[mode_var]!r} is not a mode: "
                           f"use {mode_var}=local (the default) or {mode_var}=cloud", 2)
        env_var, env = setting(environ, "ENV", "development")
        warnings = []
        if env not in ENVS:
            warnings.append(f"{env_var}={environ[env_var]!r} is not one of {', '.join(ENVS)}: logging as development "
                            f"(set STIGMER_ENV to override an unrelated {env_var})")
            env = "development"
        home = os.path.abspath(os.path.expanduser(environ.get("STIGMER_HOME") or DEFAULT_HOME))
        sandbox = environ.get("STIGMER_SANDBOX", "").strip().lower() or ("daytona" if mode == "cloud" else "filesystem")
        if sandbox not in SANDBOXES:
            raise CliError(f"STIGMER_SANDBOX={environ['STIGMER_SANDBOX']!r} is not a sandbox: use filesystem "
                           "(commands on this host) or daytona (one Daytona sandbox per execution)", 2)
        daytona = Daytona(*(environ.get(f"DAYTONA_{name}", "").strip() or None
                            for name in ("API_KEY", "API_URL", "TARGET", "SNAPSHOT")))
        cfg = Config(mode=mode, env=env, home=home,
                      endpoint=environ.get("STIGMER_BACKEND_ENDPOINT") or DEFAULT_ENDPOINT,
                      sandbox_root=os.path.abspath(environ.get("SANDBOX_ROOT_DIR") or os.getcwd()),
                      model=environ.get("STIGMER_MODEL", ""),
                      runner_grace=seconds(environ, "STIGMER_RUNNER_GRACE", RUNNER_GRACE), environ=dict(environ),
                      sandbox=sandbox, daytona=daytona, context_window=tokens(environ, "STIGMER_CONTEXT_WINDOW"),
                      inherit_env=environ.get(INHERIT_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"),
                      warnings=tuple(warnings))
        return cfg._replace(**cloud_settings(environ)) if mode == "cloud" else cfg

    def require_sandbox(self):
        """Raise CliError unless the chosen sandbox can be used: Daytona needs its key and its SDK."""
        if self.sandbox != "daytona":
            return
        why = "MODE=cloud runs commands in Daytona sandboxes" if self.mode == "cloud" and \
            not self.environ.get("STIGMER_SANDBOX") else "STIGMER_SANDBOX=daytona runs commands in Daytona sandboxes"
        if not self.daytona.api_key:
            raise CliError(f"{why} and needs DAYTONA_API_KEY: export it (make one in the Daytona dashboard, under "
                           "Keys), or set STIGMER_SANDBOX=filesystem to run commands on this host", 2)
        import importlib.util
        if importlib.util.find_spec("daytona") is None:
            raise CliError(f"{why} and needs the daytona SDK: pip install -e '.[cloud]'", 2)

    @property
    def cloud(self):
        return self.mode == "cloud"


def setting(environ, name, default):
    """(variable, lowercased value) of STIGMER_NAME, else NAME, else DEFAULT: the prefixed name wins."""
    for var in (f"STIGMER_{name}", name):
        value = environ.get(var, "").strip().lower()
        if value:
            return var, value
    return name, default


def cloud_settings(environ):
    """Cloud mode's settings (only ever read in cloud mode); one CliError naming everything missing."""
    import importlib.util
    missing = []
    url = environ.get("REDIS_URL", "").strip()
    if not url:
        missing.append("REDIS_URL (redis://[:PASSWORD@]HOST:PORT/DB, or rediss:// for TLS)")
    elif not url.startswith(("redis://", "rediss://")):
        raise CliError(f"REDIS_URL must start with redis:// or rediss://, not {url.split('://')[0]!r}:// "
                       "(e.g. REDIS_URL=redis://:PASSWORD@redis.internal:6379/0)", 2)
    sandbox = environ.get("STIGMER_SANDBOX", "").strip().lower() or "daytona"
    if sandbox not in SANDBOXES:
        raise CliError(f"STIGMER_SANDBOX={environ['STIGMER_SANDBOX']!r} is not a sandbox: use "
                       "STIGMER_SANDBOX=daytona (the cloud default) or STIGMER_SANDBOX=filesystem", 2)
    if sandbox == "daytona" and not environ.get("DAYTONA_API_KEY", "").strip():
        missing.append("DAYTONA_API_KEY (MODE=cloud runs commands in Daytona sandboxes; "
                       "or set STIGMER_SANDBOX=filesystem to run them on the worker hosts)")
    if importlib.util.find_spec("redis") is None:
        missing.append("the redis package (pip install -e '.[cloud]')")
    if missing:
        raise CliError("MODE=cloud needs " + "; ".join(missing), 2)
    prefix = environ.get("STIGMER_REDIS_PREFIX", "").strip() or "stigmer:"
    settings = {name: seconds(environ, var, default) for var, name, default in REDIS_SETTINGS}
    if settings["lease_ttl"] < 0.3:
        raise CliError("STIGMER_LEASE_TTL must be at least 0.3 seconds (heartbeats go every third of it)", 2)
    return dict(sandbox=sandbox, redis_url=url, redis_prefix=prefix, redis_settings=settings)


def seconds(environ, name, default):
    """ENVIRON[NAME] as a number of seconds, DEFAULT when unset; raises CliError when it is not one."""
    value = environ.get(name) or str(default)
    try:
        if 0 <= float(value) < float("inf"):
            return float(value)
    except ValueError:
        pass
    raise CliError(f"{name}={value!r} is not a number of seconds: use, for example, {name}={default:g}", 2)


def tokens(environ, name):
    """ENVIRON[NAME] as a positive number of tokens, 0 when unset; raises CliError when it is not one."""
    value = environ.get(name, "").strip().replace("_", "")
    if not value:
        return 0
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise CliError(f"{name}={environ[name]!r} is not a number of tokens: use, for example, {name}=200000", 2)


def default_model():
    import models
    return models.default_model()


def choose_model(cfg, name):
    """NAME (--model), else STIGMER_MODEL, else the default, as provider/model; checks that this runner can use
    its provider (SDK installed, base URL given). Raises CliError with what to do."""
    import models
    try:
        model = models.qualified(name or cfg.model)
        models.check_provider(model.split("/")[0], cfg.environ)
    except models.ModelError as exc:
        raise CliError(exc.message, 2) from None
    return model


# ---- the backend ----

def connect(cfg, endpoint=None):
    """The mode's backend client (raises BackendError): a daemon Client for this STIGMER_HOME,
    or in cloud mode a RedisClient for REDIS_URL. Both have the same calls and errors."""
    if cfg.cloud:
        from redis_backend import RedisClient
        return RedisClient(cfg.redis_url, cfg.redis_prefix, **cfg.redis_settings)
    from daemon_client import Client
    return Client(cfg.home, endpoint or cfg.endpoint)


def daemon_owner(cfg):
    """The pid of the daemon holding STIGMER_HOME's lock (0: starting, pid not written yet), or None."""
    import home
    return home.lock_holder(os.path.join(cfg.home, DAEMON_LOCK))


def daemon_serving(cfg):
    """The pid of STIGMER_HOME's daemon once it serves (its token written), else None (none, or starting)."""
    import home
    record = home.lock_record(os.path.join(cfg.home, DAEMON_LOCK))
    return int(record[0]) if record and len(record) >= 2 and record[0].isdigit() else None


def backend_status(cfg):
    """Cloud mode: (client, status) from Redis; a Redis that does not answer is a one-line error."""
    client = connect(cfg)
    try:
        return client, client.status()
    except Exception:
        client.close()
        raise


def find_daemon(cfg):
    """(client, status) of the daemon that answers at the endpoint, or None when none does (without a
    token file, at once: grpc is not even imported). A missing, empty, unreadable or foreign token with
    no daemon behind it is None too (starting a daemon replaces it); with this home's daemon running
    behind it, a CliError names the fix."""
    path = os.path.join(cfg.home, "daemon.token")
    if not os.path.lexists(path):
        return broken_token(cfg, path, "is missing")
    from daemon_client import BackendError, BackendUnavailable, DaemonError, read_token
    try:
        read_token(cfg.home)
    except DaemonError as exc:
        return broken_token(cfg, path, "is unreadable" if "unreadable" in str(exc) else "is empty")
    client = None
    try:
        client = connect(cfg)
        return client, client.status(timeout=2.0)
    except BackendError as exc:
        if client is not None:
            client.close()
        owner = None if isinstance(exc, BackendUnavailable) else daemon_owner(cfg)
        if owner:  # our home's daemon answers, but not to this token
            raise CliError(f"the daemon of STIGMER_HOME {cfg.home} (pid {owner}) refused the token in "
                           f"{os.path.join(cfg.home, 'daemon.token')}, which another process overwrote: "
                           "run `python runner.py stop`, and the next command starts a fresh one") from None
        return None


def broken_token(cfg, path, what):
    """None when no daemon serves STIGMER_HOME (starting one replaces the token); else a CliError naming the fix."""
    owner = daemon_serving(cfg)
    if owner:  # a daemon serves this home, and we cannot authenticate to it
        raise CliError(f"the daemon token {path} {what}, but the daemon of STIGMER_HOME {cfg.home} (pid {owner}) "
                       "is running: run `python runner.py stop`, and the next command starts a fresh one")
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
    home.private_dirs(logs)
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
    so that past runs can be listed and replayed when no daemon is running. Cloud mode: Redis."""
    if cfg.cloud:
        return connect(cfg), None
    found = find_daemon(cfg)
    if found is not None:
        return found[0], None
    if daemon_owner(cfg) is not None:
        raise CliError(f"the daemon of STIGMER_HOME {cfg.home} does not answer at {cfg.endpoint}: "
                       "see `python runner.py status`")
    if not os.path.exists(os.path.join(cfg.home, "stigmer.db")):
        raise CliError(f"no executions yet in {cfg.home}: run one with python runner.py \"your task\"")
    embedded = serve_embedded(cfg, "127.0.0.1:0")
    if embedded is None:  # a daemon came up meanwhile
        return find_daemon(cfg)[0], None
    return connect(cfg, embedded.endpoint), embedded


def serve_embedded(cfg, endpoint):
    """A daemon inside this process, for this command only; None when STIGMER_HOME's daemon came up
    meanwhile. Waits while another command's short-lived one holds the home's lock."""
    import daemon
    deadline = time.monotonic() + START_WAIT
    while True:
        try:
            return daemon.serve(cfg.home, endpoint, runner_grace=cfg.runner_grace)
        except daemon.DaemonRunning as exc:
            if find_daemon(cfg) is not None:
                return None
            if time.monotonic() > deadline:
                raise CliError(str(exc)) from None
        except daemon.DaemonError as exc:
            raise CliError(str(exc)) from None


# ---- processes: workers and background services ----

def worker_env(cfg, secrets, endpoint):
    """The environment of a worker: the user's, the secrets, and where the daemon is
    (in cloud mode REDIS_URL and the rest are the user's environment already)."""
    env = project_secrets().child_env(secrets, base=cfg.environ)
    env.update(STIGMER_HOME=cfg.home, STIGMER_BACKEND_ENDPOINT=endpoint, MODE=cfg.mode, STIGMER_MODE=cfg.mode,
               STIGMER_ENV=cfg.env, PYTHONUNBUFFERED="1")
    return env


def without_keys(environ):
    """ENVIRON minus every provider key and service key (Daytona's): what the daemon gets."""
    import models
    keys = set(models.model_key_vars()) | set(project_secrets().SERVICE_KEY_VARS)
    return {k: v for k, v in environ.items() if k not in keys}


def sandbox_factory(cfg, runner_id, is_terminal):
    """(make_sandbox, sweep) for worker.Worker from STIGMER_SANDBOX: the host (sweep None), or one Daytona
    sandbox per execution, labelled with RUNNER_ID; sweep deletes those whose executions IS_TERMINAL(id)
    says have ended (an id the log does not know is not terminal: it may be another home's)."""
    import worker
    if cfg.sandbox != "daytona":
        return worker.host_sandbox, None
    import threading

    import daytona_sandbox
    d, clients, lock = cfg.daytona, [], threading.Lock()

    def client():  # one SDK client for the worker, made on first use
        with lock:
            if not clients:
                clients.append(daytona_sandbox.make_client(d.api_key, d.api_url, d.target))
            return clients[0]

    def make_sandbox(execution, env):
        spec = execution.spec
        return daytona_sandbox.create_for_execution(
            execution.id, runner_id, api_key=d.api_key, api_url=d.api_url, target=d.target, snapshot=d.snapshot,
            env=env, repo=spec.repo or None, ref=spec.ref or None, keep=spec.keep_sandbox, client=client())

    return make_sandbox, lambda: daytona_sandbox.sweep(client(), is_terminal)


def backend_is_terminal(cfg):
    """is_terminal(execution_id) for the sweep, asking the daemon (or Redis); False when it cannot say."""
    import daemon_client

    def is_terminal(execution_id):
        try:
            client = connect(cfg)
            try:
                return client.get(execution_id).phase in daemon_client.TERMINAL_PHASES
            finally:
                client.close()
        except daemon_client.BackendError:  # unknown here, or the daemon is away: leave it
            return False
    return is_terminal


def spawn(args, env, log_path, pipe_stdin=False, pid_path=None):
    """Start `python runner.py ARGS` in its own session, output appended to LOG_PATH (0600)
    (stdin a pipe we hold when PIPE_STDIN, else /dev/null). PID_PATH: a pid file the child
    keeps locked while it lives (see home.live_pid)."""
    import subprocess

    import home
    try:
        home.private_dirs(os.path.dirname(log_path))
        log = home.private_open(log_path, os.O_WRONLY | os.O_APPEND)
        pid_fd = home.lock(pid_path, timeout=2.0) if pid_path else None
    except OSError as exc:
        raise CliError(home_problem(log_path, exc)) from None
    try:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), *args], env=env,
                                stdin=subprocess.PIPE if pipe_stdin else subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True,
                                pass_fds=(pid_fd,) if pid_fd is not None else ())
        if pid_fd is not None:
            try:
                home.write_record(pid_fd, proc.pid)
            except OSError as exc:
                stop_process(proc)
                raise CliError(home_problem(pid_path, exc)) from None
        return proc
    finally:
        os.close(log)
        if pid_fd is not None:
            os.close(pid_fd)


def home_problem(path, exc):
    """One line on a file in STIGMER_HOME that could not be written."""
    import errno
    if exc.errno == errno.ENOSPC:
        return f"disk full: cannot write {path} in STIGMER_HOME; free some space there"
    return f"cannot write {path}: {exc.strerror or exc}"


def gather_secrets(cfg, names, model):
    """The key MODEL's provider needs (none for Ollama) plus NAMES, prompting on the terminal for what is missing."""
    mod = project_secrets()
    try:
        return mod.gather((model.split("/")[0],), names, environ=cfg.environ,
                          warn=lambda m: print(f"stigmer: warning: {m.removeprefix('warning: ')}", file=sys.stderr))
    except mod.PromptCancelled:
        raise CliError("cancelled at the key prompt", 130) from None
    except mod.MissingSecret as exc:
        raise CliError(str(exc) + other_provider_hint(cfg, model), 2) from None
    except mod.SecretError as exc:
        raise CliError(str(exc), 2) from None


def other_provider_hint(cfg, model):
    """When MODEL's key is missing but another provider's is set: how to use that provider instead."""
    provider = model.split("/")[0]
    for name, p in project_secrets().PROVIDERS.items():
        var = next((v for v in (p.env_var, *p.alt_env_vars) if v and cfg.environ.get(v)), None)
        if name != provider and p.required and var:
            return f"; {var} is set: to use {name}, run with --model {name} (or STIGMER_MODEL={name})"
    return ""


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


def embedded_endpoint(endpoint):
    """Where an embedded daemon asked to listen on ENDPOINT will be found (as daemon.serve binds it),
    or None when that is known only once it listens (port 0)."""
    host, _, port = endpoint.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None
    return f"127.0.0.1:{port}" if host == "localhost" else endpoint


def cmd_run(cfg, args):
    workspace = os.path.abspath(os.path.expanduser(args.workspace)) if args.workspace else cfg.sandbox_root
    if not os.path.isdir(workspace):
        raise CliError(f"the workspace {workspace} does not exist (or is not a directory)", 2)
    prompt = read_prompt(args.task, sys.stdin)
    resuming = args.command == "resume" or args.cont
    if args.max_turns < 1:
        raise CliError(f"--max-turns must be at least 1 (got {args.max_turns})", 2)
    if (args.max_tokens_total or 0) < 0:
        raise CliError(f"--max-tokens-total must be positive (got {args.max_tokens_total})", 2)
    check_repo_args(cfg, args)
    cfg.require_sandbox()
    mod = project_secrets()
    try:
        names = mod.sandbox_secret_names(args.secret or (), cfg.environ)
    except mod.SecretError as exc:
        raise CliError(str(exc), 2) from None
    model = choose_model(cfg, args.model)
    found = backend_status(cfg) if cfg.cloud else find_daemon(cfg)
    embedded = worker = None
    runner_id = ""  # a foreground run's execution is pinned to the worker it spawns (both modes)
    if args.detach and (found is None or found[1].connected_runners == 0):
        # a detached run needs a backend and a worker that outlive this command
        cmd_start(cfg, argparse.Namespace(workers=1, secret=args.secret, model=model), out=sys.stderr)
        found = backend_status(cfg) if cfg.cloud else find_daemon(cfg)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        if not args.detach:  # its own worker, with this run's secrets, takes only this run
            runner_id = f"run-{os.getpid()}-{os.urandom(3).hex()}"
        # A cold start: the worker (importing its SDK, the slowest part) starts first, unless it needs
        # the secret names of the run it resumes, which only the log knows.
        endpoint = embedded_endpoint(cfg.endpoint) if runner_id and found is None and not cfg.cloud \
            and not resuming else None
        if endpoint:
            worker = spawn_run_worker(cfg, names, endpoint, runner_id, model)
        if cfg.cloud:
            client, status = found
        else:  # a foreground run shares STIGMER_HOME's daemon, starting one (idling out later) when none runs
            client, status = found or ensure_daemon(cfg, idle_exit=RUN_IDLE_EXIT)
        parent = find_parent(client, args, workspace) if resuming else None
        if parent is not None:  # the conversation goes on where it was, with the same secrets
            workspace = parent.spec.workspace
            names = list(dict.fromkeys([*parent.spec.secret_names, *names]))
            if not args.model:  # and the same model, whose provider's key is the one to gather
                model = choose_model(cfg, parent.spec.model)
        inherit = args.inherit_env or cfg.inherit_env or INHERIT_ALL in names
        names = [n for n in names if n != INHERIT_ALL]
        shell_names = names + [INHERIT_ALL] if inherit else names  # the spec's; `*` lets them all through
        if runner_id and worker is None:  # its own worker, with this run's secrets, takes only this run
            worker = spawn_run_worker(cfg, names, cfg.endpoint if cfg.cloud else client.endpoint, runner_id, model)
        import stigmer_pb2 as pb
        import terminal
        from daemon_client import BackendError
        renderer = terminal.make_renderer(args.json, cfg.environ.get("NO_COLOR"))
        spec = pb.ExecutionSpec(prompt=prompt, workspace=workspace, model=model, max_turns=args.max_turns,
                                secret_names=shell_names, max_tokens_total=args.max_tokens_total or 0, runner_id=runner_id,
                                repo=args.repo or (parent.spec.repo if parent else ""),
                                ref=args.ref or (parent.spec.ref if parent else ""), keep_sandbox=args.keep_sandbox,
                                sandbox=cfg.sandbox, parent_id=parent.id if parent else "")
        queued = 0 if runner_id else (status or client.status()).queue_depth  # (an embedded daemon may hold old ones)
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
            where = (f"Redis at {client.endpoint}" if cfg.cloud else f"embedded daemon on {client.endpoint}"
                     if embedded else f"daemon at {client.endpoint}")
            space = workspace if cfg.sandbox == "filesystem" else "daytona sandbox" + (f" · {args.repo}" if args.repo
                                                                                        else "")
            continues = f" · continues {parent.id}" if parent else ""
            renderer.out(renderer.paint("2", f"stigmer · {cfg.mode} · {where} · {space} · {model} · "
                                             f"{execution.id}{continues}") + "\n", err=True)
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
        if args.keep_sandbox and renderer.sandbox_id:
            print(f"stigmer: sandbox {renderer.sandbox_id} kept running for inspection; delete it when you are done "
                  "(Daytona also stops it once idle, then deletes it)", file=sys.stderr)
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


def spawn_run_worker(cfg, names, endpoint, runner_id, model):
    """This run's own worker (capacity 1) for MODEL (provider/model; its provider's key is gathered),
    which takes only executions pinned to RUNNER_ID and stops when this command closes its stdin."""
    secrets = gather_secrets(cfg, names, model)
    return spawn(["worker", "--capacity", "1", "--exit-with-stdin", "--runner-id", runner_id, "--pinned",
                  "--model", model], worker_env(cfg, secrets, endpoint), os.path.join(cfg.home, "logs", "run-worker.log"),
                 pipe_stdin=True)


def find_parent(client, args, workspace):
    """The execution whose conversation this run continues: `resume ID`'s, or with -c the latest one whose
    workspace is WORKSPACE. Raises CliError when there is none or it has not ended."""
    from daemon_client import parent_problem
    if args.command == "resume":
        parent = client.get(args.id)
    else:
        parent = next((ex for ex in client.list(limit=1000) if ex.spec.workspace == workspace), None)
        if parent is None:
            raise CliError(f"no execution ran in {workspace} yet, so there is nothing to continue: "
                           "run one with python runner.py \"your task\"", 2)
    problem = parent_problem(parent.id, parent)
    if problem:
        raise CliError(problem)
    return parent


def check_repo_args(cfg, args):
    """--repo, --ref and --keep-sandbox need a Daytona sandbox; a repo URL never carries a password."""
    from urllib.parse import urlsplit
    if (args.repo or args.ref or args.keep_sandbox) and cfg.sandbox != "daytona":
        raise CliError("--repo, --ref and --keep-sandbox need a Daytona sandbox: set STIGMER_SANDBOX=daytona "
                       "(on this host the agent works in --workspace, which may already be a git checkout)", 2)
    if args.ref and not args.repo:
        raise CliError("--ref needs --repo: the repository whose branch, tag or commit to check out", 2)
    if args.repo and urlsplit(args.repo).password:
        raise CliError("--repo must not hold a password or token (it is stored in the log): pass the token as "
                       "--secret GITHUB_TOKEN and give the plain https URL", 2)


def cmd_start(cfg, args, out=None):
    cfg.require_sandbox()
    names = project_secrets().sandbox_secret_names(args.secret or (), cfg.environ)
    model = choose_model(cfg, args.model)
    secrets = gather_secrets(cfg, names, model)
    logs = os.path.join(cfg.home, "logs")
    found = None if cfg.cloud else find_daemon(cfg)
    if cfg.cloud:  # no daemon: the workers on this host serve the queue on Redis
        backend_status(cfg)[0].close()  # a Redis that does not answer is an error now, not in the workers' logs
    elif found is None:
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
        spawn(["worker", "--model", model], env, os.path.join(logs, f"worker-{n}.log"), pid_path=path)
        started += 1
    where = f" on Redis at {connect(cfg).endpoint}" if cfg.cloud else ""
    print(f"{alive + started} worker(s) running{where} ({started} started); logs in {logs}", file=out)
    return 0


def cmd_stop(cfg, args):
    from terminal import plural
    from daemon_client import BackendError
    try:
        found = backend_status(cfg) if cfg.cloud else find_daemon(cfg)
        running = running_executions(found[0]) if found else []
    except (CliError, BackendError) as exc:  # a broken token or a sick daemon: stop is the fix, so go on
        print(f"stigmer: cannot list what is running ({exc}); stopping the processes", file=sys.stderr)
        found, running = None, []
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
    if running:  # their runners record the end before the daemon goes
        wait_until_ended(found[0], running)
    files = pid_files(cfg)
    ordered = [p for p in files if "worker-" in p] + [p for p in files if "worker-" not in p]
    stopped = []
    for path in ordered:  # workers first, so they can report their last events to the daemon
        pid = live_pid(path)
        if pid:
            stop_pid(pid, lambda: live_pid(path, wait=0))
            stopped.append(os.path.basename(path)[:-4])
        os.unlink(path)
    owner = daemon_owner(cfg)
    if owner and owner != os.getpid():  # a daemon with no pid file of ours: one a foreground run started
        stop_pid(owner, lambda: daemon_owner(cfg))
        stopped.append(f"the daemon a foreground run started (pid {owner})")
    if stopped:
        print(f"stopped {len(stopped)} process(es): {', '.join(stopped)}")
    else:
        print("nothing was running")
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


def wait_until_ended(client, executions, timeout=10.0):
    """Wait up to TIMEOUT seconds for EXECUTIONS to reach a terminal phase, so that their runners
    (and any foreground run following them) see the end before the daemon stops."""
    from daemon_client import TERMINAL_PHASES, BackendError
    deadline = time.monotonic() + timeout
    waiting = [ex.id for ex in executions]
    while waiting and time.monotonic() < deadline:
        try:
            waiting = [i for i in waiting if client.get(i).phase not in TERMINAL_PHASES]
        except BackendError:
            return
        if waiting:
            time.sleep(0.1)


def running_executions(client):
    """The executions the backend is running now."""
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
    found = backend_status(cfg) if cfg.cloud else find_daemon(cfg)
    procs = {os.path.basename(p)[:-4]: live_pid(p, wait=0.2) for p in pid_files(cfg)}
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
        execution = client.get(args.id)  # an unknown id becomes a one-line error
        if args.patch:
            return print_patch(client, execution)
        renderer = terminal.make_renderer(args.json, cfg.environ.get("NO_COLOR"))
        renderer.show_prompts = True
        if args.history and execution.spec.parent_id:
            terminal.show_ancestors(client, execution, renderer)
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


def print_patch(client, execution):
    """`logs ID --patch`: the patch artifact's text on stdout, as it is (for `git apply`); notes on stderr."""
    import stigmer_pb2 as pb
    patch = None
    for ev in client.watch(execution.id, follow=False):
        if ev.WhichOneof("payload") == "artifact" and ev.artifact.type == "patch":
            patch = ev.artifact
    if patch is None:
        if execution.phase in (pb.PENDING, pb.RUNNING):
            raise CliError(f"{execution.id} is still {pb.Phase.Name(execution.phase).lower()}: its patch is recorded "
                           f"when it ends (follow it with python runner.py logs {execution.id} -f)")
        raise CliError(f"{execution.id} has no patch: only a Daytona sandbox whose workspace is a git checkout "
                       "(run --repo URL) records one")
    if patch.notes:
        print(f"stigmer: {patch.notes}", file=sys.stderr)
    sys.stdout.write(patch.text)
    return 0


def cmd_cancel(cfg, args):
    import stigmer_pb2 as pb
    ex = connect(cfg).cancel(args.id)
    phase = pb.Phase.Name(ex.phase)
    print(f"{ex.id}: cancel requested; its runner is stopping it" if phase == "RUNNING" else f"{ex.id}: {phase}")
    return 0


def cmd_daemon(cfg, args):
    import daemon
    return daemon.run(cfg.home, args.endpoint or cfg.endpoint, allow_remote=args.allow_remote,
                      runner_grace=cfg.runner_grace, idle_exit=args.idle_exit)


def cmd_worker(cfg, args):
    import logging
    import threading

    import models
    cfg.require_sandbox()
    model = choose_model(cfg, args.model)
    environ = {**cfg.environ, **gather_secrets(cfg, [], model)}  # asks only for a missing key; held in memory
    # The SDK's import is the slowest part of a cold start: begin it before grpc's (worker.serve waits for it).
    threading.Thread(target=models.preload, args=(model, environ), name="import-model-sdk", daemon=True).start()
    import daemon_client
    import worker
    from daemon_client import VERSION
    level = {"development": logging.DEBUG, "staging": logging.INFO, "production": logging.WARNING}[cfg.env]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "anthropic", "openai", "grpc"):  # they log whole requests
        logging.getLogger(noisy).setLevel(max(level, logging.INFO))
    runner_id = args.runner_id or worker.new_runner_id()
    make_sandbox, sweep = sandbox_factory(cfg, runner_id, backend_is_terminal(cfg))
    if cfg.cloud:
        import redis_backend
        import sandbox
        sandbox.guard_commands()  # should this worker be killed, its commands die with it
        link = redis_backend.RedisLink(cfg.redis_url, cfg.redis_prefix, **cfg.redis_settings)
    else:
        link = daemon_client.DaemonLink(cfg.endpoint, cfg.home)
    where = f"sandbox root {cfg.sandbox_root}" if cfg.sandbox == "filesystem" else "sandbox daytona"
    print(f"stigmer worker {VERSION} · mode {cfg.mode} · endpoint {link.endpoint} · {where} · "
          f"model {model} · capacity {args.capacity}", file=sys.stderr, flush=True)
    return worker.serve(worker.Worker(capacity=args.capacity, mode=cfg.mode, model=model, runner_id=runner_id,
                                      pinned=args.pinned, make_sandbox=make_sandbox, sweep=sweep, sandbox=cfg.sandbox,
                                      environ=environ, history=link.history, context_window=cfg.context_window),
                        link, exit_with_stdin=args.exit_with_stdin)


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
    run.add_argument("--model", help="provider/model, e.g. openai/gpt-4.1, gemini/gemini-2.5-flash, ollama/qwen3:8b "
                                     "(default: STIGMER_MODEL or the newest Claude Sonnet)")
    run.add_argument("--max-turns", type=int, default=50, help="most model turns (default 50)")
    run.add_argument("--max-tokens-total", type=int, help="stop after this many tokens in all")
    run.add_argument("--secret", action="append", metavar="NAME", help="pass env var NAME to the agent's shell, redacted")
    run.add_argument("--inherit-env", action="store_true",
                     help=f"let variables that look secret (names with KEY, TOKEN, SECRET, PASSWORD, CREDENTIAL) "
                          f"reach the agent's shell, still redacted (or {INHERIT_ENV_VAR}=1)")
    run.add_argument("--json", action="store_true",
                     help="JSON lines: a run object, one object per event, then a summary object")
    run.add_argument("--detach", action="store_true", help="submit to the background daemon and print the id")
    run.add_argument("--repo", metavar="URL", help="clone this git repository into the sandbox's workspace first "
                                                   "(STIGMER_SANDBOX=daytona; a --secret GITHUB_TOKEN authenticates it)")
    run.add_argument("--ref", help="the branch, tag or commit of --repo to check out")
    run.add_argument("--keep-sandbox", action="store_true",
                     help="leave the Daytona sandbox running when the run ends, and print its id")
    run.add_argument("-c", "--continue", dest="cont", action="store_true",
                     help="continue the conversation of the latest execution in this workspace")

    resume = sub.add_parser("resume", help="continue an execution's conversation with a follow-up",
                            epilog='example: python runner.py resume ex-1a2b3c "now add a test for it"')
    resume.add_argument("id", help="the execution to continue (it must have ended)")
    resume.add_argument("task", nargs="*", help="the follow-up; `-` or none reads it from stdin")
    resume.add_argument("--model", help="model id (default: the one the execution used); another provider's is fine")
    resume.add_argument("--max-turns", type=int, default=50, help="most model turns (default 50)")
    resume.add_argument("--max-tokens-total", type=int, help="stop after this many tokens in all")
    resume.add_argument("--secret", action="append", metavar="NAME", help="pass env var NAME to the agent's shell, redacted")
    resume.add_argument("--inherit-env", action="store_true",
                     help=f"let variables that look secret (names with KEY, TOKEN, SECRET, PASSWORD, CREDENTIAL) "
                          f"reach the agent's shell, still redacted (or {INHERIT_ENV_VAR}=1)")
    resume.add_argument("--json", action="store_true",
                        help="JSON lines: a run object, one object per event, then a summary object")
    resume.add_argument("--detach", action="store_true", help="submit to the background daemon and print the id")
    resume.set_defaults(workspace=None, cont=False, repo=None, ref=None, keep_sandbox=False)

    start = sub.add_parser("start", help="run the daemon and workers in the background",
                           epilog="example: python runner.py start --workers 2")
    start.add_argument("--workers", type=int, default=1, help="how many workers (default 1)")
    start.add_argument("--secret", action="append", metavar="NAME", help="a secret the workers' shells may see")
    start.add_argument("--model", help="the workers' default model, provider/model (its key is asked for)")
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
    logs.add_argument("--history", action="store_true",
                      help="show the conversation it continues first (its parent's events, and theirs)")
    logs.add_argument("--patch", action="store_true",
                      help="print the change the agent made, for git apply: logs ID --patch > change.patch")
    cancel = sub.add_parser("cancel", help="cancel an execution", epilog="example: python runner.py cancel ex-1a2b")
    cancel.add_argument("id")
    dmn = sub.add_parser("daemon", help="run the daemon in the foreground (also: python daemon.py)",
                         epilog=DAEMON_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    dmn.add_argument("--endpoint", metavar="HOST:PORT",
                     help="where to listen (default: STIGMER_BACKEND_ENDPOINT or localhost:50051)")
    dmn.add_argument("--allow-remote", action="store_true", help="allow a non-loopback endpoint")
    dmn.add_argument("--idle-exit", type=float, default=0, help=argparse.SUPPRESS)  # a foreground run's daemon
    wrk = sub.add_parser("worker", help="run a worker in the foreground",
                         epilog="example: ANTHROPIC_API_KEY=... python runner.py worker --capacity 4")
    wrk.add_argument("--capacity", type=int, default=2, help="executions at once (default 2)")
    wrk.add_argument("--model", help="default model, provider/model (default: STIGMER_MODEL)")
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
    handlers = {"run": cmd_run, "resume": cmd_run, "start": cmd_start, "stop": cmd_stop, "status": cmd_status, "list": cmd_list,
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
