"""Benchmarks, each a ratio against a baseline measured in the same run.

    python bench.py            # every benchmark
    python bench.py sandbox    # execute() overhead, memory while swallowing output, bubblewrap's cost
    python bench.py redact     # streaming Redactor against str.replace
    python bench.py events     # daemon event throughput against a bare gRPC stream
    python bench.py loop       # the whole agent path per turn against a bare SDK loop (anthropic, openai);
                               # and a sub-agent's turns against the top-level agent's
    python bench.py cloud           # both cloud benchmarks below (needs redis-server)
    python bench.py cloud_workers   # executions per minute through 1, 2 and 4 worker processes on one Redis
    python bench.py cloud_appends   # RedisLink's fenced appends against bare XADD pipelines (needs redis-server)
    python bench.py start      # a one-turn task: cold, and warm after `start`, against the SDK's floor
    python bench.py mcp        # an MCP tool call through the whole path against the SDK's own client; and
                               # the start of a run with two stdio servers against their own start-up
    python bench.py --json     # one JSON object per benchmark

The machine is shared and noisy, so every figure is relative to a baseline taken
in the same process, interleaved where possible. No unit test depends on timings.
"""
import json
import statistics
import sys
import time

BENCHES = {}  # name -> function returning a dict of figures


def verdict(value, op, target, digits):
    """VALUE rounded, with its target and whether this run met it."""
    met = {"<=": value <= target, "<": value < target, ">=": value >= target}[op]
    shown = f"{value:,.{digits}f}" if digits else f"{value:,.0f}"
    return f"{shown} (target {op} {target:,}: {'met' if met else 'MISSED'})"


def bench(fn):
    """Register a benchmark under its function name without the bench_ prefix."""
    BENCHES[fn.__name__.removeprefix("bench_")] = fn
    return fn


# ---- sandbox (issue: sandbox.py) ----
@bench
def bench_sandbox():
    """execute("true") against a bare subprocess.run, and peak RSS growth over 200 MB of output; confined in
    workspace-write (bubblewrap) against subprocess.run and against bwrap called directly with the same argv."""
    import os
    import subprocess
    import tempfile

    import sandbox

    runs = 300
    confined = {}
    problem = sandbox.confinement_problem()
    if problem:
        confined["confined"] = f"not measured: {problem}"
    else:
        with tempfile.TemporaryDirectory() as root:
            hide = sandbox.credential_paths(os.path.expanduser("~"))
            box = sandbox.FilesystemSandbox(root, mode="workspace-write", hide=hide)
            argv = sandbox.bwrap_argv(root, "workspace-write", ["/bin/sh", "-c", "true"], hide=hide)
            bare, direct, ours = [], [], []
            for _ in range(runs * 2 // 3):  # interleaved
                t = time.perf_counter()
                subprocess.run("true", shell=True, cwd=root)
                bare.append(time.perf_counter() - t)
                t = time.perf_counter()
                subprocess.run(argv, cwd=root)
                direct.append(time.perf_counter() - t)
                t = time.perf_counter()
                result = box.execute("true")
                ours.append(time.perf_counter() - t)
                assert result.exit_code == 0, result
        bare_ms, direct_ms, ours_ms = (statistics.median(x) * 1e3 for x in (bare, direct, ours))
        confined = {
            "confined_runs_each": runs * 2 // 3,
            "confined_execute_median_ms": round(ours_ms, 3),
            "bwrap_direct_median_ms": round(direct_ms, 3),
            "confined_execute_vs_bwrap_direct": verdict(ours_ms / direct_ms, "<=", 1.3, 3),
            "confined_execute_vs_subprocess_run": round(ours_ms / bare_ms, 2),
        }
    with tempfile.TemporaryDirectory() as root:
        box = sandbox.FilesystemSandbox(root)
        bare, ours, capture = [], [], []
        for _ in range(runs):  # interleaved, so machine noise hits all alike
            t = time.perf_counter()
            subprocess.run("true", shell=True, cwd=root)
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            box.execute("true")
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()  # context: subprocess.run doing what execute must (capture, stdin closed, own session)
            subprocess.run("true", shell=True, cwd=root, capture_output=True, stdin=subprocess.DEVNULL,
                           start_new_session=True)
            capture.append(time.perf_counter() - t)
        # A fresh interpreter, so the peak RSS is this one call's and nothing earlier masks it.
        probe = (
            "import resource, sys, time, sandbox\n"
            "box = sandbox.FilesystemSandbox(sys.argv[1])\n"
            "box.execute('true')\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "t = time.perf_counter()\n"
            "r = box.execute('yes | head -c 200000000')\n"
            "took = time.perf_counter() - t\n"
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "assert r.truncated and r.exit_code == 0, r\n"
            "print((after - before) / 1024, took)\n"
        )
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run([sys.executable, "-c", probe, root], cwd=here, check=True,
                             capture_output=True, text=True).stdout.split()
    bare_ms, ours_ms = statistics.median(bare) * 1e3, statistics.median(ours) * 1e3
    growth_mb, took = float(out[0]), float(out[1])
    return {
        "runs_each": runs,
        "bare_subprocess_run_median_ms": round(bare_ms, 3),
        "execute_median_ms": round(ours_ms, 3),
        "execute_overhead_ratio": verdict(ours_ms / bare_ms, "<=", 1.3, 3),
        "context: subprocess.run with capture, stdin closed, own session, vs bare":
            round(statistics.median(capture) * 1e3 / bare_ms, 3),
        "swallow_200MB_peak_rss_growth_MB": verdict(growth_mb, "<", 50, 1),
        "swallow_200MB_seconds": round(took, 2),
        "swallow_200MB_GB_per_s": round(0.2 / took, 2),
        **_file_tool_figures(),
        **confined,
    }


def _file_tool_figures(rounds=15):
    """Each file tool against the same work done by path with the standard library (no checks),
    interleaved, as median ratios: read, write (temp file, fsync, rename), edit, ls, glob, grep
    (Python search; and rg's against a bare `rg` run)."""
    import fnmatch
    import os
    import shutil
    import subprocess
    import tempfile
    from unittest import mock

    import sandbox

    with tempfile.TemporaryDirectory() as root:
        for d in range(20):  # 1000 files of about 2 KB in 20 packages; a needle in every 50th
            os.makedirs(os.path.join(root, f"pkg{d}", "sub"))
            for i in range(50):
                rel = os.path.join(f"pkg{d}", "sub" if i % 2 else "", f"mod{i}.py")
                with open(os.path.join(root, rel), "w") as f:
                    f.write("".join(f"def f{k}(x):\n    return x + {k}\n" for k in range(60)))
                    if i == 7:
                        f.write("NEEDLE = 1\n")
        box = sandbox.FilesystemSandbox(root)
        target = os.path.join(root, "pkg3", "sub", "mod9.py")

        def bare_read():
            with open(target, encoding="utf-8", errors="replace") as f:
                return f.read()

        body = "VERSION = 1\n" + "x = 1\n" * 200

        def bare_write(text=body):
            tmp = target + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)

        def bare_edit():
            text = bare_read()
            bare_write(text.replace("VERSION = 1", "VERSION = 2") if "VERSION = 1" in text
                       else text.replace("VERSION = 2", "VERSION = 1"))

        def box_edit():
            try:
                box.edit("pkg3/sub/mod9.py", "VERSION = 1", "VERSION = 2")
            except sandbox.SandboxError:
                box.edit("pkg3/sub/mod9.py", "VERSION = 2", "VERSION = 1")

        def bare_glob():
            found = []
            for top, dirs, files in os.walk(root):
                for name in dirs + files:
                    rel = os.path.relpath(os.path.join(top, name), root)
                    if fnmatch.fnmatch(rel, "*/sub/*.py"):
                        found.append(rel)
            return sorted(found)

        def bare_grep():
            hits = []
            for top, _, files in os.walk(root):
                for name in files:
                    with open(os.path.join(top, name), "rb") as f:
                        for n, line in enumerate(f, 1):
                            if b"NEEDLE" in line:
                                hits.append((name, n, line))
            return hits

        def python_grep():
            with mock.patch.object(sandbox, "USE_RG", False):
                return box.grep("NEEDLE")

        pairs = {
            "read": (bare_read, lambda: box.read("pkg3/sub/mod9.py"), 200),
            "write": (bare_write, lambda: box.write("pkg3/sub/mod9.py", body), 50),
            "edit": (bare_edit, box_edit, 50),
            "ls": (lambda: sorted(os.listdir(os.path.join(root, "pkg3"))), lambda: box.ls("pkg3"), 200),
            "glob": (bare_glob, lambda: box.glob("*/sub/*.py"), 3),
            "grep_python": (bare_grep, python_grep, 3),
        }
        rg = shutil.which("rg")
        if rg:
            pairs["grep_rg"] = (lambda: subprocess.run([rg, "--json", "-F", "NEEDLE", "."], cwd=root,
                                                       capture_output=True, check=True),
                                lambda: box.grep("NEEDLE"), 3)
        figures = {}
        for name, (bare, ours, calls) in pairs.items():
            ratios = []
            for _ in range(rounds):
                times = []
                for fn in (bare, ours):
                    t = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    times.append(time.perf_counter() - t)
                ratios.append(times[1] / times[0])
            figures[f"file_tool_{name}_vs_bare_ratio"] = round(statistics.median(ratios), 3)
        return figures

