"""Tests for terminal.py: following a log over any client whose watch() yields pb.Event (here plain
Python iterators, no daemon), resuming after a lost backend, and the JSON forms of events.

    python -m unittest test_terminal -v
"""
import contextlib
import io
import json
import threading
import unittest

import stigmer_pb2 as pb
import terminal
from daemon_client import BackendError, BackendUnavailable
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)


def phase(seq, value, **fields):
    return pb.Event(execution_id="ex-1", seq=seq, time=1.5, phase=pb.PhaseChange(phase=value, **fields))


def text(seq, body):
    return pb.Event(execution_id="ex-1", seq=seq, time=1.5, text=pb.TextDelta(text=body))


LOG = [phase(1, pb.PENDING), phase(2, pb.RUNNING), text(3, "hello "), text(4, "world"),
       pb.Event(execution_id="ex-1", seq=5, time=1.5, usage=pb.Usage(input_tokens=12, output_tokens=3)),
       phase(6, pb.COMPLETED, final_text="hello world", turns=1)]


class ListClient:
    """A backend whose watch() is a plain iterator over EVENTS, failing with FAIL after FAIL_AFTER events."""

    def __init__(self, events, fail=None, fail_after=None):
        self.events, self.fail, self.fail_after = events, fail, fail_after
        self.watches = []  # (execution_id, after_seq, follow) per call

    def watch(self, execution_id, after_seq=0, follow=True):
        self.watches.append((execution_id, after_seq, follow))
        return self.stream([ev for ev in self.events if ev.seq > after_seq])

    def stream(self, events):
        for n, ev in enumerate(events):
            if self.fail is not None and n == self.fail_after:
                raise self.fail
            yield ev

    def status(self, timeout=10):
        return pb.DaemonStatus()

    def close(self):
        pass


def follow(client, **kwargs):
    """terminal.follow with a JSON-lines renderer; returns (phase, stdout lines as dicts, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = terminal.follow(client, "ex-1", terminal.Renderer(True, False, False), **kwargs)
    return result, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


class FollowTest(unittest.TestCase):
    def test_follow_over_a_plain_iterator(self):
        client = ListClient(LOG + [text(7, "after the end")])  # nothing after the terminal event is shown
        result, lines, err = follow(client)
        self.assertEqual(result, "COMPLETED")
        self.assertEqual(lines, [terminal.event_dict(ev) for ev in LOG])
        self.assertEqual(client.watches, [("ex-1", 0, True)])
        self.assertEqual(err, "")
        self.assertEqual(lines[4], {"execution_id": "ex-1", "seq": 5, "time": 1.5, "kind": "usage", "input_tokens": 12,
                                    "output_tokens": 3, "cache_read_tokens": 0, "cache_write_tokens": 0})

    def test_a_replay_that_ends_early_returns_none(self):
        result, lines, _ = follow(ListClient(LOG[:3]), after_seq=1, follow_live=False)
        self.assertIsNone(result)
        self.assertEqual([line["seq"] for line in lines], [2, 3])

    def test_a_lost_backend_is_reconnected_and_the_log_resumes_after_the_last_event_shown(self):
        lost = ListClient(LOG, fail=BackendUnavailable("no daemon answers"), fail_after=3)
        back = ListClient(LOG)
        result, lines, err = follow(lost, reconnect=lambda: back)
        self.assertEqual(result, "COMPLETED")
        self.assertEqual([line["seq"] for line in lines], [1, 2, 3, 4, 5, 6])  # nothing lost, nothing twice
        self.assertEqual(back.watches, [("ex-1", 3, True)])
        self.assertIn("lost the daemon", err)
        self.assertIn("reconnected", err)

    def test_other_errors_reach_the_caller(self):
        with self.assertRaises(BackendError) as caught:
            follow(ListClient(LOG, fail=BackendError("no execution 'ex-1'"), fail_after=0), reconnect=lambda: None)
        self.assertEqual(str(caught.exception), "no execution 'ex-1'")
        with self.assertRaises(BackendUnavailable):  # and a lost backend when there is no way back
            follow(ListClient(LOG, fail=BackendUnavailable("gone"), fail_after=2))

    def test_an_interrupt_waits_for_the_terminal_event_then_gives_up(self):
        interrupted = threading.Event()
        interrupted.set()
        cancelled = threading.Event()

        class Hanging:  # a watch that never ends until cancelled
            def __iter__(self):
                yield phase(1, pb.RUNNING)
                cancelled.wait(30)

            def cancel(self):
                cancelled.set()

        client = ListClient([])
        client.watch = lambda *args, **kwargs: Hanging()
        terminal.CANCEL_WAIT, saved = 0.3, terminal.CANCEL_WAIT
        try:
            result, lines, err = follow(client, interrupted=interrupted)
        finally:
            terminal.CANCEL_WAIT = saved
        self.assertIsNone(result)
        self.assertEqual([line["seq"] for line in lines], [1])
        self.assertTrue(cancelled.is_set())
        self.assertIn("cancelling", err)


class JsonTest(unittest.TestCase):
    def test_int64_fields_are_numbers(self):
        ex = pb.Execution(id="ex-1", phase=pb.RUNNING, last_seq=7, usage=pb.Usage(input_tokens=2 ** 40))
        d = terminal.execution_dict(ex)
        self.assertEqual((d["phase"], d["last_seq"], d["usage"]["input_tokens"]), ("RUNNING", 7, 2 ** 40))
        self.assertEqual(terminal.json_ints({"seq": "3", "items": [{"duration_ms": "9"}], "text": "4"}),
                         {"seq": 3, "items": [{"duration_ms": 9}], "text": "4"})


class ArtifactTest(unittest.TestCase):
    """Artifact events: one line in the live view, everything in --json."""

    PATCH = "diff --git a/a.py b/a.py\n--- a/a.py\n+++ b/a.py\n@@ -1 +1 @@\n-x\n+y\n" \
            "diff --git a/b.py b/b.py\nnew file mode 100644\n"

    def event(self, seq, **fields):
        return pb.Event(execution_id="ex-1", seq=seq, time=1.5, artifact=pb.Artifact(**fields))

    def render(self, json_lines, *events):
        out = io.StringIO()
        renderer = terminal.Renderer(json_lines, False, False)
        with contextlib.redirect_stdout(out):
            for ev in events:
                renderer.event(ev)
        return renderer, out.getvalue()

    def test_live_view_and_json(self):
        patch = self.event(4, type="patch", name="change.patch", text=self.PATCH, size=5_000_000, truncated=True,
                           notes="capped at 512000 bytes of 5000000; left out: big.csv")
        sandbox = self.event(3, type="sandbox", name="sb-42", created_in=1.25, notes="created in 1.2 s")
        renderer, screen = self.render(False, sandbox, patch, self.event(5, type="patch", name="change.patch"))
        self.assertEqual(renderer.sandbox_id, "sb-42")
        self.assertEqual(screen.splitlines(), [
            "▣ sandbox sb-42 · created in 1.2 s",
            "⎘ patch: 2 files changed, 5,000,000 bytes · capped at 512000 bytes of 5000000; left out: big.csv · "
            "python runner.py logs ex-1 --patch > change.patch",
            "⎘ patch: no changes · python runner.py logs ex-1 --patch > change.patch"])
        renderer, out = self.render(True, patch)
        (line,) = [json.loads(text) for text in out.splitlines()]
        self.assertEqual((line["kind"], line["type"], line["text"], line["size"], line["truncated"]),
                         ("artifact", "patch", self.PATCH, 5_000_000, True))  # size a number, not a string


if __name__ == "__main__":
    unittest.main()
