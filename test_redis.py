"""Tests of redis_backend against a real redis-server (started on a free loopback port).

    python -m unittest test_redis -v

The scripts are called straight (duplicates, gaps, fencing, expiry); RedisLink drives
FakeWorker, a scripted stand-in with the Worker's public methods from SEAMS.md; RedisClient
is checked call by call as the CLI would use it.
"""
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
import unittest
import uuid

import stigmer_pb2 as pb
import redis_backend as rb  # imports without the redis package (it is loaded on first use)
from redis_backend import BackendError, BackendUnavailable, RedisClient, RedisLink
from testsupport import wait_for
from testsupport_redis import RedisServer, requires_redis
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

SHORT = dict(lease_ttl=1.0, claim_idle=0.3, cancel_grace=30.0, retention=600.0)  # fast settings for tests
_prefixes = itertools.count()
logging.getLogger("stigmer.redis").addHandler(logging.NullHandler())  # expected warnings stay quiet


def spec(prompt="do it"):
    return pb.ExecutionSpec(prompt=prompt, workspace="/tmp")


def text(execution_id, seq, value="x"):
    return pb.Event(execution_id=execution_id, seq=seq, time=time.time(), text=pb.TextDelta(text=value))


def done(execution_id, seq, phase=pb.COMPLETED, **fields):
    return pb.Event(execution_id=execution_id, seq=seq, time=time.time(), phase=pb.PhaseChange(phase=phase, **fields))


class FakeWorker:
    """The Worker's public methods (SEAMS.md), with scripted events: each assigned execution
    emits SCRIPT (a list of payload dicts) unless auto=False; a cancel ends it CANCELLED."""

    def __init__(self, script=None, capacity=2, auto=True):
        self.runner_id = f"fake-{uuid.uuid4().hex[:6]}"
        self.capacity, self.mode = capacity, "cloud"
        self.stopping = threading.Event()
        self.connected = False
        self.cond = threading.Condition()
        self.script = script if script is not None else [
            {"text": pb.TextDelta(text="working")}, {"usage": pb.Usage(input_tokens=10, output_tokens=2)},
            {"phase": pb.PhaseChange(phase=pb.COMPLETED, final_text="done", turns=1)}]
        self.auto = auto
        self.assignments, self.cancels, self.refusals, self.rewinds = [], [], [], 0
        self.boxes = {}  # execution id -> {"events": [...], "sent": seq, "acked": seq, "next": seq, "done": bool}
        self.most_running = 0

    # what a test does
    def emit(self, execution_id, **payload):
        with self.cond:
            box = self.boxes.get(execution_id)
            if box is None:
                return
            box["events"].append(pb.Event(execution_id=execution_id, seq=box["next"], time=time.time(), **payload))
            box["next"] += 1
            if "phase" in payload and payload["phase"].phase in rb.TERMINAL:
                box["done"] = True
            self.cond.notify_all()

    def all_acked(self):
        with self.cond:
            return not self.boxes

    # the public methods a link calls
    def assigned(self, execution):
        with self.cond:
            self.assignments.append(execution)
            self.boxes[execution.id] = {"events": [], "sent": execution.last_seq, "acked": execution.last_seq,
                                        "next": execution.last_seq + 1, "done": False}
            self.most_running = max(self.most_running, self.running())
        if self.auto:
            for payload in self.script:
                self.emit(execution.id, **payload)

    def running(self):
        return sum(not b["done"] for b in self.boxes.values())

    def free_slots(self):
        with self.cond:
            return self.capacity - self.running()

    def next_batch(self, timeout):
        with self.cond:
            unsent = lambda: any(e.seq > b["sent"] for b in self.boxes.values() for e in b["events"])  # noqa: E731
            if not unsent():
                self.cond.wait(timeout)
            batch = []
            for box in self.boxes.values():
                for event in box["events"]:
                    if event.seq > box["sent"]:
                        batch.append(event)
                        box["sent"] = event.seq
            return batch

    def acked(self, execution_id, seq):
        with self.cond:
            box = self.boxes.get(execution_id)
            if box:
                box["events"] = [e for e in box["events"] if e.seq > seq]
                box["acked"] = max(box["acked"], seq)
                if box["done"] and not box["events"]:
                    del self.boxes[execution_id]
            self.cond.notify_all()

    def refused(self, execution_id, ack_seq, gap, message=""):
        with self.cond:
            self.refusals.append((execution_id, ack_seq, gap, message))
            box = self.boxes.get(execution_id)
            if box and gap:
                box["events"] = [e for e in box["events"] if e.seq > ack_seq]
                box["acked"] = box["sent"] = ack_seq
            elif box:
                del self.boxes[execution_id]
            self.cond.notify_all()

    def cancel_requested(self, execution_id):
        with self.cond:
            self.cancels.append(execution_id)
            there = execution_id in self.boxes and not self.boxes[execution_id]["done"]
        if there:
            self.emit(execution_id, phase=pb.PhaseChange(phase=pb.CANCELLED, reason="cancelled by the user"))

    def rewind(self):
        with self.cond:
            self.rewinds += 1
            for box in self.boxes.values():
                box["sent"] = box["acked"]
            return [pb.InFlight(execution_id=i, last_seq=b["next"] - 1) for i, b in self.boxes.items()]


