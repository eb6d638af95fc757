"""The Stigmer Daemon: the execution queue, the durable SQLite event log, Watch fan-out,
token auth and runner sessions, behind the gRPC service in stigmer.proto.

    python daemon.py                              # listen on $STIGMER_BACKEND_ENDPOINT (localhost:50051)
    python daemon.py --endpoint 127.0.0.1:50052   # another port
    STIGMER_HOME=/tmp/st python daemon.py         # keep stigmer.db and daemon.token elsewhere

Usually started for you by `python runner.py start` or `python runner.py daemon`.

Threads: the gRPC server runs one pool thread per active RPC, so every open Watch and
Connect stream holds one (a Connect stream also has a reader thread of its own). Writes
to SQLite go through one connection under the daemon lock; each Watch reads the log
through its own connection, so a stalled watcher only ever blocks its own thread. The SQL (schema,
migrations, queries, row conversions) lives in store.py. Watch sends the log's stored bytes as they are,
and WatchBatches EventBatches spliced together from them (batch_bytes; daemon_server.add_service registers
both without re-serializing). Listening, the token and the home's lock are in daemon_server.py.
"""
import contextlib
import os
import queue
import sqlite3
import sys
import threading
import time
import traceback
from itertools import chain
from operator import itemgetter

import grpc

import stigmer_pb2 as pb
import stigmer_pb2_grpc as pb_grpc
import approvals
import store
from contract import LIST_PAGE_BYTES, TERMINAL_PHASES, VERSION, parent_problem, prompt_problem

LIST_DEFAULT, LIST_MAX = 50, 1000  # List's page size when the request says 0, and its cap
WATCH_PAGE = 1000  # events read from SQLite per query by a watcher
WATCH_BATCH_EVENTS = 500  # most events per WatchBatches message
WATCH_BATCH_BYTES = 1 << 20  # most event bytes per WatchBatches message (one bigger event travels alone)
EVENT_TAG = b"\x0a"  # EventBatch field 1, length-delimited: (1 << 3) | 2
DB_FILE = "stigmer.db"  # inside $STIGMER_HOME
FULL_RETRY = 2.0  # seconds between retries of a daemon write (runner lost, cancel expired) that found the disk full

RUNNER_PHASES = TERMINAL_PHASES + (pb.RUNNING,)  # a runner may report RUNNING (with turns) and the terminal phases
Code = grpc.StatusCode

def _payloads(rows):
    """The stored event bytes of (payload, seq, kind) rows."""
    return map(itemgetter(0), rows)


def _copy(ex):
    new = pb.Execution()
    new.CopyFrom(ex)
    return new


def _finish(ex, change):
    """Apply a terminal PhaseChange to an execution."""
    ex.phase = change.phase
    ex.finished_at = time.time()
    ex.error = change.reason
    ex.final_text = change.final_text
    if change.turns:
        ex.turns = change.turns


def _spec_problem(spec):
    """Why a spec cannot run, or None."""
    if not spec.prompt.strip():
        return "spec.prompt is empty: say what the agent should do"
    if prompt_problem(spec.prompt):
        return prompt_problem(spec.prompt)
    if not spec.workspace:
        return "spec.workspace is missing: give the absolute path of the workspace directory"
    if not os.path.isabs(spec.workspace):
        return f"spec.workspace {spec.workspace!r} is relative: give an absolute path"
    if not os.path.isdir(spec.workspace):
        return f"spec.workspace {spec.workspace} is not an existing directory"
    if spec.max_turns < 0 or spec.max_tokens_total < 0:
        return "spec.max_turns and spec.max_tokens_total must not be negative"
    return None


def _reject(execution_id, code, message, ack_seq):
    return pb.DaemonMessage(reject=pb.Reject(execution_id=execution_id, code=code.value[0],
                                             message=message, ack_seq=ack_seq))


def _ack(execution_id, seq):
    return pb.DaemonMessage(ack=pb.Ack(execution_id=execution_id, seq=seq))


def _cancel_message(execution_id):
    return pb.DaemonMessage(cancel=pb.CancelExecution(execution_id=execution_id))


