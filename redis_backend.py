"""Cloud mode's Redis side: the CLI's client (RedisClient) and a worker's link (RedisLink).

    client = RedisClient("redis://localhost:6379/0")          # the same calls as the daemon Client
    ex = client.submit(pb.ExecutionSpec(prompt="fix the test", workspace="/work"))
    for event in client.watch(ex.id): print(event)
    RedisLink("redis://localhost:6379/0").run(worker)        # a Worker takes executions off the queue

Key layout, all under one prefix (default "stigmer:"):

    queue              stream   one entry {id} per submitted execution, read by group "runners"
    queue:RUNNER       stream   the same, for executions pinned to one runner (a foreground run's own worker)
    dead               stream   entries delivered more than MAX_DELIVERIES times and never taken, with why
    ex:ID              hash     the execution record: Execution's fields + epoch, owner_seq, cancel_at, entry
    events:ID          stream   the log: entry id 0-SEQ, one field e = the serialized Event
    lease:ID           string   the owner's epoch, with a TTL the owner renews by heartbeat
    leases             zset     ID by lease deadline (ms): where sweepers look for expired leases
    cancels            zset     ID by cancel request time: RUNNING executions asked to stop
    answers:ID         hash     approval request id -> the serialized Approval: the first answer (HSETNX) counts
    epoch              counter  the fencing tokens handed out by take
    index:all, index:PHASE   zset   ID by created_at, for list (newest first, by phase)
    workers, worker:RUNNER   zset + string (TTL): live workers and their free slots, for status

Every change to a record and its log goes through one of the Lua scripts in redis_scripts.py, so it is
atomic: submit, take, append, heartbeat, cancel and end (an outsider ends an execution:
runner lost, cancel not confirmed, dead letter). The events that a script writes itself are
built by Python with the seq it expects (`expected_last`); a script that finds the log moved
answers "retry". A taken execution is never run again: its queue entry is acknowledged and
deleted by the same script that takes the lease, and a lost lease ends it FAILED.

Nothing but what the worker emits (already redacted) and the spec (secret names, never
values) is written to Redis. The `redis` package is imported on first use: `pip install -e '.[cloud]'`.
"""
import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.parse

import stigmer_pb2 as pb
from contract import VERSION, BackendError, BackendUnavailable, keep_connected, parent_problem, prompt_problem
from redis_scripts import APPEND_LUA, COMMON_LUA, SCRIPTS


log = logging.getLogger("stigmer.redis")

DEFAULT_PREFIX = "stigmer:"  # STIGMER_REDIS_PREFIX
GROUP = "runners"  # the consumer group on the queue stream
LEASE_TTL = 15.0  # seconds a lease lives without a heartbeat; a dead worker's execution fails after about this
CLAIM_IDLE = 10.0  # seconds a queue entry may sit read-but-untaken before another worker reclaims it
MAX_DELIVERIES = 5  # deliveries of one queue entry before it goes to the dead-letter stream
RETENTION = 7 * 24 * 3600.0  # seconds terminal executions and their logs are kept
CANCEL_GRACE = 15.0  # seconds a worker has to confirm a cancel before the execution is ended CANCELLED for it
CANCEL_POLL = 0.25  # seconds between a link's looks at the cancel flags of its executions (cancel within 1 s)
POLL_BLOCK = 1.0  # seconds an XREADGROUP blocks; also how fast a link notices it should stop
FOLLOW_BLOCK = 0.5  # seconds a follower's XREAD blocks before it checks cancel() and lost leases
FOLLOW_RETRY = 10.0  # seconds a follower keeps retrying a lost Redis before raising BackendUnavailable
LOST_CHECK = 2.0  # seconds between a follower's checks that a silent execution still has its owner
PAGE = 1000  # events per XRANGE / XREAD reply
LIST_DEFAULT, LIST_MAX = 50, 1000
BATCH_WAIT = 0.25  # seconds the link waits for events before it looks at heartbeats again
CONNECT_TIMEOUT, SOCKET_TIMEOUT = 3.0, 10.0  # seconds; SOCKET_TIMEOUT outlasts every BLOCK we issue
TERMINAL = (pb.COMPLETED, pb.FAILED, pb.CANCELLED)
PHASES = (pb.PENDING, pb.RUNNING, pb.COMPLETED, pb.FAILED, pb.CANCELLED)  # KEYS[9 + phase] in the scripts

redis = None  # the redis module, once _redis() has imported it


