"""The Agent Runner: takes executions from the daemon's Connect stream and runs them.

    python runner.py worker                  # foreground, against STIGMER_BACKEND_ENDPOINT
    python runner.py worker --capacity 4

Every event an agent emits gets the next seq of its execution and stays in that
execution's outbox until the daemon acknowledges it. While the daemon is away the
agents keep working; past MAX_BUFFERED_EVENTS they pause (nothing is dropped). The
worker reconnects with exponential backoff and jitter, says Hello with its in-flight
executions, and sends again everything not yet acknowledged. Text deltas that pile
up while the stream is backed up are coalesced into one event.
"""
import logging
import os
import random
import socket
import sys
import threading
import time
import uuid

import grpc

import daemon_client
import stigmer_pb2 as pb
import stigmer_pb2_grpc as pb_grpc
from runner import stigmer_secrets

log = logging.getLogger("stigmer.worker")

BATCH_EVENTS = 500  # most events per EventBatch message
BATCH_BYTES = 4 << 20  # most serialized bytes per EventBatch (the daemon takes up to 16 MiB)
BATCH_LINGER = 0.005  # seconds the sender waits after a wake-up so that a burst travels as one batch
MAX_BUFFERED_EVENTS = 20_000  # unacknowledged events held before agents pause
MAX_PENDING_TEXT = 1_000_000  # characters of not-yet-sequenced text before text emitters pause too
HEARTBEAT_SECONDS = 5.0  # idle interval between heartbeats
BACKOFF_CAP = 5.0  # seconds, the longest wait between reconnect attempts
FLUSH_ON_STOP = 5.0  # seconds a stopping worker waits for its last events to be acknowledged
MODEL_KEY_VARS = tuple(var for p in stigmer_secrets.PROVIDERS.values()
                       for var in (p.env_var, *p.alt_env_vars))  # hidden from the agent's shell

SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")  # names holding one look secret
INHERIT_ALL = "*"  # in ExecutionSpec.secret_names: secret-looking variables reach the shell too (--inherit-env)
NOT_SECRET = ("STIGMER_SANDBOX_SECRETS",)  # settings whose names look secret but hold names, not values


def looks_secret(name):
    """True when a variable's NAME suggests it holds a secret (case-insensitive)."""
    return name not in NOT_SECRET and any(word in name.upper() for word in SECRET_WORDS)


def hidden_from_shell(environ, named, inherit=False):
    """The shell_env overrides that keep the model keys and, unless INHERIT, every secret-looking variable
    of ENVIRON out of the agent's shell; names in NAMED (--secret) pass."""
    hidden = set(MODEL_KEY_VARS) | (set() if inherit else {n for n in environ if looks_secret(n)})
    return {name: None for name in sorted(hidden) if name not in named}


def redacted_names(environ, named):
    """Every variable whose value is redacted from what the model and the log see: the model keys,
    the --secret names and every secret-looking variable present, passed to the shell or not."""
    names = [*MODEL_KEY_VARS, *named, *sorted(n for n in environ if looks_secret(n))]
    return [n for n in dict.fromkeys(names) if environ.get(n)]


class Cancelled(Exception):
    """An execution was cancelled before its agent started."""


class Outbox:
    """One execution's events, kept from emit until the daemon acknowledges them."""

    def __init__(self, execution_id, last_seq):
        self.execution_id = execution_id
        self.events = []  # unacknowledged events, in seq order
        self.acked = last_seq  # highest seq the daemon has confirmed
        self.sent = last_seq  # highest seq sent on the current stream
        self.next_seq = last_seq + 1
        self.pending_text = []  # text deltas not yet sequenced (coalesced when the stream lags)
        self.pending_chars = 0
        self.finished = False  # the terminal phase event has been emitted

    def sequence_text(self):
        """Turn pending text into one event; returns how many events were added."""
        if not self.pending_text:
            return 0
        self.append(text=pb.TextDelta(text="".join(self.pending_text)))
        self.pending_text.clear()
        self.pending_chars = 0
        return 1

    def append(self, **payload):
        """Give PAYLOAD the next seq and keep it until acknowledged."""
        self.events.append(pb.Event(execution_id=self.execution_id, seq=self.next_seq, time=time.time(), **payload))
        self.next_seq += 1

    def ack(self, seq):
        """Forget events up to SEQ; returns how many were freed."""
        if seq <= self.acked:
            return 0
        keep = [e for e in self.events if e.seq > seq]
        freed = len(self.events) - len(keep)
        self.events, self.acked = keep, seq
        self.sent = max(self.sent, seq)
        return freed


