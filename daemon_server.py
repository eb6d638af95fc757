"""Serving the Stigmer Daemon: one per STIGMER_HOME (its lock), the gRPC server on a loopback port behind
the token (TokenAuth), the token file, and running it in the foreground until a signal or idle.

    server = serve("/home/me/.stigmer", "127.0.0.1:0")    # a daemon on a free port; raises DaemonRunning
    print(server.endpoint, server.token)
    server.stop()

`python daemon.py` and `python runner.py daemon` end up in run(). The service itself (queue, log,
Watch, runner sessions) is daemon.Daemon.
"""
import errno
import hmac
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from concurrent import futures

import grpc

import home as stigmer_home
import stigmer_pb2 as pb
import stigmer_pb2_grpc as pb_grpc
import store
from daemon import DB_FILE, Daemon, say
from contract import DEFAULT_ENDPOINT, LOCK_FILE, MAX_MESSAGE_BYTES, MAX_SOCKET_PATH, TOKEN_FILE
from daemon_client import DaemonError, is_loopback, read_token, socket_path

RPC_THREADS = 128  # pool threads: one per active RPC (each open Watch or Connect holds one)
MAX_CONCURRENT_RPCS = RPC_THREADS  # beyond this new RPCs fail fast with RESOURCE_EXHAUSTED instead of queuing behind streams
AUTH_MESSAGE = "missing or wrong daemon token; clients read it from $STIGMER_HOME/daemon.token"
LOCK_WAIT = 3.0  # seconds serve() waits for the home's lock (a prober may hold it for a moment)
IDLE_CHECK = 0.5  # seconds between idle checks of a daemon started with idle_exit
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # otherwise a second daemon could bind the same port silently
]
SERVICE = "stigmer.v1.Daemon"  # the full name of the gRPC service


