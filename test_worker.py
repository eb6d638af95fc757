"""Tests of the worker through the methods a link calls, and of DaemonLink against a real daemon.

    python -m unittest test_worker -v
"""
import json
import os
import shutil
import tempfile
import threading
import time
import unittest
from unittest import mock

import grpc

import contract
import daemon_client
import daemon_server
import models
import sandbox
import stigmer_pb2 as pb
import stigmer_pb2_grpc as pb_grpc
import worker
from testsupport import FAKE_KEY, FakeAnthropic, text_step, tool_step
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

stigmer_secrets = models.project_secrets()


class OutboxTest(unittest.TestCase):
    """The worker's buffering, with no link at all: events wait in outboxes until acknowledged."""

    def setUp(self):
        self.w = worker.Worker(environ=os.environ, capacity=1)
        self.w.outboxes["ex-1"] = worker.Outbox("ex-1", last_seq=2)  # the daemon wrote PENDING and RUNNING
        self.redactor = stigmer_secrets.Redactor({"GITHUB_TOKEN": "ghp_supersecret_value"})

    def emit(self, **payload):
        self.w.emit("ex-1", self.redactor, **payload)

    def test_text_deltas_coalesce_and_seqs_stay_contiguous(self):
        for piece in ("Hel", "lo ", "world"):
            self.emit(text=pb.TextDelta(text=piece))
        self.emit(tool_call=pb.ToolCall(id="t1", name="ls", input_json="{}"))
        self.emit(text=pb.TextDelta(text="after"))
        batch = self.w.next_batch(0)
        self.assertEqual([e.seq for e in batch], [3, 4, 5])
        self.assertEqual(batch[0].text.text, "Hello world")
        self.assertEqual(batch[1].WhichOneof("payload"), "tool_call")
        self.assertEqual(batch[2].text.text, "after")
        self.assertEqual(self.w.next_batch(0), [])  # sent once per stream

    def test_a_secret_split_across_deltas_is_redacted(self):
        for piece in ("token: ghp_super", "secret_val", "ue done"):
            self.emit(text=pb.TextDelta(text=piece))
        self.emit(usage=pb.Usage(input_tokens=1))
        text = "".join(e.text.text for e in self.w.next_batch(0) if e.WhichOneof("payload") == "text")
        self.assertEqual(text, "token: [REDACTED:GITHUB_TOKEN] done")

    def test_acks_free_events_and_the_agent_pauses_when_the_buffer_is_full(self):
        with mock.patch.object(worker, "MAX_BUFFERED_EVENTS", 5):
            for n in range(5):
                self.emit(usage=pb.Usage(input_tokens=n))
            blocked = threading.Thread(target=self.emit, kwargs={"usage": pb.Usage(input_tokens=99)})
            blocked.start()
            blocked.join(0.5)
            self.assertTrue(blocked.is_alive(), "emit should wait while 5 events are unacknowledged")
            self.assertEqual(len(self.w.outboxes["ex-1"].events), 5)  # nothing dropped, nothing added
            self.w.acked("ex-1", 4)  # seqs 3 and 4 stored
            blocked.join(5)
            self.assertFalse(blocked.is_alive())
        box = self.w.outboxes["ex-1"]
        self.assertEqual([e.seq for e in box.events], [5, 6, 7, 8])
        self.assertEqual(box.events[-1].usage.input_tokens, 99)
        self.assertEqual(self.w.buffered, 4)

    def test_gap_reject_resends_after_the_daemons_seq(self):
        for n in range(4):
            self.emit(usage=pb.Usage(input_tokens=n))
        self.assertEqual(len(self.w.next_batch(0)), 4)  # seqs 3..6 sent
        self.w.refused("ex-1", ack_seq=4, gap=True)
        self.assertEqual([e.seq for e in self.w.next_batch(0)], [5, 6])

    def test_permission_denied_drops_the_execution(self):
        self.emit(usage=pb.Usage(input_tokens=1))
        self.w.refused("ex-1", ack_seq=2, gap=False, message="not yours")
        self.assertNotIn("ex-1", self.w.outboxes)
        self.assertEqual(self.w.buffered, 0)

    def test_cancel_before_the_agent_exists_still_ends_cancelled(self):
        self.w.cancel_requested("ex-1")
        self.assertIn("ex-1", self.w.outboxes)  # kept: its CANCELLED event must still reach the daemon
        spec = pb.ExecutionSpec(prompt="p", workspace=tempfile.gettempdir())
        self.w._run_execution(pb.Execution(id="ex-1", spec=spec, last_seq=2))  # the SDK is never ready here
        (event,) = self.w.next_batch(0)
        self.assertEqual((event.seq, event.phase.phase), (3, pb.CANCELLED))

    def test_a_cancel_after_the_end_keeps_the_unacknowledged_tail(self):
        self.emit(usage=pb.Usage(input_tokens=1))
        self.emit(phase=pb.PhaseChange(phase=pb.COMPLETED))
        self.w.cancel_requested("ex-1")
        self.assertEqual([e.seq for e in self.w.next_batch(0)], [3, 4])  # COMPLETED still goes out

    def test_an_emit_waiting_for_room_gives_up_when_the_execution_is_dropped(self):
        with mock.patch.object(worker, "MAX_BUFFERED_EVENTS", 1):
            self.emit(usage=pb.Usage(input_tokens=1))
            waiting = threading.Thread(target=self.emit, kwargs={"usage": pb.Usage(input_tokens=2)})
            waiting.start()
            time.sleep(0.2)
            self.w.refused("ex-1", ack_seq=0, gap=False)  # the log drops it
            waiting.join(5)
        self.assertFalse(waiting.is_alive())
        self.assertEqual(self.w.buffered, 0)

    def test_emit_after_the_daemon_dropped_the_execution_is_ignored(self):
        self.w.refused("ex-1", ack_seq=0, gap=False)
        self.emit(usage=pb.Usage(input_tokens=1))  # no KeyError, nothing kept
        self.assertEqual(self.w.buffered, 0)

    def test_an_event_over_the_size_cap_is_cut_and_says_so(self):
        self.emit(tool_result=pb.ToolResult(id="t1", output="o" * (5 << 20), exit_code=0))
        self.emit(prompt=pb.Prompt(text="p" * (3 << 20), system="s" * (3 << 20)))
        (result,), (prompt,) = self.w.next_batch(0), self.w.next_batch(0)  # one a batch: each is ~4 MiB
        for event in (result, prompt):
            self.assertLessEqual(event.ByteSize(), worker.MAX_EVENT_BYTES + 64)
        self.assertTrue(result.tool_result.output.startswith("o" * 1000))
        self.assertIn(f"[cut here: {5 << 20} bytes, over the 4 MiB an event holds]", result.tool_result.output)
        self.assertEqual(prompt.prompt.system, "s" * (3 << 20))  # only the longest string is cut, as far as needed
        self.assertIn("[cut here:", prompt.prompt.text)

    def test_batches_are_capped_in_bytes(self):
        big = "x" * (worker.BATCH_BYTES // 3)
        for _ in range(4):
            self.emit(tool_result=pb.ToolResult(id="t", output=big))
        self.assertEqual([len(self.w.next_batch(0)) for _ in range(3)], [2, 2, 0])

    def test_finished_execution_is_forgotten_once_acknowledged(self):
        self.emit(phase=pb.PhaseChange(phase=pb.COMPLETED))
        self.w.next_batch(0)
        self.w.acked("ex-1", 2)
        self.assertIn("ex-1", self.w.outboxes)  # seq 3 not yet stored
        self.w.acked("ex-1", 3)
        self.assertNotIn("ex-1", self.w.outboxes)


def drain(w, execution_id, ack=True, timeout=30):
    """Take batches as a link would (acknowledging each when ACK) until EXECUTION_ID's terminal event."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = w.next_batch(0.25)
        events += batch
        if ack and batch:
            w.acked(execution_id, batch[-1].seq)
        if any(e.HasField("phase") and e.phase.phase in (pb.COMPLETED, pb.FAILED, pb.CANCELLED) for e in batch):
            return events
    raise AssertionError(f"no terminal event for {execution_id} in {timeout} s: {events}")


class WorkerTest(unittest.TestCase):
    """A worker running real agents (against the fake Messages API), driven as a link drives it."""

    def setUp(self):
        self.workspace = tempfile.mkdtemp(prefix="stigmer-ws-")
        self.addCleanup(shutil.rmtree, self.workspace, ignore_errors=True)
        self.fake = FakeAnthropic([tool_step(("execute", {"command": "echo one"})),
                                   tool_step(("execute", {"command": "echo two"})),
                                   tool_step(("execute", {"command": "echo three"})),
                                   text_step("all done")]).start()
        self.addCleanup(self.fake.stop)
        env = mock.patch.dict(os.environ, {"ANTHROPIC_API_KEY": FAKE_KEY, "ANTHROPIC_BASE_URL": self.fake.url})
        env.start()
        self.addCleanup(env.stop)
        self.w = worker.Worker(environ=os.environ, capacity=1, model="claude-fake", runner_id="r-test")
        self.addCleanup(self.w.stop, flush=0)

    def assign(self, execution_id="ex-w"):
        spec = pb.ExecutionSpec(prompt="count to three", workspace=self.workspace)
        self.w.assigned(pb.Execution(id=execution_id, spec=spec, last_seq=2))  # the log wrote PENDING and RUNNING
        return execution_id

    def test_an_assignment_runs_and_its_events_are_forgotten_once_acknowledged(self):
        ex = self.assign()
        events = drain(self.w, ex)
        self.assertEqual([e.seq for e in events], list(range(3, 3 + len(events))))
        self.assertEqual([e.tool_call.name for e in events if e.HasField("tool_call")], ["execute"] * 3)
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED)
        self.assertEqual(events[-1].phase.final_text, "all done")
        self.assertNotIn(ex, self.w.outboxes)
        self.assertEqual(self.w.buffered, 0)
        self.assertEqual(self.w.rewind(), [])  # nothing in flight for the next Hello
        self.assertEqual(self.w.free_slots(), 1)

    def test_an_execution_naming_a_provider_key_or_every_variable_is_refused(self):
        for n, names in enumerate((["ANTHROPIC_API_KEY"], ["*"], ["GITHUB_TOKEN", "OPENAI_API_KEY"])):
            with self.subTest(names=names):
                spec = pb.ExecutionSpec(prompt="print the key", workspace=self.workspace, secret_names=names)
                self.w.assigned(pb.Execution(id=f"ex-r{n}", spec=spec, last_seq=2))
                events = drain(self.w, f"ex-r{n}")
                self.assertEqual(events[-1].phase.phase, pb.FAILED)
                refused = [name for name in names if name != "GITHUB_TOKEN"]
                self.assertIn(f"asks for {', '.join(refused)} in the agent's shell", events[-1].phase.reason)
                self.assertEqual([e.error.code for e in events if e.HasField("error")], ["secret_refused"])
        self.assertEqual(self.fake.requests, [])  # no model call, so no command ran
        allowed = worker.Worker(environ=os.environ, capacity=1, model="claude-fake", runner_id="r-allowed",
                                allowed_secrets=["ANTHROPIC_API_KEY", "*"])  # the run that asked started it
        self.addCleanup(allowed.stop, flush=0)
        spec = pb.ExecutionSpec(prompt="count", workspace=self.workspace, secret_names=["ANTHROPIC_API_KEY", "*"])
        allowed.assigned(pb.Execution(id="ex-ok", spec=spec, last_seq=2))
        self.assertEqual(drain(allowed, "ex-ok")[-1].phase.phase, pb.COMPLETED)

    def test_unsent_events_travel_in_one_batch_oldest_execution_first(self):
        first, second = self.assign("ex-a"), self.assign("ex-b")
        deadline = time.monotonic() + 30
        while not all(self.w.outboxes[ex].finished for ex in (first, second)):  # nobody drains meanwhile
            self.assertLess(time.monotonic(), deadline, "the agents did not finish")
            time.sleep(0.05)
        batch = self.w.next_batch(0)
        ids = [e.execution_id for e in batch]
        self.assertEqual(ids, sorted(ids))  # all of ex-a's events, then all of ex-b's
        for ex in (first, second):
            events = [e for e in batch if e.execution_id == ex]
            self.assertEqual([e.seq for e in events], list(range(3, 3 + len(events))))
            self.assertEqual(events[-1].phase.phase, pb.COMPLETED)
        self.assertEqual(self.w.next_batch(0), [])  # each event is sent once per session

    def test_a_reconnect_resends_everything_after_the_last_ack(self):
        ex = self.assign()
        sent = drain(self.w, ex, ack=False)  # the stream breaks before any ack comes back
        last = sent[-1].seq
        self.w.acked(ex, 5)
        self.assertEqual(self.w.next_batch(0), [])  # sent once per session
        (in_flight,) = self.w.rewind()  # a new session: Hello carries the in-flight execution
        self.assertEqual((in_flight.execution_id, in_flight.last_seq), (ex, last))
        again = self.w.next_batch(0)
        self.assertEqual([e.seq for e in again], list(range(6, last + 1)))
        self.assertEqual(list(again), [e for e in sent if e.seq > 5])  # the same events, not new ones
        self.w.acked(ex, last)
        self.assertNotIn(ex, self.w.outboxes)

    def test_a_gap_refusal_resends_after_the_logs_seq_and_other_refusals_drop(self):
        ex = self.assign()
        sent = drain(self.w, ex, ack=False)
        self.w.refused(ex, ack_seq=4, gap=True, message="expected seq 5")
        self.assertEqual([e.seq for e in self.w.next_batch(0)], [e.seq for e in sent if e.seq > 4])
        self.w.refused(ex, ack_seq=4, gap=False, message="not yours")
        self.assertNotIn(ex, self.w.outboxes)
        self.assertEqual((self.w.buffered, self.w.next_batch(0)), (0, []))

    def test_a_full_buffer_pauses_the_agent_until_acks_free_room(self):
        with mock.patch.object(worker, "MAX_BUFFERED_EVENTS", 3):
            ex = self.assign()
            batch, deadline = [], time.monotonic() + 30
            while len(batch) < 3:
                self.assertLess(time.monotonic(), deadline, f"the agent sent only {batch}")
                batch += self.w.next_batch(1)
            time.sleep(0.5)  # time enough for the agent's remaining turns, were it not paused
            self.assertIn(ex, self.w.agents, "the agent should be paused, not finished")
            self.assertEqual(len(self.w.outboxes[ex].events), 3)
            self.assertLess(len(self.fake.requests), 4)  # it has not asked for its last turn
            self.w.acked(ex, batch[-1].seq)
            events = batch + drain(self.w, ex)
        self.assertEqual([e.seq for e in events], list(range(3, 3 + len(events))))
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED)

    def test_a_cancel_stops_a_running_agent(self):
        self.fake.script[1]["delay"] = 1.0  # the second turn is slow: the cancel lands mid-run
        ex = self.assign()
        first = self.w.next_batch(5)
        self.w.cancel_requested(ex)
        events = first + drain(self.w, ex)
        self.assertEqual(events[-1].phase.phase, pb.CANCELLED)


class RedactionPointTest(unittest.TestCase):
    """Issue 28, items 7 and 8: every string leaving the worker passes one redactor, and model output that is
    not valid text never fails a run."""

    SECRET = 'pa"ss\\word-0123456'  # JSON escapes both the quote and the backslash

    def run_script(self, script, prompt="go"):
        workspace = tempfile.mkdtemp(prefix="stigmer-ws-")
        self.addCleanup(shutil.rmtree, workspace, ignore_errors=True)
        fake = FakeAnthropic(script).start()
        self.addCleanup(fake.stop)
        env = mock.patch.dict(os.environ, {"ANTHROPIC_API_KEY": FAKE_KEY, "ANTHROPIC_BASE_URL": fake.url,
                                           "DB_PASSWORD": self.SECRET})
        env.start()
        self.addCleanup(env.stop)
        w = worker.Worker(environ=os.environ, capacity=1, model="claude-fake", runner_id="r-redact")
        self.addCleanup(w.stop, flush=0)
        w.assigned(pb.Execution(id="ex-redact", spec=pb.ExecutionSpec(prompt=prompt, workspace=workspace), last_seq=2))
        return drain(w, "ex-redact")

    def assert_nowhere(self, events, *values):
        wire = b"".join(e.SerializeToString() for e in events)
        for value in values:
            for form in (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]):
                self.assertNotIn(form.encode(), wire)

    def test_a_secret_with_a_quote_and_a_backslash_is_redacted_in_tool_input(self):
        events = self.run_script([tool_step(("execute", {"command": f"echo '{self.SECRET}' | wc -c"})),
                                  text_step("done")])
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED)
        call = next(e.tool_call for e in events if e.HasField("tool_call"))
        self.assertEqual(json.loads(call.input_json), {"command": "echo '[REDACTED:DB_PASSWORD]' | wc -c"})
        self.assert_nowhere(events, self.SECRET)

    def test_a_model_error_that_echoes_the_key_is_redacted(self):
        echo = f"bad request; your headers were x-api-key: {FAKE_KEY}"
        events = self.run_script([text_step("never", errors=[(400, echo)])])
        self.assertEqual(events[-1].phase.phase, pb.FAILED)
        errors = [e.error for e in events if e.HasField("error")]
        self.assertTrue(errors and "[REDACTED:ANTHROPIC_API_KEY]" in errors[-1].message, errors)
        self.assertIn("[REDACTED:ANTHROPIC_API_KEY]", events[-1].phase.reason)
        self.assert_nowhere(events, FAKE_KEY)

    def test_every_event_field_is_redacted_the_prompt_and_final_text_too(self):
        events = self.run_script([text_step(f"the password is {self.SECRET}")], prompt=f"use {self.SECRET}")
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED)
        self.assertEqual(events[-1].phase.final_text, "the password is [REDACTED:DB_PASSWORD]")
        self.assert_nowhere(events, self.SECRET)

    def test_a_lone_surrogate_in_model_text_does_not_fail_the_run(self):
        events = self.run_script([tool_step(("execute", {"command": "printf 'a\\377b'"}), text="a\udfffb"),
                                  text_step("done \ud83d")])
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED, events[-1].phase.reason)
        text = "".join(e.text.text for e in events if e.HasField("text"))
        self.assertIn("a\ufffdb", text)
        self.assertIn("done \ufffd", text)
        self.assertEqual(events[-1].phase.final_text, "done \ufffd")
        result = next(e.tool_result for e in events if e.HasField("tool_result"))
        self.assertEqual(result.output, "a\ufffdb")  # a byte that is not UTF-8 in a command's output, too

    def test_valid_text_replaces_lone_surrogates_only(self):
        import agent
        self.assertEqual(agent.valid_text("ok \U0001f600"), "ok \U0001f600")
        self.assertEqual(agent.valid_value({"k\ud800": ["\udc00", 1, {"x": "\ud83d!"}]}),
                         {"k\ufffd": ["\ufffd", 1, {"x": "\ufffd!"}]})


class ConfinedWorkerTest(unittest.TestCase):
    """Executions whose commands are confined by the real bwrap, through the worker's own sandbox factory: the
    spec's mode (else the worker's default) applies; secrets and the daemon's token are redacted inside too."""

    SECRET = "confined-secret-value-0123456789"
    TOKEN = "daemon-token-for-the-redaction-test-0123456789"

    def setUp(self):
        problem = sandbox.confinement_problem()
        if problem:
            self.skipTest(f"bwrap cannot run here, so confinement is not tested: {problem}")
        self.workspace = tempfile.mkdtemp(prefix="stigmer-ws-")
        self.outside = tempfile.mkdtemp(prefix="stigmer-outside-", dir="/var/tmp")  # not under the private /tmp
        for folder in (self.workspace, self.outside):
            self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        command = f"echo [$MY_SECRET] [{self.TOKEN}]; echo planted > {self.outside}/planted.txt; echo made > made.txt"
        self.fake = FakeAnthropic([tool_step(("execute", {"command": command})), text_step("done")]).start()
        self.addCleanup(self.fake.stop)
        env = mock.patch.dict(os.environ, {"ANTHROPIC_API_KEY": FAKE_KEY, "ANTHROPIC_BASE_URL": self.fake.url,
                                           "MY_SECRET": self.SECRET})
        env.start()
        self.addCleanup(env.stop)
        make_sandbox = worker.confined_host_sandbox("workspace-write", [os.path.join(self.outside, "hidden")])
        self.w = worker.Worker(capacity=1, model="claude-fake", runner_id="r-confined", make_sandbox=make_sandbox,
                               environ=os.environ, also_secret=lambda: {"STIGMER_DAEMON_TOKEN": self.TOKEN})
        self.addCleanup(self.w.stop, flush=0)

    def run_one(self, execution_id, **spec):
        self.w.assigned(pb.Execution(id=execution_id, last_seq=2, spec=pb.ExecutionSpec(
            prompt="try it", workspace=self.workspace, secret_names=["MY_SECRET"], **spec)))
        events = drain(self.w, execution_id)
        results = [e.tool_result.output for e in events if e.HasField("tool_result")]
        return events, results

    def test_the_default_mode_confines_and_redaction_still_works_inside(self):
        events, (output,) = self.run_one("ex-default")  # the spec says no mode: the worker's default
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED)
        self.assertIn("[[REDACTED:MY_SECRET]] [[REDACTED:STIGMER_DAEMON_TOKEN]]", output)
        self.assertNotIn(self.SECRET, str(events))
        seen = json.dumps([m for r in self.fake.requests for m in r["messages"] if m["role"] == "user"])
        self.assertNotIn(self.TOKEN, str(events) + seen)  # what the model got back and the log
        self.assertIn("Read-only file system", output)
        self.assertFalse(os.path.exists(os.path.join(self.outside, "planted.txt")))
        with open(os.path.join(self.workspace, "made.txt")) as f:
            self.assertEqual(f.read(), "made\n")

    def test_full_access_in_the_spec_is_not_confined(self):
        events, (output,) = self.run_one("ex-full", sandbox_mode="full-access")
        self.assertEqual(events[-1].phase.phase, pb.COMPLETED)
        self.assertNotIn("Read-only file system", output)
        self.assertTrue(os.path.exists(os.path.join(self.outside, "planted.txt")))
        self.assertIn("[REDACTED:STIGMER_DAEMON_TOKEN]", output)  # the token is redacted in full-access too

    def test_where_commands_cannot_be_confined_the_execution_fails_with_the_fix(self):
        said = "commands cannot be confined: bubblewrap (bwrap) is not installed: apt install bubblewrap"
        with mock.patch.dict(sandbox._CONFINEMENT, {"problem": said}):
            events, results = self.run_one("ex-refused", sandbox_mode="read-only")
        self.assertEqual((events[-1].phase.phase, results, self.fake.requests), (pb.FAILED, [], []))
        self.assertIn("apt install bubblewrap", events[-1].phase.reason)
        self.assertIn("--sandbox-mode full-access", events[-1].phase.reason)
        self.assertFalse(os.path.exists(os.path.join(self.workspace, "made.txt")))  # nothing ran unconfined