class Session:
    """One runner's Connect stream: what it holds and the queue of messages to send it."""

    def __init__(self, hello):
        self.runner_id, self.capacity, self.mode = hello.runner_id, hello.capacity, hello.mode
        self.pinned = hello.pinned  # a private runner: takes only executions pinned to it
        self.executions = set()  # ids of the RUNNING executions it holds
        self.outbox = queue.Queue()  # DaemonMessages, then None to end the stream
        self.last_seen = time.monotonic()
        self.closed = False
        self.error = None  # (StatusCode, message) when the daemon ends the stream over a problem

    def free_slots(self):
        return max(0, self.capacity - len(self.executions))

    def send(self, message):
        self.outbox.put(message)


class LogFull(Exception):
    """A write to the log failed because the disk is full; the message names STIGMER_HOME."""


def _is_full(error):
    """True when a sqlite3 error means the disk (or the database's quota) is full."""
    return (getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or "disk is full" in str(error) or "No space left" in str(error))


def say(message):
    """One line on the daemon's stderr (its log), which may itself sit on the full disk."""
    try:
        print(f"stigmer daemon: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass


class Daemon(pb_grpc.DaemonServicer):
    """The service. All state sits behind self._lock; watchers wait on per-execution conditions."""

    def __init__(self, db, db_path, runner_grace, cancel_grace, home=""):
        self._db, self._db_path = db, db_path
        self._home = home or os.path.dirname(db_path)
        self._full = False  # the last write failed with a full disk (logged once per outage)
        self._notices = {}  # execution id -> serialized seq-0 Events for its followers (disk full)
        self._noticed = {}  # execution id -> notice kinds sent in the current outage
        self._unstored = {}  # execution id -> the PhaseChange its runner ended it with, which the log refused
        self._waiting = {}  # execution id -> {approval request id: None}, in order: tool calls waiting for a person
        self._answered = {}  # execution id -> {request id: who answered}: the first answer counts
        self._watchers = 0  # open Watch streams
        self._last_call = time.monotonic()  # the latest RPC, for the idle check
        self._runner_grace, self._cancel_grace = runner_grace, cancel_grace
        self._lock = threading.Lock()
        self._active = {}  # id -> Execution, for PENDING and RUNNING; replaced, never mutated
        self._pending = {}  # ids of PENDING executions, oldest first (a dict keeps order)
        self._sessions = {}  # runner_id -> Session
        self._owner = {}  # execution id -> the Session holding it
        self._conds = {}  # execution id -> Condition(self._lock) that watchers wait on
        self._timers = {}  # ("lost" | "cancel", execution id) -> threading.Timer
        self._stopping = False
        self._started = time.time()
        for ex in store.active_executions(db):
            self._active[ex.id] = ex
            if ex.phase == pb.PENDING:
                self._pending[ex.id] = None
            else:  # its runner has `runner_grace` from now to reconnect and claim it
                self._schedule(("lost", ex.id), runner_grace, self._runner_lost)
        for execution_id in store.cancels_requested(db):
            self._schedule(("cancel", execution_id), cancel_grace, self._cancel_expired)  # sent again on Hello

    # ---- unary RPCs ----

    def Submit(self, request, context):
        problem = _spec_problem(request.spec)
        if problem:
            context.abort(Code.INVALID_ARGUMENT, problem)
        with self._lock:
            self._check_open(context)
            if request.spec.parent_id:  # resume: the conversation continues from an execution that has ended
                parent_id = request.spec.parent_id
                problem = parent_problem(parent_id, self._active.get(parent_id) or store.get_execution(self._db, parent_id))
                if problem:
                    context.abort(Code.FAILED_PRECONDITION, problem)
            ex = pb.Execution(id=self._new_id(), spec=request.spec, phase=pb.PENDING,
                              created_at=time.time())
            try:
                self._store(self._author(ex, phase=pb.PhaseChange(phase=pb.PENDING, model=ex.spec.model,
                                                                   agent=ex.spec.agent.name,
                                                                   sandbox_mode=ex.spec.sandbox_mode,
                                                                   network=ex.spec.network)), [ex])
            except LogFull as e:
                context.abort(Code.RESOURCE_EXHAUSTED, f"{e}; nothing was submitted")
            self._pending[ex.id] = None
            self._dispatch()
            return self._active.get(ex.id, ex)

    def Get(self, request, context):
        with self._lock, self._reading(context):
            self._check_open(context)
            return self._shown(self._find(request.execution_id, context))

    def _shown(self, ex):
        """EX as a client sees it: with the approvals it waits for; when its runner ended it but the log could not
        store that (a full disk), the phase it ended in, marked not_stored, until the log holds it (call with the
        lock held)."""
        if self._waiting.get(ex.id):
            ex = _copy(ex)
            ex.waiting_approvals = len(self._waiting[ex.id])
        change = self._unstored.get(ex.id)
        if change is None:
            return ex
        if ex.phase in TERMINAL_PHASES:  # stored at last
            del self._unstored[ex.id]
            return ex
        ex = _copy(ex)
        ex.phase, ex.error, ex.turns, ex.not_stored = change.phase, change.reason, change.turns, True
        ex.final_text = change.final_text
        return ex

    def List(self, request, context):
        if request.limit < 0 or request.phase not in pb.Phase.values():
            context.abort(Code.INVALID_ARGUMENT, "limit must not be negative and phase must be a known Phase")
        limit = min(request.limit or LIST_DEFAULT, LIST_MAX)
        try:
            after = store.parse_page_token(request.page_token)
        except ValueError:
            context.abort(Code.INVALID_ARGUMENT, f"page_token {request.page_token!r} is not one List gave")
        with self._lock, self._reading(context):
            self._check_open(context)
            executions = [self._shown(ex) for ex in store.list_executions(self._db, request.phase, limit, after)]
        page, size = [], 0
        for ex in executions:  # a page stays well under the message limit, whatever the prompts hold
            size += ex.ByteSize()
            if page and size > LIST_PAGE_BYTES:
                return pb.ListResponse(executions=page, next_page_token=store.page_token(page[-1]))
            page.append(ex)
        return pb.ListResponse(executions=page)

    def Cancel(self, request, context):
        with self._lock:
            self._check_open(context)
            ex = self._find(request.execution_id, context)
            if ex.phase == pb.PENDING:
                ex = _copy(ex)
                change = pb.PhaseChange(phase=pb.CANCELLED, reason="cancelled before it started")
                rows = self._author(ex, phase=change)
                _finish(ex, change)
                try:
                    self._store(rows, [ex])
                except LogFull as e:
                    context.abort(Code.RESOURCE_EXHAUSTED, str(e))
            elif ex.phase == pb.RUNNING and ("cancel", ex.id) not in self._timers:
                # The runner confirms with a CANCELLED event; if it does not in time, we write it.
                try:
                    store.request_cancel(self._db, ex.id, time.time())
                except sqlite3.Error as e:  # a full disk: the cancel still goes out, unrecorded
                    if not _is_full(e):
                        raise
                    self._log_full()
                self._schedule(("cancel", ex.id), self._cancel_grace, self._cancel_expired)
                if ex.id in self._owner:
                    self._owner[ex.id].send(_cancel_message(ex.id))
            return ex

    def Approve(self, request, context):
        """Pass a person's answer to the runner of an execution waiting for it; the first answer counts."""
        with self._lock:
            self._check_open(context)
            ex = self._find(request.execution_id, context)
            if ex.phase == pb.RUNNING and ex.id not in self._waiting:  # a daemon started since: the log knows
                self._recall_approvals(ex.id)
            waiting = self._waiting.get(ex.id, {})
            answered = self._answered.get(ex.id, {})
            try:
                request_id = approvals.pick(ex.id, request.request_id, waiting, answered)
            except approvals.ApprovalError as e:
                context.abort(Code.FAILED_PRECONDITION, str(e))
            session = self._owner.get(ex.id)
            if session is None:
                context.abort(Code.FAILED_PRECONDITION, f"the runner of {ex.id} is not connected: answer once it "
                                                        "is back, or resume the execution later")
            approval = pb.Approval(id=request_id, approved=request.approved, reason=request.reason,
                                   always=request.always, by=request.by)
            answered[request_id] = approvals.answered_by(approval)
            self._answered[ex.id] = answered
            session.send(pb.DaemonMessage(approval=pb.ApprovalAnswer(execution_id=ex.id, approval=approval)))
            return pb.ApproveResponse(request_id=request_id)

    def _recall_approvals(self, execution_id):
        """Fill _waiting and _answered for EXECUTION_ID from its stored events (call with the lock held)."""
        waiting, answered = approvals.waiting_calls(store.approval_events(self._db, execution_id))
        self._waiting[execution_id], self._answered[execution_id] = waiting, answered

    def Status(self, request, context):
        with self._lock, self._reading(context):
            self._check_open(context)
            counts = store.count_by_phase(self._db)
            for execution_id, change in list(self._unstored.items()):  # ended, not stored yet: counted as ended
                active = self._active.get(execution_id)
                if active is None:  # gone from memory: its end was stored
                    del self._unstored[execution_id]
                    continue
                if self._shown(active).not_stored and counts.get(pb.RUNNING):
                    counts[pb.RUNNING] -= 1
                    counts[change.phase] = counts.get(change.phase, 0) + 1
            return pb.DaemonStatus(
                version=VERSION, pid=os.getpid(), uptime_seconds=time.time() - self._started,
                connected_runners=len(self._sessions), queue_depth=len(self._pending),
                executions_by_phase={pb.Phase.Name(phase): n for phase, n in counts.items() if n},
                free_capacity=sum(s.free_slots() for s in self._sessions.values() if not s.pinned))  # shared slots

    # ---- Watch ----

    def Watch(self, request, context):
        """Yields each event as the bytes stored in the log, which are a serialized Event: the
        service registers Watch with no response serializer (see add_service)."""
        self._check_watch(request, context)
        pages = self._watch(request.execution_id, request.after_seq, request.follow, context)
        return chain.from_iterable(map(_payloads, pages))

    def WatchBatches(self, request, context):
        """Yields serialized EventBatches built from the stored bytes (see batch_bytes): everything the
        log holds past the last batch sent, split at WATCH_BATCH_EVENTS events or WATCH_BATCH_BYTES."""
        self._check_watch(request, context)
        pages = self._watch(request.execution_id, request.after_seq, request.follow, context)
        return chain.from_iterable(batch_bytes(_payloads(rows)) for rows in pages)

    def _check_watch(self, request, context):
        with self._lock, self._reading(context):
            self._check_open(context)
            self._find(request.execution_id, context)
            self._watchers += 1
        if not context.add_callback(self._unwatch):
            self._unwatch()

    def _unwatch(self):
        with self._lock:
            self._watchers -= 1
            self._last_call = time.monotonic()

    def _watch(self, execution_id, after, follow, context):
        """Yield the stored events after `after` as pages of (payload, seq, kind) rows; with follow, wait
        for more until the terminal one. A page is whatever the log holds (up to WATCH_PAGE), so an idle
        log's next event goes out alone, at once. A terminal phase event is always an execution's last,
        so only each page's last row is looked at."""
        with self._reading(context):
            yield from self._watch_rows(execution_id, after, follow, context)

    def _watch_rows(self, execution_id, after, follow, context):
        """_watch's pages, its reads of the database unguarded (_watch turns their failure into one line)."""
        db = store.open_reader(self._db_path)
        seen = 0  # notices (seq 0, not in the log) already sent
        try:
            finished = False
            while context.is_active():
                if follow:
                    # Without the lock, which the writer holds through each commit: a watcher that waited
                    # for it on every page fell seconds behind a busy log. The list is only appended to
                    # (under the lock), so a slice of it is a consistent snapshot.
                    notices = self._notices.get(execution_id, ())[seen:]
                    for notice in notices:
                        seen += 1
                        yield [(notice, 0, "notice")]  # a page of its own: Watch and WatchBatches send it as is
                        if pb.Event.FromString(notice).phase.phase in TERMINAL_PHASES:
                            return  # the run ended, but its last events wait for disk space
                rows = store.events_after(db, execution_id, after, WATCH_PAGE)
                if rows:
                    yield rows
                    payload, after, kind = rows[-1]
                    if kind == "phase" and pb.Event.FromString(payload).phase.phase in TERMINAL_PHASES:
                        return
                    if len(rows) == WATCH_PAGE:
                        continue
                if not follow or finished:
                    return
                finished = self._wait_for_events(execution_id, after, context, seen)
                if finished is None:
                    if self._stopping and context.is_active():  # not a clean end: the log goes on
                        context.abort(Code.UNAVAILABLE, "the daemon is shutting down; watch again after "
                                                        f"seq {after} to resume")
                    return
        finally:
            db.close()

    def _wait_for_events(self, execution_id, after, context, seen=0):
        """Block until the execution has events past `after` or notices past `seen` (False) or
        has finished (True); None when the watch should end (client gone, daemon stopping)."""
        while context.is_active():  # checked outside our lock: grpc takes its own locks
            with self._lock:
                if self._stopping:
                    return None
                ex = self._active.get(execution_id)
                if ex is None or ex.last_seq > after or len(self._notices.get(execution_id, ())) > seen:
                    return ex is None
                cond = self._conds.setdefault(execution_id, threading.Condition(self._lock))
                cond.wait(1.0)  # the timeout only serves to notice a departed client
        return None

    # ---- Connect ----

    def Connect(self, request_iterator, context):
        try:
            first = next(request_iterator, None)
        except grpc.RpcError:  # the runner left before saying anything
            return iter(())
        if first is None or first.WhichOneof("msg") != "hello":
            context.abort(Code.FAILED_PRECONDITION, "send Hello first: a Connect stream must open with Hello")
        hello = first.hello
        if not hello.runner_id or hello.capacity < 0:
            context.abort(Code.INVALID_ARGUMENT, "Hello needs a runner_id and a capacity of 0 or more")
        session = Session(hello)
        if not context.add_callback(lambda: session.outbox.put(None)):
            return iter(())
        with self._lock:
            self._check_open(context)
            if hello.runner_id in self._sessions:  # a reconnect racing the old stream's end
                self._end_session(self._sessions[hello.runner_id])
            self._sessions[hello.runner_id] = session
            self._resume(session, hello.in_flight)
            self._dispatch()
        threading.Thread(target=self._read, args=(session, request_iterator), daemon=True,
                         name=f"stigmer-runner-{hello.runner_id}").start()
        return self._write(session, context)

    def _resume(self, session, in_flight):
        """Keep the executions a reconnecting runner still holds; tell it to drop the rest."""
        for item in in_flight:
            ex = self._active.get(item.execution_id)
            if (ex is None or ex.phase != pb.RUNNING or ex.runner_id != session.runner_id
                    or ex.id in self._owner):
                session.send(_cancel_message(item.execution_id))
                continue
            self._cancel_timer(("lost", ex.id))
            self._owner[ex.id] = session
            session.executions.add(ex.id)
            session.send(_ack(ex.id, ex.last_seq))  # it resends everything after this
            if ("cancel", ex.id) in self._timers:  # cancelled while it was away
                session.send(_cancel_message(ex.id))
        claimed = {item.execution_id for item in in_flight}
        for ex in list(self._active.values()):  # assigned to it, but the Assign was lost with the old stream
            if (ex.phase == pb.RUNNING and ex.runner_id == session.runner_id and ex.id not in claimed
                    and ex.id not in self._owner):
                self._cancel_timer(("lost", ex.id))
                self._owner[ex.id] = session
                session.executions.add(ex.id)
                session.send(pb.DaemonMessage(assign=pb.Assign(execution=ex)))
                if ("cancel", ex.id) in self._timers:  # cancelled while the Assign was lost
                    session.send(_cancel_message(ex.id))

    def _write(self, session, context):
        """The response stream: whatever lands in the session's outbox, until None. (The reader
        thread ends the session: its read fails or stops whenever the RPC ends.)"""
        while (message := session.outbox.get()) is not None:
            yield message
        if session.error:
            context.set_code(session.error[0])
            context.set_details(session.error[1])

    def _read(self, session, requests):
        """The runner's messages, on a thread of their own."""
        try:
            for message in requests:
                kind = message.WhichOneof("msg")
                session.last_seen = time.monotonic()
                if kind == "events":
                    self._store_batch(session, message.events)
                elif kind == "hello":
                    session.error = (Code.FAILED_PRECONDITION, "Hello may only be sent once per Connect stream")
                if session.closed or session.error:
                    break
        except grpc.RpcError:  # the runner went away; its executions get the grace period below
            pass
        except Exception as e:  # a daemon bug: end this stream loudly, keep the daemon up
            traceback.print_exc()
            session.error = (Code.INTERNAL, f"daemon error while handling runner {session.runner_id}: {e!r}")
        with self._lock:
            self._end_session(session)

    def _end_session(self, session):
        """Forget a stream; its RUNNING executions wait `runner_grace` for it to come back."""
        if session.closed:
            return
        session.closed = True
        if self._sessions.get(session.runner_id) is session:
            del self._sessions[session.runner_id]
        for execution_id in session.executions:
            if self._owner.get(execution_id) is session:
                del self._owner[execution_id]
                if not self._stopping:
                    self._schedule(("lost", execution_id), self._runner_grace, self._runner_lost)
        session.executions.clear()
        session.outbox.put(None)

    def _store_batch(self, session, batch):
        """Store a runner's EventBatch in one transaction, then Ack (and Reject) per execution."""
        groups = {}
        for event in batch.events:
            groups.setdefault(event.execution_id, []).append(event)
        replies, rows, changed, now = [], [], [], time.time()
        with self._lock:
            if self._stopping or session.closed:
                return
            for execution_id, events in groups.items():
                if self._owner.get(execution_id) is not session:
                    replies.append(_reject(execution_id, Code.PERMISSION_DENIED,
                                           f"execution {execution_id} is not running on runner "
                                           f"{session.runner_id}: stop sending events for it",
                                           self._stored_last_seq(execution_id)))
                    continue
                ex = _copy(self._active[execution_id])
                problem = self._take_events(ex, events, rows, now)
                if ex.last_seq != self._active[execution_id].last_seq:
                    changed.append(ex)
                replies.append(_ack(execution_id, ex.last_seq))
                if problem:
                    replies.append(_reject(execution_id, *problem, ex.last_seq))
            try:
                self._store(rows, changed)
            except LogFull as e:
                replies, changed = self._refuse_full(session, groups, str(e)), []
            for reply in replies:
                session.send(reply)
            if any(ex.phase in TERMINAL_PHASES for ex in changed):
                self._dispatch()

    def _refuse_full(self, session, groups, message):
        """Nothing of a batch was stored (disk full): Reject it all as RESOURCE_EXHAUSTED (the runner
        keeps the events and resends them later) and tell each execution's followers, once per outage."""
        replies = []
        for execution_id, events in groups.items():
            if self._owner.get(execution_id) is not session:
                continue
            replies.append(_reject(execution_id, Code.RESOURCE_EXHAUSTED, message,
                                   self._active[execution_id].last_seq))
            self._notice(execution_id, "error", error=pb.Error(code="disk_full", message=message))
            ended = [e.phase for e in events if e.WhichOneof("payload") == "phase" and e.phase.phase in TERMINAL_PHASES]
            if ended:
                self._unstored[execution_id] = ended[-1]  # Get, List and Status answer with it meanwhile
                self._notice(execution_id, "phase", phase=pb.PhaseChange(
                    phase=pb.FAILED, turns=ended[-1].turns,
                    reason=f"{message}; the run has ended ({pb.Phase.Name(ended[-1].phase)}) but its last "
                           "events are not stored yet"))
        return replies

    def _notice(self, execution_id, kind, **payload):
        """Send EXECUTION_ID's followers a seq-0 Event that is not in the log, once per kind per outage."""
        sent = self._noticed.setdefault(execution_id, set())
        if kind in sent:
            return
        sent.add(kind)
        event = pb.Event(execution_id=execution_id, seq=0, time=time.time(), **payload)
        self._notices.setdefault(execution_id, []).append(event.SerializeToString())
        cond = self._conds.get(execution_id)
        if cond:
            cond.notify_all()

    def _log_full(self):
        """Log the first failed write of an outage (one line), and remember the outage."""
        if not self._full:
            self._full = True
            say(f"disk full in STIGMER_HOME ({self._home}): writes to the log fail until space is freed; "
                 "reads go on, runners keep their events")

    def _full_message(self):
        return (f"disk full: the daemon cannot write to STIGMER_HOME ({self._home}); free some space there "
                "(runners keep their events and resend them)")

    def _take_events(self, ex, events, rows, now):
        """Append the next contiguous events to rows and apply them to ex (a copy); the problem, if any."""
        execution_id, last, ended = ex.id, ex.last_seq, ex.phase in TERMINAL_PHASES  # locals: this is the hot loop
        problem = None
        for event in events:
            seq = event.seq
            if seq <= last:
                continue  # a resend of a stored event
            if ended:
                problem = Code.PERMISSION_DENIED, f"execution {execution_id} already ended at seq {last}"
                break
            if seq != last + 1:
                problem = (Code.FAILED_PRECONDITION, f"seq gap for execution {execution_id}: got {seq}, "
                           f"expected {last + 1}; resend after {last}")
                break
            kind = event.WhichOneof("payload")
            if kind is None or (kind == "phase" and event.phase.phase not in RUNNER_PHASES):
                problem = (Code.INVALID_ARGUMENT, f"event {seq} of {execution_id} has no payload or a phase "
                           "a runner may not set (runners send RUNNING, COMPLETED, FAILED or CANCELLED)")
                break
            if kind == "usage":
                ex.usage.CopyFrom(event.usage)
            elif kind in ("approval_request", "approval", "tool_result"):  # the runner's answer is the one that counts
                approvals.track(event, self._waiting.setdefault(execution_id, {}),
                                self._answered.setdefault(execution_id, {}))
            elif kind == "phase":
                if event.phase.phase in TERMINAL_PHASES:
                    _finish(ex, event.phase)
                    self._waiting.pop(execution_id, None)
                    self._answered.pop(execution_id, None)
                    ended = True
                elif event.phase.turns:
                    ex.turns = event.phase.turns
            if not event.time:
                event.time = now
            rows.append((execution_id, seq, event.time, kind, event.SerializeToString()))  # as store.event_row
            last = seq
        ex.last_seq = last
        return problem

    # ---- state changes (the caller holds self._lock) ----

    def _store(self, rows, executions):
        """Write event rows and execution rows in one transaction, then update memory and wake watchers."""
        if not rows and not executions:
            return
        try:
            store.write(self._db, rows, executions)
        except sqlite3.Error as e:
            if not _is_full(e):
                raise
            self._log_full()
            raise LogFull(self._full_message()) from None
        if self._full:
            self._full = False
            say(f"space is back in STIGMER_HOME ({self._home}): writes to the log go on")
        for ex in executions:
            self._noticed.pop(ex.id, None)  # a later outage is news again
        for ex in executions:
            cond = self._conds.get(ex.id)
            if ex.phase not in TERMINAL_PHASES:
                self._active[ex.id] = ex
            else:
                self._active.pop(ex.id, None)
                self._pending.pop(ex.id, None)
                self._conds.pop(ex.id, None)
                self._notices.pop(ex.id, None)
                session = self._owner.pop(ex.id, None)
                if session:
                    session.executions.discard(ex.id)
                self._cancel_timer(("lost", ex.id))
                self._cancel_timer(("cancel", ex.id))
            if cond:
                cond.notify_all()

    def _author(self, ex, **payload):
        """The next event of ex, written by the daemon itself (advances ex.last_seq)."""
        ex.last_seq += 1
        return [store.event_row(pb.Event(execution_id=ex.id, seq=ex.last_seq, time=time.time(), **payload))]

    def _dispatch(self):
        """Assign PENDING executions, oldest first, to the runners with the most free slots."""
        for execution_id in list(self._pending):
            pin = self._active[execution_id].spec.runner_id
            if pin:  # only its own runner may take it
                session = self._sessions.get(pin)
            else:  # the shared runner with the most free slots; private runners take only their own
                session = max((s for s in self._sessions.values() if not s.pinned), key=Session.free_slots,
                              default=None)
            if session is None or session.free_slots() == 0:
                continue
            ex = _copy(self._active[execution_id])
            ex.phase, ex.runner_id = pb.RUNNING, session.runner_id
            ex.started_at = ex.started_at or time.time()
            try:
                self._store(self._author(ex, phase=pb.PhaseChange(phase=pb.RUNNING)), [ex])
            except LogFull:
                return  # it stays PENDING; the next dispatch tries again
            del self._pending[execution_id]
            self._owner[execution_id] = session
            session.executions.add(execution_id)
            session.send(pb.DaemonMessage(assign=pb.Assign(execution=ex)))

    def _runner_lost(self, execution_id):
        """Fail an execution whose runner did not come back in time."""
        ex = self._active.get(execution_id)
        if ex is None or ex.phase != pb.RUNNING or execution_id in self._owner:
            return
        ex = _copy(ex)
        message = (f"runner {ex.runner_id or '?'} lost: it did not reconnect with this execution "
                   f"within {self._runner_grace:g}s")
        code, reason = "runner_lost", "runner lost"
        if self._noticed.get(execution_id):  # its events were refused for a full disk, then it left
            code, reason = "disk_full", f"{self._full_message()}; {message}, and its last events were lost"
            message = reason
        change = pb.PhaseChange(phase=pb.FAILED, reason=reason, turns=ex.turns)
        rows = self._author(ex, error=pb.Error(code=code, message=message))
        rows += self._author(ex, phase=change)
        _finish(ex, change)
        self._store(rows, [ex])

    def _cancel_expired(self, execution_id):
        """Mark CANCELLED a running execution whose runner did not confirm the cancel in time."""
        ex = self._active.get(execution_id)
        if ex is None or ex.phase != pb.RUNNING:
            return
        ex = _copy(ex)
        change = pb.PhaseChange(phase=pb.CANCELLED, turns=ex.turns,
                                reason=f"cancelled (the runner did not confirm within {self._cancel_grace:g}s)")
        rows = self._author(ex, phase=change)
        _finish(ex, change)
        self._store(rows, [ex])
        self._dispatch()

    def _schedule(self, key, delay, action):
        self._cancel_timer(key)
        timer = threading.Timer(delay, self._fire, (key, action))
        timer.daemon = True
        self._timers[key] = timer
        timer.start()

    def _fire(self, key, action):
        with self._lock:
            if self._stopping or self._timers.get(key) is not threading.current_thread():
                return  # cancelled or replaced after it started
            del self._timers[key]
            try:
                action(key[1])
            except LogFull:  # try again once there may be space
                self._schedule(key, FULL_RETRY, action)

    def _cancel_timer(self, key):
        timer = self._timers.pop(key, None)
        if timer:
            timer.cancel()

    # ---- lookups (the caller holds self._lock) ----

    @contextlib.contextmanager
    def _reading(self, context):
        """A read of the database that fails (an I/O error, a malformed page) ends the RPC with DATA_LOSS and
        one line naming the file and the way out, never an empty answer or a gRPC internal."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            if _is_full(e):
                raise
            say(store.damaged(self._db_path, e))
            context.abort(Code.DATA_LOSS, store.damaged(self._db_path, e))

    def _check_open(self, context):
        self._last_call = time.monotonic()
        if self._stopping:
            context.abort(Code.UNAVAILABLE, "the daemon is shutting down")

    def _find(self, execution_id, context):
        ex = self._active.get(execution_id)
        if ex is None:
            ex = store.get_execution(self._db, execution_id)
            if ex is None:
                context.abort(Code.NOT_FOUND, f"no execution {execution_id!r}: `python runner.py list` shows them")
        return ex

    def _stored_last_seq(self, execution_id):
        if execution_id in self._active:
            return self._active[execution_id].last_seq
        return store.last_seq(self._db, execution_id)

    def _new_id(self):
        """ex- + seconds in hex + random hex: short, unique, roughly in submit order."""
        while True:
            execution_id = f"ex-{int(time.time()):08x}{os.urandom(3).hex()}"
            if not store.execution_exists(self._db, execution_id):
                return execution_id

    # ---- shutdown ----

    def idle(self):
        """True when nothing is queued or running, no runner is connected but a foreground run's idle one (kept
        warm for the next run: it leaves after the same idle period), nobody watches, and no RPC came in during
        the last check (the caller times how long this lasts)."""
        with self._lock:
            runners = any(not s.pinned or s.executions for s in self._sessions.values())
            return not (self._active or runners or self._watchers) and not self._stopping

    def last_call(self):
        return self._last_call

    def begin_stop(self):
        """Refuse new work, end runner streams and wake watchers so the server can drain."""
        with self._lock:
            self._stopping = True
            for session in list(self._sessions.values()):
                self._end_session(session)
            for cond in self._conds.values():
                cond.notify_all()
            for key in list(self._timers):
                self._cancel_timer(key)

    def close(self):
        """Stop (if not yet) and close the database."""
        self.begin_stop()
        with self._lock:
            self._db.close()


def _varint(n, _cache={}):
    """N in protobuf's base-128 varint encoding (lengths repeat, so they are cached)."""
    encoded = _cache.get(n)
    if encoded is None:
        out = bytearray()
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        out.append(n)
        encoded = _cache[n] = bytes(out)
    return encoded


def batch_bytes(payloads):
    """Serialized EventBatches holding the serialized Events PAYLOADS, in order, split at WATCH_BATCH_EVENTS
    events or WATCH_BATCH_BYTES bytes. Each event is written as field 1 (`repeated Event events = 1`,
    wire type 2: tag byte 0x0A, the length as a varint, the bytes), which is exactly how protobuf encodes
    the message, so the stored bytes are sent without being parsed."""
    parts, count, size = [], 0, 0
    for payload in payloads:
        if count and (count == WATCH_BATCH_EVENTS or size + len(payload) > WATCH_BATCH_BYTES):
            yield b"".join(parts)
            parts, count, size = [], 0, 0
        parts += (EVENT_TAG, _varint(len(payload)), payload)
        count += 1
        size += len(payload)
    if count:
        yield b"".join(parts)


if __name__ == "__main__":
    # `python daemon.py [--endpoint HOST:PORT] [--allow-remote]` is `python runner.py daemon`, configured by
    # runner.Config: this process becomes that one (same pid), so that no module here imports runner.
    os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py"),
                              "daemon", *sys.argv[1:]])