class Worker:
    """Just enough of a worker for RedisLink.take and send called by hand."""
    capacity, mode = 4, "cloud"

    def __init__(self, runner_id="w1"):
        self.runner_id, self.assignments, self.replies = runner_id, [], []

    def assigned(self, execution):
        self.assignments.append(execution)

    def acked(self, execution_id, seq):
        self.replies.append(("ack", seq))

    def refused(self, execution_id, ack_seq, gap, message=""):
        self.replies.append(("gap" if gap else "refused", ack_seq, message))

    def free_slots(self):
        return self.capacity


@requires_redis
class RedisCase(unittest.TestCase):
    """One redis-server per class; a fresh key prefix per test."""
    aof = False

    @classmethod
    def setUpClass(cls):
        cls.server = RedisServer(aof=cls.aof).start()
        cls._saved = rb.POLL_BLOCK, rb.FOLLOW_BLOCK, rb.LOST_CHECK
        rb.POLL_BLOCK, rb.FOLLOW_BLOCK, rb.LOST_CHECK = 0.2, 0.2, 0.3  # quick stops and checks

    @classmethod
    def tearDownClass(cls):
        rb.POLL_BLOCK, rb.FOLLOW_BLOCK, rb.LOST_CHECK = cls._saved
        cls.server.stop()

    def setUp(self):
        self.prefix = f"t{next(_prefixes)}-{os.getpid()}:"
        self.client = self.make_client()
        self.log = self.client.log
        self.r = self.log.r
        self.links = []

    def tearDown(self):
        for worker, thread in self.links:
            worker.stopping.set()
            thread.join(5)
        self.client.close()

    def make_client(self, **settings):
        return RedisClient(self.server.url, self.prefix, **{**SHORT, **settings})

    def start_link(self, worker, **settings):
        link = RedisLink(self.server.url, self.prefix, **{**SHORT, **settings})
        thread = threading.Thread(target=link.run, args=(worker,), daemon=True)
        thread.start()
        self.links.append((worker, thread))
        return link

    def read_entry(self, consumer="reader"):
        """Read the next queue entry as CONSUMER without taking it: (entry id, fields)."""
        self.log.ensure_group()
        reply = self.r.xreadgroup(rb.GROUP, consumer, {self.log.queue: ">"}, count=1)
        entry_id, fields = reply[0][1][0]
        return entry_id.decode(), fields

    def taken(self, execution=None, runner="w1", **settings):
        """Submit (unless given) and take an execution by hand: (execution id, link, stub worker)."""
        execution = execution or self.client.submit(spec())
        link = RedisLink(self.server.url, self.prefix, **{**SHORT, **settings})
        worker = Worker(runner)
        link.take(worker, *self.read_entry(runner))
        self.assertEqual([a.id for a in worker.assignments], [execution.id])
        return execution.id, link, worker

    def events(self, execution_id):
        return list(self.client.watch(execution_id, follow=False))

    def assert_contiguous(self, execution_id):
        seqs = [e.seq for e in self.events(execution_id)]
        self.assertEqual(seqs, list(range(1, len(seqs) + 1)))
        self.assertEqual(self.client.get(execution_id).last_seq, len(seqs))
        return seqs

    def append(self, execution_id, epoch, *events):
        """Call the append script straight; its reply as (status, seq, info)."""
        args = [epoch, len(events)]
        for event in events:
            args.extend(rb._event_args(event))
        status, seq, info = self.log.run("append", execution_id, *args)
        return status.decode(), int(seq), info


