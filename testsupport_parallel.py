"""The suite in parallel, still started by `python -m unittest`: each test class runs in a process forked
from the one that discovered the tests, STIGMER_TEST_JOBS classes at once (default: twice the CPUs, at most 4;
1 runs everything in one process, exactly as plain unittest does).

Each test module opts in with one line, `load_tests = testsupport_parallel.load_tests`; unittest calls it
while it discovers (or loads a named module), and the suite it returns hands the module's classes to one pool
instead of running them. The pool forks a child per class (setUpClass, the tests, tearDownClass: a class's
fixtures stay shared by its tests, and nothing is shared between classes), or per group of up to SHARE_CLASSES
classes of a module whose `share_process()` gives the same key (their fixtures may then be shared between them: see
test_runner.CliCase, whose classes share a home, a daemon and its warm worker this way), reads each test's outcome from a
pipe and reports it to unittest's own result in the parent, one test at a time, so that the dots, `-v` and
the failure listing read as usual. A child that dies without reporting fails its remaining tests with its exit
status. The last module's suite waits for the pool, so `Ran N tests` counts them all. STIGMER_TEST_TIMES=N
prints the N slowest classes at the end (wall seconds each, fixtures included).

Most of the suite's time is spent waiting on other processes (a worker importing the model SDK, a daemon
starting, a command being killed), so classes overlap well even on two CPUs.
"""
import collections
import contextlib
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
import unittest
from unittest.suite import _ErrorHolder

SHARE_CLASSES = 6  # classes that share a process (the same share_process key, one module) run in one child, this many
CLASS_LIMIT = 900.0  # seconds a class may take in its process before it is killed (the slowest take under 60)
_suites = []  # every ForkedSuite that loading made, in order: the last one to run waits for the pool
_pool = None