# ---- redact (issue: secrets.py) ----
@bench
def bench_redact():
    """Redactor streaming 10 MB in 4 KiB chunks against five str.replace calls on the whole text."""
    import random

    import models
    module = models.project_secrets()
    rng = random.Random(3)
    secrets = {
        "ANTHROPIC_API_KEY": "sk-ant-api03-" + "".join(rng.choice("abcdefXYZ0123456789_-") for _ in range(95)),
        "OPENAI_API_KEY": "sk-proj-" + "".join(rng.choice("abcdefXYZ0123456789") for _ in range(48)),
        "GITHUB_TOKEN": "ghp_" + "".join(rng.choice("abcdefXYZ0123456789") for _ in range(36)),
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "DB_PASSWORD": "correct-horse-battery-staple",
    }
    words = ("the build step test failed passed running import error warning sk- ghp token "
             "secret value config return status ok def class self src tests /usr/lib python").split()
    lines, size = [], 0
    while size < 10_000_000:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
        if rng.random() < 0.0005:  # about 100 occurrences in all, some across chunk boundaries
            line += " " + rng.choice(list(secrets.values()))
        lines.append(line)
        size += len(line) + 1
    text = "\n".join(lines)
    chunks = [text[i:i + 4096] for i in range(0, len(text), 4096)]
    ordered = sorted(secrets.items(), key=lambda kv: len(kv[1]), reverse=True)

    def baseline():
        out = text
        for name, value in ordered:
            out = out.replace(value, f"[REDACTED:{name}]")
        return out

    def streamed():
        redactor = module.Redactor(secrets)
        return "".join([redactor.feed(chunk) for chunk in chunks] + [redactor.flush()])

    base_times, redact_times = [], []
    for _ in range(7):
        for fn, times in ((baseline, base_times), (streamed, redact_times)):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
    assert result == baseline(), "streamed redaction differs from str.replace"
    occurrences = sum(text.count(v) for v in secrets.values())
    base, redact = statistics.median(base_times), statistics.median(redact_times)
    return {"mb": round(len(text) / 1e6, 1), "chunks": len(chunks), "occurrences": occurrences,
            "str_replace_ms": round(base * 1e3, 1), "redactor_ms": round(redact * 1e3, 1),
            "ratio": verdict(redact / base, "<=", 3.0, 2)}

# ---- events (issue: daemon.py; batched watchers: issue 15) ----
EVENTS_WATCHER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import daemon_client
home, endpoint, execution_id, last = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
arrivals = []  # (seq, perf_counter) of every 1000th event and the last text event
for event in daemon_client.Client(home, endpoint).watch(execution_id, follow=True):  # as `logs -f` reads
    if event.seq == 1:
        print("ready", flush=True)
    if event.seq % 1000 == 0 or event.seq == last:
        arrivals.append((event.seq, time.perf_counter()))