class TestScripts(RedisCase):

    def test_submit_writes_a_pending_record_its_first_event_and_a_queue_entry(self):
        ex = self.client.submit(spec("hello"))
        self.assertEqual((ex.phase, ex.last_seq, ex.spec.prompt), (pb.PENDING, 1, "hello"))
        self.assertTrue(ex.id.startswith("ex-"))
        [event] = self.events(ex.id)
        self.assertEqual((event.seq, event.phase.phase), (1, pb.PENDING))
        self.assertEqual(self.r.xlen(self.log.queue), 1)
        self.assertEqual(self.r.ttl(self.prefix + "ex:" + ex.id), -1)  # live: never expires

    def test_take_leases_with_a_new_epoch_and_removes_the_queue_entry(self):
        execution_id, link, worker = self.taken()
        [ex] = worker.assignments
        self.assertEqual((ex.phase, ex.last_seq, ex.runner_id), (pb.RUNNING, 2, "w1"))
        self.assertEqual(self.events(execution_id)[1].phase.phase, pb.RUNNING)
        self.assertEqual(self.r.get(self.prefix + "lease:" + execution_id), link.held[execution_id])
        self.assertGreater(self.r.pttl(self.prefix + "lease:" + execution_id), 0)
        self.assertEqual(self.r.xlen(self.log.queue), 0)  # acknowledged and deleted by the take itself
        self.assertEqual(self.r.xpending(self.log.queue, rb.GROUP)["pending"], 0)
        other_id, other_link, _ = self.taken(runner="w2")
        self.assertNotEqual(other_link.held[other_id], link.held[execution_id])  # every take, a new epoch

    def test_a_duplicate_is_acknowledged_and_a_gap_refused_with_the_last_stored_seq(self):
        execution_id, link, _ = self.taken()
        epoch = link.held[execution_id]
        self.assertEqual(self.append(execution_id, epoch, text(execution_id, 3), text(execution_id, 4))[:2], ("ok", 4))
        self.assertEqual(self.append(execution_id, epoch, text(execution_id, 3), text(execution_id, 4))[:2], ("ok", 4))
        self.assertEqual(self.append(execution_id, epoch, *(text(execution_id, s) for s in (3, 4, 5, 6)))[:2],
                         ("ok", 6))
        status, seq, why = self.append(execution_id, epoch, text(execution_id, 9))
        self.assertEqual((status, seq), ("gap", 6))
        self.assertIn(b"expected 7", why)
        status, seq, _ = self.append(execution_id, epoch, text(execution_id, 7), text(execution_id, 9))
        self.assertEqual((status, seq), ("gap", 7))  # what came before the gap is stored
        self.assertEqual(self.assert_contiguous(execution_id), [1, 2, 3, 4, 5, 6, 7])

    def test_send_tells_the_worker_acks_and_gaps(self):
        execution_id, link, worker = self.taken()
        link.send(worker, [text(execution_id, 3), text(execution_id, 4)])
        link.send(worker, [text(execution_id, 4)])
        link.send(worker, [text(execution_id, 8)])
        self.assertEqual(worker.replies[:2], [("ack", 4), ("ack", 4)])
        self.assertEqual(worker.replies[2][:2], ("gap", 4))

    def test_a_stale_epoch_is_refused_and_its_heartbeat_too(self):
        execution_id, link, _ = self.taken()
        epoch = int(link.held[execution_id])
        status, seq, why = self.append(execution_id, str(epoch + 100), text(execution_id, 3))
        self.assertEqual((status, seq), ("stale", 2))
        self.assertIn(b"does not own", why)
        self.assertEqual(self.log.run("heartbeat", execution_id, str(epoch + 100), 1000, 0)[0], 0)
        self.assertEqual(self.log.run("heartbeat", execution_id, str(epoch), 1000, 0)[0], 1)
        self.assertEqual(self.client.get(execution_id).last_seq, 2)

    def test_an_invalid_phase_is_refused(self):
        execution_id, link, _ = self.taken()
        status, seq, _ = self.append(execution_id, link.held[execution_id], done(execution_id, 3, pb.PENDING))
        self.assertEqual((status, seq), ("invalid", 2))

    def test_a_terminal_event_updates_the_record_ends_the_lease_and_sets_retention(self):
        execution_id, link, _ = self.taken()
        live_id, _, _ = self.taken(runner="w2")
        epoch = link.held[execution_id]
        usage = pb.Event(execution_id=execution_id, seq=4, usage=pb.Usage(input_tokens=7, output_tokens=3))
        status, seq, phase = self.append(
            execution_id, epoch, done(execution_id, 3, pb.RUNNING, turns=1), usage,
            done(execution_id, 5, final_text="all good", turns=2))
        self.assertEqual((status, seq, int(phase)), ("ok", 5, pb.COMPLETED))
        ex = self.client.get(execution_id)
        self.assertEqual((ex.phase, ex.final_text, ex.turns, ex.last_seq), (pb.COMPLETED, "all good", 2, 5))
        self.assertEqual((ex.usage.input_tokens, ex.usage.output_tokens), (7, 3))
        self.assertGreater(ex.finished_at, ex.started_at)
        self.assertFalse(self.r.exists(self.prefix + "lease:" + execution_id))
        for key in ("ex:", "events:"):
            self.assertAlmostEqual(self.r.ttl(self.prefix + key + execution_id), SHORT["retention"], delta=5)
            self.assertEqual(self.r.ttl(self.prefix + key + live_id), -1)  # live: never expires
        self.assertEqual(self.append(execution_id, epoch, text(execution_id, 6))[0], "stale")  # ended
        self.assertEqual(self.append(execution_id, epoch, done(execution_id, 5))[:2], ("ok", 5))  # a resend: fine
        self.assertEqual([e.id for e in self.client.list(pb.COMPLETED)], [execution_id])
        self.assertEqual([e.id for e in self.client.list(pb.RUNNING)], [live_id])

    def test_an_expired_lease_fails_the_execution_once_and_fences_the_zombie(self):
        execution_id, link, worker = self.taken(lease_ttl=0.3)
        epoch = link.held[execution_id]
        self.assertEqual(self.append(execution_id, epoch, text(execution_id, 3))[0], "ok")
        time.sleep(0.5)
        self.log.sweep()
        ex = self.client.get(execution_id)
        self.assertEqual((ex.phase, ex.error), (pb.FAILED, "runner lost"))
        events = self.events(execution_id)
        self.assertEqual([e.WhichOneof("payload") for e in events], ["phase", "phase", "text", "error", "phase"])
        self.assertEqual(events[3].error.code, "runner_lost")
        self.assertEqual(self.assert_contiguous(execution_id), [1, 2, 3, 4, 5])
        # the zombie wakes up: its events and heartbeats are refused, the record stays as the sweeper left it
        self.assertEqual(self.append(execution_id, epoch, text(execution_id, 4), text(execution_id, 5))[:2],
                         ("stale", 3))
        self.assertEqual(self.log.run("heartbeat", execution_id, epoch, 1000, 0)[0], 0)
        link.send(worker, [text(execution_id, 4)])
        self.assertEqual(worker.replies[-1][0], "refused")
        self.assertEqual(self.client.get(execution_id).last_seq, 5)
        self.assertFalse(self.log.end(execution_id, "lost"))  # a second sweeper changes nothing
        self.assertEqual(self.client.get(execution_id).last_seq, 5)
        self.assertGreater(self.r.ttl(self.prefix + "events:" + execution_id), 0)

    def test_the_cli_notices_an_expired_lease_on_get(self):
        execution_id, _, _ = self.taken(lease_ttl=0.2)
        time.sleep(0.35)
        self.assertEqual(self.client.get(execution_id).error, "runner lost")

    def test_take_skips_terminal_and_running_executions(self):
        ex = self.client.submit(spec())
        entry = self.read_entry("slow")
        self.client.cancel(ex.id)
        worker = Worker("slow")
        RedisLink(self.server.url, self.prefix, **SHORT).take(worker, *entry)
        self.assertEqual(worker.assignments, [])
        execution_id, _, _ = self.taken(runner="fast")
        again = Worker("late")  # the same execution, as a stale entry delivered to another worker
        RedisLink(self.server.url, self.prefix, **SHORT).take(again, "0-1", {b"id": execution_id.encode()})
        self.assertEqual(again.assignments, [])
        self.assertEqual(self.client.get(execution_id).runner_id, "fast")

    def test_a_retried_take_of_ones_own_is_the_same_take(self):
        self.client.submit(spec())
        entry = self.read_entry("w1")
        link, worker = RedisLink(self.server.url, self.prefix, **SHORT), Worker("w1")
        link.take(worker, *entry)
        epoch = link.held[worker.assignments[0].id]
        link.take(worker, *entry)  # as if the reply to the first was lost and the call repeated
        self.assertEqual(len(worker.assignments), 2)  # the worker ignores a repeat (worker.assigned does)
        self.assertEqual(worker.assignments[0].id, worker.assignments[1].id)
        self.assertEqual(link.held[worker.assignments[0].id], epoch)
        self.assertEqual(self.assert_contiguous(worker.assignments[0].id), [1, 2])

    def test_cancel_pending_ends_it_at_once(self):
        ex = self.client.submit(spec())
        cancelled = self.client.cancel(ex.id)
        self.assertEqual((cancelled.phase, cancelled.error), (pb.CANCELLED, "cancelled before it started"))
        self.assertEqual([e.phase.phase for e in self.events(ex.id)], [pb.PENDING, pb.CANCELLED])
        self.assertEqual(self.r.xlen(self.log.queue), 0)
        self.assertEqual(self.client.cancel(ex.id).phase, pb.CANCELLED)  # again: nothing changes
        self.assertEqual(self.client.get(ex.id).last_seq, 2)

    def test_an_unconfirmed_cancel_ends_it_after_the_grace(self):
        client = self.make_client(cancel_grace=0.2)
        execution_id, _, _ = self.taken()
        self.assertEqual(client.cancel(execution_id).phase, pb.RUNNING)
        time.sleep(0.3)
        client.log.sweep()
        ex = client.get(execution_id)
        self.assertEqual(ex.phase, pb.CANCELLED)
        self.assertIn("did not confirm", ex.error)
        client.close()