def _redis():
    global redis
    if redis is None:
        try:
            import redis as module
        except ImportError:
            raise BackendError("cloud mode needs the redis package: pip install -e '.[cloud]'") from None
        redis = module
    return redis


def _down_errors():
    """The exceptions that mean Redis cannot be reached (ConnectionError covers BusyLoadingError)."""
    return (_redis().ConnectionError, redis.TimeoutError)


def shown_url(url):
    """URL with its password masked, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + parts.netloc.rpartition("@")[2]).geturl()


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def execution_from_hash(fields):
    """The Execution in an ex:ID hash (a dict, or HGETALL's flat list from a script)."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2]))
    f = {_text(k): v for k, v in fields.items()}
    return pb.Execution(
        id=_text(f["id"]), spec=pb.ExecutionSpec.FromString(f["spec"]), phase=int(f["phase"]),
        created_at=float(f["created_at"]), started_at=float(f["started_at"]), finished_at=float(f["finished_at"]),
        runner_id=_text(f["runner_id"]), usage=pb.Usage.FromString(f["usage"]), final_text=_text(f["final_text"]),
        error=_text(f["error"]), last_seq=int(f["last_seq"]), turns=int(f["turns"]))


def _answered_by(data):
    """Who gave the stored answer DATA (a serialized Approval), for a person."""
    if not data:
        return "answered by someone"
    import approvals
    return approvals.answered_by(pb.Approval.FromString(data))


def _pinned(worker):
    """True for a private runner (a foreground run's own worker): it takes only executions pinned to it."""
    return bool(getattr(worker, "pinned", False))


def _event_args(event):
    """The 7 script arguments for one event: seq, bytes, kind, then what the record needs from it."""
    kind = event.WhichOneof("payload") or ""
    extra = ("", "", "", "")
    if kind == "phase":
        change = event.phase
        extra = (change.phase, change.reason, change.final_text, change.turns)
    elif kind == "usage":
        extra = (event.usage.SerializeToString(), "", "", "")
    return (event.seq, event.SerializeToString(), kind, *extra)


class RedisLog:
    """The queue, records and event logs on one Redis, and the scripts that change them.
    RedisClient (the CLI) and RedisLink (a worker) each hold one."""

    def __init__(self, url, prefix=DEFAULT_PREFIX, *, lease_ttl=LEASE_TTL, claim_idle=CLAIM_IDLE,
                 max_deliveries=MAX_DELIVERIES, retention=RETENTION, cancel_grace=CANCEL_GRACE):
        self.url, self.prefix = url, prefix
        self.lease_ttl, self.claim_idle, self.max_deliveries = lease_ttl, claim_idle, max_deliveries
        self.retention, self.cancel_grace = retention, cancel_grace
        try:
            self.r = _redis().Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT,
                                             socket_timeout=SOCKET_TIMEOUT, socket_keepalive=True)
        except ValueError as e:
            raise BackendError(f"REDIS_URL {shown_url(url)!r} is not a Redis URL ({e}): "
                               "use redis://[:PASSWORD@]HOST:PORT/DB or rediss:// for TLS") from None
        self.queue, self.dead = prefix + "queue", prefix + "dead"
        self.leases, self.cancels, self.epoch = prefix + "leases", prefix + "cancels", prefix + "epoch"
        self.index = {0: prefix + "index:all", **{p: prefix + "index:" + pb.Phase.Name(p) for p in PHASES}}
        self.workers = prefix + "workers"
        self.scripts = {name: self.r.register_script(COMMON_LUA + body) for name, body in SCRIPTS.items()}

    def keys(self, execution_id, queue=None):
        """The 14 KEYS every script takes (QUEUE: the execution's queue stream, the shared one by default)."""
        p = self.prefix
        return [p + "ex:" + execution_id, p + "lease:" + execution_id, p + "events:" + execution_id,
                queue or self.queue, self.dead, self.leases, self.cancels, self.epoch,
                self.index[0], *(self.index[phase] for phase in PHASES)]

    def run(self, name, execution_id, *args, client=None, queue=None):
        """Run script NAME for EXECUTION_ID (ARGV: id, now, retention ms, *ARGS)."""
        argv = [execution_id, repr(time.time()), int(self.retention * 1000), *args]
        return self.scripts[name](keys=self.keys(execution_id, queue), args=argv, client=client)

    def queue_for(self, runner_id):
        """The queue stream of executions pinned to RUNNER_ID; the shared queue for ""."""
        return self.prefix + "queue:" + runner_id if runner_id else self.queue

    def queue_of(self, execution_id):
        """The queue stream EXECUTION_ID was submitted to."""
        return _text(self.r.hget(self.prefix + "ex:" + execution_id, "queue") or self.queue)

    def ensure_group(self, queue=None):
        try:
            self.r.xgroup_create(queue or self.queue, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # ---- records ----

    def get(self, execution_id):
        """The Execution, or None."""
        fields = self.r.hgetall(self.prefix + "ex:" + execution_id)
        return execution_from_hash(fields) if fields else None

    def events(self, execution_id):
        """Every stored event of the execution, in seq order."""
        key, after, events = self.prefix + "events:" + execution_id, 0, []
        while True:
            entries = self.r.xrange(key, f"(0-{after}", "+", count=PAGE)
            events += [pb.Event.FromString(fields[b"e"]) for _, fields in entries]
            if len(entries) < PAGE:
                return events
            after = events[-1].seq

    def recent(self, execution_id, count=50):
        """The last COUNT events of the execution, oldest first."""
        entries = self.r.xrevrange(self.prefix + "events:" + execution_id, "+", "-", count=count)
        return [pb.Event.FromString(fields[b"e"]) for _, fields in reversed(entries)]

    def last_seq(self, execution_id):
        return int(self.r.hget(self.prefix + "ex:" + execution_id, "last_seq") or 0)

    def submit(self, spec):
        """Queue a new execution (on its runner's own queue when spec.runner_id pins it); returns it
        (PENDING, last_seq 1)."""
        token = os.urandom(8).hex()
        while True:
            execution_id = f"ex-{int(time.time()):08x}{os.urandom(3).hex()}"
            event = pb.Event(execution_id=execution_id, seq=1, time=time.time(),
                             phase=pb.PhaseChange(phase=pb.PENDING, model=spec.model, agent=spec.agent.name,
                                                  sandbox_mode=spec.sandbox_mode, network=spec.network))
            if self.run("submit", execution_id, spec.SerializeToString(), event.SerializeToString(), token,
                        queue=self.queue_for(spec.runner_id)) != 0:
                return self.get(execution_id)

    def _author(self, name, execution_id, build, args, queue=None):
        """Run script NAME with ARGS(last_seq, events), events built by BUILD(last_seq); again while the log moves."""
        for _ in range(20):
            last = self.last_seq(execution_id)
            events = [e.SerializeToString() for e in build(last)]
            reply = self.run(name, execution_id, *args(last, events), queue=queue)
            status = reply if isinstance(reply, bytes) else reply[0] if isinstance(reply, list) else reply
            if status != b"retry":
                return reply
        raise BackendError(f"execution {execution_id} kept changing while being updated; try again")

    def cancel(self, execution_id):
        """Cancel: at once if PENDING; RUNNING ones are flagged for their worker. The script's answer."""
        reason = "cancelled before it started"

        def build(last):
            return [pb.Event(execution_id=execution_id, seq=last + 1, time=time.time(),
                             phase=pb.PhaseChange(phase=pb.CANCELLED, reason=reason))]
        return _text(self._author("cancel", execution_id, build, lambda last, ev: (last, ev[0], GROUP, reason),
                                  queue=self.queue_of(execution_id)))

    def end(self, execution_id, mode, *, entry="", deliveries=0):
        """End EXECUTION_ID from outside (mode lost, cancel or dead) if the mode's condition holds."""
        now = time.time()
        fields = self.r.hmget(self.prefix + "ex:" + execution_id, "runner_id", "lease_ms", "turns", "queue")
        runner, lease_ms, turns = _text(fields[0] or b"?"), int(fields[1] or 0), int(fields[2] or 0)
        queue = _text(fields[3] or self.queue)
        if mode == "lost":
            phase, reason, code = pb.FAILED, "runner lost", "runner_lost"
            message = (f"runner {runner} lost: its lease expired without a heartbeat "
                       f"(lease {lease_ms / 1000:g}s); the execution is not run again")
        elif mode == "cancel":
            phase, code, message = pb.CANCELLED, "", ""
            reason = f"cancelled (the runner did not confirm within {self.cancel_grace:g}s)"
        else:
            phase, reason, code = pb.FAILED, f"dead letter: its queue entry was delivered {deliveries} times " \
                                             "without a runner taking it", "dead_letter"
            message = reason

        def build(last):
            events = []
            if code:
                events.append(pb.Event(execution_id=execution_id, seq=last + 1, time=now,
                                       error=pb.Error(code=code, message=message)))
            events.append(pb.Event(execution_id=execution_id, seq=last + 1 + len(events), time=now,
                                   phase=pb.PhaseChange(phase=phase, reason=reason, turns=turns)))
            return events
        mode_arg = {"lost": "", "cancel": repr(now - self.cancel_grace), "dead": GROUP}[mode]
        reply = self._author("end", execution_id, build,
                             lambda last, ev: (mode, last, phase, reason, mode_arg, entry, len(ev), *ev), queue=queue)
        ended = reply[0] == b"ended"
        if ended:
            log.warning("%s: %s", execution_id, message or reason)
        return ended

    def sweep(self):
        """End what needs ending: expired leases (runner lost) and cancels nobody confirmed."""
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.zrangebyscore(self.leases, "-inf", int(now * 1000), start=0, num=100)
        pipe.zrangebyscore(self.cancels, "-inf", now - self.cancel_grace, start=0, num=100)
        lost, unconfirmed = pipe.execute()
        for execution_id in lost:
            self.end(_text(execution_id), "lost")
        for execution_id in unconfirmed:
            self.end(_text(execution_id), "cancel")

    def prune(self):
        """Forget index entries whose records expired (only ones created before the retention window can)."""
        old = self.r.zrangebyscore(self.index[0], "-inf", time.time() - self.retention, start=0, num=1000)
        if not old:
            return
        pipe = self.r.pipeline(transaction=False)
        for execution_id in old:
            pipe.exists(self.prefix + "ex:" + _text(execution_id))
        gone = [i for i, there in zip(old, pipe.execute()) if not there]
        if gone:
            pipe = self.r.pipeline(transaction=False)
            for key in self.index.values():
                pipe.zrem(key, *gone)
            pipe.execute()

    def list(self, phase=0, limit=LIST_DEFAULT):
        ids = self.r.zrevrange(self.index[phase], 0, limit - 1)
        pipe = self.r.pipeline(transaction=False)
        for execution_id in ids:
            pipe.hgetall(self.prefix + "ex:" + _text(execution_id))
        return [execution_from_hash(f) for f in pipe.execute() if f]


# ---- the CLI's client ----

class Watch:
    """An iterator of an execution's events (replay, then follow until the terminal phase event);
    cancel() ends it from another thread within FOLLOW_BLOCK."""

    def __init__(self, client, execution_id, after_seq, follow):
        self._client, self._id, self._after, self._follow = client, execution_id, after_seq, follow
        self._cancelled = threading.Event()
        self._events = self._run()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._events)

    def cancel(self):
        self._cancelled.set()

    def _run(self):
        """XRANGE pages until the replay is done, then blocking XREADs; Redis outages shorter
        than FOLLOW_RETRY are waited out and the stream resumes after the last event yielded."""
        log_ = self._client.log
        key = log_.prefix + "events:" + self._id
        replaying, down_since, checked = True, None, time.monotonic()
        while not self._cancelled.is_set():
            try:
                if replaying:
                    entries = log_.r.xrange(key, f"(0-{self._after}", "+", count=PAGE)
                    replaying = len(entries) == PAGE
                    if not replaying and self._follow and not entries and self._over():
                        return  # watched from past its terminal event: nothing more will come
                elif not self._follow:
                    return
                else:
                    reply = log_.r.xread({key: f"0-{self._after}"}, count=PAGE, block=int(FOLLOW_BLOCK * 1000))
                    entries = reply[0][1] if reply else []
                    if not entries and time.monotonic() - checked > LOST_CHECK:
                        checked = time.monotonic()
                        if self._over():
                            return
                down_since = None
            except _down_errors() as e:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > FOLLOW_RETRY:
                    raise self._client.unavailable(e) from None
                self._cancelled.wait(0.2 * random.uniform(1, 2))
                continue
            for _, fields in entries:
                event = pb.Event.FromString(fields[b"e"])
                self._after = event.seq
                yield event
                if event.WhichOneof("payload") == "phase" and event.phase.phase in TERMINAL:
                    return

    def _over(self):
        """For a silent log: True when nothing more will come (expired, or ended at or before the
        last seq yielded); a RUNNING one whose lease expired is ended "runner lost" (its events follow)."""
        log_ = self._client.log
        ex = log_.get(self._id)
        if ex is None or (ex.phase in TERMINAL and ex.last_seq <= self._after):
            return True
        if ex.phase == pb.RUNNING and not log_.r.exists(log_.prefix + "lease:" + self._id):
            log_.end(self._id, "lost")
        return False