print(json.dumps(arrivals), flush=True)
"""


@bench
def bench_events(total=200_000, many=10):
    """One runner streams TextDelta events through Connect into SQLite: alone, with one watcher, and
    with MANY watchers following at once (separate processes reading as the CLI does, in batches);
    against a bare grpcio bidi stream, in this process, sending the same events one message each with
    no storage. A watcher's lag is how far behind it is when the last event is stored."""
    import os
    import queue
    import subprocess
    import tempfile
    from concurrent import futures

    import grpc

    import daemon_client
    import daemon_server
    import stigmer_pb2 as pb
    import stigmer_pb2_grpc as pb_grpc

    batch_size, bare_total = 2000, 50_000  # events per EventBatch; for the baseline
    body = "x" * 180  # about 200 bytes per serialized Event
    here = os.path.dirname(os.path.abspath(__file__))

    def persist(watchers):
        """Stream `total` events into a fresh daemon; (events/s, [(events behind, s behind) per watcher])."""
        with tempfile.TemporaryDirectory() as home:
            server = daemon_server.serve(home, "127.0.0.1:0", runner_grace=60)
            channel = daemon_client.client_channel(server.endpoint)
            stub, md = pb_grpc.DaemonStub(channel), daemon_client.auth_metadata(server.token)
            ex = stub.Submit(pb.SubmitRequest(spec=pb.ExecutionSpec(prompt="bench", workspace=home)),
                             metadata=md, timeout=30)
            last = total + 2  # seq 1 and 2 are the daemon's PENDING and RUNNING
            events = [pb.Event(execution_id=ex.id, seq=seq, time=1.0, text=pb.TextDelta(text=body))
                      for seq in range(3, last + 1)]
            batches = [pb.RunnerMessage(events=pb.EventBatch(events=events[i:i + batch_size]))
                       for i in range(0, total, batch_size)]
            procs = [subprocess.Popen([sys.executable, "-c", EVENTS_WATCHER, here, home, server.endpoint, ex.id,
                                       str(last)], stdout=subprocess.PIPE, text=True) for _ in range(watchers)]
            for proc in procs:
                assert proc.stdout.readline().strip() == "ready"
            outbox = queue.Queue()
            outbox.put(pb.RunnerMessage(hello=pb.Hello(runner_id="bench", capacity=1, mode="local")))
            responses = stub.Connect(iter(outbox.get, None), metadata=md, timeout=600)
            assert next(responses).assign.execution.id == ex.id
            start = time.perf_counter()
            for message in batches:
                outbox.put(message)
            for message in responses:
                if message.ack.seq == last:
                    break
            stored = time.perf_counter()
            outbox.put(pb.RunnerMessage(events=pb.EventBatch(events=[pb.Event(
                execution_id=ex.id, seq=last + 1, phase=pb.PhaseChange(phase=pb.COMPLETED))])))
            lags = []
            for proc in procs:
                arrivals = json.loads(proc.communicate(timeout=600)[0])
                seen_by_then = max((seq for seq, at in arrivals if at <= stored), default=0)
                lags.append((last - seen_by_then, max(0.0, dict(arrivals)[last] - stored)))
            outbox.put(None)
            channel.close()
            server.stop(0)
        return total / (stored - start), lags, events

    alone, _, _ = persist(0)
    watched, [(behind, behind_s)], events = persist(1)
    crowded, lags, _ = persist(many)
    worst = max(s for _, s in lags)

    def bare_stream(request_iterator, context):
        yield pb.Ack(seq=sum(1 for _ in request_iterator))

    bare = grpc.server(futures.ThreadPoolExecutor(4), options=daemon_server.SERVER_OPTIONS)
    bare.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Bare", {
        "Stream": grpc.stream_stream_rpc_method_handler(
            bare_stream, request_deserializer=pb.Event.FromString, response_serializer=pb.Ack.SerializeToString)})])
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    with daemon_client.client_channel(f"127.0.0.1:{port}") as bare_channel:
        call = bare_channel.stream_stream("/bench.Bare/Stream", request_serializer=pb.Event.SerializeToString,
                                          response_deserializer=pb.Ack.FromString)
        bare_start = time.perf_counter()
        (ack,) = list(call(iter(events[:bare_total]), timeout=600))
        bare_rate = ack.seq / (time.perf_counter() - bare_start)
    bare.stop(0)
    return {
        "events": total,
        "event_bytes": events[0].ByteSize(),
        "batch_size": batch_size,
        "persisted_per_s": verdict(watched, ">=", 50_000, 0),
        "persisted_per_s_without_watcher": round(alone),
        "watcher_behind_when_last_stored_events": behind,
        "watcher_behind_when_last_stored_ms": verdict(behind_s * 1000, "<", 1000, 1),
        f"persisted_per_s_with_{many}_watchers": round(crowded),
        f"{many}_watchers_behind_when_last_stored_ms": verdict(worst * 1000, "<", 1000, 1)
        + " worst; each: " + ", ".join(f"{s * 1000:.0f}" for _, s in lags),
        f"{many}_watchers_behind_when_last_stored_events": ", ".join(str(n) for n, _ in lags),
        "bare_stream_per_s": round(bare_rate),
        "ratio_vs_bare": verdict(watched / bare_rate, ">=", 5, 2),
    }

# ---- loop (issue: runner.py) ----
@bench
def bench_emit(turns=2000):
    """Worker.emit, the one redaction point, for the events of one agent turn (10 text deltas, a tool call, its
    2 KB result, usage, the turn), with a redactor of 6 secrets (none in the text) against the same emits with no
    secret to redact: what central redaction adds per turn, to set beside `loop`'s milliseconds per turn."""
    import models
    import stigmer_pb2 as pb
    import worker

    stigmer_secrets = models.project_secrets()

    secrets = {"ANTHROPIC_API_KEY": "sk-ant-api03-" + "x" * 95, "GITHUB_TOKEN": "ghp_" + "y" * 36,
               "DB_PASSWORD": "correct-horse-battery-staple", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRf",
               "REDIS_URL": "s3cr3t-redis-password", "DAYTONA_API_KEY": "dtn_" + "z" * 40}
    output = "\n".join(f"src/module_{i}.py:{i}: def function_{i}(self, value): return value" for i in range(40))
    call = json.dumps({"command": "pytest -x tests/test_module.py -k 'not slow'"})

    def run(redactor):
        w = worker.Worker(environ={}, capacity=1)
        start = time.perf_counter()
        for n in range(turns):
            w.outboxes["ex-b"] = worker.Outbox("ex-b", 0)  # a fresh outbox per turn: no buffer-full pauses
            w.buffered = 0
            for piece in range(10):
                w.emit("ex-b", redactor, text=pb.TextDelta(text=f"Looking at the failing test, step {piece}. "))
            w.emit("ex-b", redactor, turn=pb.Turn(number=n, stop="tool_use", text="Looking at the failing test."))
            w.emit("ex-b", redactor, usage=pb.Usage(input_tokens=n, output_tokens=n))
            w.emit("ex-b", redactor, tool_call=pb.ToolCall(id=f"t{n}", name="execute", input_json=call))
            w.emit("ex-b", redactor, tool_result=pb.ToolResult(id=f"t{n}", output=output, exit_code=1))
        return (time.perf_counter() - start) / turns * 1e6

    with_secrets, without = [], []
    for _ in range(5):
        without.append(run(stigmer_secrets.Redactor({})))
        with_secrets.append(run(stigmer_secrets.Redactor(secrets)))
    base, redacted = statistics.median(without), statistics.median(with_secrets)
    return {"turns": turns, "emit_us_per_turn_no_secrets": round(base, 1),
            "emit_us_per_turn_6_secrets": round(redacted, 1), "ratio": round(redacted / base, 2),
            "added_us_per_turn": verdict(redacted - base, "<", 2000, 1) + " (5% of a 40 ms turn is 2000 us)"}


