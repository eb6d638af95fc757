"""The client side of the daemon's contract: where the daemon is, its token, a channel to it,
and the CLI's `Client` (submit, get, list, watch, cancel, status), which returns stigmer_pb2 messages.

    client = Client(os.path.expanduser("~/.stigmer"), "localhost:50051")
    execution = client.submit(stigmer_pb2.ExecutionSpec(prompt="add a README", workspace="/tmp/ws"))
    for event in client.watch(execution.id):
        print(event.seq, event.WhichOneof("payload"))

    link = DaemonLink("localhost:50051", home)              # a worker's side of the Connect stream
    link.run(worker.Worker(capacity=2, history=link.history))   # until the worker stops

Kept apart from daemon.py (the server) so that CLI commands such as `list` start without
importing the server's SQLite store and thread pool.
"""
import ipaddress
import logging
import os
import stat
import threading
import time

import grpc

import home as stigmer_home
import stigmer_pb2 as pb
import stigmer_pb2_grpc as pb_grpc
# The contract's shared names, here too for the client's callers:
from contract import (DEFAULT_ENDPOINT, DEFAULT_HOME, LIST_PAGE_BYTES, LOCK_FILE, MAX_MESSAGE_BYTES,  # noqa: F401
                      MAX_PROMPT_BYTES, MAX_SOCKET_PATH, SOCKET_FILE, TERMINAL_NAMES, TERMINAL_PHASES, TOKEN_FILE,
                      VERSION, BackendError, BackendUnavailable, keep_connected, parent_problem, prompt_problem)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class DaemonError(Exception):
    """A problem a person must fix before the daemon can run; the message says how."""


def read_token(home):
    """The running daemon's token from HOME/daemon.token."""
    path = os.path.join(home, TOKEN_FILE)
    try:
        with open(path) as f:
            token = f.read().strip()
    except FileNotFoundError:
        token = ""
    except (OSError, UnicodeDecodeError) as e:  # unreadable: a directory, no permission, not text
        raise DaemonError(f"the daemon token {path} is unreadable ({getattr(e, 'strerror', None) or e})") from None
    if not token:
        raise DaemonError(f"no daemon token at {path}: is the daemon running? "
                          "start it with `python runner.py start`")
    return token


def socket_path(home):
    """Where HOME's daemon listens on a Unix socket (when the path is short enough to bind)."""
    return os.path.join(os.path.abspath(home), SOCKET_FILE)


def bound_endpoint(endpoint):
    """ENDPOINT as the daemon binds and records it: `localhost` is 127.0.0.1 (never whatever `localhost`
    resolves to first, which may be ::1, where anyone may listen)."""
    host, _, port = endpoint.rpartition(":")
    return f"127.0.0.1:{port}" if host == "localhost" else endpoint


def is_loopback(host):
    """True for `localhost` and loopback addresses (brackets allowed)."""
    host = host.strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def daemon_target(home, endpoint):
    """The gRPC target of HOME's daemon, asked for at ENDPOINT, checked before any token goes there.

    HOME's daemon holds HOME/daemon.lock while it lives and records there the endpoint it listens on and
    whether it listens on HOME/daemon.sock. When it is alive and listens at ENDPOINT, the target is that
    socket (inside the 0700 home: nobody else can listen there), else the literal address it recorded. A
    loopback ENDPOINT with no live daemon of HOME behind it is a DaemonError: whoever listens there now
    (after a crash, or on ::1 while the daemon is on 127.0.0.1) never gets the token. An ENDPOINT that is
    not loopback is a remote daemon (`daemon --allow-remote`) the user named: it is dialled as given."""
    record = stigmer_home.lock_record(os.path.join(home, LOCK_FILE)) or []
    alive = len(record) >= 2 and record[0].isdigit() and stigmer_home.pid_alive(int(record[0]))
    host = endpoint.rpartition(":")[0]
    if alive and bound_endpoint(endpoint) == record[1]:
        if "unix" not in record[2:]:
            return record[1]
        path = socket_path(home)
        try:
            info = os.lstat(path)
        except OSError:
            info = None
        if info is None or not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
            raise DaemonError(f"{path} is not the socket of the daemon of STIGMER_HOME {home}: "
                              "run `python runner.py stop`, and the next command starts a fresh daemon")
        return f"unix:{path}"
    if not is_loopback(host):
        return endpoint
    if alive:
        raise DaemonError(f"no daemon of STIGMER_HOME {home} answers at {endpoint}: it listens at {record[1]} "
                          f"(set STIGMER_BACKEND_ENDPOINT={record[1]}, or leave it unset)")
    raise DaemonError(f"no daemon answers at {endpoint}: start one with `python runner.py start`")


def auth_metadata(token):
    """The metadata every RPC must carry."""
    return (("authorization", f"Bearer {token}"),)


def client_channel(endpoint):
    """An insecure channel to the daemon with the daemon's message size limits."""
    return grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)


