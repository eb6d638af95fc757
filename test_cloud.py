"""Cloud mode end to end: `runner.py worker` processes on a real redis-server, the real anthropic
SDK against the fake Messages API, and the CLI as a subprocess with MODE=cloud.

    python -m unittest test_cloud -v

Short leases (STIGMER_LEASE_TTL) make lost workers show quickly; every wait is a poll with a
generous deadline, since the machine is shared.
"""
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import redis_backend as rb
import stigmer_pb2 as pb
from testsupport import (FAKE_KEY, HERE, FakeAnthropic, pid_alive, reap, run_cli, running, sleep_tag, text_step,
                         stop_home, tool_step, wait_for)
from testsupport_redis import RedisServer, requires_redis
from testsupport_parallel import load_tests  # noqa: F401 - the suite runs in parallel (see there)

LEASE_TTL = 5.0  # seconds; heartbeats every 1.7 s: short enough to see a lost worker, long for a busy machine
_prefixes = itertools.count()
SLOW_TAG = sleep_tag()  # the slow command's sleep, found on the host by its command line (see slow_pids)
SLOW = (f"if [ -f slow ]; then sleep {SLOW_TAG} & echo $! > sleep.pid; wait; fi; echo ok")
TERMINAL = (pb.COMPLETED, pb.FAILED, pb.CANCELLED)


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def runner_pid(runner_id):
    """The pid inside a worker's runner id (host-PID-random)."""
    return int(runner_id.rsplit("-", 2)[1])


@requires_redis
class CloudCase(unittest.TestCase):
    """One redis-server per class; per test a key prefix, a fake model, a STIGMER_HOME and workspaces."""
    aof = False
    password = None  # set: Redis wants it (requirepass), and REDIS_URL carries it
    script = [tool_step(("execute", {"command": SLOW})), text_step("done")]
    settings = {}

    @classmethod
    def setUpClass(cls):
        cls.server = RedisServer(aof=cls.aof, password=cls.password).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="stigmer-cloud-")
        self.home = os.path.join(self.tmp, "home")
        self.fake = FakeAnthropic(self.script).start()
        self.prefix = f"c{next(_prefixes)}-{os.getpid()}:"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("ANTHROPIC", "OPENAI", "STIGMER", "REDIS", "DAYTONA")) and k != "MODE"}
        self.env.update(MODE="cloud", REDIS_URL=self.server.url, STIGMER_REDIS_PREFIX=self.prefix,
                        STIGMER_SANDBOX="filesystem", STIGMER_LEASE_TTL=str(LEASE_TTL), STIGMER_CLAIM_IDLE="0.5",
                        STIGMER_HOME=self.home, ANTHROPIC_BASE_URL=self.fake.url, ANTHROPIC_API_KEY=FAKE_KEY,
                        STIGMER_MODEL="claude-fake", SANDBOX_ROOT_DIR=self.tmp, ENV="staging",
                        HOME=os.path.join(self.tmp, "userhome"))
        self.env.update(self.settings)
        self.client = rb.RedisClient(self.server.url, self.prefix, lease_ttl=LEASE_TTL)
        self.log = self.client.log
        self.workers = []

    def tearDown(self):
        for proc in self.workers:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        stop_home(self.env)  # cancels what a test left running
        self.client.close()
        self.fake.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- helpers ----

    def start_workers(self, n, capacity=1):
        """N `runner.py worker` processes (cloud mode); returns them once all are registered on Redis."""
        before = len(self.workers)
        for i in range(n):
            log = open(os.path.join(self.tmp, f"worker-{before + i}.log"), "wb")
            self.addCleanup(log.close)
            self.workers.append(subprocess.Popen(
                [sys.executable, os.path.join(HERE, "runner.py"), "worker", "--capacity", str(capacity)],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True))
        wait_for(lambda: self.client.status().connected_runners >= before + n, 90, f"{n} workers to register")
        return self.workers[before:]

    def worker_log(self, proc):
        return read(os.path.join(self.tmp, f"worker-{self.workers.index(proc)}.log"))

    def workspace(self, name, slow=False):
        path = os.path.join(self.tmp, name)
        os.makedirs(path, exist_ok=True)
        if slow:
            open(os.path.join(path, "slow"), "w").close()
        return path

    def submit(self, tag, slow=False):
        """Submit a task whose prompt carries TAG (so the fake's requests can be counted per execution)."""
        spec = pb.ExecutionSpec(prompt=f"[{tag}] do the thing", workspace=self.workspace(tag, slow),
                                model="claude-fake", max_turns=10)
        return self.client.submit(spec).id

    def requests_for(self, tag):
        return sum(f"[{tag}]" in json.dumps(body["messages"][0]) for body in self.fake.requests)

    def phase(self, execution_id):
        """The phase in the record, read straight (RedisClient.get would itself end a lost one)."""
        return self.log.get(execution_id).phase

    def wait_phase(self, execution_id, phases=TERMINAL, timeout=90.0):
        wait_for(lambda: self.phase(execution_id) in phases, timeout, f"{execution_id} to reach {phases}")
        return self.log.get(execution_id)

    def events(self, execution_id):
        return list(self.client.watch(execution_id, follow=False))

    def assert_complete_log(self, execution_id, phases):
        events = self.events(execution_id)
        self.assertEqual([e.seq for e in events], list(range(1, len(events) + 1)), execution_id)
        self.assertEqual(self.log.get(execution_id).last_seq, len(events))
        self.assertEqual([pb.Phase.Name(e.phase.phase) for e in events if e.WhichOneof("payload") == "phase"], phases)
        return events

    def slow_pids(self, tag):
        """Host pids of the slow command in TAG's workspace (its shell, its sleep, the bwrap around them when
        confined), once its sleep has started: found by the sleep's command line, since a confined command's
        `$!` is a pid of its own PID namespace."""
        folder = os.path.join(self.tmp, tag)
        wait_for(lambda: read(os.path.join(folder, "sleep.pid")).strip(), 90, "the slow command to start")
        pids = running(SLOW_TAG)
        self.assertTrue(pids, "the slow command's processes are not to be found")
        return pids