@bench
def bench_loop(turns=50, list_runs=15):
    """A 50-turn scripted run through CLI, daemon, worker, fake model and sandbox, per turn, against
    a bare loop (the SDK on the same fake server plus subprocess.run), for AnthropicModel and for
    OpenAIChatModel (--model openai/...); and `runner.py list` start time."""
    import os
    import subprocess
    import tempfile

    import anthropic
    import openai

    import agent
    import models
    from testsupport import FAKE_KEY, OPENAI_KEY, FakeAnthropic, FakeOpenAI, free_port, text_step, tool_step

    script = [tool_step(("execute", {"command": f"echo turn {i}"})) for i in range(turns - 1)] + [text_step("done")]

    def per_turn_ms(fake):
        return (fake.times[-1] - fake.times[0]) / (len(fake.times) - 1) * 1000

    # The bare loop: no daemon, no worker, no sandbox, no events. It sends the same tools and system
    # prompt as the agent, so the ratio measures the runner's machinery, not the request's size.
    system = agent.system_prompt("/tmp")
    with FakeAnthropic(script) as fake:
        client = anthropic.Anthropic(api_key=FAKE_KEY, base_url=fake.url)
        messages = [{"role": "user", "content": "go"}]
        while True:
            with client.messages.stream(model="m", max_tokens=models.MAX_OUTPUT_TOKENS, messages=messages,
                                        system=system, tools=agent.TOOLS) as stream:
                message = stream.get_final_message()
            if message.stop_reason != "tool_use":
                break
            messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]})
            results = []
            for block in message.content:
                if block.type == "tool_use":
                    done = subprocess.run(block.input["command"], shell=True, capture_output=True, text=True)
                    results.append({"type": "tool_result", "tool_use_id": block.id, "content": done.stdout})
            messages.append({"role": "user", "content": results})
        bare = per_turn_ms(fake)

    runner_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")

    def full_path(fake, tmp, args=(), **settings):
        """The scripted run through `runner.py --json`, CLI to daemon to worker to model and sandbox."""
        env = dict(os.environ, STIGMER_HOME=os.path.join(tmp, "home"), SANDBOX_ROOT_DIR=tmp,
                   STIGMER_BACKEND_ENDPOINT=f"127.0.0.1:{free_port()}", **settings)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, runner_py, "--json", *args, "go"], env=env, capture_output=True,
                              text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0 or len(fake.times) != turns:
            raise RuntimeError(f"the scripted run failed ({done.returncode}): {done.stderr[-500:]}")
        return per_turn_ms(fake), wall, env

    # The same against OpenAIChatModel: a bare openai SDK loop, then the runner with --model openai/...
    with FakeOpenAI(script) as fake:
        client = openai.OpenAI(api_key=OPENAI_KEY, base_url=fake.url + "/v1")
        tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                   "parameters": t["input_schema"]}} for t in agent.TOOLS]
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "go"}]
        while True:
            calls, finish = {}, None
            for chunk in client.chat.completions.create(model="m", messages=messages, tools=tools, stream=True,
                                                        max_completion_tokens=models.MAX_OUTPUT_TOKENS,
                                                        stream_options={"include_usage": True}):
                for choice in chunk.choices:
                    for call in choice.delta.tool_calls or ():
                        slot = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                        slot["id"] = call.id or slot["id"]
                        slot["name"] += call.function.name or ""
                        slot["arguments"] += call.function.arguments or ""
                    finish = choice.finish_reason or finish
            if finish != "tool_calls":
                break
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in calls.values()]})
            for c in calls.values():
                done = subprocess.run(json.loads(c["arguments"])["command"], shell=True, capture_output=True, text=True)
                messages.append({"role": "tool", "tool_call_id": c["id"], "content": done.stdout})
        bare_openai = per_turn_ms(fake)
        client.close()
    def stop(env):  # the shared daemon a foreground run leaves behind (it would idle out after a minute)
        subprocess.run([sys.executable, runner_py, "stop", "--force"], env=env, capture_output=True, timeout=60)

    with tempfile.TemporaryDirectory() as tmp, FakeOpenAI(script) as fake:
        full_openai, _, env = full_path(fake, tmp, OPENAI_API_KEY=OPENAI_KEY, OPENAI_BASE_URL=fake.url + "/v1",
                                        STIGMER_MODEL="openai/gpt-fake")
        stop(env)

    with tempfile.TemporaryDirectory() as tmp, FakeAnthropic(script) as fake:
        full, wall, env = full_path(fake, tmp, ANTHROPIC_API_KEY=FAKE_KEY, ANTHROPIC_BASE_URL=fake.url,
                                    STIGMER_MODEL="claude-fake")
        try:  # `list` against the daemon the run left behind
            starts = []
            for _ in range(list_runs):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, runner_py, "list"], env=env, capture_output=True, check=True)
                starts.append(time.perf_counter() - t0)
            python_alone = statistics.median(
                [_timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True)) for _ in range(list_runs)])
        finally:
            stop(env)
    # Approvals under never: no call is checked; with a deny rule every call is, against the rule. Alternating runs
    # of the same script, so that the machine's noise falls on both.
    never, checked = [], []
    for _ in range(3):
        for times, args in ((never, ["--approval", "never"]), (checked, ["--approval", "never", "--deny", "rm -rf"])):
            with tempfile.TemporaryDirectory() as tmp, FakeAnthropic(script) as fake:
                took, _, env = full_path(fake, tmp, args, ANTHROPIC_API_KEY=FAKE_KEY, ANTHROPIC_BASE_URL=fake.url,
                                         STIGMER_MODEL="claude-fake")
                stop(env)
                times.append(took)
    top_ms, sub_ms = bench_subagent_turns(script, turns)
    return {"turns": turns, "bare_loop_ms_per_turn": round(bare, 2), "full_path_ms_per_turn": round(full, 2),
            "ratio": verdict(full / bare, "<=", 1.5, 2),
            "openai_bare_loop_ms_per_turn": round(bare_openai, 2),
            "openai_full_path_ms_per_turn": round(full_openai, 2),
            "openai_ratio": verdict(full_openai / bare_openai, "<=", 1.5, 2),
            "full_run_wall_s (incl. process start and SDK import)": round(wall, 2),
            "list_start_s": verdict(statistics.median(starts), "<", 0.3, 3) + f" (bare python start {python_alone:.3f})",
            "top_level_ms_per_turn (median of 3)": round(top_ms, 2),
            "subagent_ms_per_turn (median of 3)": round(sub_ms, 2),
            "subagent_ratio": verdict(sub_ms / top_ms, "<=", 1.10, 3),
            "approval never, ms per turn (median of 3)": round(statistics.median(never), 2),
            "approval never with a deny rule checked on every call, ms per turn (median of 3)":
                round(statistics.median(checked), 2),
            "approval_check_vs_never": verdict(statistics.median(checked) / statistics.median(never), "<=", 1.05, 3)}


def bench_subagent_turns(script, turns, rounds=3):
    """Per-turn cost of the same TURNS-turn script run by the top-level agent and by a sub-agent (the top-level
    agent's one task call runs it), each through the whole path (`runner.py --json`), alternating, ROUNDS times;
    returns the medians (ms per turn). The sub-agent's turns are timed from its own requests to the fake."""
    import os
    import subprocess
    import tempfile

    import subagents
    from testsupport import FAKE_KEY, FakeAnthropic, free_port, text_step, tool_step

    runner_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")

    def run(fake, wanted):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, STIGMER_HOME=os.path.join(tmp, "home"), SANDBOX_ROOT_DIR=tmp,
                       STIGMER_BACKEND_ENDPOINT=f"127.0.0.1:{free_port()}", ANTHROPIC_API_KEY=FAKE_KEY,
                       ANTHROPIC_BASE_URL=fake.url, STIGMER_MODEL="claude-fake")
            done = subprocess.run([sys.executable, runner_py, "--json", "go"], env=env, capture_output=True, text=True)
            subprocess.run([sys.executable, runner_py, "stop", "--force"], env=env, capture_output=True, timeout=60)
        times = [t for t, body in zip(fake.times, fake.requests) if fake.route(body) == wanted]
        if done.returncode != 0 or len(times) != turns:
            raise RuntimeError(f"the scripted run failed ({done.returncode}): {done.stderr[-500:]}")
        return (times[-1] - times[0]) / (len(times) - 1) * 1000

    delegate = [tool_step(("task", {"subagent_type": subagents.GENERAL_PURPOSE, "description": "[sub] go"})),
                text_step("done")]
    top, sub = [], []
    for _ in range(rounds):
        with FakeAnthropic(script) as fake:
            top.append(run(fake, None))
        with FakeAnthropic(delegate, routes={"[sub]": script}) as fake:
            sub.append(run(fake, "[sub]"))
    return statistics.median(top), statistics.median(sub)



# ---- cloud mode (issue 12: redis_backend.py) ----
CLOUD_WATCHER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import redis_backend
url, prefix, execution_id, last = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
client = redis_backend.RedisClient(url, prefix)
arrivals = []
for event in client.watch(execution_id):
    if event.seq == 1:
        print("ready", flush=True)
    if event.seq % 1000 == 0 or event.seq == last:
        arrivals.append((event.seq, time.perf_counter()))
