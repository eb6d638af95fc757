"""The Agent Runner: runs the executions a link hands it and keeps their events until the log stores them.

    python runner.py worker                  # foreground, against STIGMER_BACKEND_ENDPOINT
    python runner.py worker --capacity 4

    link = daemon_client.DaemonLink(endpoint, home)
    w = Worker(capacity=2, history=link.history)   # knows nothing of gRPC, Redis or Daytona
    serve(w, link)
    w = Worker(make_sandbox=make, sweep=sweep)  # sandboxes elsewhere: see sandbox_factory

Every event an agent emits gets the next seq of its execution and stays in that
execution's outbox until the log acknowledges it. While the log is away the agents
keep working; past MAX_BUFFERED_EVENTS they pause (nothing is dropped). A link (the
daemon's Connect stream, or Redis) calls the worker's public methods: `assigned`,
`cancel_requested`, `acked`, `refused`, `next_batch`, `rewind` (after a reconnect:
everything not yet acknowledged goes again), `free_slots`. Text deltas that pile up
while the link is backed up are coalesced into one event.

Where the agent's tools run is the make_sandbox(execution, env) the worker was given
(env: the values of the execution's --secret names). The default is the host, in
spec.workspace. A remote sandbox (one with an `id`, such as a DaytonaSandbox) is made when
the execution starts (a "sandbox" artifact event says which, and how long it took), and
when it ends, however it ends, its workspace's git diff becomes a "patch" artifact event and
the sandbox is deleted (unless spec.keep_sandbox). sweep(), when given, deletes leftover
sandboxes of executions that have ended: serve() runs it at start and every SWEEP_EVERY s.

An execution that continues another (spec.parent_id: `runner.py resume`) starts from the
conversation in its ancestors' events, which the worker reads through `history(execution_id)
-> (pb.Execution, [pb.Event])`, a function the link provides (DaemonLink.history, RedisLink.history).
"""
import importlib
import logging
import os
import posixpath
import socket
import sys
import threading
import time
import uuid

import approvals
import models
import skills as skills_mod
import stigmer_pb2 as pb
from contract import TERMINAL_PHASES, WARM_WORD
from mcp_tools import McpError

log = logging.getLogger("stigmer.worker")

BATCH_EVENTS = 500  # most events per batch
BATCH_BYTES = 4 << 20  # most serialized bytes per batch (the daemon takes up to 16 MiB per message)
BATCH_LINGER = 0.005  # seconds next_batch waits after a wake-up so that a burst travels as one batch
MAX_BUFFERED_EVENTS = 20_000  # unacknowledged events held before agents pause
MAX_PENDING_TEXT = 1_000_000  # characters of not-yet-sequenced text before text emitters pause too
FLUSH_ON_STOP = 5.0  # seconds a stopping worker waits for its last events to be acknowledged
FULL_BACKOFF = (0.5, 5.0)  # seconds before resending events the log refused for a full disk: first, longest
LOG_FULL_PATIENCE = 60.0  # seconds of a full log before the worker ends the execution FAILED (events still kept)
CLEANUP_ON_STOP = 8.0  # seconds a stopping worker then waits for executions to delete their sandboxes
STOP_LIMIT = FLUSH_ON_STOP + CLEANUP_ON_STOP + 5.0  # seconds after which a stopping worker exits anyway
PATCH_MAX_BYTES = 512_000  # most bytes of a patch artifact: whole files are left out to fit, and named
SWEEP_EVERY = 600.0  # seconds between sweeps of leftover sandboxes
WARM_CUT_OFF = 5.0  # seconds a warm worker stays without its daemon (gone: it idled out or was stopped)
WARM_GRACE = 1.0  # seconds a warm worker leaving waits for a run that picked it just before
MAX_CHAIN = 1000  # most ancestors a resumed conversation may have
SKILLS_DIR = ".agents/skills"  # in a remote sandbox, under its user's home: where an execution's skills are put
MAX_EVENT_BYTES = 4 << 20  # the largest event payload sent: longer strings are cut to fit, and say so

class Cancelled(Exception):
    """An execution was cancelled before its agent started."""


class SecretRefused(Exception):
    """An execution named a provider key or `*` among its secrets that this worker was not started with."""


class HistoryError(Exception):
    """The conversation an execution continues could not be read from the log."""


class AgentUnsupported(Exception):
    """The execution's agent uses what this runner cannot honour (a newer CLI submitted it)."""


def agent_settings(spec):
    """The non-secret variables SPEC's agent declares, with the values the run got: for the agent's shell.
    (Its secrets come like --secret's: their names are in spec.secret_names, their values in our environment.)"""
    return {name: v.value for name, v in sorted(spec.agent.env_spec.data.items()) if not v.is_secret}


def check_agent(spec):
    """Raise AgentUnsupported when SPEC's agent uses fields this runner cannot honour yet."""
    import agents
    try:
        agents.check_supported(spec.agent)
    except agents.AgentError as exc:
        raise AgentUnsupported(str(exc)) from None


