"""The CLI's processes: finding or starting STIGMER_HOME's daemon, the backend client of the mode,
workers (a run's own, or `start`'s in the background) with their secrets, and stopping them.

    cfg = runner.Config.load(os.environ)
    client, status = ensure_daemon(cfg)                 # the daemon of cfg.home, started when none runs
    worker = spawn_run_worker(cfg, [], client.endpoint, "run-1", "anthropic/claude-sonnet-4-5")
    stop_process(worker)

Everything here gets the configuration as a `runner.Config`; nothing reads os.environ. grpc and the
generated stubs are imported where they are used, so that `--help` starts at once.
"""
import contextlib
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
START_WAIT = 30.0  # seconds `start` (or a run) waits for the daemon it started to answer
DAEMON_LOCK = "daemon.lock"  # in STIGMER_HOME: flocked by its one daemon (daemon_server.LOCK_FILE)
START_LOCK = "start.lock"  # in STIGMER_HOME: flocked by the one command starting a daemon
RUN_IDLE_EXIT = 60.0  # seconds a daemon started by a foreground run lingers with nothing to do, then exits


def project_secrets():
    """The project's secrets.py, loaded once by models.py."""
    import models
    return models.project_secrets()


class CliError(Exception):
    """A one-line message for the user and the exit code that goes with it."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def backend(cfg):
    """The mode's backend, chosen once: STIGMER_HOME's daemon (local mode) or Redis (cloud mode)."""
    return RedisBackend(cfg) if cfg.cloud else DaemonBackend(cfg)


class DaemonBackend:
    """Local mode: STIGMER_HOME's daemon, found, started when a command needs it, reached with a gRPC client;
    a worker keeps a DaemonLink to it.

        be = backend(cfg)
        client, status = be.find() or be.ensure()
    """
    cloud = False

    def __init__(self, cfg):
        self.cfg = cfg

    def find(self):
        """(client, status) of the daemon, or None when none answers."""
        return find_daemon(self.cfg)

    def ensure(self, idle_exit=0.0, out=None):
        """(client, status) of the daemon, started in the background when none runs (OUT: say so there)."""
        return ensure_daemon(self.cfg, idle_exit, out)

    def connect(self):
        return connect(self.cfg)

    def start(self, out):
        """For `start`: the daemon, started when none runs, on a database that reads whole (checked here, where
        a person waits for it, not on a foreground run's path); returns where the workers serve, for a person."""
        if find_daemon(self.cfg) is None:
            check_database(self.cfg)
            ensure_daemon(self.cfg, out=out)
        else:
            print(f"daemon already running at {self.cfg.endpoint}", file=out)
        return ""

    def worker_endpoint(self, found):
        """Where a run's worker dials: the daemon that answers (FOUND), else where the one about to start will
        listen (None when that is known only once it listens: port 0)."""
        return found[0].endpoint if found else known_endpoint(self.cfg.endpoint)

    def where(self, client):
        return f"daemon at {client.endpoint}"

    def warm_worker(self, found, model, names, environ_print):
        """Who takes a run of MODEL naming NAMES whose worker would get the environment ENVIRON_PRINT (see
        environment_print) at once: "" for the shared workers of `start` (one with a free slot fits), the runner id
        of an idle warm worker a foreground run left (see fitting_worker), or None: the run brings its own."""
        if found is None:
            return None
        return fitting_worker(self.cfg, model, names, environ_print, shared_free=found[1].free_capacity > 0)

    def link(self):
        """A worker's side of the backend: its Connect stream to the daemon."""
        import daemon_client
        return daemon_client.DaemonLink(self.cfg.endpoint, self.cfg.home)

    def worker_secrets(self):
        """What a worker redacts besides its secrets, read when an execution starts: the daemon's token."""
        return lambda: daemon_token(self.cfg.home)

    def open_log(self):
        """(client, embedded daemon or None) for reading the log; see open_log."""
        return open_log(self.cfg)

    def processes(self):
        """For `status`: this home's background processes by name (daemon, worker-N): pid, or None when gone."""
        return {os.path.basename(p)[:-4]: live_pid(p, wait=0.2) for p in pid_files(self.cfg)}


class RedisBackend(DaemonBackend):
    """Cloud mode: the queue and logs on Redis at REDIS_URL, which must already run; there is no daemon to
    start, and every worker of every host serves the one queue."""
    cloud = True

    def find(self):
        """(client, status) from Redis; a Redis that does not answer is a BackendError (there is no None)."""
        return backend_status(self.cfg)

    def ensure(self, idle_exit=0.0, out=None):
        return backend_status(self.cfg)

    def start(self, out):
        client, _ = backend_status(self.cfg)  # a Redis that does not answer is an error now, not in the workers' logs
        client.close()
        return f" on Redis at {client.endpoint}"

    def worker_endpoint(self, found):
        return self.cfg.endpoint

    def where(self, client):
        return f"Redis at {client.endpoint}"

    def warm_worker(self, found, model, names, environ_print):
        return None  # a run brings its own worker: a shared one may be on another host, with other keys

    def link(self):
        import redis_backend
        return redis_backend.RedisLink(self.cfg.redis_url, self.cfg.redis_prefix, **self.cfg.redis_settings)

    def worker_secrets(self):
        return None

    def open_log(self):
        return connect(self.cfg), None

    def processes(self):
        """This host's workers only: cloud mode has no daemon (one a local run left in this home is not ours)."""
        return {name: pid for name, pid in super().processes().items() if name.startswith("worker-")}


def check_database(cfg):
    """A CliError naming the file and the way out when STIGMER_HOME's database does not read whole
    (SQLite's quick_check: every page, not the cross-checks of the indexes)."""
    import sqlite3

    import store
    path = os.path.join(cfg.home, "stigmer.db")
    if not os.path.exists(path):
        return
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        problem = str(exc)
    if problem != "ok":
        raise CliError(store.damaged(path, problem).replace("stop the daemon (`python runner.py stop`), then ", ""))


def daemon_token(home):
    """{"STIGMER_DAEMON_TOKEN": the token} of HOME's daemon, as it is now (a daemon makes a new one when it
    starts), for the worker to redact: hidden from confined commands, a full-access command can still read it."""
    from contract import TOKEN_FILE
    try:
        with open(os.path.join(home, TOKEN_FILE)) as f:
            token = f.read().strip()
    except OSError:
        return {}
    return {"STIGMER_DAEMON_TOKEN": token} if token else {}


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
        if isinstance(exc, BackendUnavailable):
            return None
        owner = daemon_owner(cfg)
        if owner and getattr(exc.code, "name", "") == "UNAUTHENTICATED":  # a grpc.StatusCode  # our home's daemon answers, not to this token
            raise CliError(f"the daemon of STIGMER_HOME {cfg.home} (pid {owner}) refused the token in "
                           f"{os.path.join(cfg.home, 'daemon.token')}, which another process overwrote: "
                           "run `python runner.py stop`, and the next command starts a fresh one") from None
        if owner:  # it answers, with another problem (say, at its limit of calls at once): that problem
            raise CliError(str(exc)) from None
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
        home.write_record(pid_fd, pid, "run" if idle_exit else "start")  # who started it, for `status`
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
    embedded = serve_embedded(cfg, "127.0.0.1:0")
    if embedded is None:  # a daemon came up meanwhile
        return find_daemon(cfg)[0], None
    return connect(cfg, embedded.endpoint), embedded


def serve_embedded(cfg, endpoint):
    """A daemon inside this process, for this command only; None when STIGMER_HOME's daemon came up
    meanwhile. Waits while another command's short-lived one holds the home's lock."""
    import daemon_client
    import daemon_server
    deadline = time.monotonic() + START_WAIT
    while True:
        try:
            return daemon_server.serve(cfg.home, endpoint, runner_grace=cfg.runner_grace)
        except daemon_server.DaemonRunning as exc:
            if find_daemon(cfg) is not None:
                return None
            if time.monotonic() > deadline:
                raise CliError(str(exc)) from None
        except daemon_client.DaemonError as exc:
            raise CliError(str(exc)) from None


def worker_env(cfg, secrets, endpoint):
    """The environment of a worker: the user's, the secrets, and where the daemon is
    (in cloud mode REDIS_URL and the rest are the user's environment already)."""
    env = project_secrets().child_env(secrets, base=cfg.environ)
    env.update(STIGMER_HOME=cfg.home, STIGMER_BACKEND_ENDPOINT=endpoint, MODE=cfg.mode, STIGMER_MODE=cfg.mode,
               STIGMER_ENV=cfg.env, PYTHONUNBUFFERED="1")
    return env


def without_keys(environ):
    """ENVIRON minus every provider key, service credential and secret-looking variable: what the daemon gets
    (it needs none, and its environment block is readable by every process of the user)."""
    import models
    keys = set(models.model_key_vars()) | set(project_secrets().SERVICE_KEY_VARS)
    return {k: v for k, v in environ.items() if k not in keys and not project_secrets().looks_secret(k)}


def backend_is_terminal(cfg):
    """is_terminal(execution_id) for the sweep, asking the daemon (or Redis); False when it cannot say."""
    import contract

    def is_terminal(execution_id):
        try:
            client = connect(cfg)
            try:
                return client.get(execution_id).phase in contract.TERMINAL_PHASES
            finally:
                client.close()
        except contract.BackendError:  # unknown here, or the daemon is away: leave it
            return False
    return is_terminal


def spawn(args, env, log_path, pipe_stdin=False, pid_path=None, record=()):
    """Start `python runner.py ARGS` in its own session, output appended to LOG_PATH (0600)
    (stdin a pipe we hold when PIPE_STDIN, else /dev/null). PID_PATH: a pid file the child
    keeps locked while it lives (see home.live_pid), holding its pid and the fields of RECORD.
    A worker gets the secrets of ENV (keys, credentials, secret-looking and --secret variables) in an
    inherited pipe instead (secrets.py secrets_pipe), so that its environment block never holds them."""
    import subprocess

    import home
    try:
        home.private_dirs(os.path.dirname(log_path))
        log = home.private_open(log_path, os.O_WRONLY | os.O_APPEND)
        pid_fd = home.lock(pid_path, timeout=2.0) if pid_path else None
    except OSError as exc:
        raise CliError(home_problem(log_path, exc)) from None
    secrets_fd = None
    try:
        if args[:1] == ["worker"]:  # its secrets go in a pipe it reads once, never in its environment block
            mod = project_secrets()
            values = mod.environment_secrets(env, [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--secret"])
            env = {k: v for k, v in env.items() if k not in values}
            try:
                secrets_fd = mod.secrets_pipe(values)
            except mod.SecretError as exc:
                raise CliError(str(exc), 2) from None
            env[mod.SECRETS_FD_VAR] = str(secrets_fd)
            # forked from the fork server, which has imported the SDKs already; else started afresh
            proc = forked_worker(args, env, log, pipe_stdin, [fd for fd in (pid_fd, secrets_fd) if fd is not None])
        else:
            proc = None
        if proc is None:
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), *args], env=env,
                                    stdin=subprocess.PIPE if pipe_stdin else subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True,
                                    pass_fds=tuple(fd for fd in (pid_fd, secrets_fd) if fd is not None))
        if pid_fd is not None:
            try:
                home.write_record(pid_fd, proc.pid, *record)
            except OSError as exc:
                stop_process(proc)
                raise CliError(home_problem(pid_path, exc)) from None
        return proc
    finally:
        os.close(log)
        for fd in (pid_fd, secrets_fd):
            if fd is not None:
                os.close(fd)