print(json.dumps(arrivals), flush=True)
"""


@bench
def bench_cloud_appends(events=20_000, batch=500):
    """Text events appended through RedisLink.send (the fenced Lua append, one script call per
    batch, the record updated) while a watcher process follows with XREAD; against a bare
    redis-py pipeline of XADDs of the same serialized events, batch for batch, interleaved."""
    import os
    import subprocess

    import redis_backend
    import stigmer_pb2 as pb
    from testsupport_redis import REDIS_SERVER, RedisServer

    if not REDIS_SERVER:
        return {"skipped": "redis-server is not installed (apt-get install redis-server)"}

    class Stub:  # the Worker methods send() calls
        runner_id, capacity, mode = "bench", 1, "cloud"
        acked_to = 0

        def assigned(self, execution):
            self.execution = execution

        def acked(self, execution_id, seq):
            self.acked_to = seq

        def refused(self, execution_id, ack_seq, gap, message=""):
            raise RuntimeError(f"refused at {ack_seq}: {message}")

    server = RedisServer().start()
    try:
        prefix = "bench:"
        client = redis_backend.RedisClient(server.url, prefix)
        link = redis_backend.RedisLink(server.url, prefix, lease_ttl=600)
        ex = client.submit(pb.ExecutionSpec(prompt="bench", workspace="/tmp"))
        client.log.ensure_group()
        [(_, [(entry_id, fields)])] = client.log.r.xreadgroup(redis_backend.GROUP, "bench",
                                                               {client.log.queue: ">"}, count=1)
        worker = Stub()
        link.take(worker, entry_id.decode(), fields)
        first = worker.execution.last_seq + 1
        last = first + events  # the terminal event
        here = os.path.dirname(os.path.abspath(__file__))
        watcher = subprocess.Popen([sys.executable, "-c", CLOUD_WATCHER, here, server.url, prefix, ex.id, str(last)],
                                   stdout=subprocess.PIPE, text=True)
        assert watcher.stdout.readline().strip() == "ready"
        payload = "x" * 40  # a typical streamed text delta
        ours = [pb.Event(execution_id=ex.id, seq=s, time=time.time(), text=pb.TextDelta(text=payload))
                for s in range(first, last)]
        bare_rows = [e.SerializeToString() for e in ours]
        bare_key = prefix + "bare"
        bare_time = ours_time = 0.0
        r = client.log.r
        for i in range(0, events, batch):
            t = time.perf_counter()
            pipe = r.pipeline(transaction=False)
            for n, row in enumerate(bare_rows[i:i + batch], start=i + 1):
                pipe.xadd(bare_key, {"e": row}, id=f"0-{n}")
            pipe.execute()
            bare_time += time.perf_counter() - t
            t = time.perf_counter()
            link.send(worker, ours[i:i + batch])
            ours_time += time.perf_counter() - t
        link.send(worker, [pb.Event(execution_id=ex.id, seq=last, time=time.time(),
                                    phase=pb.PhaseChange(phase=pb.COMPLETED, final_text="done"))])
        sent_at = time.perf_counter()
        arrivals = json.loads(watcher.stdout.readline())
        watcher.wait(30)
        assert worker.acked_to == last and client.get(ex.id).phase == pb.COMPLETED
        lag = arrivals[-1][1] - sent_at
        client.close()
    finally:
        server.stop()
    bare_rate, ours_rate = events / bare_time, events / ours_time
    return {"events": events, "batch": batch,
            "bare_xadd_pipeline_events_per_s": round(bare_rate), "redislink_events_per_s": round(ours_rate),
            "ratio": verdict(ours_rate / bare_rate, ">=", 0.5, 2),
            "watcher_lag_at_end_ms": round(max(lag, 0.0) * 1000, 1)}

# ---- start (issue 15: cold start at the SDK's floor, warm runs after `start`) ----
START_FLOOR = """
import sys, anthropic
client = anthropic.Anthropic(api_key=sys.argv[2], base_url=sys.argv[1])
with client.messages.stream(model="claude-fake", max_tokens=1024, messages=[{"role": "user", "content": "go"}]) as s:
    s.get_final_message()
