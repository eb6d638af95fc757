"""The names both sides of the contract share, beside stigmer.proto: the version, the defaults, which
phases end an execution, the message limits, the backend errors the CLI shows, and the checks the CLI,
the daemon and Redis' Submit all make on a prompt and a parent.

    from contract import TERMINAL_PHASES, BackendError, prompt_problem
    if execution.phase in TERMINAL_PHASES: ...

Standard library and stigmer_pb2 only: the worker, the Redis backend and the terminal import this and
never grpc or the daemon's client.
"""
import random
import time

import stigmer_pb2 as pb

VERSION = "0.1.0"  # the one version: pyproject, the daemon's Status and `--version` read it
DEFAULT_ENDPOINT = "localhost:50051"
DEFAULT_HOME = "~/.stigmer"  # where state lives unless STIGMER_HOME says otherwise
TERMINAL_PHASES = (pb.COMPLETED, pb.FAILED, pb.CANCELLED)  # an execution in one of these is over
TERMINAL_NAMES = tuple(pb.Phase.Name(p) for p in TERMINAL_PHASES)
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # largest gRPC message either way; bigger gets RESOURCE_EXHAUSTED
MAX_PROMPT_BYTES = 1 << 20  # the largest prompt (task plus piped stdin) a run takes, in UTF-8 bytes
LIST_PAGE_BYTES = 4 << 20  # List answers in pages of about this many bytes (one execution at least)
TOKEN_FILE = "daemon.token"  # inside $STIGMER_HOME
LOCK_FILE = "daemon.lock"  # inside $STIGMER_HOME: flocked by its one daemon; holds its pid, endpoint, transport
SOCKET_FILE = "daemon.sock"  # inside $STIGMER_HOME (0700): the daemon's local transport, which only we can reach
PROG = "python runner.py"  # how the user runs the CLI, for hints: runner.main makes it `stigmer` when so started
WARM_WORD = b"warm\n"  # a run writes it to its own worker's stdin before EOF: stay warm for the next run
MAX_SOCKET_PATH = 100  # bytes; a Unix socket path must fit sun_path (104 on macOS, 108 on Linux)


def as_typed(text):
    """TEXT with its `python runner.py …` hints in the form the user typed (PROG)."""
    return text.replace("python runner.py", PROG) if PROG != "python runner.py" else text


def prompt_problem(prompt):
    """Why PROMPT is too big to run (checked by the CLI, the daemon and Redis' Submit), or None."""
    size = len(prompt.encode("utf-8", "surrogatepass"))
    if size <= MAX_PROMPT_BYTES:
        return None
    return (f"the prompt is {size / (1 << 20):.1f} MiB (the task with what was piped on stdin), over the limit of "
            f"{MAX_PROMPT_BYTES >> 20} MiB: put the input in a file in the workspace and name that file in the task")


def parent_problem(parent_id, parent):
    """Why an execution cannot continue PARENT (the Execution with id PARENT_ID, or None), or None."""
    if parent is None:
        return f"no execution {parent_id!r} to continue: `python runner.py list` shows them"
    if parent.phase not in TERMINAL_PHASES:
        return (f"{parent_id} is still {pb.Phase.Name(parent.phase).lower()}: wait for it to end "
                f"(`python runner.py logs {parent_id} -f`) or cancel it (`python runner.py cancel {parent_id}`), "
                "then resume it")
    return None


class BackendError(Exception):
    """What went wrong talking to the backend, in one line for a person; .code is the grpc.StatusCode
    when an RPC failed (None otherwise)."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class BackendUnavailable(BackendError):
    """The backend cannot be reached (yet): a follower may wait for it and reconnect."""


BACKOFF_CAP = 5.0  # seconds, the longest wait between a link's reconnect attempts


def keep_connected(worker, attempt, where, log, eager_seconds=0.0, eager_retry=0.05):
    """A worker's link to its backend (the daemon, Redis) kept up until worker.stopping is set: ATTEMPT() runs one
    session and returns why it ended (a reason, and the link reconnects) or None (the link is done). Reconnects
    back off from 0.1 s, doubling to BACKOFF_CAP, with jitter; a lost session and the first failure of an outage
    are logged once, naming WHERE ("the daemon at HOST:PORT"). Until a first session, for EAGER_SECONDS, failures
    are retried every EAGER_RETRY seconds unlogged: a run's worker may start before its backend listens."""
    delay, told = 0.1, False  # told: the current outage has been logged
    eager_until, ever = time.monotonic() + eager_seconds, False
    while not worker.stopping.is_set():
        reason = attempt()
        if reason is None:
            break
        if worker.connected:  # the session was up: a new outage
            delay, told, ever = 0.1, True, True
            log.warning("lost %s (%s); agents keep running, events are buffered; reconnecting", where, reason)
        elif not ever and time.monotonic() < eager_until:
            worker.stopping.wait(eager_retry)
            continue
        elif not told:
            told = True
            log.warning("cannot reach %s (%s); retrying", where, reason)
        worker.connected = False
        worker.stopping.wait(min(BACKOFF_CAP, delay) * random.uniform(0.5, 1.0))
        delay = min(BACKOFF_CAP, delay * 2)