def forked_worker(args, env, log, pipe_stdin, passed):
    """`runner.py ARGS` (a worker) forked from the fork server, as spawn would start it (output to LOG, stdin a
    pipe when PIPE_STDIN, the fds PASSED at their numbers), or None when the fork server cannot (spawn starts
    it then)."""
    import forkserver
    stdin, ours = (os.pipe() if pipe_stdin else (os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), None))
    child = None
    try:
        child = forkserver.spawn(args, env, {0: stdin, 1: log, 2: log, **{fd: fd for fd in passed}})
    finally:
        os.close(stdin)
        if ours is not None and child is None:
            os.close(ours)
        elif ours is not None:
            child.stdin = os.fdopen(ours, "wb")
    return child


def home_problem(path, exc):
    """One line on a file in STIGMER_HOME that could not be written."""
    import errno
    if exc.errno == errno.ENOSPC:
        return f"disk full: cannot write {path} in STIGMER_HOME; free some space there"
    return f"cannot write {path}: {exc.strerror or exc}"


def gather_secrets(cfg, names, model, labels=None):
    """The key MODEL's provider needs (none for Ollama) plus NAMES, prompting on the terminal for what is missing
    (LABELS: what the prompt says for a name, an agent's description of it)."""
    mod = project_secrets()
    try:
        return mod.gather((model.split("/")[0],), names, environ=cfg.environ, labels=labels,
                          warn=lambda m: print(f"stigmer: warning: {m}", file=sys.stderr))
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