class DispatchTest(unittest.TestCase):
    """DaemonLink hands each DaemonMessage to the worker's public method."""

    def setUp(self):
        self.w = worker.Worker(environ=os.environ, capacity=1)
        self.w.outboxes["ex-1"] = worker.Outbox("ex-1", last_seq=2)
        for n in range(4):
            self.w.emit("ex-1", stigmer_secrets.Redactor({}), usage=pb.Usage(input_tokens=n))
        self.assertEqual(len(self.w.next_batch(0)), 4)  # seqs 3..6 sent

    def dispatch(self, **message):
        daemon_client.DaemonLink._dispatch(self.w, pb.DaemonMessage(**message))

    def test_ack_and_gap_reject(self):
        self.dispatch(ack=pb.Ack(execution_id="ex-1", seq=3))
        self.assertEqual(self.w.outboxes["ex-1"].acked, 3)
        self.dispatch(reject=pb.Reject(execution_id="ex-1", code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                                       ack_seq=4))
        self.assertEqual([e.seq for e in self.w.next_batch(0)], [5, 6])

    def test_other_rejects_and_unknown_cancels_drop(self):
        self.dispatch(reject=pb.Reject(execution_id="ex-1", code=grpc.StatusCode.PERMISSION_DENIED.value[0]))
        self.assertNotIn("ex-1", self.w.outboxes)
        self.dispatch(cancel=pb.CancelExecution(execution_id="ex-2"))  # never heard of: nothing to do
        self.assertEqual((self.w.outboxes, self.w.buffered), ({}, 0))

    def test_assign_starts_the_execution(self):
        started = []
        with mock.patch.object(self.w, "assigned", started.append):
            self.dispatch(assign=pb.Assign(execution=pb.Execution(id="ex-3", last_seq=2)))
        self.assertEqual([e.id for e in started], ["ex-3"])