class TokenAuth(grpc.ServerInterceptor):
    """Refuses every RPC whose metadata lacks `authorization: Bearer <daemon token>`."""

    def __init__(self, token):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        supplied = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if handler is None or hmac.compare_digest(str(supplied).encode(), self._expected):
            return handler

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_MESSAGE)

        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}
        return make[handler.request_streaming, handler.response_streaming](
            refuse, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def add_service(daemon, server):
    """Register the Daemon service as generated, except that Watch and WatchBatches send what their handlers
    yield as it is: the log's stored bytes (Events, or EventBatches made of them), never re-serialized."""
    handlers = {}

    class Capture:  # stands in for the server to collect the generated handlers
        def add_generic_rpc_handlers(self, generic_handlers):
            pass

        def add_registered_method_handlers(self, service, method_handlers):
            handlers.update(method_handlers)

    pb_grpc.add_DaemonServicer_to_server(daemon, Capture())
    handlers["Watch"] = grpc.unary_stream_rpc_method_handler(
        daemon.Watch, request_deserializer=pb.WatchRequest.FromString, response_serializer=None)  # None: as is
    handlers["WatchBatches"] = grpc.unary_stream_rpc_method_handler(
        daemon.WatchBatches, request_deserializer=pb.WatchRequest.FromString, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class DaemonServer:
    """A started daemon: .port, .endpoint ("127.0.0.1:PORT"), .token, .home, .socket (HOME/daemon.sock, or None
    when that path is too long to bind)."""

    def __init__(self, server, daemon, port, endpoint, token, home, lock_fd=None, socket=None):
        self._server, self._daemon = server, daemon
        self.port, self.endpoint, self.token, self.home, self.socket = port, endpoint, token, home, socket
        self._lock_fd = lock_fd  # HOME/daemon.lock, flocked while this daemon runs
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()

    def stop_when_idle(self, idle_exit):
        """Stop once the daemon has been idle (see Daemon.idle) for IDLE_EXIT seconds, on a thread."""
        def watch():
            while not self._stopped.wait(IDLE_CHECK):
                if not self._daemon.idle():
                    continue
                quiet = time.monotonic() - self._daemon.last_call()
                if quiet >= idle_exit:
                    say(f"idle for {quiet:.0f} s with no execution, runner or watcher: stopping")
                    self.stop()
                    return
        threading.Thread(target=watch, name="stigmer-idle", daemon=True).start()

    def stop(self, grace=1.0):
        """Stop accepting RPCs, end the streams, flush and close the database, remove the token."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._daemon.begin_stop()
            self._server.stop(grace).wait()
            self._daemon.close()
            path = os.path.join(self.home, TOKEN_FILE)
            try:
                if read_token(self.home) == self.token:  # not a newer daemon's
                    os.remove(path)
            except DaemonError:
                pass  # already gone
            if self.socket:  # ours: we still hold the home's lock
                _remove(self.socket)
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # the next daemon of this home may start
            self._stopped.set()

    def wait(self):
        """Block until stop() has finished."""
        self._stopped.wait()


def _parse_endpoint(endpoint):
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise DaemonError(f"bad endpoint {endpoint!r}: expected HOST:PORT, for example {DEFAULT_ENDPOINT}")
    return host, int(port)


def _remove(path):
    """Remove PATH if it exists."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _bind_problem(host, port):
    """Why a plain socket cannot bind host:port, to explain a failed add_insecure_port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does
            probe.bind((host, port))
    except OSError as e:
        return e
    return None


class DaemonRunning(DaemonError):
    """Another daemon already holds this STIGMER_HOME's lock; .pid is its pid (0 if not yet known)."""

    def __init__(self, message, pid):
        super().__init__(message)
        self.pid = pid


def lock_home(home):
    """Take HOME's daemon lock (at most one daemon per STIGMER_HOME); returns its fd or raises DaemonRunning."""
    path = os.path.join(home, LOCK_FILE)
    try:
        fd = stigmer_home.lock(path, LOCK_WAIT)
        stigmer_home.write_record(fd, os.getpid())  # its endpoint follows once it serves: "starting" till then
        return fd
    except stigmer_home.LockTimeout:
        pid = stigmer_home.lock_holder(path) or 0
        raise DaemonRunning(f"a daemon already runs for STIGMER_HOME {home}" + (f" (pid {pid})" if pid else "") +
                            ": use it (`python runner.py status`) or stop it (`python runner.py stop`)", pid) from None


def _write_token(home, token):
    """Write HOME/daemon.token with mode 0600, atomically."""
    path = os.path.join(home, TOKEN_FILE)
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # in case a stale temporary file had other bits
        f.write(token + "\n")
    os.replace(temporary, path)


def serve(home, endpoint=DEFAULT_ENDPOINT, *, allow_remote=False, runner_grace=15.0, cancel_grace=None):
    """Start a daemon keeping its state in HOME and listening on ENDPOINT (port 0: any free port).
    Raises DaemonRunning when another daemon holds HOME's lock.

    cancel_grace: how long a runner has to confirm a cancel (default: runner_grace)."""
    host, port = _parse_endpoint(endpoint)
    if not is_loopback(host):
        if not allow_remote:
            raise DaemonError(f"refusing to listen on {endpoint}: {host} is not a loopback address; "
                              "pass --allow-remote if other machines should reach this daemon")
        print(f"warning: the daemon listens on {endpoint}, reachable from other machines; "
              "anyone there with the token can run commands as you", file=sys.stderr)
    bind_host = "127.0.0.1" if host == "localhost" else host
    address = f"[{bind_host}]:{port}" if ":" in bind_host else f"{bind_host}:{port}"
    stigmer_home.private_home(home, warn=say)
    lock_fd = lock_home(home)
    try:
        return _serve_locked(home, host, port, bind_host, address, runner_grace, cancel_grace, lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def _serve_locked(home, host, port, bind_host, address, runner_grace, cancel_grace, lock_fd):
    """serve(), once HOME's lock is ours."""
    db_path = os.path.join(home, DB_FILE)
    try:
        stigmer_home.private_file(db_path)  # 0600 before SQLite makes it; the WAL and SHM copy its mode
        db = store.open_db(db_path)
    except OSError as e:
        raise DaemonError(f"cannot create the database {db_path}: {e}") from None
    except sqlite3.Error as e:
        raise DaemonError(store.damaged(db_path, e) if isinstance(e, sqlite3.DatabaseError) and not
                          isinstance(e, store.SchemaError) else f"cannot open the database {db_path}: {e}") from None
    token = os.urandom(32).hex()
    try:  # it reads what was running when the last daemon stopped: a damaged file fails here
        daemon = Daemon(db, db_path, runner_grace, runner_grace if cancel_grace is None else cancel_grace, home)
    except sqlite3.DatabaseError as e:
        db.close()
        raise DaemonError(store.damaged(db_path, e)) from None
    server = grpc.server(futures.ThreadPoolExecutor(RPC_THREADS, thread_name_prefix="stigmer-rpc"),
                         interceptors=[TokenAuth(token)], options=SERVER_OPTIONS,
                         maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    add_service(daemon, server)
    problem = port and _bind_problem(bind_host, port)  # checked first: grpc would also log a warning
    if problem and problem.errno == errno.EADDRINUSE:
        daemon.close()
        raise DaemonError(f"port {port} is already in use: is another daemon running? "
                          f"(`python runner.py status`) or pick another port, e.g. STIGMER_BACKEND_ENDPOINT=127.0.0.1:{port + 1}")
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        daemon.close()
        raise DaemonError(f"cannot listen on {address}: {_bind_problem(bind_host, port) or 'gRPC refused it'}")
    sock = _bind_socket(server, home)
    _write_token(home, token)
    server.start()
    endpoint = f"{bind_host}:{bound}" if ":" not in bind_host else f"[{bind_host}]:{bound}"
    # What clients check before they send the token: this pid (alive while the lock is held), the address
    # it listens on, and whether HOME/daemon.sock is its socket.
    stigmer_home.write_record(lock_fd, os.getpid(), endpoint, "unix" if sock else "tcp")
    return DaemonServer(server, daemon, bound, endpoint, token, home, lock_fd, sock)


def _bind_socket(server, home):
    """Listen on HOME/daemon.sock too (the caller holds HOME's lock, so a file there is a dead daemon's);
    returns its path, or None when the path is too long for a Unix socket (clients then dial the recorded
    TCP address, after checking that this daemon is alive)."""
    path = socket_path(home)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        say(f"{path} is too long for a Unix socket: clients use the TCP endpoint")
        return None
    _remove(path)
    try:
        bound = server.add_insecure_port(f"unix:{path}")
    except RuntimeError:
        bound = 0
    if not bound:
        say(f"cannot listen on {path}: clients use the TCP endpoint")
        return None
    return path


def run(home, endpoint, *, allow_remote=False, runner_grace=15.0, idle_exit=0.0):
    """Run the daemon in the foreground until SIGTERM or SIGINT (or, with IDLE_EXIT > 0, until it has
    been idle that many seconds); returns the exit code."""
    try:
        server = serve(home, endpoint, allow_remote=allow_remote, runner_grace=runner_grace)
    except DaemonError as e:
        print(f"stigmer daemon: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    print(f"stigmer daemon listening on {server.endpoint} (home {home})", flush=True)
    if idle_exit > 0:
        server.stop_when_idle(idle_exit)
    while not stop.wait(0.5) and not server._stopped.is_set():
        pass
    server.stop()
    return 0