class ScaleOutTest(CloudCase):
    script = [tool_step(("execute", {"command": "echo hello"})), text_step("done")]

    def test_three_workers_run_twenty_executions_once_each_with_complete_logs(self):
        workers = self.start_workers(3)
        tags = [f"task {n:02d}" for n in range(20)]
        ids = [self.submit(tag) for tag in tags]
        for execution_id in ids:
            self.wait_phase(execution_id, timeout=240)
        runners = set()
        for tag, execution_id in zip(tags, ids):
            ex = self.log.get(execution_id)
            self.assertEqual(pb.Phase.Name(ex.phase), "COMPLETED", ex.error)
            self.assertEqual(self.requests_for(tag), 2, tag)  # both turns, once: it ran exactly once
            events = self.assert_complete_log(execution_id, ["PENDING", "RUNNING", "COMPLETED"])
            kinds = [e.WhichOneof("payload") for e in events]
            self.assertEqual((kinds.count("tool_call"), kinds.count("tool_result")), (1, 1))
            self.assertEqual([e.tool_result.output for e in events if e.WhichOneof("payload") == "tool_result"],
                             ["hello"])
            runners.add(ex.runner_id)
        self.assertEqual(len(self.fake.requests), 40)
        self.assertLessEqual({runner_pid(r) for r in runners}, {w.pid for w in workers})
        self.assertGreater(len(runners), 1, "one worker ran everything")
        self.assertEqual(self.log.r.xlen(self.log.queue), 0)  # the queue is trimmed of what was taken