class StreamTest(unittest.TestCase):
    """The worker's Connect stream against a real daemon: events buffered while it is away arrive once."""

    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="stigmer-worker-")
        self.workspace = tempfile.mkdtemp(prefix="stigmer-ws-")
        self.server = daemon_server.serve(self.home, "127.0.0.1:0", runner_grace=30)
        self.endpoint = self.server.endpoint

    def tearDown(self):
        self.server.stop()
        shutil.rmtree(self.home, ignore_errors=True)
        shutil.rmtree(self.workspace, ignore_errors=True)

    def stub(self):
        channel = daemon_client.client_channel(self.endpoint)
        self.addCleanup(channel.close)
        return pb_grpc.DaemonStub(channel), daemon_client.auth_metadata(daemon_client.read_token(self.home))

    def wait(self, predicate, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        self.fail("timed out")

    def test_reconnecting_to_a_dead_daemon_leaks_no_threads(self):
        w = worker.Worker(environ=os.environ, capacity=1)
        link = daemon_client.DaemonLink("127.0.0.1:1", self.home)  # nothing listens on port 1
        before = threading.active_count()
        with mock.patch.object(contract, "BACKOFF_CAP", 0.01), mock.patch.object(daemon_client, "EAGER_SECONDS", 0), \
                self.assertLogs("stigmer.link") as logs:
            thread = threading.Thread(target=link.run, args=(w,), daemon=True)
            thread.start()
            time.sleep(1.5)  # dozens of attempts
            during = threading.active_count()
            w.stopping.set()
            thread.join(5)
        self.assertFalse(thread.is_alive())
        self.assertLessEqual(during - before, 4)
        # told once, and not as a loss: this worker never had the daemon
        self.assertEqual(len(logs.output), 1)
        self.assertIn("cannot reach the daemon at 127.0.0.1:1", logs.output[0])
        self.assertNotIn("lost", logs.output[0])

    def test_a_worker_started_before_its_daemon_connects_without_a_warning(self):
        self.server.stop(0)  # a run's worker is spawned before the run's daemon listens
        w = worker.Worker(environ=os.environ, capacity=1)
        with self.assertNoLogs("stigmer.link", level="WARNING"), \
                mock.patch.object(daemon_client, "EAGER_SECONDS", 600), mock.patch.object(contract, "BACKOFF_CAP", 600):
            thread = threading.Thread(target=daemon_client.DaemonLink(self.endpoint, self.home).run, args=(w,),
                                      daemon=True)
            thread.start()
            time.sleep(0.3)  # a few failed attempts: no token, then nothing listening
            self.server = daemon_server.serve(self.home, self.endpoint, runner_grace=5)
            stub, md = self.stub()  # retried every EAGER_RETRY, not after a growing backoff:
            self.wait(lambda: stub.Status(pb.StatusRequest(), metadata=md, timeout=5).connected_runners == 1)
            w.stopping.set()
            thread.join(5)
        self.server.stop(0)

    def test_events_emitted_while_the_daemon_is_down_arrive_exactly_once(self):
        stub, md = self.stub()
        ex = stub.Submit(pb.SubmitRequest(spec=pb.ExecutionSpec(prompt="p", workspace=self.workspace)), metadata=md)
        w = worker.Worker(environ=os.environ, capacity=1, runner_id="r-test")
        redactor = stigmer_secrets.Redactor({})
        # take the assignment ourselves instead of running an agent: the outbox is what is under test
        with mock.patch.object(w, "assigned", lambda execution: w.outboxes.setdefault(
                execution.id, worker.Outbox(execution.id, execution.last_seq))), \
                self.assertLogs("stigmer.link") as logs:
            thread = threading.Thread(target=daemon_client.DaemonLink(self.endpoint, self.home).run, args=(w,),
                                      daemon=True)
            thread.start()
            self.addCleanup(w.stopping.set)
            self.wait(lambda: ex.id in w.outboxes)
            for n in range(50):
                w.emit(ex.id, redactor, usage=pb.Usage(input_tokens=n))
            self.wait(lambda: w.outboxes[ex.id].acked == 52)
            port = self.server.port
            self.server.stop()  # the daemon goes away; the worker keeps its events
            for n in range(50, 100):
                w.emit(ex.id, redactor, usage=pb.Usage(input_tokens=n))
            w.emit(ex.id, redactor, phase=pb.PhaseChange(phase=pb.COMPLETED, final_text="ok"))
            self.assertEqual(len(w.outboxes[ex.id].events), 51)
            self.server = daemon_server.serve(self.home, f"127.0.0.1:{port}", runner_grace=30)  # new token
            self.wait(lambda: ex.id not in w.outboxes)  # all acknowledged, then forgotten
        self.assertTrue(any("lost the daemon at" in line for line in logs.output), logs.output)
        stub, md = self.stub()
        events = list(stub.Watch(pb.WatchRequest(execution_id=ex.id), metadata=md, timeout=10))
        self.assertEqual([e.seq for e in events], list(range(1, 104)))
        self.assertEqual([e.usage.input_tokens for e in events if e.HasField("usage")], list(range(100)))
        self.assertEqual(stub.Get(pb.GetRequest(execution_id=ex.id), metadata=md).phase, pb.COMPLETED)


if __name__ == "__main__":
    unittest.main()