def new_runner_id():
    """A runner id unique to this process: host, pid and a random tail."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def host_sandbox(execution, env, default_mode="full-access", hide=()):
    """The local default: the agent works in spec.workspace on this host, whose environment already holds env,
    its commands confined as spec.sandbox_mode says (DEFAULT_MODE when the spec does not), the network theirs
    only with spec.network, the paths in HIDE out of their sight. Where commands cannot be confined, a
    confined execution fails with the reason and the fix; it never runs unconfined."""
    from sandbox import CONFINED_MODES, EXECUTION_MARKER, FilesystemSandbox, SandboxError, confinement_problem
    spec = execution.spec
    if not os.path.isdir(spec.workspace):
        raise SandboxError(f"the workspace {spec.workspace} does not exist on this runner")
    mode = spec.sandbox_mode or default_mode
    problem = confinement_problem() if mode in CONFINED_MODES else None
    if problem:
        raise SandboxError(f"{problem} (on runner {socket.gethostname()}); or run it unconfined with "
                           "--sandbox-mode full-access")
    # The marker names the execution in its commands' environment (sandbox.kill_marked finds them by it). Skill
    # folders outside the workspace stay readable (and read-only) for its commands, even under a hidden path.
    root = os.path.realpath(spec.workspace).rstrip("/") + "/"
    skill_dirs = [os.path.realpath(s.folder) for s in spec.skills
                  if not (os.path.realpath(s.folder) + "/").startswith(root)]
    return FilesystemSandbox(spec.workspace, env={EXECUTION_MARKER: execution.id}, mode=mode, network=spec.network,
                             hide=hide, read_only=skill_dirs)


def confined_host_sandbox(default_mode, hide):
    """make_sandbox for a worker process: host_sandbox with runner.Config's DEFAULT_MODE and HIDE."""
    return lambda execution, env: host_sandbox(execution, env, default_mode, hide)


def sandbox_factory(cfg, runner_id, is_terminal):
    """(make_sandbox, sweep) for worker.Worker from STIGMER_SANDBOX: the host (sweep None), or one Daytona
    sandbox per execution, labelled with RUNNER_ID; sweep deletes those whose executions IS_TERMINAL(id)
    says have ended (an id the log does not know is not terminal: it may be another home's)."""
    if cfg.sandbox != "daytona":  # a Daytona sandbox is isolated already: the spec's sandbox mode changes nothing there
        return confined_host_sandbox(cfg.sandbox_mode or "workspace-write", cfg.sandbox_hide), None
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


def patch_artifact(patch, redactor):
    """The artifact event payload of a sandbox's Patch, its text redacted."""
    text = redactor.redact(patch.text)
    notes = []
    if not patch.text:
        notes.append("no changes")
    if patch.binary_files:
        notes.append(f"binary files changed, not included: {', '.join(patch.binary_files)}")
    if patch.truncated:
        notes.append(f"capped at {PATCH_MAX_BYTES} bytes of {patch.size}; left out: {', '.join(patch.omitted_files)}")
    if text != patch.text:
        notes.append("secret values in it were replaced with [REDACTED:NAME]: those lines will not apply as they were")
    return pb.Artifact(type="patch", name="change.patch", text=text, size=patch.size, truncated=patch.truncated,
                       notes=redactor.redact("; ".join(notes)))


GIT_TIMEOUT = 60.0  # seconds a git command of the host patch may take