class LostWorkerTest(CloudCase):
    slow = True  # among the longest: testsupport_parallel starts it first

    def test_kill_9_fails_its_execution_by_lease_expiry_and_kills_its_commands(self):
        self.start_workers(3)
        slow = self.submit("slow", slow=True)
        pids = self.slow_pids("slow")
        victim = runner_pid(self.log.get(slow).runner_id)
        self.assertTrue(all(pid_alive(p) for p in pids))
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        fast = [self.submit(f"fast {n}") for n in range(3)]
        ex = self.wait_phase(slow, timeout=LEASE_TTL + LEASE_TTL / 3 + 60)
        self.assertEqual(pb.Phase.Name(ex.phase), "FAILED")
        self.assertEqual(ex.error, "runner lost")
        self.assertGreaterEqual(ex.finished_at, killed_at)
        events = self.assert_complete_log(slow, ["PENDING", "RUNNING", "FAILED"])
        self.assertEqual([e.error.code for e in events if e.WhichOneof("payload") == "error"], ["runner_lost"])
        wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "the killed worker's commands to die")
        for execution_id in fast:
            done = self.wait_phase(execution_id)
            self.assertEqual(pb.Phase.Name(done.phase), "COMPLETED", done.error)
            self.assertNotEqual(runner_pid(done.runner_id), victim)
        self.assertEqual(self.requests_for("slow"), 1)  # never run again

    def test_a_zombie_past_its_lease_is_fenced_and_changes_nothing(self):
        first, _ = self.start_workers(2)
        slow = self.submit("slow", slow=True)
        pids = self.slow_pids("slow")
        zombie = next(w for w in self.workers if w.pid == runner_pid(self.log.get(slow).runner_id))
        os.kill(zombie.pid, signal.SIGSTOP)
        ex = self.wait_phase(slow)  # the other worker's sweep ends it
        self.assertEqual((pb.Phase.Name(ex.phase), ex.error), ("FAILED", "runner lost"))
        before = [e.SerializeToString() for e in self.events(slow)]
        os.kill(zombie.pid, signal.SIGCONT)
        # it learns from its next heartbeat ("lost the lease") or, if its sender goes first, from the refused append
        noticed = (f"lost the lease on {slow}", f"Redis refused events for {slow}")
        wait_for(lambda: any(n in self.worker_log(zombie) for n in noticed), 60, "the zombie to notice")
        wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "the zombie to stop its command")
        # its epoch is fenced: an append in its name is refused, and nothing it did changed the execution
        late = pb.Event(execution_id=slow, seq=ex.last_seq + 1, time=time.time(), text=pb.TextDelta(text="late"))
        status, _, why = self.log.run("append", slow, self.log.r.hget(self.log.prefix + "ex:" + slow, "epoch"), 1,
                                      *rb._event_args(late))
        self.assertEqual(status, b"stale", why)
        after = self.log.get(slow)
        self.assertEqual((after.phase, after.last_seq, after.error), (pb.FAILED, ex.last_seq, "runner lost"))
        self.assertEqual([e.SerializeToString() for e in self.events(slow)], before)
        self.assertEqual(zombie.poll(), None)  # the zombie lives on and serves other work
        again = self.submit("after")
        self.assertEqual(pb.Phase.Name(self.wait_phase(again).phase), "COMPLETED")


class ReclaimTest(CloudCase):
    script = [tool_step(("execute", {"command": "echo once"})), text_step("done")]

    def test_an_entry_read_by_a_worker_that_died_before_taking_it_runs_once(self):
        execution_id = self.submit("orphan")
        self.log.ensure_group()
        reply = self.log.r.xreadgroup(rb.GROUP, "died-before-take", {self.log.queue: ">"}, count=1)
        self.assertEqual(reply[0][1][0][1][b"id"].decode(), execution_id)  # read, never taken
        self.start_workers(1)
        ex = self.wait_phase(execution_id)
        self.assertEqual(pb.Phase.Name(ex.phase), "COMPLETED", ex.error)
        self.assertEqual(self.requests_for("orphan"), 2)
        self.assert_complete_log(execution_id, ["PENDING", "RUNNING", "COMPLETED"])
        self.assertEqual(self.log.r.xpending(self.log.queue, rb.GROUP)["pending"], 0)