# ---- DaemonLink: a worker's side of the Connect stream ----

link_log = logging.getLogger("stigmer.link")
HEARTBEAT_SECONDS = 5.0  # idle interval between heartbeats
EAGER_SECONDS, EAGER_RETRY = 3.0, 0.05  # until a first connection: retry this long, this often, unlogged
BATCH_WAIT = 0.25  # seconds the sender waits for events before it considers a heartbeat
GAP = grpc.StatusCode.FAILED_PRECONDITION.value[0]  # a Reject with this code asks for a resend after ack_seq
FULL = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]  # a Reject with this code: disk full, keep the events, resend later


class DaemonLink:
    """Connects a worker to the daemon: Hello with its in-flight executions, event batches,
    heartbeats; reconnects with exponential backoff and jitter until the worker stops."""

    def __init__(self, endpoint, home):
        self.endpoint, self.home = endpoint, home

    def run(self, worker):
        """Connect, reconnecting with backoff and jitter (contract.keep_connected), until worker.stopping is set."""
        def attempt():
            try:
                self._session(worker)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and worker.stopping.is_set():
                    return None
                return f"{exc.code().name}: {exc.details()}"
            except DaemonError as exc:
                return str(exc)
            return "the daemon closed the stream"
        keep_connected(worker, attempt, f"the daemon at {self.endpoint}", link_log, EAGER_SECONDS, EAGER_RETRY)

    def history(self, execution_id):
        """(pb.Execution, its stored events) from the daemon: the conversation a resumed execution continues."""
        client = Client(self.home, self.endpoint)
        try:
            return client.get(execution_id), list(client.watch(execution_id, follow=False))
        finally:
            client.close()

    def _session(self, worker):
        """One Connect stream, until it breaks or the worker stops."""
        token = read_token(self.home)
        channel = client_channel(daemon_target(self.home, self.endpoint))  # checked before the token goes out
        session = threading.Event()
        try:
            call = pb_grpc.DaemonStub(channel).Connect(self._requests(worker, session),
                                                       metadata=auth_metadata(token))

            def cancel_on_stop():  # lives as long as this session, not as long as the worker
                with worker.cond:  # notified when the worker stops and when this session ends
                    while not (session.is_set() or worker.stopping.is_set()):
                        worker.cond.wait(0.25)
                if worker.stopping.is_set():
                    call.cancel()  # at once: a stopping worker's process should not wait on its stream

            threading.Thread(target=cancel_on_stop, name="session-watch", daemon=True).start()
            for message in call:
                if not worker.connected:
                    worker.connected = True
                    link_log.info("connected to the daemon at %s as %s", self.endpoint, worker.runner_id)
                self._dispatch(worker, message)
        finally:
            session.set()
            with worker.cond:
                worker.cond.notify_all()
            channel.close()

    def _requests(self, worker, session):
        """The runner's side of Connect: Hello, then batches and heartbeats until the session ends."""
        yield pb.RunnerMessage(hello=pb.Hello(runner_id=worker.runner_id, capacity=worker.capacity,
                                              mode=worker.mode, in_flight=worker.rewind(),
                                              pinned=getattr(worker, "pinned", False)))
        last = time.monotonic()
        while not session.is_set():
            batch = worker.next_batch(BATCH_WAIT, session)
            if session.is_set():  # a newer stream owns the outboxes now
                return
            if batch:
                yield pb.RunnerMessage(events=pb.EventBatch(events=batch))
                last = time.monotonic()
            elif time.monotonic() - last > HEARTBEAT_SECONDS:
                yield pb.RunnerMessage(heartbeat=pb.Heartbeat(free_slots=worker.free_slots()))
                last = time.monotonic()

    @staticmethod
    def _dispatch(worker, message):
        """Hand one DaemonMessage to the worker."""
        kind = message.WhichOneof("msg")
        if kind == "assign":
            worker.assigned(message.assign.execution)
        elif kind == "ack":
            worker.acked(message.ack.execution_id, message.ack.seq)
        elif kind == "reject":
            reject = message.reject
            if reject.code == FULL:
                worker.log_full(reject.execution_id, reject.ack_seq, reject.message)
                return
            worker.refused(reject.execution_id, reject.ack_seq, gap=reject.code == GAP, message=reject.message)
        elif kind == "cancel":
            worker.cancel_requested(message.cancel.execution_id)
        elif kind == "approval":
            worker.approval_answered(message.approval.execution_id, message.approval.approval)

# ---- the CLI's client ----

CALL_LIMIT = "Concurrent RPC limit exceeded"  # grpc's RESOURCE_EXHAUSTED details past maximum_concurrent_rpcs


def rpc_message(exc, endpoint):
    """A one-line message for a failed RPC."""
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"no daemon answers at {endpoint}: start one with `python runner.py start`"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"the daemon at {endpoint} refused our token: it belongs to another STIGMER_HOME, or restarted; "
                "check STIGMER_HOME and STIGMER_BACKEND_ENDPOINT")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and CALL_LIMIT in (exc.details() or ""):
        return (f"the daemon at {endpoint} is serving as many calls at once as it can (each `logs -f`, foreground "
                "run and worker holds one): end some of them and try again")
    return exc.details() or code.name