class Worker:
    """Holds the Connect stream and the executions it runs."""

    def __init__(self, endpoint, home, *, capacity=2, mode="local", model="", runner_id=None):
        self.endpoint, self.home, self.capacity, self.mode = endpoint, home, capacity, mode
        self.model = model
        self.runner_id = runner_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.cond = threading.Condition()
        self.outboxes = {}  # execution id -> Outbox
        self.agents = {}  # execution id -> Agent, while it runs
        self.cancels = set()  # executions cancelled before their agent existed
        self.buffered = 0  # unacknowledged events over all outboxes
        self.stopping = threading.Event()
        self.connected = False
        self._client = None
        self._client_lock = threading.Lock()
        self._client_ready = threading.Event()

    # ---- events from the agents ----

    def emit(self, execution_id, redactor, **payload):
        """Queue one event payload for EXECUTION_ID; waits while the buffer is full."""
        with self.cond:
            box = self.outboxes.get(execution_id)
            if box is None:  # the daemon refused or dropped this execution: nobody wants its events
                return
            if "text" in payload:
                text = redactor.feed(payload["text"].text)
                if text:
                    box.pending_text.append(text)
                    box.pending_chars += len(text)
                while box.pending_chars > MAX_PENDING_TEXT and not self.stopping.is_set():
                    self.cond.wait(0.5)
                    if self.outboxes.get(execution_id) is not box:
                        return  # dropped while we waited
            else:
                held = redactor.flush()
                if held:
                    box.pending_text.append(held)
                self.buffered += box.sequence_text()
                while self.buffered >= MAX_BUFFERED_EVENTS and not self.stopping.is_set():
                    self.cond.wait(0.5)  # the agent pauses here until acks free room
                    if self.outboxes.get(execution_id) is not box:
                        return  # dropped while we waited
                box.append(**payload)
                self.buffered += 1
                if "phase" in payload and payload["phase"].phase in (pb.COMPLETED, pb.FAILED, pb.CANCELLED):
                    box.finished = True
            self.cond.notify_all()

    def _unsent(self):
        """True when some event or text is waiting to be sent (called with the lock held)."""
        return any(b.pending_text or (b.events and b.events[-1].seq > b.sent) for b in self.outboxes.values())

    def _take_batch(self):
        """Unsent events, oldest executions first, at most BATCH_EVENTS and about BATCH_BYTES
        (called with the lock held)."""
        batch, size = [], 0
        for box in list(self.outboxes.values()):
            self.buffered += box.sequence_text()
            for event in box.events:
                if event.seq <= box.sent:
                    continue
                if len(batch) >= BATCH_EVENTS or (batch and size + event.ByteSize() > BATCH_BYTES):
                    return batch
                batch.append(event)
                size += event.ByteSize()
                box.sent = event.seq
        return batch

    # ---- the stream ----

    def _requests(self, session):
        """The runner's side of Connect: Hello, then batches and heartbeats until the session ends."""
        with self.cond:
            for box in self.outboxes.values():
                box.sent = box.acked  # send again everything not acknowledged
            in_flight = [pb.InFlight(execution_id=b.execution_id, last_seq=b.next_seq - 1) for b in self.outboxes.values()]
        yield pb.RunnerMessage(hello=pb.Hello(runner_id=self.runner_id, capacity=self.capacity, mode=self.mode,
                                              in_flight=in_flight))
        last = time.monotonic()
        while not session.is_set():
            with self.cond:
                if not self._unsent():
                    self.cond.wait(0.25)
                    woke = self._unsent()
                else:
                    woke = False
            if woke:  # let the rest of this burst (a turn's events) join the same batch
                time.sleep(BATCH_LINGER)
            with self.cond:
                if session.is_set():  # a newer stream owns the outboxes now
                    return
                batch = self._take_batch()
                free = self.capacity - len(self.agents)
            if batch:
                yield pb.RunnerMessage(events=pb.EventBatch(events=batch))
                last = time.monotonic()
            elif time.monotonic() - last > HEARTBEAT_SECONDS:
                yield pb.RunnerMessage(heartbeat=pb.Heartbeat(free_slots=free))
                last = time.monotonic()

    def _session(self):
        """One Connect stream, until it breaks or the worker stops."""
        token = daemon_client.read_token(self.home)
        channel = daemon_client.client_channel(self.endpoint)
        session = threading.Event()
        try:
            call = pb_grpc.DaemonStub(channel).Connect(self._requests(session), metadata=daemon_client.auth_metadata(token))
            def cancel_on_stop():  # lives as long as this session, not as long as the worker
                while not session.wait(0.25):
                    if self.stopping.is_set():
                        call.cancel()
                        return

            threading.Thread(target=cancel_on_stop, name="session-watch", daemon=True).start()
            for message in call:
                if not self.connected:
                    self.connected = True
                    log.info("connected to the daemon at %s as %s", self.endpoint, self.runner_id)
                self._handle(message)
        finally:
            session.set()
            with self.cond:
                self.cond.notify_all()
            channel.close()

    def _handle(self, message):
        kind = message.WhichOneof("msg")
        if kind == "assign":
            self._start(message.assign.execution)
        elif kind == "ack":
            with self.cond:
                box = self.outboxes.get(message.ack.execution_id)
                if box:
                    self.buffered -= box.ack(message.ack.seq)
                    if box.finished and not box.events and not box.pending_text:
                        del self.outboxes[box.execution_id]
                self.cond.notify_all()
        elif kind == "reject":
            reject = message.reject
            with self.cond:
                box = self.outboxes.get(reject.execution_id)
                if box and reject.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]:
                    self.buffered -= box.ack(reject.ack_seq)
                    box.sent = box.acked  # resend from the daemon's last contiguous seq
                elif box:
                    log.warning("daemon refused events for %s: %s", reject.execution_id, reject.message)
                    self._drop(reject.execution_id)
                self.cond.notify_all()
        elif kind == "cancel":
            execution_id = message.cancel.execution_id
            with self.cond:
                agent = self.agents.get(execution_id)
                box = self.outboxes.get(execution_id)
                if agent is not None:
                    log.info("cancelling %s", execution_id)
                    agent.cancel()
                elif box is not None and not box.finished:
                    self.cancels.add(execution_id)  # its agent is still being set up: cancel it on arrival
                elif box is None:
                    self._drop(execution_id)
                # else: it has finished and its last events are on their way; the daemon decides

    def _drop(self, execution_id):
        """Forget an execution the daemon no longer wants (called with the lock held)."""
        box = self.outboxes.pop(execution_id, None)
        if box:
            self.buffered -= len(box.events)
        agent = self.agents.get(execution_id)
        if agent is not None:
            agent.cancel()

    def run(self):
        """Connect, reconnecting with backoff and jitter, until stop()."""
        delay = 0.1
        down_since = None
        ever_connected = False
        while not self.stopping.is_set():
            try:
                self._session()
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and self.stopping.is_set():
                    break
                reason = f"{exc.code().name}: {exc.details()}"
            except daemon_client.DaemonError as exc:
                reason = str(exc)
            else:
                reason = "the daemon closed the stream"
            if self.connected:
                delay, down_since, ever_connected = 0.1, None, True
            if down_since is None:
                down_since = time.monotonic()
                if ever_connected:
                    log.warning("lost the daemon at %s (%s); agents keep running, events are buffered; "
                                "reconnecting", self.endpoint, reason)
                else:
                    log.warning("cannot reach the daemon at %s (%s); retrying", self.endpoint, reason)
            self.connected = False
            self.stopping.wait(min(BACKOFF_CAP, delay) * random.uniform(0.5, 1.0))
            delay = min(BACKOFF_CAP, delay * 2)

    # ---- executions ----

    def _start(self, execution):
        with self.cond:
            if execution.id in self.outboxes or execution.id in self.agents:
                return
            self.outboxes[execution.id] = Outbox(execution.id, execution.last_seq)
        thread = threading.Thread(target=self._run_execution, args=(execution,), name=execution.id, daemon=True)
        thread.start()

    def client(self):
        """The anthropic client, made once (imported lazily: it is slow to import)."""
        with self._client_lock:
            if self._client is None:
                import agent  # noqa: F401  (imports anthropic too)
                import anthropic
                self._client = anthropic.Anthropic()
                self._client_ready.set()
            return self._client

    def _run_execution(self, execution):
        import agent as agent_mod
        from sandbox import FilesystemSandbox, SandboxError

        spec = execution.spec
        named = [n for n in spec.secret_names if n != INHERIT_ALL]
        redactor = stigmer_secrets.Redactor({n: os.environ[n] for n in redacted_names(os.environ, named)})
        emit = lambda **payload: self.emit(execution.id, redactor, **payload)  # noqa: E731
        log.info("running %s in %s", execution.id, spec.workspace)
        phase, reason, final_text, turns = pb.FAILED, "", "", 0
        try:
            for name in named:
                if name not in os.environ:
                    emit(error=pb.Error(code="secret_missing", message=f"{name} was named with --secret but this "
                                        "worker's environment does not have it; the agent's shell runs without it"))
            if not os.path.isdir(spec.workspace):
                raise SandboxError(f"the workspace {spec.workspace} does not exist on this runner")
            shell_env = hidden_from_shell(os.environ, named, inherit=INHERIT_ALL in spec.secret_names)
            while not self._client_ready.wait(0.1):  # the SDK is still importing (serve() started that)
                if execution.id in self.cancels or self.stopping.is_set():
                    raise Cancelled()
                if not self._client_lock.locked():
                    self.client()
            the_agent = agent_mod.Agent(self.client(), FilesystemSandbox(spec.workspace), emit,
                                        model=spec.model or self.model, max_turns=spec.max_turns,
                                        max_tokens_total=spec.max_tokens_total, redactor=redactor, shell_env=shell_env)
            with self.cond:
                self.agents[execution.id] = the_agent
                if execution.id in self.cancels or execution.id not in self.outboxes:
                    the_agent.cancel()  # cancelled (or dropped) while it was being set up
            phase, reason, final_text = the_agent.run(spec.prompt, spec.workspace)
            turns = the_agent.turns
        except Cancelled:
            phase, reason = pb.CANCELLED, "cancelled by the user"
        except SandboxError as exc:
            reason = str(exc)
            emit(error=pb.Error(code="workspace", message=reason))
        except Exception as exc:  # a bug in the runner: report it on the execution, keep serving others
            log.exception("execution %s crashed", execution.id)
            reason = f"internal runner error: {type(exc).__name__}: {exc}"
            emit(error=pb.Error(code="internal", message=redactor.redact(reason)))
        finally:
            with self.cond:
                self.agents.pop(execution.id, None)
                self.cancels.discard(execution.id)
                alive = execution.id in self.outboxes
            if alive:
                emit(phase=pb.PhaseChange(phase=phase, reason=redactor.redact(reason), final_text=final_text,
                                          turns=turns))
            log.info("%s ended %s", execution.id, pb.Phase.Name(phase))

    def stop(self, flush=FLUSH_ON_STOP):
        """Cancel running agents, give their last events a moment to reach the daemon, then end."""
        with self.cond:
            agents = list(self.agents.values())
        for agent in agents:
            agent.cancel()
        deadline = time.monotonic() + flush
        with self.cond:
            while (self.agents or self.buffered) and self.connected and time.monotonic() < deadline:
                self.cond.wait(0.1)
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()


def serve(endpoint, home, *, capacity, mode, model, exit_with_stdin=False):
    """Run a worker in the foreground until SIGTERM, SIGINT or (optionally) EOF on stdin; returns an exit code."""
    import signal

    from sandbox import kill_all

    worker = Worker(endpoint, home, capacity=capacity, mode=mode, model=model)
    # The SDK takes seconds to import: load it while we connect, not when the first task arrives.
    threading.Thread(target=worker.client, name="import-anthropic", daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if exit_with_stdin:  # the CLI that spawned us holds our stdin; EOF means it is gone
        threading.Thread(target=lambda: (sys.stdin.buffer.read(), stop.set()), daemon=True).start()
    thread = threading.Thread(target=worker.run, name="connect", daemon=True)
    thread.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        worker.stop()
        thread.join(timeout=2)
        kill_all()
    return 0