class CancelTest(CloudCase):

    def cancel(self, execution_id):
        proc = run_cli(["cancel", execution_id], self.env, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout.strip()

    def test_cancel_a_pending_execution_from_another_process(self):
        pending = self.submit("pending")
        self.assertEqual(self.cancel(pending), f"{pending}: CANCELLED")
        self.assertEqual(self.phase(pending), pb.CANCELLED)  # at once: no worker was involved
        self.assert_complete_log(pending, ["PENDING", "CANCELLED"])
        self.start_workers(1)
        later = self.submit("later")
        ex = self.wait_phase(later)
        self.assertEqual(pb.Phase.Name(ex.phase), "COMPLETED", f"{ex.error} {[str(e) for e in self.events(later)]}")
        self.assertEqual(self.requests_for("pending"), 0)  # never run

    def test_cancel_a_running_execution_from_another_process(self):
        self.start_workers(1)
        running = self.submit("running", slow=True)
        pids = self.slow_pids("running")
        self.assertEqual(self.cancel(running), f"{running}: cancel requested; its runner is stopping it")
        ex = self.wait_phase(running)
        self.assertEqual(pb.Phase.Name(ex.phase), "CANCELLED", ex.error)
        wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "the command to be killed")
        events = self.assert_complete_log(running, ["PENDING", "RUNNING", "CANCELLED"])
        (result,) = [e.tool_result for e in events if e.WhichOneof("payload") == "tool_result"]
        self.assertTrue(result.is_error)


class ForegroundCancelTest(CloudCase):

    def test_ctrl_c_cancels_a_foreground_run_and_leaves_no_process(self):
        workspace = self.workspace("fg", slow=True)
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "--json", "--workspace", workspace,
                                 "sleep a while"], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
        self.addCleanup(reap, proc)
        pids = self.slow_pids("fg")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 130, err)
        events = [json.loads(line) for line in out.splitlines()]
        events = [e for e in events if "seq" in e]  # without the run and summary objects around the log
        self.assertEqual(events[-1]["phase"], "CANCELLED")
        self.assertEqual([e["seq"] for e in events], list(range(1, len(events) + 1)))
        wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "the command to be killed")
        self.assertEqual(self.phase(events[0]["execution_id"]), pb.CANCELLED)
        self.assertEqual(self.log.r.keys(self.prefix + "queue:*"), [])  # its own worker's queue is gone


class CancelWhileThinkingTest(CloudCase):
    script = [text_step("far too late", delay=600)]  # the model's first byte would come in 10 minutes

    def test_ctrl_c_while_the_model_thinks_cancels_at_once(self):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "--json", "--workspace",
                                 self.workspace("think"), "think hard"], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.addCleanup(reap, proc)
        wait_for(lambda: self.fake.requests, 90, "the model request")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)  # far less than 600 s: the request was abandoned
        self.assertEqual(proc.returncode, 130, err)
        summary = json.loads(out.splitlines()[-1])
        self.assertEqual((summary["kind"], summary["phase"]), ("summary", "CANCELLED"))
        self.assertEqual(self.phase(summary["execution_id"]), pb.CANCELLED)


class RedisRestartTest(CloudCase):
    aof = True
    settings = {"STIGMER_LEASE_TTL": "20"}  # the lease outlives the outage (its TTL is kept in the AOF)
    script = [tool_step(("execute", {"command": "sleep 3; echo slept"})), tool_step(("execute", {"command": "echo second"})),
              text_step("done after the restart")]

    def test_redis_restarted_mid_run_loses_and_doubles_nothing(self):
        worker, = self.start_workers(1)
        execution_id = self.submit("restart")
        follower = subprocess.Popen([sys.executable, os.path.join(HERE, "runner.py"), "logs", execution_id, "-f",
                                     "--json"], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True)
        self.addCleanup(reap, follower)
        first = follower.stdout.readline()  # the follower is connected (it has shown the first event)...
        wait_for(lambda: self.fake.requests, 90, "the first turn")  # ... and the sleep is under way
        self.server.restart(down_for=1.0)
        ex = self.wait_phase(execution_id)
        self.assertEqual(pb.Phase.Name(ex.phase), "COMPLETED", ex.error)
        events = self.assert_complete_log(execution_id, ["PENDING", "RUNNING", "COMPLETED"])
        outputs = [e.tool_result.output for e in events if e.WhichOneof("payload") == "tool_result"]
        self.assertEqual(outputs, ["slept", "second"])
        self.assertIn("lost Redis", self.worker_log(worker))
        deadline = threading.Timer(90, follower.kill)  # a follower that never ends fails the test, not hangs it
        deadline.start()
        self.addCleanup(deadline.cancel)
        out = follower.stdout.read()  # to its end (communicate() would skip what readline buffered)
        err = follower.stderr.read()
        follower.stdout.close()
        follower.stderr.close()
        follower.wait(timeout=60)
        self.assertEqual(follower.returncode, 0, err)
        self.assertEqual([json.loads(line)["seq"] for line in (first + out).splitlines()], [e.seq for e in events])
        self.assertEqual(self.requests_for("restart"), 3)