class TestClient(RedisCase):

    def test_get_list_newest_first_by_phase_and_limit(self):
        ids = []
        for n in range(4):
            ids.append(self.client.submit(spec(f"task {n}")).id)
            time.sleep(0.002)
        self.client.cancel(ids[1])
        self.assertEqual([e.id for e in self.client.list()], ids[::-1])
        self.assertEqual([e.id for e in self.client.list(limit=2)], ids[:1:-1])
        self.assertEqual([e.id for e in self.client.list(pb.PENDING)], [ids[3], ids[2], ids[0]])
        self.assertEqual([e.id for e in self.client.list(pb.CANCELLED)], [ids[1]])
        self.assertEqual(self.client.get(ids[2]).spec.prompt, "task 2")
        with self.assertRaisesRegex(BackendError, "no execution 'ex-nope'"):
            self.client.get("ex-nope")
        with self.assertRaises(BackendError):
            self.client.list(phase=42)

    def test_submit_refuses_an_empty_prompt(self):
        with self.assertRaisesRegex(BackendError, "prompt is empty"):
            self.client.submit(spec("  "))

    def test_list_forgets_expired_records(self):
        ex = self.client.submit(spec())
        self.r.delete(self.prefix + "ex:" + ex.id)
        self.r.zadd(self.log.index[0], {ex.id: 1.0})  # as if created long before the retention window
        self.assertEqual(self.client.list(), [])
        self.client.status()
        self.assertIsNone(self.r.zscore(self.log.index[0], ex.id))

    def test_watch_replays_from_any_seq_and_follows_to_the_terminal_event(self):
        execution_id, link, worker = self.taken()
        link.send(worker, [text(execution_id, 3, "a"), text(execution_id, 4, "b")])
        self.assertEqual([e.seq for e in self.client.watch(execution_id, after_seq=2, follow=False)], [3, 4])
        got = []
        follower = threading.Thread(target=lambda: got.extend(self.client.watch(execution_id, after_seq=1)),
                                    daemon=True)
        follower.start()
        wait_for(lambda: len(got) == 3, what="the replay")
        for seq in range(5, 9):
            link.send(worker, [text(execution_id, seq)])
            time.sleep(0.01)
        link.send(worker, [done(execution_id, 9)])
        follower.join(5)
        self.assertFalse(follower.is_alive())
        self.assertEqual([e.seq for e in got], list(range(2, 10)))
        self.assertEqual(got[-1].phase.phase, pb.COMPLETED)
        self.assertEqual([e.seq for e in self.client.watch(execution_id, after_seq=9)], [])

    def test_watch_pages_through_a_long_log(self):
        execution_id, link, worker = self.taken()
        link.send(worker, [text(execution_id, s) for s in range(3, rb.PAGE + 503)] + [done(execution_id, rb.PAGE + 503)])
        seqs = [e.seq for e in self.client.watch(execution_id)]
        self.assertEqual(seqs, list(range(1, rb.PAGE + 504)))

    def test_a_follower_can_be_cancelled_and_ends_when_the_owner_is_lost(self):
        execution_id, _, _ = self.taken(lease_ttl=30)
        watch = self.client.watch(execution_id)
        got = []
        follower = threading.Thread(target=lambda: got.extend(watch), daemon=True)
        follower.start()
        wait_for(lambda: len(got) == 2)
        watch.cancel()
        follower.join(2)
        self.assertFalse(follower.is_alive())
        self.r.delete(self.prefix + "lease:" + execution_id)  # as if it expired
        events = list(self.client.watch(execution_id, after_seq=2))  # the follower itself notices
        self.assertEqual([e.WhichOneof("payload") for e in events], ["error", "phase"])
        self.assertEqual(events[-1].phase.reason, "runner lost")

    def test_status_counts_phases_queue_and_live_workers(self):
        for _ in range(3):
            self.client.submit(spec())
        self.client.cancel(self.client.list(pb.PENDING)[0].id)
        worker = FakeWorker(capacity=0)  # takes nothing: only registers
        self.start_link(worker)
        wait_for(lambda: self.client.status().connected_runners == 1, what="the worker to register")
        status = self.client.status()
        self.assertEqual(status.queue_depth, 2)
        self.assertEqual(dict(status.executions_by_phase), {"PENDING": 2, "CANCELLED": 1})
        self.assertEqual((status.free_capacity, status.version), (0, rb.VERSION))
        worker.stopping.set()
        wait_for(lambda: self.client.status().connected_runners == 0, what="the worker to leave")

    def test_redis_down_is_backend_unavailable_naming_redis_url(self):
        from testsupport import free_port
        client = RedisClient(f"redis://:hunter2@127.0.0.1:{free_port()}/0", self.prefix)
        with self.assertRaises(BackendUnavailable) as caught:
            client.list()
        message = str(caught.exception)
        self.assertIn("REDIS_URL", message)
        self.assertNotIn("hunter2", message)
        self.assertEqual(len(message.splitlines()), 1)
        with self.assertRaisesRegex(BackendError, "not a Redis URL"):
            RedisClient("http://example.com", self.prefix)