def jobs():
    value = os.environ.get("STIGMER_TEST_JOBS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    # Three per core: most classes spend much of their time waiting on processes they started (six on two cores
    # took 149 s where four took 175 s, the same tests).
    return max(1, min(6, 3 * (os.cpu_count() or 1)))


def load_tests(loader, tests, pattern):
    """unittest's hook: this module's tests as a ForkedSuite (or as they are, with one job, or when
    `fork` is unavailable)."""
    if jobs() <= 1 or not hasattr(os, "fork"):
        return tests
    suite = ForkedSuite(tests)
    _suites.append(suite)
    return suite


def _cases(suite):
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from _cases(test)
        else:
            yield test


class ForkedSuite(unittest.TestSuite):
    """A module's tests, grouped by class, run by the pool."""

    def __init__(self, tests):
        super().__init__(tests)
        self.submitted = False

    def run(self, result, debug=False):
        global _pool
        if _pool is None:
            _pool = Pool(result, jobs())
        groups = collections.OrderedDict()
        for test in _cases(self):
            groups.setdefault(type(test), []).append(test)
        units, open_units = [], {}
        for cls, tests in groups.items():
            key = cls.share_process() if hasattr(cls, "share_process") else None
            if key is None:
                units.append(tests)
                continue
            unit = open_units.get(key)
            if unit is None or unit[1] >= SHARE_CLASSES:
                unit = open_units[key] = [[], 0]
                units.append(unit[0])
            unit[0].extend(tests)
            unit[1] += 1
        for tests in units:
            _pool.submit(tests)
        self.submitted = True
        if all(s.submitted for s in _suites):
            _pool.join()
        return result


class ChildFailure(Exception):
    """A failure or error reported by the child that ran the test: its traceback, formatted there."""

    def __str__(self):
        return self.args[0]


def _remote(text):
    return ChildFailure, ChildFailure("\n" + text.rstrip()), None


class PipeResult(unittest.TestResult):
    """In a child: each outcome as one JSON line on the pipe FD."""

    def __init__(self, fd):
        super().__init__()
        self.fd = fd

    def send(self, kind, test, text=""):
        line = json.dumps({"kind": kind, "id": test.id(), "desc": str(test), "text": text}) + "\n"
        data = line.encode()
        while data:
            data = data[os.write(self.fd, data):]

    def startTest(self, test):
        super().startTest(test)
        self.send("start", test)

    def stopTest(self, test):
        super().stopTest(test)
        self.send("stop", test)

    def addSuccess(self, test):
        self.send("success", test)

    def addFailure(self, test, err):
        self.send("failure", test, self._exc_info_to_string(err, test))

    def addError(self, test, err):
        self.send("error", test, self._exc_info_to_string(err, test))

    def addSkip(self, test, reason):
        self.send("skip", test, reason)

    def addExpectedFailure(self, test, err):
        self.send("expected_failure", test, self._exc_info_to_string(err, test))

    def addUnexpectedSuccess(self, test):
        self.send("unexpected_success", test)

    def addSubTest(self, test, subtest, err):
        if err is not None:
            kind = "failure" if issubclass(err[0], test.failureException) else "error"
            self.send(f"sub_{kind}", subtest, self._exc_info_to_string(err, test))


def _run_child(tests, fd):
    """In the forked child: run TESTS (one class) and report on FD; never returns."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        unittest.TestSuite(tests).run(PipeResult(fd))
    except BaseException:  # noqa: BLE001 - whatever escapes is reported, then the child exits
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


class Child:
    def __init__(self, tests):
        self.tests = {t.id(): t for t in tests}
        self.order = [t.id() for t in tests]
        self.done = set()
        self.buffered = []  # the current test's events, reported together at its stop
        self.partial = b""
        classes = list(dict.fromkeys(type(t) for t in tests))
        self.name = f"{classes[0].__module__}.{classes[0].__qualname__}" + \
            (f" (+{len(classes) - 1} classes)" if len(classes) > 1 else "")
        self.started = time.monotonic()
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(read)
            _run_child(tests, write)
        os.close(write)
        self.fd = read


def _slow(tests):
    """Whether a unit holds a class marked `slow = True`: one of the longest (most of it waiting on processes,
    timeouts or leases), started first so that the suite does not end with it running alone."""
    return any(getattr(type(test), "slow", False) for test in tests)


class Pool:
    """Runs submitted classes in forked children, JOBS at once, reporting into RESULT (only from its thread
    while the main thread waits in join, so the result is never touched by two threads at once)."""

    def __init__(self, result, jobs):
        self.result, self.jobs = result, jobs
        self.queue = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.took = []  # (seconds, class name) of each class, for STIGMER_TEST_TIMES
        self.thread = threading.Thread(target=self._loop, name="test-pool", daemon=True)
        self.thread.start()

    def submit(self, tests):
        with self.cond:
            self.queue.append(tests)
            self.cond.notify()

    def join(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        try:
            while self.thread.is_alive():
                self.thread.join(0.5)
        except KeyboardInterrupt:
            self.result.stop()
            raise
        if os.environ.get("STIGMER_TEST_TIMES"):  # where the time goes: the slowest classes, wall seconds each
            for took, name in sorted(self.took, reverse=True)[:int(os.environ["STIGMER_TEST_TIMES"] or 20)]:
                print(f"{took:7.1f} s  {name}", file=sys.stderr)

    def _loop(self):
        running, ordered = {}, False
        while True:
            with self.cond:
                # Fork only once loading is over and the main thread just waits in join: a lock it held at the
                # moment of a fork (a module being imported, a stream being written) would stay held in the child.
                while not self.closed:
                    self.cond.wait()
                if not ordered:  # every class is in: those marked slow start first (else in order)
                    self.queue = collections.deque(sorted(self.queue, key=lambda tests: not _slow(tests)))
                    ordered = True
                if not self.queue and not running and self.closed:
                    return
                while self.queue and len(running) < self.jobs and not self.result.shouldStop:
                    child = Child(self.queue.popleft())  # forked from this thread: the child runs only it
                    running[child.fd] = child
                if self.result.shouldStop:
                    self.queue.clear()
            if not running:
                continue
            for child in running.values():  # a class that hangs is killed: its unfinished tests fail, the rest go on
                if time.monotonic() - child.started > CLASS_LIMIT:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)
            ready, _, _ = select.select(list(running), [], [], 0.5)
            for fd in ready:
                child = running[fd]
                data = os.read(fd, 65536)
                if data:
                    self._feed(child, data)
                    continue
                os.close(fd)
                del running[fd]
                _, status = os.waitpid(child.pid, 0)
                self.took.append((time.monotonic() - child.started, child.name))
                self._finish(child, status)

    def _feed(self, child, data):
        lines = (child.partial + data).split(b"\n")
        child.partial = lines.pop()
        for line in lines:
            event = json.loads(line)
            child.buffered.append(event)
            if event["kind"] == "stop" or event["id"] not in child.tests:  # a class-level outcome stands alone
                self._report(child, child.buffered)
                child.buffered = []

    def _report(self, child, events):
        result = self.result
        for event in events:
            kind, text = event["kind"], event["text"]
            test = child.tests.get(event["id"]) or _ErrorHolder(event["desc"])
            if kind == "start":
                result.startTest(test)
            elif kind == "stop":
                result.stopTest(test)
                child.done.add(event["id"])
            elif kind == "success":
                result.addSuccess(test)
            elif kind in ("failure", "sub_failure"):
                result.addFailure(test, _remote(text))
            elif kind in ("error", "sub_error"):
                result.addError(test, _remote(text))
            elif kind == "skip":
                result.addSkip(test, text)
            elif kind == "expected_failure":
                result.addExpectedFailure(test, _remote(text))
            elif kind == "unexpected_success":
                result.addUnexpectedSuccess(test)

    def _finish(self, child, status):
        """After the child exits: the tests it never finished fail with how it ended."""
        code = os.waitstatus_to_exitcode(status)
        if code == 0:  # it ran what unittest runs (a class whose set-up failed runs no test: reported already)
            return
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        for test_id in child.order:
            if test_id in child.done:
                continue
            test = child.tests[test_id]
            self.result.startTest(test)
            self.result.addError(test, _remote(f"the process running {test_id} {how} before it finished"))
            self.result.stopTest(test)
        child.buffered = []