def allowed_args(names, inherit):
    """`worker` arguments that let its executions pass NAMES (provider keys among them) and, with INHERIT,
    every variable to their shell: what the user asked for, since a worker refuses anything more."""
    return [arg for name in names for arg in ("--secret", name)] + (["--inherit-env"] if inherit else [])


def spawn_run_worker(cfg, names, endpoint, runner_id, model, labels=None, inherit=False, mcp=False):
    """This run's own worker (capacity 1) for MODEL (provider/model; its provider's key is gathered, and
    NAMES, asked for with LABELS), which takes only executions pinned to RUNNER_ID and stops when this command
    closes its stdin, unless it was told to stay warm first (see release_worker). Its .secrets are the values
    gathered for it (some perhaps typed at the prompt). MCP: the run has MCP servers, so the worker imports their
    SDK first (it starts them while the model's SDK is still importing)."""
    secrets = gather_secrets(cfg, names, model, labels)
    warm = keep_warm(cfg)
    shell = names + [project_secrets().INHERIT_ALL] if inherit else names
    proc = spawn(["worker", "--capacity", "1", "--exit-with-stdin", "--runner-id", runner_id, "--pinned",
                  "--model", model, *allowed_args(names, inherit),
                  *(["--warm-for", f"{warm:g}", "--warm-print", environment_print(cfg, shell, model, secrets)]
                    if warm else []), *(["--preload-mcp"] if mcp else [])],
                 worker_env(cfg, secrets, endpoint), os.path.join(cfg.home, "logs", "run-worker.log"), pipe_stdin=True)
    proc.secrets = secrets
    proc.warm_path = os.path.join(cfg.home, "logs", f"warm-{runner_id}.pid") if warm else None
    return proc