class TestLink(RedisCase):

    def test_executions_run_once_each_over_two_workers_with_complete_logs(self):
        workers = [FakeWorker(capacity=2), FakeWorker(capacity=1)]
        for worker in workers:
            self.start_link(worker)
        ids = [self.client.submit(spec(f"task {n}")).id for n in range(8)]
        wait_for(lambda: all(self.client.get(i).phase == pb.COMPLETED for i in ids), 15, "all to complete")
        assigned = [a.id for w in workers for a in w.assignments]
        self.assertEqual(sorted(assigned), sorted(ids))  # each exactly once
        for execution_id in ids:
            ex = self.client.get(execution_id)
            self.assertEqual((ex.final_text, ex.usage.input_tokens, ex.turns), ("done", 10, 1))
            self.assertEqual(self.assert_contiguous(execution_id), [1, 2, 3, 4, 5])
        for worker in workers:
            self.assertLessEqual(worker.most_running, worker.capacity)
            wait_for(worker.all_acked, what="acks")
        self.assertEqual(self.r.xlen(self.log.queue), 0)

    def test_no_secret_value_reaches_redis(self):
        os.environ["STIGMER_TEST_TOKEN"] = value = "s3cr3t-" + uuid.uuid4().hex
        self.addCleanup(os.environ.pop, "STIGMER_TEST_TOKEN")
        worker = FakeWorker()
        self.start_link(worker)
        ex = self.client.submit(pb.ExecutionSpec(prompt="use the token", workspace="/tmp",
                                                 secret_names=["STIGMER_TEST_TOKEN"]))
        wait_for(lambda: self.client.get(ex.id).phase == pb.COMPLETED)
        self.assertEqual(list(self.client.get(ex.id).spec.secret_names), ["STIGMER_TEST_TOKEN"])  # the name only
        dump = []
        for key in self.r.scan_iter(match=self.prefix + "*"):
            kind = self.r.type(key)
            read = {b"hash": lambda k: self.r.hgetall(k), b"stream": lambda k: self.r.xrange(k),
                    b"zset": lambda k: self.r.zrange(k, 0, -1), b"string": lambda k: self.r.get(k)}[kind]
            dump.append(repr((key, read(key))))
        self.assertGreater(len(dump), 5)
        self.assertNotIn(value, "".join(dump))

    def test_an_entry_read_but_never_taken_is_reclaimed_and_runs_once(self):
        ex = self.client.submit(spec())
        self.read_entry("died-after-reading")
        worker = FakeWorker()
        self.start_link(worker)
        wait_for(lambda: self.client.get(ex.id).phase == pb.COMPLETED, what="the reclaimed run")
        time.sleep(0.5)  # more reclaim rounds: nothing runs twice
        self.assertEqual([a.id for a in worker.assignments], [ex.id])
        self.assertEqual(self.r.xpending(self.log.queue, rb.GROUP)["pending"], 0)
        self.assertEqual(self.assert_contiguous(ex.id), [1, 2, 3, 4, 5])

    def test_an_entry_delivered_too_often_is_dead_lettered_and_failed(self):
        ex = self.client.submit(spec())
        entry_id, _ = self.read_entry("died")
        self.r.xclaim(self.log.queue, rb.GROUP, "died-again", 0, [entry_id], retrycount=rb.MAX_DELIVERIES)
        worker = FakeWorker()
        self.start_link(worker)
        wait_for(lambda: self.client.get(ex.id).phase == pb.FAILED, what="the dead letter")
        self.assertEqual(worker.assignments, [])
        [(_, fields)] = self.r.xrange(self.log.dead)
        self.assertEqual(fields[b"id"].decode(), ex.id)
        self.assertIn(b"delivered", fields[b"reason"])
        self.assertIn("dead letter", self.client.get(ex.id).error)
        self.assertEqual([e.WhichOneof("payload") for e in self.events(ex.id)], ["phase", "error", "phase"])
        self.assertEqual(self.r.xlen(self.log.queue), 0)

    def test_cancel_reaches_the_owning_worker_within_a_second(self):
        worker = FakeWorker(script=[{"text": pb.TextDelta(text="thinking")}])  # never finishes by itself
        self.start_link(worker)
        ex = self.client.submit(spec())
        wait_for(lambda: self.client.get(ex.id).last_seq == 3, what="the run to start")
        start = time.monotonic()
        self.assertEqual(self.client.cancel(ex.id).phase, pb.RUNNING)
        wait_for(lambda: self.client.get(ex.id).phase == pb.CANCELLED, 3, "the cancel")
        self.assertLess(time.monotonic() - start, 1.5)
        self.assertEqual(worker.cancels, [ex.id])
        self.assertEqual(self.client.get(ex.id).error, "cancelled by the user")
        self.assertEqual(self.assert_contiguous(ex.id), [1, 2, 3, 4])

    def test_a_cancelled_pending_execution_is_never_assigned(self):
        ex = self.client.submit(spec())
        self.client.cancel(ex.id)
        worker = FakeWorker()
        self.start_link(worker)
        other = self.client.submit(spec())
        wait_for(lambda: self.client.get(other.id).phase == pb.COMPLETED)
        self.assertEqual([a.id for a in worker.assignments], [other.id])

    def test_a_lost_lease_stops_the_worker_and_fails_the_execution(self):
        worker = FakeWorker(script=[], auto=False)
        self.start_link(worker, lease_ttl=0.6)
        ex = self.client.submit(spec())
        wait_for(lambda: worker.assignments, what="the assignment")
        worker.emit(ex.id, text=pb.TextDelta(text="a"))
        wait_for(lambda: self.client.get(ex.id).last_seq == 3)
        self.r.delete(self.prefix + "lease:" + ex.id)  # as if it had expired while the worker was paused
        wait_for(lambda: worker.refusals, what="the refusal")
        self.assertEqual(worker.refusals[0][:3], (ex.id, 3, False))
        wait_for(lambda: self.client.get(ex.id).phase == pb.FAILED)
        self.assertEqual(self.client.get(ex.id).error, "runner lost")
        worker.emit(ex.id, text=pb.TextDelta(text="too late"))  # dropped: the worker forgot it
        time.sleep(0.3)
        self.assertEqual(self.assert_contiguous(ex.id), [1, 2, 3, 4, 5])

    def test_heartbeats_keep_a_long_run_alive(self):
        worker = FakeWorker(script=[], auto=False)
        self.start_link(worker, lease_ttl=0.6)
        ex = self.client.submit(spec())
        wait_for(lambda: worker.assignments)
        time.sleep(1.5)  # more than two lease lifetimes
        self.assertEqual(self.client.get(ex.id).phase, pb.RUNNING)
        worker.emit(ex.id, phase=pb.PhaseChange(phase=pb.COMPLETED, final_text="ok"))
        wait_for(lambda: self.client.get(ex.id).phase == pb.COMPLETED)
        wait_for(worker.all_acked)