class CliTest(CloudCase):
    slow = True  # among the longest: testsupport_parallel starts it first
    GITHUB = "ghp_thisIsAFakeGithubTokenCloud42"
    script = [tool_step(("execute", {"command": "echo gh=$GITHUB_TOKEN key=[$ANTHROPIC_API_KEY]"})),
              text_step("done")]

    def cli(self, *args, env=None):
        return run_cli(list(args), env or self.env, timeout=120, cwd=self.tmp)

    def json_lines(self, proc):
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]

    def test_the_cli_in_cloud_mode(self):
        started = self.cli("start", "--workers", "2")
        self.assertEqual(started.returncode, 0, started.stderr)
        self.assertIn("2 worker(s) running on Redis at", started.stdout)
        self.assertEqual(self.client.status().connected_runners, 2)  # start returned once they were connected

        # a foreground run: its own worker (its secrets) runs it, though two shared workers wait
        env = dict(self.env, GITHUB_TOKEN=self.GITHUB)
        events = [e for e in self.json_lines(self.cli("--json", "--secret", "GITHUB_TOKEN", "show the env", env=env))
                  if "seq" in e]  # the log, without the run and summary objects
        execution_id = events[0]["execution_id"]
        self.assertEqual([e["seq"] for e in events], list(range(1, len(events) + 1)))
        self.assertEqual(events[-1]["phase"], "COMPLETED")
        self.assertTrue(self.log.get(execution_id).runner_id.startswith("run-"))  # pinned to its own worker
        (result,) = [e for e in events if e["kind"] == "tool_result"]
        self.assertEqual(result["output"], "gh=[REDACTED:GITHUB_TOKEN] key=[]")
        self.assertEqual(self.json_lines(self.cli("logs", execution_id, "--json")), events)

        # detached, followed from another process
        detached = self.cli("run", "--detach", "in the background")
        self.assertEqual(detached.returncode, 0, detached.stderr)
        other = detached.stdout.strip()
        followed = self.json_lines(self.cli("logs", other, "-f", "--json"))
        self.assertEqual(followed[-1]["phase"], "COMPLETED")
        self.assertIn(runner_pid(self.log.get(other).runner_id),
                      [int(read(os.path.join(self.home, "logs", f"worker-{n}.pid")).split()[0]) for n in (1, 2)])

        rows = self.json_lines(self.cli("list", "--json"))
        self.assertEqual([r["id"] for r in rows], [other, execution_id])
        self.assertIn(other, self.cli("list").stdout)
        status = self.json_lines(self.cli("status", "--json"))[0]
        self.assertEqual((status["connected_runners"], status["executions_by_phase"]), (2, {"COMPLETED": 2}))
        self.assertEqual(sorted(status["processes"]), ["worker-1", "worker-2"])
        self.assertIn("runners connected: 2", self.cli("status").stdout)
        # reading needs REDIS_URL only (no Daytona key: status runs nothing), and there is no daemon to show
        reader = {k: v for k, v in self.env.items() if k not in ("STIGMER_SANDBOX", "DAYTONA_API_KEY")}
        status = self.json_lines(self.cli("status", "--json", env=reader))[0]
        self.assertEqual((status["started_by"], sorted(status["processes"])), (None, ["worker-1", "worker-2"]))
        self.assertNotIn("daemon", self.cli("status", env=reader).stdout)
        done = self.cli("cancel", other)
        self.assertEqual((done.returncode, done.stdout), (0, f"{other}: COMPLETED\n"))
        unknown = self.cli("logs", "ex-nope")
        self.assertEqual((unknown.returncode, unknown.stderr.count("\n")), (1, 1))
        self.assertIn("ex-nope", unknown.stderr)

        # the same shapes as local mode (one local run against the same fake)
        local = {k: v for k, v in self.env.items() if k not in ("MODE", "REDIS_URL")}
        local.update(STIGMER_HOME=os.path.join(self.tmp, "local-home"), STIGMER_BACKEND_ENDPOINT="127.0.0.1:0")
        from testsupport import free_port
        local["STIGMER_BACKEND_ENDPOINT"] = f"127.0.0.1:{free_port()}"
        local_events = [e for e in self.json_lines(self.cli("--json", "show the env", env=local)) if "seq" in e]
        shape = lambda evs: sorted({(e["kind"], tuple(sorted(e))) for e in evs})  # noqa: E731
        self.assertEqual(shape(local_events), shape(events))
        local_rows = self.json_lines(self.cli("list", "--json", env=local))
        self.assertEqual(sorted(local_rows[0]), sorted(rows[0]))
        run_cli(["stop"], local, timeout=30)

        stopped = self.cli("stop")
        self.assertIn("stopped 2", stopped.stdout)
        # no provider key and no secret value anywhere in Redis
        r = self.log.r
        for key in r.scan_iter(self.prefix + "*"):
            kind = r.type(key)
            value = {b"string": lambda: r.get(key), b"hash": lambda: r.hgetall(key),
                     b"stream": lambda: r.xrange(key), b"zset": lambda: r.zrange(key, 0, -1)}[kind]()
            for secret in (FAKE_KEY, self.GITHUB):
                self.assertNotIn(secret.encode(), repr(value).encode(), key)