"""


def import_profile(stderr, top=8):
    """(total ms, [(ms, module)] of the TOP slowest top-level imports) from `-X importtime` output."""
    entries = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|", 2)
        name = name.rstrip()
        if not name.startswith("  ") and name.strip():  # top level: imported by the program itself
            entries.append((int(cumulative) / 1000, name.strip()))
    entries.sort(reverse=True)
    return sum(ms for ms, _ in entries), entries[:top]


@bench
def bench_start(runs=7):
    """Wall time of a one-turn task (`python runner.py --json go`) from a cold shell (no daemon: the CLI
    starts the daemon and a worker, the fork server off), the same once the fork server is up (its worker
    forked), a second task right after a cold one (the first run's worker kept warm), and after
    `python runner.py start` (a warm worker), against
    the floor: a bare script that imports the anthropic SDK and makes the same one streamed request to the
    same fake. Interleaved, RUNS rounds. Then what the CLI and the worker import (-X importtime), and,
    when a `claude` CLI is on PATH, Claude Code headless on the same fake."""
    import os
    import shutil
    import subprocess
    import tempfile

    from testsupport import FAKE_KEY, FakeAnthropic, free_port, text_step

    runner_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")
    claude = shutil.which("claude")

    def timed_run(args, env, cwd=None, check=True):
        t0 = time.perf_counter()
        done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
        took = time.perf_counter() - t0
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed ({done.returncode}): {done.stderr[-800:]}")
        return took, done

    with tempfile.TemporaryDirectory() as tmp, FakeAnthropic([text_step("done")]) as fake:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("STIGMER_", "ANTHROPIC_"))
                and k not in ("MODE", "PYTHONPROFILEIMPORTTIME", "PYTHONDONTWRITEBYTECODE")}  # as a user's machine
        base.update(ANTHROPIC_API_KEY=FAKE_KEY, ANTHROPIC_BASE_URL=fake.url, STIGMER_MODEL="claude-fake",
                    SANDBOX_ROOT_DIR=tmp)

        def fresh_env(name):  # the fork server off: a cold run is the first of the day, its worker started afresh
            return dict(base, STIGMER_HOME=os.path.join(tmp, name), STIGMER_BACKEND_ENDPOINT=f"127.0.0.1:{free_port()}",
                        STIGMER_FORKSERVER="0")

        def forked_env(name):  # a cold run (no daemon, no warm worker) once the fork server is up: a bench's own
            return dict(fresh_env(name), STIGMER_FORKSERVER="1", TMPDIR=tmp, STIGMER_FORKSERVER_IDLE="20")

        warm_env = fresh_env("warm")
        timed_run([sys.executable, runner_py, "start"], warm_env)
        floor, cold, warm, claude_times, grpc_start = [], [], [], [], []
        # With an agent: the example reviewer found by name, its declared secret set, an AGENTS.md to read.
        agent_ws = os.path.join(tmp, "agent-ws")
        os.makedirs(os.path.join(agent_ws, ".git"))
        os.makedirs(os.path.join(agent_ws, ".stigmer", "agents"))
        shutil.copy(os.path.join(os.path.dirname(runner_py), "examples", "agents", "code-reviewer.yaml"),
                    os.path.join(agent_ws, ".stigmer", "agents"))
        with open(os.path.join(agent_ws, "AGENTS.md"), "w") as f:
            f.write("# Project rules\n\n" + "- Run the tests with make check before you say you are done.\n" * 40)
        cold_agent, plan_bare, plan_agent, plan_first = [], [], [], []
        # What the CLI of a cold run has imported before it plans the run, then the agent's part of the plan
        # (with the agent parsed before, in STIGMER_HOME's cache; and the first time, parsing it).
        plan = ("import sys, time; import commands, daemon_client, terminal, stigmer_pb2, processes; "
                "processes.project_secrets(); t = time.perf_counter(){0}; print(time.perf_counter() - t)")
        with_agent = ("; import agents; agents.check_supported(agents.resolve('code-reviewer', sys.argv[1], sys.argv[2])); "
                      "agents.project_docs(sys.argv[1], sys.argv[2])")
        seeded = os.path.join(tmp, "seeded")  # a STIGMER_HOME whose cache holds the agent, as after one run
        timed_run([sys.executable, "-c", plan.format(with_agent), agent_ws, seeded], base, cwd=os.path.dirname(runner_py))

        # With 200 Agent Skills in the workspace: what discovering them and fitting their catalogue adds to the plan
        # every cold run makes (models, agents and the project docs are part of it anyway).
        skills_ws = os.path.join(tmp, "skills-ws")
        os.makedirs(os.path.join(skills_ws, ".git"))
        for k in range(200):
            folder = os.path.join(skills_ws, ".agents", "skills", f"skill-{k:03d}")
            os.makedirs(os.path.join(folder, "scripts"))
            with open(os.path.join(folder, "SKILL.md"), "w") as f:
                f.write(f"---\nname: skill-{k:03d}\ndescription: Helps with tasks of kind {k} and says which steps to "
                        f"take and which scripts to run.\nlicense: MIT\nmetadata:\n  version: '1.{k}'\n---\n"
                        + "A step of the skill.\n" * 100)
        skills_base = "; import models, agents; agents.project_docs(sys.argv[1], sys.argv[2])"
        with_skills = skills_base + ("; import skills; usable, _ = skills.discover(sys.argv[1], sys.argv[2]); "
                                     "skills.fit(usable, skills.budget('anthropic/claude-sonnet-4-5'))")
        skills_seeded = os.path.join(tmp, "skills-seeded")  # a STIGMER_HOME whose cache holds the checked files
        timed_run([sys.executable, "-c", plan.format(with_skills), skills_ws, skills_seeded], base,
                  cwd=os.path.dirname(runner_py))
        plan_no_skills, plan_skills, plan_skills_first = [], [], []

        def agent_env(n):  # a fresh home (so no daemon runs), the agent's cache as a previous run left it
            env = dict(fresh_env(f"agent{n}"), SANDBOX_ROOT_DIR=agent_ws, GITHUB_TOKEN="ghp_bench0000000000000000")
            shutil.copytree(os.path.join(seeded, "cache"), os.path.join(env["STIGMER_HOME"], "cache"))
            return env
        to_request = {"floor": [], "cold": [], "follow-up": [], "forked": []}  # seconds from the start to the request
        forked = []  # a cold run whose worker is forked from the fork server
        follow_up = []  # a second one-turn task right after a cold one: the first run's worker, kept warm

        def until_request(kind, args, env):
            before = len(fake.times)
            took, _ = timed_run(args, env)
            to_request[kind].append(fake.times[before] - (time.perf_counter() - took))
            return took

        try:
            for _ in range(2):  # the started worker's first run, and page caches for everyone
                timed_run([sys.executable, runner_py, "--json", "go"], warm_env)
            timed_run([sys.executable, "-c", START_FLOOR, fake.url, FAKE_KEY], base)
            import forkserver
            first = forked_env("forked-first")  # starts the fork server (its worker started afresh meanwhile)
            timed_run([sys.executable, runner_py, "--json", "go"], first)
            timed_run([sys.executable, runner_py, "stop"], first)
            deadline = time.monotonic() + 60
            while not os.path.exists(forkserver.socket_path(first) or "") and time.monotonic() < deadline:
                time.sleep(0.05)
            for n in range(runs):
                floor.append(until_request("floor", [sys.executable, "-c", START_FLOOR, fake.url, FAKE_KEY], base))
                cold_env = fresh_env(f"cold{n}")
                cold.append(until_request("cold", [sys.executable, runner_py, "--json", "go"], cold_env))
                follow_up.append(until_request("follow-up", [sys.executable, runner_py, "--json", "go"], cold_env))
                timed_run([sys.executable, runner_py, "stop"], cold_env)  # not left lingering for the next rounds
                env = forked_env(f"forked{n}")
                forked.append(until_request("forked", [sys.executable, runner_py, "--json", "go"], env))
                timed_run([sys.executable, runner_py, "stop"], env)
                cold_agent.append(timed_run([sys.executable, runner_py, "--json", "--agent", "code-reviewer", "go"],
                                            agent_env(n))[0])
                for times, code, home in ((plan_no_skills, plan.format(skills_base), skills_seeded),
                                          (plan_skills, plan.format(with_skills), skills_seeded),
                                          (plan_skills_first, plan.format(with_skills), os.path.join(tmp, f"sk{n}"))):
                    _, done = timed_run([sys.executable, "-c", code, skills_ws, home], base,
                                        cwd=os.path.dirname(runner_py))
                    times.append(float(done.stdout))
                for times, code, home in ((plan_bare, plan.format(""), seeded),
                                          (plan_agent, plan.format(with_agent), seeded),
                                          (plan_first, plan.format(with_agent), os.path.join(tmp, f"unseeded{n}"))):
                    _, done = timed_run([sys.executable, "-c", code, agent_ws, home], base, cwd=os.path.dirname(runner_py))
                    times.append(float(done.stdout))
                warm.append(timed_run([sys.executable, runner_py, "--json", "go"], warm_env)[0])
                grpc_start.append(timed_run([sys.executable, "-c", "import grpc, stigmer_pb2"], base,
                                            cwd=os.path.dirname(runner_py))[0])
                if claude:
                    home = os.path.join(tmp, f"claude{n}")
                    os.makedirs(home)
                    env = dict(base, HOME=home, CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1")
                    claude_times.append(timed_run([claude, "-p", "go", "--output-format", "stream-json", "--verbose",
                                                   "--allowedTools", "Bash"], env, cwd=tmp)[0])
            profiled = fresh_env("profiled")
            profiled["PYTHONPROFILEIMPORTTIME"] = "1"  # the worker inherits it and writes to its log
            _, done = timed_run([sys.executable, runner_py, "--json", "go"], profiled)
            with open(os.path.join(profiled["STIGMER_HOME"], "logs", "run-worker.log"), errors="replace") as f:
                worker_log = f.read()
        finally:
            timed_run([sys.executable, runner_py, "stop"], warm_env, check=False)

    def spread(times):
        return f"median {statistics.median(times):.3f} s (range {min(times):.3f}-{max(times):.3f})"

    floor_s, cold_s, warm_s = (statistics.median(t) for t in (floor, cold, warm))
    figures = {"runs_each": runs,
               "floor (import anthropic + one streamed request)": spread(floor),
               "cold run (no daemon)": spread(cold),
               "cold_vs_floor": verdict(cold_s / floor_s, "<=", 1.15, 2),
               "context: until the request, floor": spread(to_request["floor"]),
               "context: until the request, cold run": spread(to_request["cold"]),
               "context: the floor's interpreter tear-down, which the runner skips (os._exit)":
                   f"{statistics.median(floor) - statistics.median(to_request['floor']):.3f} s after its request",
               "cold run with --agent (the example reviewer, an AGENTS.md)": spread(cold_agent),
               "context: cold run with --agent minus without (noisy: whole processes)":
                   f"{(statistics.median(cold_agent) - cold_s) * 1000:+.0f} ms",
               "agent_added_ms (find the agent, its parsed spec from the cache, check it, read AGENTS.md)":
                   verdict((statistics.median(plan_agent) - statistics.median(plan_bare)) * 1000, "<", 20, 1),
               "context: the same the first time (import yaml, parse and check the file, write the cache)":
                   f"{(statistics.median(plan_first) - statistics.median(plan_bare)) * 1000:.1f} ms",
               "context: agent_added vs the cold run": f"{(statistics.median(plan_agent) - statistics.median(plan_bare)) / cold_s:.2%}",
               "skills_added_ms (discover 200 skills, checked by an earlier run, and fit their catalogue)":
                   verdict((statistics.median(plan_skills) - statistics.median(plan_no_skills)) * 1000, "<", 30, 1),
               "context: the same the first time (import yaml, parse and check 200 SKILL.md, write the cache)":
                   f"{(statistics.median(plan_skills_first) - statistics.median(plan_no_skills)) * 1000:.1f} ms",
               "cold run, fork server up (no daemon, no warm worker: another home, another secret)": spread(forked),
               "context: until the request, cold run with the fork server up": spread(to_request["forked"]),
               "forked_vs_cold": verdict(statistics.median(forked) / cold_s, "<=", 0.5, 2),
               "warm follow-up (a second task within a minute of a cold one)": spread(follow_up),
               "follow_up_to_request_s": verdict(statistics.median(to_request["follow-up"]), "<=", 0.30, 3),
               "warm run (after start)": spread(warm),
               "warm_run_s": verdict(warm_s, "<=", 0.25, 3),
               "context: python -c 'import grpc, stigmer_pb2' (the CLI's own floor)": spread(grpc_start)}
    if claude_times:
        figures["claude code headless"] = spread(claude_times)
        figures["claude_code_vs_cold_run"] = round(statistics.median(claude_times) / cold_s, 2)
        figures["follow_up_vs_claude_code"] = verdict(statistics.median(follow_up) / statistics.median(claude_times),
                                                      "<=", 0.5, 2)
    else:
        figures["claude code headless"] = "skipped: no `claude` CLI on PATH (npm i -g @anthropic-ai/claude-code)"
        figures["follow_up_vs_claude_code"] = "skipped: no `claude` CLI on PATH"
    for who, text in (("cli", done.stderr), ("worker", worker_log)):
        total, top = import_profile(text)
        figures[f"{who}_imports_ms (cumulative, top level)"] = round(total)
        figures[f"{who}_top_imports"] = ", ".join(f"{name} {ms:.0f}" for ms, name in top)
    return figures


@bench
def bench_cloud_workers(executions=24, counts=(1, 2, 4)):
    """Executions per minute through 1, 2 and 4 `runner.py worker` processes (cloud mode, capacity 1
    each) on one Redis against the fake model: two turns and one shell command per execution. Workers
    are started and registered before the clock starts; the clock stops when the last one ends."""
    import os
    import shutil
    import subprocess
    import tempfile

    import redis_backend
    import stigmer_pb2 as pb
    from testsupport import FAKE_KEY, FakeAnthropic, text_step, tool_step
    from testsupport_redis import REDIS_SERVER, RedisServer

    if not REDIS_SERVER:
        return {"skipped": "redis-server is not installed (apt-get install redis-server)"}
    here = os.path.dirname(os.path.abspath(__file__))
    server = RedisServer().start()
    fake = FakeAnthropic([tool_step(("execute", {"command": "echo hi"})), text_step("done")]).start()
    tmp = tempfile.mkdtemp(prefix="stigmer-bench-")
    rates = {}
    try:
        for n in counts:
            prefix = f"bench{n}:"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC", "STIGMER", "REDIS"))}
            env.update(MODE="cloud", REDIS_URL=server.url, STIGMER_REDIS_PREFIX=prefix, STIGMER_SANDBOX="filesystem",
                       STIGMER_HOME=os.path.join(tmp, "home"), ANTHROPIC_BASE_URL=fake.url, ANTHROPIC_API_KEY=FAKE_KEY,
                       STIGMER_MODEL="claude-fake", ENV="production")
            client = redis_backend.RedisClient(server.url, prefix)
            workers = [subprocess.Popen([sys.executable, os.path.join(here, "runner.py"), "worker", "--capacity", "1"],
                                        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL) for _ in range(n)]
            try:
                deadline = time.monotonic() + 120
                while client.status().connected_runners < n:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{n} workers did not register")
                    time.sleep(0.05)
                def run(count, tag):
                    ids = [client.submit(pb.ExecutionSpec(prompt=f"{tag} {i}", workspace=tmp)).id
                           for i in range(count)]
                    while any(client.log.get(i).phase not in redis_backend.TERMINAL for i in ids):
                        time.sleep(0.02)
                    return ids
                run(2 * n, "warm-up")  # every worker has imported the model SDK and run once
                t = time.perf_counter()
                ids = run(executions, "bench")
                elapsed = time.perf_counter() - t
                assert all(client.get(i).phase == pb.COMPLETED for i in ids)
            finally:
                for w in workers:
                    w.terminate()
                for w in workers:
                    w.wait(30)
                client.close()
            rates[n] = executions / elapsed * 60
    finally:
        fake.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"executions_per_run": executions, "cores": os.cpu_count(),
            **{f"workers_{n}_executions_per_min": round(rates[n]) for n in counts},
            "scaling_4_over_1": round(rates[counts[-1]] / rates[counts[0]], 2)}


@bench
def bench_mcp(turns=40, rounds=5):
    """Per turn with one MCP tool call: the whole path (runner.py --json, a warm worker after `start`: model turn, the
    call through mcp_tools.Hub, events stored) against a bare loop (the anthropic SDK on the same fake server and
    the mcp SDK's own ClientSession calling the same stdio server). And, with two stdio servers, the time from the
    execution's start (its RUNNING event) to its first model request, against the servers' own start-up (the SDK
    starting both at once and listing their tools); a cold run's time to its first request, with and without the
    servers, for context. ROUNDS times each."""
    import asyncio
    import os
    import subprocess
    import tempfile
    import threading

    import anthropic
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    import agent
    import models
    from testsupport import FAKE_KEY, FakeAnthropic, free_port, text_step, tool_step

    here = os.path.dirname(os.path.abspath(__file__))
    runner_py, server_py = os.path.join(here, "runner.py"), os.path.join(here, "testsupport_mcp_server.py")
    params = StdioServerParameters(command=sys.executable, args=[server_py, "stdio"])
    script = [tool_step(("mcp__t__echo", {"text": f"turn {i}"})) for i in range(turns - 1)] + [text_step("done")]

    def per_turn_ms(fake):
        return (fake.times[-1] - fake.times[0]) / (len(fake.times) - 1) * 1000

    async def server_start(t0=None):  # the SDK alone: spawn, initialize, list the tools
        t0 = t0 or time.perf_counter()
        async with stdio_client(params, errlog=open(os.devnull, "w")) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                listed = await session.list_tools()
                took = time.perf_counter() - t0
        return took, listed

    async def both_start():  # two at once, as an execution starts its servers
        t0 = time.perf_counter()
        return max(took for took, _ in await asyncio.gather(server_start(t0), server_start(t0)))

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    _, listed = asyncio.run_coroutine_threadsafe(server_start(), loop).result()
    mcp_tools = [{"name": f"mcp__t__{t.name}", "description": t.description, "input_schema": t.input_schema}
                 for t in sorted(listed.tools, key=lambda t: t.name)]

    async def bare_loop(fake):  # the same requests (built-in tools, the task tool aside, and the server's)
        client = anthropic.AsyncAnthropic(api_key=FAKE_KEY, base_url=fake.url)
        system = agent.system_prompt("/tmp")
        async with stdio_client(params, errlog=open(os.devnull, "w")) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                messages = [{"role": "user", "content": "go"}]
                while True:
                    async with client.messages.stream(model="m", max_tokens=models.MAX_OUTPUT_TOKENS, system=system,
                                                      messages=messages, tools=agent.TOOLS + mcp_tools) as stream:
                        message = await stream.get_final_message()
                    if message.stop_reason != "tool_use":
                        break
                    messages.append({"role": "assistant",
                                     "content": [b.model_dump(exclude_none=True) for b in message.content]})
                    results = []
                    for block in message.content:
                        if block.type == "tool_use":
                            result = await session.call_tool(block.name.removeprefix("mcp__t__"), block.input)
                            results.append({"type": "tool_result", "tool_use_id": block.id,
                                            "content": result.content[0].text})
                    messages.append({"role": "user", "content": results})
        await client.close()

    bare, full, to_request, starts, from_running = [], [], {"with": [], "without": []}, [], []
    wall_offset = time.time() - time.perf_counter()  # the fake's times are perf_counter's; events carry wall time
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "mcp.json")
        with open(config, "w") as f:
            json.dump({"mcpServers": {"t": {"command": sys.executable, "args": [server_py, "stdio"]}}}, f)
        two = os.path.join(tmp, "two.json")
        with open(two, "w") as f:
            json.dump({"mcpServers": {n: {"command": sys.executable, "args": [server_py, "stdio"]} for n in "ab"}}, f)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC", "STIGMER", "OPENAI"))}
        with FakeAnthropic(script) as fake:
            base.update(ANTHROPIC_API_KEY=FAKE_KEY, ANTHROPIC_BASE_URL=fake.url, STIGMER_MODEL="claude-fake",
                        SANDBOX_ROOT_DIR=tmp)
            warm = dict(base, STIGMER_HOME=os.path.join(tmp, "warm"), STIGMER_BACKEND_ENDPOINT=f"127.0.0.1:{free_port()}")
            subprocess.run([sys.executable, runner_py, "start"], env=warm, capture_output=True, check=True)
            try:
                for _ in range(rounds):
                    fake.reset(script)
                    asyncio.run_coroutine_threadsafe(bare_loop(fake), loop).result()
                    bare.append(per_turn_ms(fake))
                    fake.reset(script)
                    done = subprocess.run([sys.executable, runner_py, "--json", "--mcp-config", config, "go"], env=warm,
                                          capture_output=True, text=True)
                    if done.returncode != 0 or len(fake.times) != turns:
                        raise RuntimeError(f"the MCP run failed ({done.returncode}): {done.stderr[-500:]}")
                    full.append(per_turn_ms(fake))
                for n in range(rounds + 1):  # two servers; the first run imports the mcp SDK in the worker
                    fake.reset([text_step("done")])
                    done = subprocess.run([sys.executable, runner_py, "--json", "--mcp-config", two, "go"], env=warm,
                                          capture_output=True, text=True)
                    running = next(json.loads(line)["time"] for line in done.stdout.splitlines()
                                   if '"phase": "RUNNING"' in line)
                    if n:
                        from_running.append(fake.times[0] + wall_offset - running)
                        starts.append(asyncio.run_coroutine_threadsafe(both_start(), loop).result())
            finally:
                subprocess.run([sys.executable, runner_py, "stop", "--force"], env=warm, capture_output=True)
            for n in range(rounds):  # cold runs: each its own home, so no daemon or worker is there yet
                for kind, extra in (("without", []), ("with", ["--mcp-config", two])):
                    fake.reset([text_step("done")])
                    cold = dict(base, STIGMER_HOME=os.path.join(tmp, f"{kind}{n}"),
                                STIGMER_BACKEND_ENDPOINT=f"127.0.0.1:{free_port()}")
                    t0 = time.perf_counter()
                    done = subprocess.run([sys.executable, runner_py, "--json", *extra, "go"], env=cold,
                                          capture_output=True, text=True)
                    if done.returncode != 0 or not fake.times:
                        raise RuntimeError(f"the cold run failed ({done.returncode}): {done.stderr[-500:]}")
                    to_request[kind].append(fake.times[0] - t0)
                    subprocess.run([sys.executable, runner_py, "stop", "--force"], env=cold, capture_output=True)
    loop.call_soon_threadsafe(loop.stop)
    bare_ms, full_ms = statistics.median(bare), statistics.median(full)
    without, with_servers = (statistics.median(x) for x in (to_request["without"], to_request["with"]))
    own, ours = statistics.median(starts), statistics.median(from_running)
    return {"turns": turns, "rounds": rounds,
            "bare_loop_ms_per_turn (anthropic SDK + mcp ClientSession.call_tool)": round(bare_ms, 2),
            "full_path_ms_per_turn (runner.py after start, --mcp-config)": round(full_ms, 2),
            "per_call_vs_bare": verdict(full_ms, "<=", round(1.3 * bare_ms + 5, 2), 2) + " ms (target: 1.3x bare + 5 ms)",
            "context: ratio": round(full_ms / bare_ms, 2),
            "two servers' own start-up (the SDK: both at once, initialize, list tools)": f"{own:.3f} s",
            "execution start to its first request, two servers (worker after start)": f"{ours:.3f} s",
            "startup_vs_servers_own_s": verdict(ours, "<=", round(own + 0.1, 3), 3)
            + " (target: the servers' own start-up plus 100 ms)",
            "context: cold run to its first request, no servers": f"{without:.3f} s",
            "context: cold run to its first request, two stdio servers": f"{with_servers:.3f} s"}


GROUPS = {"cloud": ["cloud_workers", "cloud_appends"]}  # a name that runs several benchmarks


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    names = [b for a in args if a != "--json" for b in GROUPS.get(a, [a])] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown or "-h" in args or "--help" in args:
        if unknown:
            print(f"unknown benchmark: {', '.join(unknown)}", file=sys.stderr)
        print(__doc__.strip(), file=sys.stderr)
        return 2 if unknown else 0
    for name in names:
        if not as_json:
            print(f"== {name}", flush=True)
        figures = BENCHES[name]()
        if as_json:
            print(json.dumps({"bench": name, **figures}), flush=True)
        else:
            for key, value in figures.items():
                print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