def backend_error(exc, endpoint):
    """The BackendError (or BackendUnavailable) for a failed RPC."""
    unavailable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return (BackendUnavailable if unavailable else BackendError)(rpc_message(exc, endpoint), exc.code())


class Watch:
    """An execution's events from a WatchBatches call, one Event at a time, as an iterator;
    cancel() ends it from any thread. A daemon older than WatchBatches gets a per-event Watch."""

    def __init__(self, stub, request, metadata, endpoint, channel):
        self._stub, self._request, self._metadata, self._endpoint = stub, request, metadata, endpoint
        self._channel = channel  # held: a channel that is garbage-collected cancels its calls
        self._call = stub.WatchBatches(request, metadata=metadata)
        self._cancelled = False

    def __iter__(self):
        after = self._request.after_seq
        try:
            for batch in self._call:
                for event in batch.events:
                    after = event.seq or after  # 0: a notice, not in the log
                    yield event
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED or self._cancelled:
                self._raise(exc)
            yield from self._per_event(after)

    def _per_event(self, after):
        """The same watch through the per-event Watch, from AFTER on."""
        request = pb.WatchRequest(execution_id=self._request.execution_id, after_seq=after,
                                  follow=self._request.follow)
        self._call = self._stub.Watch(request, metadata=self._metadata)
        if self._cancelled:
            self._call.cancel()
        try:
            yield from self._call
        except grpc.RpcError as exc:
            self._raise(exc)

    def _raise(self, exc):
        if exc.code() != grpc.StatusCode.CANCELLED:  # CANCELLED: we (or the daemon) ended it
            raise backend_error(exc, self._endpoint) from None

    def cancel(self):
        """End the watch: the iteration stops quietly."""
        self._cancelled = True
        self._call.cancel()


class Client:
    """The CLI's daemon client. Every method returns stigmer_pb2 messages and raises BackendError
    (BackendUnavailable when no daemon answers)."""

    def __init__(self, home, endpoint):
        import stigmer_pb2_grpc
        self.endpoint = endpoint
        try:
            self._metadata = auth_metadata(read_token(home))
            self.target = daemon_target(home, endpoint)  # HOME's live daemon, or a remote one: never a stranger
        except DaemonError as exc:  # no token, or no daemon of this home behind the endpoint
            raise BackendUnavailable(str(exc)) from None
        self._channel = client_channel(self.target)
        self._stub = stigmer_pb2_grpc.DaemonStub(self._channel)

    def _call(self, method, request, timeout=10.0):
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise backend_error(exc, self.endpoint) from None

    def submit(self, spec):
        """Queue an execution of SPEC; returns the pb.Execution (PENDING)."""
        return self._call("Submit", pb.SubmitRequest(spec=spec))

    def get(self, execution_id):
        """The execution as the log has it now."""
        return self._call("Get", pb.GetRequest(execution_id=execution_id))

    def list(self, phase=0, limit=20):
        """Executions newest first, of one phase if PHASE is set (read page by page: see LIST_PAGE_BYTES)."""
        executions, token = [], ""
        while True:
            want = limit - len(executions) if limit else 0
            page = self._call("List", pb.ListRequest(phase=phase, limit=want, page_token=token))
            executions += page.executions
            token = page.next_page_token
            if not token or (limit and len(executions) >= limit):
                return executions

    def watch(self, execution_id, after_seq=0, follow=True):
        """The events after AFTER_SEQ, then (FOLLOW) live ones until the terminal event: a Watch,
        which reads them in batches (WatchBatches) and yields them one by one."""
        request = pb.WatchRequest(execution_id=execution_id, after_seq=after_seq, follow=follow)
        return Watch(self._stub, request, self._metadata, self.endpoint, self._channel)

    def cancel(self, execution_id):
        """Ask for the execution to stop; returns it as it is now."""
        return self._call("Cancel", pb.CancelRequest(execution_id=execution_id))

    def approve(self, execution_id, request_id, approved, reason="", always=False, by=""):
        """Answer a tool call of EXECUTION_ID waiting for approval (REQUEST_ID, or the one waiting): the id answered.
        BackendError (FAILED_PRECONDITION) when none waits or it was answered already."""
        return self._call("Approve", pb.ApproveRequest(execution_id=execution_id, request_id=request_id,
                                                       approved=approved, reason=reason, always=always,
                                                       by=by)).request_id

    def status(self, timeout=10.0):
        """The daemon's pb.DaemonStatus: version, pid, runners, queue, executions by phase."""
        return self._call("Status", pb.StatusRequest(), timeout=timeout)

    def close(self):
        """Close the channel; watches still running on it end."""
        self._channel.close()