class RedisClient:
    """The CLI's backend in cloud mode: the daemon Client's calls, answered from Redis."""

    def __init__(self, url, prefix=DEFAULT_PREFIX, **settings):
        self.log = RedisLog(url, prefix, **settings)
        self.endpoint = shown_url(url)

    def unavailable(self, error):
        return BackendUnavailable(f"cannot reach Redis at {self.endpoint} (REDIS_URL): {error}")

    @contextlib.contextmanager
    def reachable(self):
        """Turn Redis connection failures into BackendUnavailable."""
        try:
            yield
        except _down_errors() as e:
            raise self.unavailable(e) from None

    def submit(self, spec):
        """Queue SPEC; returns the PENDING Execution."""
        if not spec.prompt.strip():
            raise BackendError("spec.prompt is empty: say what the agent should do")
        if prompt_problem(spec.prompt):
            raise BackendError(prompt_problem(spec.prompt))
        if spec.max_turns < 0 or spec.max_tokens_total < 0:
            raise BackendError("spec.max_turns and spec.max_tokens_total must not be negative")
        with self.reachable():
            if spec.parent_id:
                problem = parent_problem(spec.parent_id, self.log.get(spec.parent_id))
                if problem:
                    raise BackendError(problem)
            return self.log.submit(spec)

    def get(self, execution_id):
        """The execution; a RUNNING one whose lease expired is ended FAILED ("runner lost") first."""
        with self.reachable():
            ex = self._find(execution_id)
            if ex.phase == pb.RUNNING and not self.log.r.exists(self.log.prefix + "lease:" + execution_id):
                if self.log.end(execution_id, "lost"):
                    ex = self._find(execution_id)
            return self._with_waiting([ex])[0]

    def _with_waiting(self, executions):
        """EXECUTIONS with waiting_approvals set for the RUNNING ones (from their last events)."""
        import approvals
        for ex in executions:
            if ex.phase == pb.RUNNING:
                ex.waiting_approvals = len(approvals.waiting_calls(self.log.recent(ex.id))[0])
        return executions

    def _find(self, execution_id):
        ex = self.log.get(execution_id)
        if ex is None:
            raise BackendError(f"no execution {execution_id!r}: `python runner.py list` shows them")
        return ex

    def list(self, phase=0, limit=20):
        """Executions, newest first, optionally only those in PHASE."""
        if limit < 0 or phase not in pb.Phase.values():
            raise BackendError("limit must not be negative and phase must be a known Phase")
        with self.reachable():
            self.log.sweep()
            return self._with_waiting(self.log.list(phase, min(limit or LIST_DEFAULT, LIST_MAX)))

    def watch(self, execution_id, after_seq=0, follow=True):
        """Events after AFTER_SEQ; with FOLLOW, then live ones until the terminal phase event."""
        self.get(execution_id)  # a missing one is an error now, not at the first next()
        return Watch(self, execution_id, after_seq, follow)

    def approve(self, execution_id, request_id, approved, reason="", always=False, by=""):
        """Answer a tool call of EXECUTION_ID waiting for approval (REQUEST_ID, or the one waiting); its worker reads the
        answer from answers:ID. The first answer counts (HSETNX); returns the id answered."""
        with self.reachable():
            ex = self._find(execution_id)
            import approvals
            waiting, answered = approvals.waiting_calls(self.log.events(execution_id)) if ex.phase == pb.RUNNING \
                else ({}, {})
            key = self.log.prefix + "answers:" + execution_id
            for rid, data in self.log.r.hgetall(key).items():  # answered, its event not written yet
                answered.setdefault(_text(rid), _answered_by(data))
            try:
                request_id = approvals.pick(execution_id, request_id, waiting, answered)
            except approvals.ApprovalError as e:
                raise BackendError(str(e)) from None
            approval = pb.Approval(id=request_id, approved=approved, reason=reason, always=always, by=by)
            pipe = self.log.r.pipeline(transaction=True)
            pipe.hsetnx(key, request_id, approval.SerializeToString())
            pipe.expire(key, int(self.log.retention))
            won, _ = pipe.execute()
            if not won:
                raise BackendError(f"that call of {execution_id} was already answered "
                                   f"({_answered_by(self.log.r.hget(key, request_id))})")
            return request_id

    def cancel(self, execution_id):
        """Cancel: a PENDING execution at once, a RUNNING one through its worker."""
        with self.reachable():
            self._find(execution_id)
            self.log.cancel(execution_id)
            return self._find(execution_id)

    def status(self, timeout=10):
        """A DaemonStatus for the Redis backend: live workers, queue depth, executions by phase."""
        log_ = self.log
        with self.reachable():
            log_.sweep()
            log_.prune()
            now_ms = int(time.time() * 1000)
            pipe = log_.r.pipeline(transaction=False)
            pipe.zremrangebyscore(log_.workers, "-inf", now_ms)
            pipe.zrange(log_.workers, 0, -1)
            for phase in PHASES:
                pipe.zcard(log_.index[phase])
            pipe.info("server")
            _, workers, *counts, info = pipe.execute()
            seen = log_.r.mget([log_.prefix + "worker:" + _text(w) for w in workers]) if workers else []
        alive = [json.loads(s) for s in seen if s]
        return pb.DaemonStatus(
            version=VERSION, pid=0, uptime_seconds=float(info.get("uptime_in_seconds", 0)),
            connected_runners=len(alive), queue_depth=counts[0],
            executions_by_phase={pb.Phase.Name(p): n for p, n in zip(PHASES, counts) if n},
            free_capacity=sum(w.get("free", 0) for w in alive))

    def close(self):
        self.log.r.close()


