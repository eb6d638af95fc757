"""The client side of the daemon's contract: where the daemon is, its token, a channel to it,
and the CLI's `Client` (submit, get, list, watch, cancel, status), which returns stigmer_pb2 messages.

    client = Client(os.path.expanduser("~/.stigmer"), "localhost:50051")
    execution = client.submit(stigmer_pb2.ExecutionSpec(prompt="add a README", workspace="/tmp/ws"))
    for event in client.watch(execution.id):
        print(event.seq, event.WhichOneof("payload"))

Kept apart from daemon.py (the server) so that CLI commands such as `list` start without
importing the server's SQLite store and thread pool.
"""
import os

import grpc

import stigmer_pb2 as pb

VERSION = "0.1.0"  # the one version: pyproject, the daemon's Status and `--version` read it
DEFAULT_ENDPOINT = "localhost:50051"
DEFAULT_HOME = "~/.stigmer"  # where state lives unless STIGMER_HOME says otherwise
TERMINAL_PHASES = (pb.COMPLETED, pb.FAILED, pb.CANCELLED)  # an execution in one of these is over
TERMINAL_NAMES = tuple(pb.Phase.Name(p) for p in TERMINAL_PHASES)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # largest gRPC message either way; bigger gets RESOURCE_EXHAUSTED
TOKEN_FILE = "daemon.token"  # inside $STIGMER_HOME
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
    if not token:
        raise DaemonError(f"no daemon token at {path}: is the daemon running? "
                          "start it with `python runner.py start`")
    return token


def auth_metadata(token):
    """The metadata every RPC must carry."""
    return (("authorization", f"Bearer {token}"),)


def client_channel(endpoint):
    """An insecure channel to the daemon with the daemon's message size limits."""
    return grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)


# ---- the CLI's client ----

class BackendError(Exception):
    """What went wrong talking to the backend, in one line for a person."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached (yet): a follower may wait for it and reconnect."""


def rpc_message(exc, endpoint):
    """A one-line message for a failed RPC."""
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"no daemon answers at {endpoint}: start one with `python runner.py start`"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"the daemon at {endpoint} refused our token: it belongs to another STIGMER_HOME, or restarted; "
                "check STIGMER_HOME and STIGMER_BACKEND_ENDPOINT")
    return exc.details() or code.name


def backend_error(exc, endpoint):
    """The BackendError (or BackendUnavailable) for a failed RPC."""
    unavailable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return (BackendUnavailable if unavailable else BackendError)(rpc_message(exc, endpoint))


class Watch:
    """An execution's events from a Watch call, as an iterator; cancel() ends it from any thread."""

    def __init__(self, call, endpoint, channel):
        self._call, self._endpoint = call, endpoint
        self._channel = channel  # held: a channel that is garbage-collected cancels its calls

    def __iter__(self):
        try:
            yield from self._call
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:  # CANCELLED: we (or the daemon) ended it
                raise backend_error(exc, self._endpoint) from None

    def cancel(self):
        """End the watch: the iteration stops quietly."""
        self._call.cancel()


class Client:
    """The CLI's daemon client. Every method returns stigmer_pb2 messages and raises BackendError
    (BackendUnavailable when no daemon answers)."""

    def __init__(self, home, endpoint):
        import stigmer_pb2_grpc
        self.endpoint = endpoint
        try:
            self._metadata = auth_metadata(read_token(home))
        except DaemonError as exc:  # no token: no daemon has started for this home (or it stopped)
            raise BackendUnavailable(str(exc)) from None
        self._channel = client_channel(endpoint)
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
        """Executions newest first, of one phase if PHASE is set."""
        return list(self._call("List", pb.ListRequest(phase=phase, limit=limit)).executions)

    def watch(self, execution_id, after_seq=0, follow=True):
        """The events after AFTER_SEQ, then (FOLLOW) live ones until the terminal event: a Watch."""
        request = pb.WatchRequest(execution_id=execution_id, after_seq=after_seq, follow=follow)
        return Watch(self._stub.Watch(request, metadata=self._metadata), self.endpoint, self._channel)

    def cancel(self, execution_id):
        """Ask for the execution to stop; returns it as it is now."""
        return self._call("Cancel", pb.CancelRequest(execution_id=execution_id))

    def status(self, timeout=10.0):
        """The daemon's pb.DaemonStatus: version, pid, runners, queue, executions by phase."""
        return self._call("Status", pb.StatusRequest(), timeout=timeout)

    def close(self):
        """Close the channel; watches still running on it end."""
        self._channel.close()