def release_worker(proc, warm):
    """The end of a run for its own worker PROC: with WARM (the run ended and it may stay warm), the worker is told
    to stay for the next run and left running; else EOF on its stdin stops it, killing its commands."""
    import home
    try:
        if warm and proc.warm_path and proc.poll() is None:
            from contract import WARM_WORD
            proc.stdin.write(WARM_WORD)
            proc.stdin.close()
            # Wait (briefly) until it says it is idle, so that a run started right after this one finds it.
            deadline = time.monotonic() + 2.0
            while proc.poll() is None and time.monotonic() < deadline and \
                    (home.lock_record(proc.warm_path) or [])[WARM_STATE:WARM_STATE + 1] != ["idle"]:
                time.sleep(0.005)
            return
    except OSError:  # it exited meanwhile
        pass
    try:
        proc.stdin.close()
    except OSError:
        pass
    stop_process(proc, timeout=10)


def known_secrets(cfg, names, gathered=()):
    """A Redactor of the secret values this CLI knows: the provider and service keys in its environment, the
    --secret NAMES (an agent's declared secrets among them), every secret-looking variable (a worker redacts all
    of these too) and GATHERED (the values gathered for its worker, keys typed at the prompt among them)."""
    import models
    mod = project_secrets()
    keys = set(models.model_key_vars()) | set(mod.SERVICE_KEY_VARS)
    values = {n: v for n, v in cfg.environ.items() if v and (n in keys or n in names or mod.looks_secret(n))}
    values.update(dict(gathered))
    return mod.Redactor(mod.secret_values(values))


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


