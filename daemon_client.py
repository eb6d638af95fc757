"""The client side of the daemon's contract: where the daemon is, its token, and a channel to it.

    channel = client_channel("localhost:50051")
    stub = stigmer_pb2_grpc.DaemonStub(channel)
    stub.Status(stigmer_pb2.StatusRequest(), metadata=auth_metadata(read_token(default_home())))

Kept apart from daemon.py (the server) so that CLI commands such as `list` start without
importing the server's SQLite store and thread pool. daemon.py re-exports all of it.
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


def default_home():
    """$STIGMER_HOME, else ~/.stigmer."""
    return os.environ.get("STIGMER_HOME") or os.path.expanduser("~/.stigmer")


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