# ---- the worker's link ----

class RedisLink:
    """Feeds a Worker from the queue and delivers its events to the logs: takes executions
    (leases) while it has free slots, appends batches through the fenced script, heartbeats,
    passes on cancels, sweeps expired leases and reclaims entries other workers read and dropped.
    Survives Redis outages: reconnects with backoff and jitter and resends via worker.rewind()."""

    def __init__(self, url, prefix=DEFAULT_PREFIX, **settings):
        self.log = RedisLog(url, prefix, **settings)
        self.endpoint = shown_url(url)
        self.held = {}  # execution id -> epoch (bytes) of the leases this link holds
        self.told = set()  # executions whose cancel the worker has been given
        self.passed = set()  # (execution id, request id) of the approval answers the worker has been given
        self._lock = threading.Lock()
        self._next_beat = 0.0  # monotonic time of the next heartbeat (keeper thread)
        self._next_reclaim = 0.0  # monotonic time of the next XAUTOCLAIM (poller thread)

    def history(self, execution_id):
        """(pb.Execution, its stored events): the conversation a resumed execution continues."""
        ex = self.log.get(execution_id)
        if ex is None:
            raise BackendError(f"no execution {execution_id!r} in Redis (expired after the retention period?)")
        return ex, self.log.events(execution_id)

    def run(self, worker):
        """Serve WORKER, reconnecting with backoff and jitter, until worker.stopping is set.
        A pinned worker (worker.pinned) reads only its own queue, queue:RUNNER_ID."""
        def attempt():
            try:
                self._session(worker)
            except _down_errors() as e:
                return str(e)
            return None
        keep_connected(worker, attempt, f"Redis at {self.endpoint} (REDIS_URL)", log)
        worker.connected = False
        with contextlib.suppress(*_down_errors()):
            self.log.r.zrem(self.log.workers, worker.runner_id)
            self.log.r.delete(self.log.prefix + "worker:" + worker.runner_id)
            if _pinned(worker):
                self._close_own_queue(worker)

    def _close_own_queue(self, worker):
        """A pinned worker stops: what is still waiting on its own queue can never run; cancel it, drop the queue."""
        queue = self.log.queue_for(worker.runner_id)
        for _, fields in self.log.r.xrange(queue, "-", "+", count=PAGE):
            execution_id = _text(fields.get(b"id", b""))
            if execution_id and self.log.cancel(execution_id) == "cancelled":
                log.warning("cancelled %s: its own runner stopped before taking it", execution_id)
        self.log.r.delete(queue)

    def _session(self, worker):
        """One stretch with Redis up: a poller and a keeper thread, the sender here."""
        self.log.r.ping()
        self.log.ensure_group()
        if _pinned(worker):
            self.log.ensure_group(self.log.queue_for(worker.runner_id))
        worker.rewind()  # everything not acknowledged goes again
        self._keep_leases(worker)
        worker.connected = True
        log.info("connected to Redis at %s as %s", self.endpoint, worker.runner_id)
        down, errors = threading.Event(), []

        def guarded(body):
            def loop():
                try:
                    while not down.is_set() and not worker.stopping.is_set():
                        body(worker, down)
                except BaseException as e:
                    errors.append(e)
                finally:
                    down.set()
            return threading.Thread(target=loop, name=f"redis-{body.__name__.strip('_')}", daemon=True)
        threads = [guarded(self._poll), guarded(self._keep)]
        for thread in threads:
            thread.start()
        try:
            while not down.is_set() and not worker.stopping.is_set():
                batch = worker.next_batch(BATCH_WAIT)
                if batch:
                    self.send(worker, batch)
        finally:
            down.set()
            for thread in threads:
                thread.join()
        if errors:
            raise errors[0]

    # ---- the queue ----

    def _free(self, worker):
        with self._lock:
            return min(worker.free_slots(), worker.capacity - len(self.held))

    def _poll(self, worker, down):
        """Take one execution when there is room: a reclaimed entry first, else a new one
        (a pinned worker: only from its own queue, which nobody else reads)."""
        if self._free(worker) <= 0:
            down.wait(0.1)
            return
        queue = self.log.queue_for(worker.runner_id) if _pinned(worker) else self.log.queue
        if queue == self.log.queue and time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + min(self.log.claim_idle / 2, POLL_BLOCK * 5)
            if self.reclaim(worker):
                self._next_reclaim = 0.0  # there may be more
                return
        try:
            reply = self.log.r.xreadgroup(GROUP, worker.runner_id, {queue: ">"}, count=1,
                                          block=int(POLL_BLOCK * 1000))
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self.log.ensure_group(queue)
            return
        for entry_id, fields in (reply[0][1] if reply else []):
            self.take(worker, _text(entry_id), fields, queue)

    def reclaim(self, worker):
        """Claim one entry read by another consumer and left untaken for claim_idle; True if one was found."""
        log_ = self.log
        _, claimed, _ = log_.r.xautoclaim(log_.queue, GROUP, worker.runner_id, int(log_.claim_idle * 1000),
                                          "0-0", count=1)
        for entry_id, fields in claimed:
            entry_id = _text(entry_id)
            pending = log_.r.xpending_range(log_.queue, GROUP, entry_id, entry_id, 1)
            deliveries = pending[0]["times_delivered"] if pending else 0
            if deliveries > log_.max_deliveries:
                execution_id = _text(fields.get(b"id", b""))
                if not execution_id or not log_.end(execution_id, "dead", entry=entry_id, deliveries=deliveries):
                    log_.r.xack(log_.queue, GROUP, entry_id)
                    log_.r.xdel(log_.queue, entry_id)
            else:
                log.info("reclaimed queue entry %s (delivery %d)", entry_id, deliveries)
                self.take(worker, entry_id, fields)
        return bool(claimed)

    def take(self, worker, entry_id, fields, queue=None):
        """Lease the execution of a queue entry (on QUEUE, the shared one by default) and hand it
        to the worker, unless it is not PENDING."""
        log_ = self.log
        queue = queue or log_.queue
        execution_id = _text(fields.get(b"id", b""))
        if not execution_id:
            log.warning("dropping queue entry %s: it names no execution", entry_id)
            log_.r.xack(queue, GROUP, entry_id)
            log_.r.xdel(queue, entry_id)
            return
        ttl_ms = int(log_.lease_ttl * 1000)

        def build(last):
            return [pb.Event(execution_id=execution_id, seq=last + 1, time=time.time(),
                             phase=pb.PhaseChange(phase=pb.RUNNING))]
        reply = log_._author("take", execution_id, build, lambda last, ev: (
            GROUP, entry_id, worker.runner_id, ttl_ms, last, ev[0], int(time.time() * 1000) + ttl_ms), queue=queue)
        if reply[0] != b"taken":
            log.info("skipped %s (%s)", execution_id, _text(reply[0]))
            return
        execution = execution_from_hash(reply[2])
        with self._lock:
            self.held[execution_id] = reply[1]
        log.info("took %s (epoch %s)", execution_id, _text(reply[1]))
        worker.assigned(execution)

    # ---- the log ----

    def send(self, worker, batch, reloaded=False):
        """Append a batch (one script call per execution, one round trip) and tell the worker what was stored."""
        groups = {}
        for event in batch:
            groups.setdefault(event.execution_id, []).append(event)
        with self._lock:
            epochs = {i: self.held.get(i) for i in groups}
        pipe = self.log.r.pipeline(transaction=False)
        sent = []
        for execution_id, events in groups.items():
            if epochs[execution_id] is None:
                worker.refused(execution_id, 0, gap=False, message=f"this worker holds no lease on {execution_id}")
                continue
            args = [epochs[execution_id], len(events)]
            for event in events:
                if not event.time:
                    event.time = time.time()
                args.extend(_event_args(event))
            pipe.evalsha(self.log.scripts["append"].sha, 14, *self.log.keys(execution_id),
                         execution_id, repr(time.time()), int(self.log.retention * 1000), *args)
            sent.append(execution_id)
        replies = pipe.execute(raise_on_error=False)
        if not reloaded and any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
            self.log.r.script_load(COMMON_LUA + APPEND_LUA)  # Redis restarted with an empty script cache:
            return self.send(worker, batch, reloaded=True)  # appends are idempotent, so send it all again
        for execution_id, reply in zip(sent, replies):
            if isinstance(reply, Exception):
                raise reply
            status, seq, info = _text(reply[0]), int(reply[1]), reply[2]
            if status == "ok":
                if int(info) in TERMINAL:
                    self._release(execution_id)
                worker.acked(execution_id, seq)
            elif status == "gap":
                worker.refused(execution_id, seq, gap=True, message=_text(info))
            else:
                log.warning("Redis refused events for %s: %s", execution_id, _text(info))
                self._release(execution_id)
                worker.refused(execution_id, seq, gap=False, message=_text(info))

    def _release(self, execution_id):
        with self._lock:
            self.held.pop(execution_id, None)
            self.told.discard(execution_id)

    # ---- leases, cancels, sweeping ----

    def _keep(self, worker, down):
        """Every CANCEL_POLL: pass on cancels; every lease_ttl/3: heartbeat, register, sweep."""
        if down.wait(CANCEL_POLL):
            return
        self._pass_cancels(worker)
        if time.monotonic() >= self._next_beat:
            self._keep_leases(worker)
            self.log.sweep()
            self._next_beat = time.monotonic() + self.log.lease_ttl / 3

    def _pass_cancels(self, worker):
        """Pass on cancels and approval answers for the executions this link holds."""
        with self._lock:
            held = list(self.held)
            ids = [i for i in held if i not in self.told]
        if held and any(getattr(worker, "gates", {}).get(i) is not None and worker.gates[i].pending() for i in held):
            pipe = self.log.r.pipeline(transaction=False)
            for execution_id in held:
                pipe.hgetall(self.log.prefix + "answers:" + execution_id)
            for execution_id, answers in zip(held, pipe.execute()):
                for request_id, data in answers.items():
                    key = (execution_id, _text(request_id))
                    if key not in self.passed:
                        self.passed.add(key)
                        worker.approval_answered(execution_id, pb.Approval.FromString(data))
        if not ids:
            return
        pipe = self.log.r.pipeline(transaction=False)
        for execution_id in ids:
            pipe.hget(self.log.prefix + "ex:" + execution_id, "cancel_at")
        for execution_id, at in zip(ids, pipe.execute()):
            if at and float(at) > 0:
                with self._lock:
                    self.told.add(execution_id)
                log.info("cancel requested for %s", execution_id)
                worker.cancel_requested(execution_id)

    def _keep_leases(self, worker):
        """Renew every lease this link holds and say this worker is alive; a lost lease is ended and dropped."""
        log_ = self.log
        ttl_ms = int(log_.lease_ttl * 1000)
        deadline = int(time.time() * 1000) + ttl_ms
        with self._lock:
            held = dict(self.held)
        pipe = log_.r.pipeline(transaction=False)
        for execution_id, epoch in held.items():
            log_.run("heartbeat", execution_id, epoch, ttl_ms, deadline, client=pipe)
        pipe.zadd(log_.workers, {worker.runner_id: deadline})
        pipe.set(log_.prefix + "worker:" + worker.runner_id, json.dumps(
            {"free": max(0, self._free(worker)), "capacity": worker.capacity, "mode": worker.mode,
             "host": socket.gethostname()}), px=ttl_ms)
        replies = pipe.execute()
        for (execution_id, _), (state, seq) in zip(held.items(), replies):
            if state == 2:  # it ended with its own terminal event; the sender acknowledges that
                self._release(execution_id)
            elif state == 0:
                log.warning("lost the lease on %s: another worker or the CLI ends it; stopping it here",
                            execution_id)
                self._release(execution_id)
                worker.refused(execution_id, int(seq), gap=False, message=f"the lease on {execution_id} was lost")
                log_.end(execution_id, "lost")