def fitting_worker(cfg, model, names, environ_print, shared_free):
    """"" when a worker of `start` is alive (SHARED_FREE: the shared workers have a free slot) with the key of
    MODEL's provider and every secret in NAMES; else the runner id of a warm worker (a foreground run's, kept for
    the next run: see keep_warm) that is idle, holds the same and was given the environment ENVIRON_PRINT; else
    None. Their pid files record the model, the secret names (never their values) and, for a warm one, its
    runner id, whether it is idle and its environment's print."""
    import home
    warm = None
    for path in pid_files(cfg):
        base = os.path.basename(path)
        if not base.startswith(("worker-", "warm-")):
            continue
        record = home.lock_record(path) or []
        if len(record) < 3 or record[1].split("/")[0] != model.split("/")[0] or \
                not set(names) <= set(record[2].split(",")) - {"-"} or not live_pid(path, wait=0):
            continue
        if base.startswith("worker-") and shared_free:
            return ""
        if base.startswith("warm-") and len(record) > WARM_PRINT and record[WARM_STATE] == "idle" and \
                prints_fit(record[WARM_PRINT], environ_print):
            warm = warm or record[3]
    return warm


def keep_warm(cfg):
    """Seconds a foreground run's worker stays warm for the next run (STIGMER_KEEP_WARM, at most as long as the
    daemon a run starts lingers; 0: it exits with its run). Local mode only: in cloud mode runs bring their own."""
    return 0.0 if cfg.cloud else min(cfg.keep_warm, RUN_IDLE_EXIT)


def environment_print(cfg, names, model, values=None):
    """What a warm worker must have been given to take a later run: a digest of the environment without its
    secrets (NAMES, keys, secret-looking variables) and the shell's bookkeeping (the variables its commands see,
    the model's URL), then "-", then a short digest of MODEL's provider key in VALUES (default: the environment),
    or "" when there is none there (typed at a prompt, the worker holds it: any key of that provider fits).
    Only these digests are written (in STIGMER_HOME, private): 32 bits of a key's hash cannot give the key back,
    and they let a run whose key changed bring its own worker instead of using the old key."""
    import hashlib
    kept = sorted((k, v) for k, v in without_keys(cfg.environ).items()
                  if k not in names and k not in ("_", "PWD", "OLDPWD", "SHLVL", "SANDBOX_ROOT_DIR"))
    provider = project_secrets().PROVIDERS.get(model.split("/")[0])
    source = cfg.environ if values is None else values
    key = next((source[v] for v in (provider.key_vars if provider else ()) if source.get(v)), "")
    key_print = hashlib.sha256(key.encode()).hexdigest()[:8] if key else ""
    return hashlib.sha256(repr(kept).encode()).hexdigest()[:24] + "-" + key_print


def prints_fit(held, wanted):
    """True when a warm worker given HELD (environment_print) may take a run that would give WANTED."""
    held_env, _, held_key = held.partition("-")
    wanted_env, _, wanted_key = wanted.partition("-")
    return held_env == wanted_env and (not wanted_key or wanted_key == held_key)


WARM_STATE = 4  # a warm worker's pid file: pid, model, secret names, runner id, then WARM_STATE: idle or busy,
WARM_PRINT = 5  # and its environment_print (see warm_marker)


def warm_marker(path, fields, environ_print):
    """mark(state) for a warm worker: "idle" or "busy" (re)writes its pid file PATH (held locked while it lives)
    with its pid, FIELDS (model, secret names, runner id), the state and ENVIRON_PRINT, which runs read to find
    it (fitting_worker); None removes the file, so that no run picks it any more."""
    import home
    fd = None

    def mark(state):
        nonlocal fd
        if state is None:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                os.close(fd)
                fd = None
            return
        if fd is None:
            fd = home.lock(path, timeout=2.0)
        home.write_record(fd, os.getpid(), *fields, state, environ_print)
    return mark


def pid_files(cfg):
    logs = os.path.join(cfg.home, "logs")
    return sorted(os.path.join(logs, n) for n in os.listdir(logs) if n.endswith(".pid")) if os.path.isdir(logs) else []


def live_pid(path, wait=1.0):
    """The pid in a pid file while its process runs (it holds the file's lock; no /proc), else None."""
    import home
    return home.live_pid(path, wait)


def known_endpoint(endpoint):
    """Where a daemon asked to listen on ENDPOINT will be found (as daemon_server.serve binds it), or None
    when that is known only once it listens (port 0)."""
    host, _, port = endpoint.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None
    return f"127.0.0.1:{port}" if host == "localhost" else endpoint