class SecretsAtRestTest(CloudCase):
    """Issue 28, items 4 and 5: REDIS_URL's password is a secret like a key (hidden from the agent's shell,
    redacted), and secrets typed into the prompt or piped on stdin are stored nowhere raw."""
    password = "redis-Pa55word-hunter2"
    GITHUB = "ghp_thisIsAFakeGithubTokenInAPrompt"
    script = [tool_step(("execute", {"command": 'echo "url=[$REDIS_URL]"; cat pw.txt'})), text_step("done")]

    def test_the_redis_password_and_a_prompts_secrets_stay_secret(self):
        with open(os.path.join(self.tmp, "pw.txt"), "w") as f:
            f.write(self.password)
        env = dict(self.env, GITHUB_TOKEN=self.GITHUB)
        proc = run_cli(["--json", f"deploy with {self.GITHUB}"], env, cwd=self.tmp, timeout=120,
                       input=f"the redis password is {self.password} and the key {FAKE_KEY}\n")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("the prompt held the value of ANTHROPIC_API_KEY, GITHUB_TOKEN, REDIS_URL", proc.stderr)
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        self.assertEqual(lines[0]["kind"], "run")
        (result,) = [e for e in lines if e.get("kind") == "tool_result"]
        self.assertEqual(result["output"], "url=[]\n[REDACTED:REDIS_URL]")  # not in the shell; redacted in a file
        prompt = self.fake.requests[0]["messages"][0]["content"][0]["text"]
        self.assertIn("deploy with [REDACTED:GITHUB_TOKEN]", prompt)
        self.assertIn("the redis password is [REDACTED:REDIS_URL] and the key [REDACTED:ANTHROPIC_API_KEY]", prompt)
        listed = run_cli(["list", "--json"], self.env, cwd=self.tmp)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        r = self.log.r
        stored = [(key, r.type(key)) for key in r.scan_iter(self.prefix + "*")]
        self.assertTrue(any(kind == b"hash" for _, kind in stored))  # the record, with its spec
        for secret in (self.password, self.GITHUB, FAKE_KEY):
            self.assertNotIn(secret, proc.stdout + listed.stdout)
            for key, kind in stored:
                value = {b"string": r.get, b"hash": r.hgetall, b"stream": r.xrange,
                         b"zset": lambda k: r.zrange(k, 0, -1)}[kind](key)
                self.assertNotIn(secret.encode(), repr(value).encode(), key)


if __name__ == "__main__":
    unittest.main()