class TestRestart(RedisCase):
    aof = True  # these restart redis-server and need their data back

    def test_a_worker_buffers_through_a_redis_restart_and_resends(self):
        worker = FakeWorker(script=[], auto=False)
        self.start_link(worker, lease_ttl=10)
        ex = self.client.submit(spec())
        wait_for(lambda: worker.assignments, what="the assignment")
        for n in range(5):
            worker.emit(ex.id, text=pb.TextDelta(text=f"before {n}"))
        wait_for(lambda: self.client.get(ex.id).last_seq == 7)
        self.server.stop(remove=False)
        wait_for(lambda: not worker.connected, what="the link to notice")
        for n in range(5):
            worker.emit(ex.id, text=pb.TextDelta(text=f"during {n}"))
        time.sleep(0.3)
        self.server.start()
        worker.emit(ex.id, phase=pb.PhaseChange(phase=pb.COMPLETED, final_text="ok"))
        wait_for(worker.all_acked, 15, "everything to be acknowledged")
        self.assertGreaterEqual(worker.rewinds, 2)
        events = self.events(ex.id)
        self.assertEqual(self.assert_contiguous(ex.id), list(range(1, 14)))
        self.assertEqual([e.text.text for e in events[2:12]], [f"before {n}" for n in range(5)] +
                         [f"during {n}" for n in range(5)])
        self.assertEqual(self.client.get(ex.id).phase, pb.COMPLETED)

    def test_a_follower_resumes_after_a_redis_restart(self):
        execution_id, link, worker = self.taken(lease_ttl=10)
        got = []
        follower = threading.Thread(target=lambda: got.extend(self.client.watch(execution_id)), daemon=True)
        follower.start()
        link.send(worker, [text(execution_id, 3), text(execution_id, 4)])
        wait_for(lambda: len(got) == 4)
        self.server.restart(down_for=0.5)
        link.send(worker, [text(execution_id, 5), done(execution_id, 6)])
        follower.join(10)
        self.assertFalse(follower.is_alive())
        self.assertEqual([e.seq for e in got], [1, 2, 3, 4, 5, 6])


class TestWithoutRedisPackage(unittest.TestCase):

    def test_the_error_names_the_cloud_extra(self):
        code = ("import sys; sys.modules['redis'] = None\n"
                "import redis_backend\n"
                "try:\n    redis_backend.RedisClient('redis://127.0.0.1:1/0')\n"
                "except redis_backend.BackendError as e:\n    print(e)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=60)
        self.assertIn("pip install -e '.[cloud]'", out.stdout, out.stderr)


if __name__ == "__main__":
    unittest.main()