def _git(workspace, index, environ, *args):
    """git ARGS in WORKSPACE with the private index file INDEX and ENVIRON's PATH and HOME (no secret); its
    stdout, or None when git fails (or is absent)."""
    import subprocess
    env = {k: environ[k] for k in ("PATH", "HOME") if environ.get(k)}
    env.update(GIT_INDEX_FILE=index, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
    try:
        done = subprocess.run(["git", "-c", "core.quotepath=off", *args], cwd=workspace, env=env,
                              capture_output=True, timeout=GIT_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def workspace_tree(workspace, environ):
    """The git tree of WORKSPACE as it is now (tracked and new files, .gitignore respected), written through a
    private index so that the user's index, refs and files stay as they are; None when WORKSPACE is not in a
    git checkout. Two of them give what a run changed: host_patch."""
    import tempfile
    fd, index = tempfile.mkstemp(prefix="stigmer-index-")
    os.close(fd)
    os.unlink(index)  # git makes it; an empty file is not an index
    try:
        if _git(workspace, index, environ, "rev-parse", "--is-inside-work-tree") is None:
            return None
        base = (_git(workspace, index, environ, "rev-parse", "--verify", "-q", "HEAD") or "").strip() or \
            (_git(workspace, index, environ, "hash-object", "-t", "tree", "/dev/null") or "").strip()
        if not base or _git(workspace, index, environ, "read-tree", base) is None or \
                _git(workspace, index, environ, "add", "-A", ".") is None:
            return None
        tree = _git(workspace, index, environ, "write-tree")
        return tree.strip() if tree else None
    finally:
        if os.path.exists(index):
            os.unlink(index)


def host_patch(workspace, before, max_bytes, environ):
    """The Patch of what changed in WORKSPACE since the tree BEFORE (workspace_tree), binary files named and the
    text capped at MAX_BYTES as a Daytona sandbox's; None when it cannot be taken."""
    import daytona_sandbox
    after = workspace_tree(workspace, environ)
    if after is None:
        return None
    text = _git(workspace, os.devnull, environ, "diff", "--no-color", "--no-ext-diff", "--no-renames", before, after)
    return None if text is None else daytona_sandbox._cap_patch(text, max_bytes)


def redact_payload(message, redactor):
    """Every string of the event payload MESSAGE (nested messages and repeated fields too) through REDACTOR,
    in place: the one place where what leaves the worker is redacted. A tool call's input is redacted as the
    JSON it is (Redactor.redact_json), so a secret holding `"` or a backslash is found although JSON escapes it.
    Returns how many characters its strings hold (to tell whether it may be over MAX_EVENT_BYTES)."""
    chars = 0
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            if field.is_repeated:
                value[:] = [redactor.redact(v) for v in value]
                chars += sum(map(len, value))
                continue
            redacted = redactor.redact_json(value) if field.name == "input_json" else redactor.redact(value)
            if redacted is not value:
                setattr(message, field.name, redacted)
            chars += len(redacted)
        elif field.type == field.TYPE_MESSAGE:
            for item in (value if field.is_repeated else (value,)):
                chars += redact_payload(item, redactor)
    return chars


def cap_payload(message, limit=MAX_EVENT_BYTES):
    """Cut the longest strings of the event payload MESSAGE (its own fields) until it holds at most LIMIT bytes,
    each cut one ending with a note saying so: one oversized field never makes an event the log cannot take."""
    while message.ByteSize() > limit:
        strings = [(len(v.encode()), f.name) for f, v in message.ListFields()
                   if f.type == f.TYPE_STRING and not f.is_repeated]
        if not strings:
            return
        size, name = max(strings)
        note = f"\n[cut here: {size} bytes, over the {limit >> 20} MiB an event holds]"
        keep = max(0, size - (message.ByteSize() - limit) - len(note) - 16)
        setattr(message, name, getattr(message, name).encode()[:keep].decode(errors="ignore") + note)


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
        self.full_since = None  # time.monotonic() of the first refusal for a full disk in this outage
        self.hold_until = 0.0  # time.monotonic() before which nothing is sent (backing off a full disk)
        self.backoff = FULL_BACKOFF[0]

    def held(self, now):
        """True while sending is paused for a full disk."""
        return self.hold_until > now

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
    """The executions this runner runs and their outboxes; a link feeds it and drains it."""

    def __init__(self, *, capacity=2, mode="local", model="", runner_id=None, pinned=False, make_sandbox=host_sandbox,
                 sweep=None, sandbox="filesystem", history=None, context_window=0, environ=None, allowed_secrets=(),
                 also_secret=None, log_dir=None):
        self.capacity, self.mode, self.model = capacity, mode, model
        # The worker's whole environment (runner.Config.environ plus the gathered key): keys and base URLs for
        # the models, what an execution's shell may be given. Never os.environ, which holds no secret here.
        self.environ = {} if environ is None else environ
        self.pinned = pinned  # a private runner: the log gives it only executions pinned to runner_id
        # The --secret names (and `*` for --inherit-env) the user gave when starting this worker: the only
        # provider keys an execution may pass to its shell, and whether it may pass every variable.
        self.allowed_secrets = frozenset(allowed_secrets)
        # () -> {name: value} of more secrets to redact, read when an execution starts: the daemon's token,
        # which a command in full-access can read from STIGMER_HOME.
        self.also_secret = also_secret
        self.log_dir = log_dir  # where an execution's MCP servers write their stderr (STIGMER_HOME/logs)
        self.log_full_patience = LOG_FULL_PATIENCE
        self.abandoned = {}  # execution id -> why this worker ends it FAILED (the log stayed full)
        self.sandbox = sandbox  # what make_sandbox makes: "filesystem" or "daytona" (checked against spec.sandbox)
        self.runner_id = runner_id or new_runner_id()
        self.make_sandbox = make_sandbox  # (execution, env) -> a sandbox; raises SandboxError or SandboxUnavailable
        self.sweep = sweep  # () -> ids of leftover sandboxes it deleted, or None
        self.active = set()  # executions whose thread runs: setting up, running or cleaning up
        self.history = history  # execution id -> (pb.Execution, its events): the link's; None: no resuming
        self.context_window = context_window  # tokens; 0: the model's, from models.context_window
        self.cond = threading.Condition()
        self.outboxes = {}  # execution id -> Outbox
        self.agents = {}  # execution id -> Agent, while it runs
        self.gates = {}  # execution id -> approvals.Gate, while it runs
        self.cancels = set()  # executions cancelled before their agent existed
        self.buffered = 0  # unacknowledged events over all outboxes
        self.stopping = threading.Event()  # set by stop(): the link ends its session
        self.connected = False  # set by the link: True while a session with the log is up
        self._sdk_lock = threading.Lock()
        self._sdk_ready = threading.Event()
        self._preloading = False  # start_preload has started preload's thread

    # ---- events from the agents ----

    def emit(self, execution_id, redactor, **payload):
        """Queue one event payload for EXECUTION_ID, redacted by REDACTOR (text deltas as a stream, every other
        payload's strings here: the one redaction point of the events); waits while the buffer is full."""
        if "text" not in payload:
            for message in payload.values():
                if isinstance(message, (str, int)):
                    continue  # a sub-agent's tags (subagent, task_call_id, depth): names and ids, not payload
                if redact_payload(message, redactor) * 4 > MAX_EVENT_BYTES - 65536:  # UTF-8: 4 bytes a character
                    cap_payload(message)  # at most (plus the fields that are not strings)
        with self.cond:
            box = self.outboxes.get(execution_id)
            if box is None:  # the log refused or dropped this execution: nobody wants its events
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
                if "phase" in payload and payload["phase"].phase in TERMINAL_PHASES:
                    box.finished = True
            self.cond.notify_all()

    def _unsent(self):
        """True when some event or text is waiting to be sent (called with the lock held)."""
        now = time.monotonic()
        return any((b.pending_text or (b.events and b.events[-1].seq > b.sent)) and not b.held(now)
                   for b in self.outboxes.values())

    def _take_batch(self):
        """Unsent events, oldest executions first, at most BATCH_EVENTS and about BATCH_BYTES
        (called with the lock held)."""
        batch, size, now = [], 0, time.monotonic()
        for box in list(self.outboxes.values()):
            if box.held(now):
                continue
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

    # ---- what a link calls ----

    def next_batch(self, timeout, session=None):
        """Unsent events (oldest executions first), marked sent; waits up to TIMEOUT for some.
        SESSION: an Event the link sets when its stream ends; once set, nothing is taken,
        since the next session's rewind() owns the outboxes."""
        with self.cond:
            woke = False
            if not self._unsent():
                self.cond.wait(timeout)
                woke = self._unsent()
        if woke:  # let the rest of this burst (a turn's events) join the same batch
            time.sleep(BATCH_LINGER)
        with self.cond:
            if session is not None and session.is_set():
                return []
            return self._take_batch()

    def rewind(self):
        """After a reconnect: everything not acknowledged is unsent again; returns the in-flight list for Hello."""
        with self.cond:
            for box in self.outboxes.values():
                box.sent = box.acked
            return [pb.InFlight(execution_id=b.execution_id, last_seq=b.next_seq - 1) for b in self.outboxes.values()]

    def free_slots(self):
        """How many more executions this worker would take now."""
        with self.cond:
            return self.capacity - len(self.agents)

    def acked(self, execution_id, seq):
        """The log stored EXECUTION_ID's events up to SEQ."""
        with self.cond:
            box = self.outboxes.get(execution_id)
            if box:
                self.buffered -= box.ack(seq)
                if box.full_since is not None:
                    log.warning("the log stores %s's events again", execution_id)
                    box.full_since, box.hold_until, box.backoff = None, 0.0, FULL_BACKOFF[0]
                if box.finished and not box.events and not box.pending_text:
                    del self.outboxes[box.execution_id]
            self.cond.notify_all()

    def refused(self, execution_id, ack_seq, gap, message=""):
        """The log refused events: after a GAP it resends after ACK_SEQ; otherwise the execution is dropped."""
        with self.cond:
            box = self.outboxes.get(execution_id)
            if box and gap:
                self.buffered -= box.ack(ack_seq)
                box.sent = box.acked  # resend from the log's last contiguous seq
            elif box:
                log.warning("the log refused events for %s: %s", execution_id, message)
                self._drop(execution_id)
            self.cond.notify_all()

    def log_full(self, execution_id, ack_seq, message=""):
        """The log could not store events (disk full): keep them all, resend after a growing pause,
        and after log_full_patience end the execution FAILED (those events wait in the outbox too)."""
        with self.cond:
            box = self.outboxes.get(execution_id)
            if box is None:
                return
            self.buffered -= box.ack(ack_seq)
            box.sent = box.acked  # everything after the log's last stored seq goes again
            now = time.monotonic()
            if box.full_since is None:
                box.full_since = now
                log.warning("the log cannot store %s's events (%s); keeping them and retrying", execution_id, message)
            box.hold_until = now + box.backoff
            box.backoff = min(FULL_BACKOFF[1], box.backoff * 2)
            agent = self.agents.get(execution_id)
            if now - box.full_since >= self.log_full_patience and execution_id not in self.abandoned \
                    and not box.finished:
                self.abandoned[execution_id] = message or "the log is full"
                log.warning("ending %s: the log stayed full for %.0f s", execution_id, now - box.full_since)
                if agent is not None:
                    agent.cancel()
                else:
                    self.cancels.add(execution_id)
            self.cond.notify_all()

    def cancel_requested(self, execution_id):
        """Cancel EXECUTION_ID (or forget it, when this worker has nothing of it)."""
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
            # else: it has finished and its last events are on their way; the log decides

    def approval_answered(self, execution_id, approval):
        """A person answered one of EXECUTION_ID's approval requests (pb.Approval); the first answer counts."""
        with self.cond:
            gate = self.gates.get(execution_id)
        if gate is None or not gate.answer(approval):
            log.info("an answer to %s of %s came when nothing waited for it", approval.id, execution_id)

    def _drop(self, execution_id):
        """Forget an execution the log no longer wants (called with the lock held)."""
        box = self.outboxes.pop(execution_id, None)
        if box:
            self.buffered -= len(box.events)
        agent = self.agents.get(execution_id)
        if agent is not None:
            agent.cancel()

    # ---- executions ----

    def assigned(self, execution):
        """Run EXECUTION; its seq continues after execution.last_seq."""
        with self.cond:
            if execution.id in self.outboxes or execution.id in self.agents:
                return
            self.outboxes[execution.id] = Outbox(execution.id, execution.last_seq)
            self.active.add(execution.id)
        thread = threading.Thread(target=self._run_execution, args=(execution,), name=execution.id, daemon=True)
        thread.start()

    def start_preload(self, mcp=False):
        """Begin preload in the background (once: later calls do nothing); MCP: import the mcp SDK first (the run has
        MCP servers: its execution starts them as soon as that import is done, the model's SDK importing meanwhile)."""
        with self._sdk_lock:
            if self._preloading:
                return
            self._preloading = True

        def preload():
            if mcp:
                try:
                    importlib.import_module("mcp.client.stdio")
                except ImportError:
                    pass  # the execution says so, with the fix
            self.preload()
        threading.Thread(target=preload, name="import-model-sdk", daemon=True).start()

    def preload(self):
        """Import the model SDK once (it is slow to import) and make its client."""
        with self._sdk_lock:
            if not self._sdk_ready.is_set():
                models.preload(self.model, self.environ)
                self._sdk_ready.set()

    def _run_execution(self, execution):
        import agent as agent_mod
        import subagents
        from sandbox import SandboxError, SandboxUnavailable

        spec = execution.spec
        mod = models.project_secrets()
        key_vars = (*models.model_key_vars(), *mod.SERVICE_KEY_VARS)
        named = [n for n in spec.secret_names if n != mod.INHERIT_ALL]
        environ = self.environ  # Config.environ: the worker's whole environment, its secrets included
        redactor = mod.Redactor(mod.secret_values({**{n: environ[n] for n in mod.redacted_names(environ, named, key_vars)},
                                                   **(self.also_secret() if self.also_secret else {})}))
        emit = lambda **payload: self.emit(execution.id, redactor, **payload)  # noqa: E731
        log.info("running %s in %s", execution.id, spec.repo or spec.workspace)
        phase, reason, final_text, turns, box, service_down, hub = pb.FAILED, "", "", 0, None, False, None
        try:
            refused = mod.refused_secrets(spec.secret_names, key_vars, self.allowed_secrets)
            if refused:
                raise SecretRefused(
                    f"refused: this execution asks for {', '.join(refused)} in the agent's shell, which runner "
                    f"{self.runner_id} was not started with; a provider key, or every variable (--inherit-env), "
                    "reaches the shell only when the run that asks for it starts its runner (in the foreground)")
            for name in named:
                if name not in environ:
                    emit(error=pb.Error(code="secret_missing", message=f"{name} was named with --secret but this "
                                        "worker's environment does not have it; the agent's shell runs without it"))
            shell_env = mod.shell_environment(environ, named, key_vars, inherit=mod.INHERIT_ALL in spec.secret_names)
            if environ.get("SANDBOX_ROOT_DIR"):  # a warm worker's is its first run's: say this execution's
                shell_env["SANDBOX_ROOT_DIR"] = spec.workspace
            shell_env.update(agent_settings(spec))  # an agent's declared non-secret variables
            check_agent(spec)
            history = self.conversation(spec.parent_id) if spec.parent_id else []
            hub = self._mcp(execution, shell_env, emit)  # while the model's SDK may still be importing
            while not self._sdk_ready.wait(0.1):  # the SDK is still importing (serve() started that)
                if execution.id in self.cancels or self.stopping.is_set():
                    raise Cancelled()
                if not self._sdk_lock.locked():
                    self.preload()
            model_name = spec.model or self.model
            model = models.make_model(model_name, self.environ)
            if spec.agent.config.HasField("temperature"):
                model.temperature = spec.agent.config.temperature
            model.max_output_tokens = spec.agent.config.max_tokens
            if spec.sandbox and spec.sandbox != self.sandbox:
                raise SandboxError(f"this execution asked for a {spec.sandbox} sandbox, but runner {self.runner_id} "
                                   f"makes {self.sandbox} ones: start runners with STIGMER_SANDBOX={spec.sandbox} "
                                   "(python runner.py stop, then start), or run it with the same STIGMER_SANDBOX")
            box = self._open_sandbox(execution, emit)
            if not getattr(box, "id", None) and not spec.no_patch:  # the host: what the run changes is its patch
                box.patch_base = workspace_tree(spec.workspace, self.environ)
            offered = self._skills(execution, box)
            gate = approvals.Gate(spec.approval, emit, history=history, root=box.root)
            the_agent = agent_mod.Agent(model, box, emit, max_turns=spec.max_turns,
                                        max_tokens_total=spec.max_tokens_total, redactor=redactor, shell_env=shell_env,
                                        context_window=models.context_window(model_name, self.context_window),
                                        instructions=spec.agent.instructions, project_docs=spec.project_docs,
                                        team=subagents.Team(spec.agent.instructions, spec.agent.sub_agents),
                                        skills=skills_mod.Shelf(offered, box) if offered else None, mcp=hub,
                                        gate=gate)
            gate.cancelled = the_agent.cancelled.is_set
            with self.cond:
                self.agents[execution.id] = the_agent
                self.gates[execution.id] = gate
                if execution.id in self.cancels or execution.id not in self.outboxes:
                    the_agent.cancel()  # cancelled (or dropped) while it was being set up
            phase, reason, final_text = the_agent.run(spec.prompt, box.root, history)
            turns = the_agent.turns
        except Cancelled:
            phase, reason = pb.CANCELLED, "cancelled by the user"
        except SecretRefused as exc:
            reason = str(exc)
            emit(error=pb.Error(code="secret_refused", message=reason))
        except SandboxError as exc:
            reason = str(exc)
            emit(error=pb.Error(code="workspace", message=reason))
        except HistoryError as exc:
            reason = str(exc)
            emit(error=pb.Error(code="history", message=reason))
        except AgentUnsupported as exc:
            reason = str(exc)
            emit(error=pb.Error(code="agent", message=reason))
        except McpError as exc:
            reason = str(exc)
            emit(error=pb.Error(code="mcp", message=reason))
        except SandboxUnavailable as exc:  # the sandbox service: auth, quota, rate limit, unreachable, clone
            reason, service_down = str(exc), True
            emit(error=pb.Error(code=f"sandbox_{exc.code}", message=reason))
        except models.ModelError as exc:  # a model name that does not resolve
            reason = exc.message
            emit(error=pb.Error(code=exc.code, message=reason))
        except Exception as exc:  # a bug in the runner: report it on the execution, keep serving others
            log.exception("execution %s crashed", execution.id)
            reason = f"internal runner error: {type(exc).__name__}: {exc}"
            emit(error=pb.Error(code="internal", message=reason))
        finally:
            if hub is not None:
                hub.close()
            if box is not None:
                self._close_sandbox(execution, box, emit, redactor, take_patch=not service_down)
            with self.cond:
                self.agents.pop(execution.id, None)
                self.gates.pop(execution.id, None)
                self.cancels.discard(execution.id)
                alive = execution.id in self.outboxes
                abandoned = self.abandoned.pop(execution.id, None)
            if abandoned and alive:  # ended because the log stayed full, not by the user
                phase, reason = pb.FAILED, abandoned
                emit(error=pb.Error(code="disk_full", message=abandoned))
            if alive:
                emit(phase=pb.PhaseChange(phase=phase, reason=reason, final_text=final_text, turns=turns))
            with self.cond:
                self.active.discard(execution.id)
                self.cond.notify_all()
            log.info("%s ended %s", execution.id, pb.Phase.Name(phase))

    def conversation(self, execution_id):
        """The events of EXECUTION_ID and of its ancestors, oldest first, read through the link."""
        if self.history is None:
            raise HistoryError(f"this runner cannot read the log, so it cannot continue {execution_id}")
        chain, wanted = [], execution_id
        while wanted:
            if len(chain) >= MAX_CHAIN:
                raise HistoryError(f"the conversation of {execution_id} has more than {MAX_CHAIN} executions")
            try:
                parent, events = self.history(wanted)
            except Exception as exc:  # the link's error, whatever its transport: the message says what happened
                raise HistoryError(f"could not read the log of {wanted}, whose conversation this run "
                                   f"continues: {exc}") from None
            if parent.phase not in TERMINAL_PHASES:
                raise HistoryError(f"{wanted} has not ended ({pb.Phase.Name(parent.phase)}): a conversation "
                                   "continues from an execution that has ended")
            if not any(e.WhichOneof("payload") == "prompt" for e in events):
                raise HistoryError(f"{wanted} was recorded by an older stigmer, whose log does not hold the "
                                   "conversation (no prompt and turn events): it cannot be resumed; start a new run")
            chain.append(events)
            wanted = parent.spec.parent_id
        return [event for events in reversed(chain) for event in events]

    def _open_sandbox(self, execution, emit):
        """The execution's sandbox, from make_sandbox; a remote one is named in a "sandbox" artifact event.
        Raises Cancelled when the execution was cancelled (or the worker stopped) meanwhile."""
        env = {n: self.environ[n] for n in execution.spec.secret_names if n in self.environ}
        env.update(agent_settings(execution.spec))
        box = self.make_sandbox(execution, env)
        if getattr(box, "id", None):  # it lives elsewhere: say which, and how long it took to make
            where = f"a clone of {execution.spec.repo}" + (f" at {execution.spec.ref}" if execution.spec.ref else "") \
                if execution.spec.repo else "an empty workspace"
            emit(artifact=pb.Artifact(type="sandbox", name=box.id, created_in=box.created_in,
                                      notes=f"created in {box.created_in:.1f} s with {where} at {box.root}"))
        if execution.id in self.cancels or self.stopping.is_set():
            self._close_sandbox(execution, box, emit, None, take_patch=False)
            raise Cancelled()
        return box

    def _mcp(self, execution, shell_env, emit):
        """The execution's MCP servers, started (all at once, before the first model request), in a Hub whose tools
        the agent offers; None without servers. One "mcp" artifact event names them, their tools and versions.
        Raises McpError (the execution fails) for a server that does not start."""
        spec = execution.spec
        if not spec.mcp_servers:
            return None
        import mcp_tools
        import tempfile
        hub = mcp_tools.Hub(spec.mcp_servers, shell_env, spec.workspace, self.log_dir or tempfile.gettempdir(),
                            execution.id, remote=self.sandbox != "filesystem")
        cancelled = lambda: execution.id in self.cancels or self.stopping.is_set()  # noqa: E731
        try:
            hub.start(cancelled=cancelled)
        except McpError:
            if cancelled():
                raise Cancelled() from None
            raise
        emit(artifact=pb.Artifact(type="mcp", name=",".join(s.name for s in spec.mcp_servers), notes=hub.notes()))
        return hub

    def _skills(self, execution, box):
        """The execution's skills as its agent sees them: on the host where the CLI found them; in a remote
        sandbox uploaded first, each into SKILLS_DIR/NAME under the sandbox user's home (read-only there)."""
        spec = execution.spec
        if not spec.skills or not getattr(box, "id", None):
            return list(spec.skills)
        base = posixpath.join(posixpath.dirname(box.root), SKILLS_DIR)
        offered = []
        for skill in spec.skills:
            folder = posixpath.join(base, skill.name)
            box.upload(folder, [(f.path, f.data, f.executable) for f in skill.files])
            offered.append(pb.Skill(name=skill.name, description=skill.description,
                                    path=posixpath.join(folder, "SKILL.md"), folder=folder))
        return offered

    def _close_sandbox(self, execution, box, emit, redactor, take_patch=True):
        """At the end of an execution, however it ended: a remote sandbox's workspace patch becomes a "patch"
        artifact event, then the sandbox is deleted (kept, and said so, with spec.keep_sandbox)."""
        from sandbox import SandboxError, SandboxUnavailable
        if not getattr(box, "id", None):  # the host: its workspace holds the change; the log gets its patch too
            base = getattr(box, "patch_base", None)
            patch = host_patch(execution.spec.workspace, base, PATCH_MAX_BYTES, self.environ) if base and take_patch and \
                redactor is not None else None
            if patch is not None and patch.text + "".join(patch.binary_files):  # something changed
                emit(artifact=patch_artifact(patch, redactor))
            return
        if take_patch and redactor is not None:
            try:
                patch = box.patch(PATCH_MAX_BYTES)
                if patch is not None:  # None: the workspace is not a git checkout
                    emit(artifact=patch_artifact(patch, redactor))
            except (SandboxError, SandboxUnavailable) as exc:
                emit(error=pb.Error(code="patch", message=f"could not take the workspace's patch: {exc}"))
        if execution.spec.keep_sandbox:
            emit(artifact=pb.Artifact(type="sandbox", name=box.id, notes="kept running for inspection "
                                      "(--keep-sandbox): delete it when you are done"))
            return
        try:
            box.delete()
        except SandboxUnavailable as exc:  # auto-delete and the next sweep are the backstops
            log.warning("could not delete sandbox %s of %s: %s", box.id, execution.id, exc)

    def sweep_sandboxes(self):
        """Delete leftover sandboxes of executions that have ended, now and every SWEEP_EVERY seconds,
        until the worker stops (run on a thread by serve())."""
        from sandbox import SandboxUnavailable
        while self.sweep is not None:
            try:
                deleted = self.sweep()
                if deleted:
                    log.info("deleted %d leftover sandbox(es) of ended executions: %s", len(deleted),
                             ", ".join(deleted))
            except SandboxUnavailable as exc:
                log.warning("could not sweep leftover sandboxes: %s", exc)
            if self.stopping.wait(SWEEP_EVERY):
                return

    def stop(self, flush=FLUSH_ON_STOP):
        """Cancel running agents (and those still being set up), give their last events a moment to reach
        the log (while the link is connected), set stopping so that the link ends, then give executions
        up to CLEANUP_ON_STOP seconds to end and delete their sandboxes."""
        with self.cond:
            agents = list(self.agents.values())
            self.cancels.update(self.active.difference(self.agents))
        for agent in agents:
            agent.cancel()
        deadline = time.monotonic() + flush
        with self.cond:
            while (self.active or self.buffered) and self.connected and time.monotonic() < deadline:
                self.cond.wait(0.1)
        self.stopping.set()
        deadline = time.monotonic() + CLEANUP_ON_STOP
        with self.cond:
            self.cond.notify_all()
            while self.active and time.monotonic() < deadline:
                self.cond.wait(0.1)


def _stuck_on_stop():
    """A stopping worker's clean-up has overrun its bounds: log every thread's stack, kill the commands, exit."""
    import faulthandler

    from sandbox import kill_all

    log.error("stopping took over %.0f s; exiting without finishing the clean-up (stacks follow)", STOP_LIMIT)
    faulthandler.dump_traceback(all_threads=True)
    kill_all()
    os._exit(1)


def stay_warm(worker, period, mark, stop, cut_off=WARM_CUT_OFF, grace=WARM_GRACE):
    """A foreground run's worker after its run: it waits for the next run of the same daemon, which pins it by
    runner id. MARK("idle"/"busy") keeps its pid file saying whether it is free; it returns (and the worker stops)
    once it has been idle for PERIOD seconds or cut off from the log for CUT_OFF (the daemon is gone), or when
    STOP is set. Before leaving it takes its pid file away and waits GRACE seconds for a run that picked it just
    before, which it then serves to its end."""
    state, idle_since, away_since = None, time.monotonic(), None
    with worker.cond:
        while not stop.is_set():
            busy, now = bool(worker.active), time.monotonic()
            if state != ("busy" if busy else "idle"):
                state = "busy" if busy else "idle"
                try:
                    mark(state)
                except OSError:
                    log.warning("cannot write the warm worker's pid file; exiting", exc_info=True)
                    break
            if busy:
                idle_since = now
            away_since = None if worker.connected else away_since or now
            if not busy and (now - idle_since >= period or (away_since and now - away_since >= cut_off)):
                break
            worker.cond.wait(0.5)
        mark(None)
        deadline = time.monotonic() + grace
        while not stop.is_set() and (worker.active or time.monotonic() < deadline):
            worker.cond.wait(0.2)


def serve(worker, link, *, exit_with_stdin=False, warm_for=0.0, mark=None):
    """Run WORKER over LINK in the foreground until SIGTERM, SIGINT or (optionally) EOF on stdin;
    returns an exit code. LINK is anything with run(worker) that returns once worker.stopping is set.
    With WARM_FOR and MARK, a stdin that said WARM_WORD before its EOF keeps the worker (see stay_warm)."""
    import faulthandler
    import signal

    from sandbox import kill_all

    worker.start_preload()  # the SDK takes seconds to import: load it while we connect, not at the first task
    if worker.sweep is not None:
        threading.Thread(target=worker.sweep_sandboxes, name="sweep-sandboxes", daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if exit_with_stdin:  # the CLI that spawned us holds our stdin; EOF means it is gone

        def until_eof():
            if sys.stdin.buffer.read() == WARM_WORD and warm_for > 0 and mark is not None:
                stay_warm(worker, warm_for, mark, stop)  # its run ended well: stay for the next one a while
            stop.set()
        threading.Thread(target=until_eof, name="stdin", daemon=True).start()
    thread = threading.Thread(target=link.run, args=(worker,), name="link", daemon=True)
    thread.start()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to the log
    try:
        while not stop.wait(0.5):
            pass
    finally:
        # Clean-up is bounded (FLUSH_ON_STOP, CLEANUP_ON_STOP, the link's join): should a step still block,
        # the worker says where and exits anyway, so that a stopped worker never lingers.
        watchdog = threading.Timer(STOP_LIMIT, _stuck_on_stop)
        watchdog.daemon = True
        watchdog.start()
        worker.stop()
        thread.join(timeout=2)
        kill_all()
        watchdog.cancel()
    return 0
