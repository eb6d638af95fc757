"""Helpers shared by the tests and bench.py: a fake Anthropic Messages API on loopback.

    from testsupport import FakeAnthropic, tool_step, text_step
    fake = FakeAnthropic([tool_step(("execute", {"command": "ls"})), text_step("done")]).start()
    os.environ["ANTHROPIC_BASE_URL"] = fake.url   # the real SDK now talks to it

The fake serves `POST /v1/messages` with SSE streaming, scripted by a list of steps.
Which step answers is derived from the request itself (the number of assistant
messages already in it), so the SDK's retries and a worker's reconnects replay the
same step. Like the real API it checks the key and that every `tool_use` of the last
assistant turn is answered by a `tool_result` in the next user message, else 400.

Several conversations at once (an agent and its sub-agents) each get a script of their own: `routes`
maps a marker to a script, and a request whose system prompt or first user message holds the marker
is answered from that script (the first marker that matches; none: the main script).

    fake = FakeAnthropic(parent_script, routes={"[sub-a]": sub_script}).start()
"""
import itertools
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAKE_KEY = "sk-ant-fake.not.a.real.key.0123456789"  # the only key the fake accepts (dots: no real key has them)
OPENAI_KEY = "sk-openai-fake.not.a.real.key.0123456789"  # the only key FakeOpenAI accepts by default
HERE = os.path.dirname(os.path.abspath(__file__))
MESSAGE_IDS = itertools.count(1)  # every reply gets a unique message id, as from the real API (Claude Code needs it)


def text_step(text, stop="end_turn", **extra):
    """A turn in which the model only writes text."""
    return {"text": text, "stop": stop, **extra}


def tool_step(*calls, text="", stop="tool_use", **extra):
    """A turn in which the model calls tools: each call is (name, input_dict)."""
    return {"text": text, "tools": list(calls), "stop": stop, **extra}


def free_port():
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sse(event, data):
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def render_stream(step, index, model="claude-fake", reply_id=None):
    """The SSE body of one scripted turn."""
    usage = step.get("usage", {})
    out = [_sse("message_start", {"type": "message_start", "message": {
        "id": reply_id or f"msg_{index}_{next(MESSAGE_IDS)}", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": usage.get("input", 100), "output_tokens": 1,
                  "cache_read_input_tokens": usage.get("cache_read", 0),
                  "cache_creation_input_tokens": usage.get("cache_write", 0)}}})]
    block = 0
    if step.get("text"):
        out.append(_sse("content_block_start", {"type": "content_block_start", "index": block,
                                                "content_block": {"type": "text", "text": ""}}))
        text = step["text"]
        pieces = step.get("pieces") or [text[i:i + 16] for i in range(0, len(text), 16)]
        for piece in pieces:
            out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": block,
                                                    "delta": {"type": "text_delta", "text": piece}}))
        out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": block}))
        block += 1
    for n, (name, tool_input) in enumerate(step.get("tools", [])):
        out.append(_sse("content_block_start", {"type": "content_block_start", "index": block, "content_block": {
            "type": "tool_use", "id": f"toolu_{index}_{n}", "name": name, "input": {}}}))
        raw = tool_input if isinstance(tool_input, str) else json.dumps(tool_input)
        for i in range(0, len(raw), 40):
            out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": block,
                                                    "delta": {"type": "input_json_delta", "partial_json": raw[i:i + 40]}}))
        out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": block}))
        block += 1
    out.append(_sse("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": step.get("stop", "end_turn"), "stop_sequence": None},
                                      "usage": {"output_tokens": usage.get("output", 20)}}))
    out.append(_sse("message_stop", {"type": "message_stop"}))
    return "".join(out).encode()


def check_request(body):
    """What the real API would reject in this request body, or None."""
    messages = body.get("messages") or []
    if not messages or messages[0].get("role") != "user":
        return "messages: the first message must use the user role"
    for i, message in enumerate(messages):
        content = message.get("content")
        if message.get("role") != "assistant" or not isinstance(content, list):
            continue
        wanted = {b["id"] for b in content if b.get("type") == "tool_use"}
        if not wanted:
            continue
        reply = messages[i + 1]["content"] if i + 1 < len(messages) else None
        given = {b.get("tool_use_id") for b in reply if b.get("type") == "tool_result"} if isinstance(reply, list) else set()
        if wanted - given:
            return f"messages.{i + 1}: tool_use ids were found without tool_result blocks: {sorted(wanted - given)}"
    return None


class QuietServer(ThreadingHTTPServer):
    """Clients that hang up (a cancelled stream, a retry) are normal here, not errors to print."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeAnthropic:
    """A scripted Messages API server on a free loopback port."""

    def __init__(self, script, key=FAKE_KEY, routes=None):
        self.script = list(script)
        self.routes = {marker: list(steps) for marker, steps in (routes or {}).items()}  # marker -> script
        self.key = key
        self.requests = []  # parsed JSON bodies, in arrival order
        self.statuses = []  # (step, status) per request
        self.times = []  # time.perf_counter() at each request's arrival
        self._failures = {}  # step -> how many scripted errors were already served
        self._lock = threading.Lock()
        self._server = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def reset(self, script):
        """Start over with SCRIPT: no request seen, no scripted error served (the server and its URL stay)."""
        with self._lock:
            self.script = list(script)
            self.requests, self.statuses, self.times = [], [], []
            self._failures, self._replies = {}, 0

    def start(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each response waits on a delayed ACK (~40 ms)

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                status, headers, payload = fake._answer(self.path, self.headers, body)
                self.send_response(status)
                headers.setdefault("content-length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
                if len(payload) < int(headers["content-length"]):
                    self.close_connection = True  # the promised rest never comes

        self._server = QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def route(self, body):
        """The marker of ROUTES that BODY's system prompt or first user message holds, or None (the main script)."""
        messages = body.get("messages") or []
        first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages))
        opening = json.dumps(body.get("system", "")) + json.dumps(messages[:first + 1])
        return next((marker for marker in self.routes if marker in opening), None)

    def _step(self, step_index, route=None):
        """(step, scripted error or None) for a request at STEP_INDEX of ROUTE's script (the caller holds the
        lock): a step's "errors" are answered in turn, one per request, before the step itself."""
        script = self.script if route is None else self.routes[route]
        step = script[step_index] if step_index < len(script) else text_step("(script exhausted)")
        key = step_index if route is None else (route, step_index)
        served = self._failures.get(key, 0)
        errors = step.get("errors", [])
        scripted_error = errors[served] if served < len(errors) else None
        if scripted_error is not None:
            self._failures[key] = served + 1
        return step, scripted_error

    def _error(self, status, kind, message, headers=None):
        body = json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
        return status, {"content-type": "application/json", **(headers or {})}, body

    def _answer(self, path, headers, body):
        if not path.startswith("/v1/messages"):
            return self._error(404, "not_found_error", f"no route {path}")
        step_index = sum(1 for m in body.get("messages", []) if m.get("role") == "assistant")
        with self._lock:
            self.times.append(time.perf_counter())
            self.requests.append(body)
            step, scripted_error = self._step(step_index, self.route(body))
        key = headers.get("x-api-key") or (headers.get("authorization") or "").removeprefix("Bearer ")
        if key != self.key:
            result = self._error(401, "authentication_error", "invalid x-api-key")
        elif (problem := check_request(body)) is not None:
            result = self._error(400, "invalid_request_error", problem)
        elif scripted_error is not None:
            kinds = {400: "invalid_request_error", 403: "permission_error", 429: "rate_limit_error",
                     500: "api_error", 529: "overloaded_error"}
            status, message = scripted_error if isinstance(scripted_error, tuple) else (scripted_error, "scripted")
            result = self._error(status, kinds.get(status, "api_error"), message, {"retry-after": "0.05"})
        else:
            if step.get("delay"):
                time.sleep(step["delay"])
            if step.get("gate"):  # a threading.Event the test sets when this reply may go
                step["gate"].wait(60)
            with self._lock:
                self._replies = getattr(self, "_replies", 0) + 1
                reply_id = f"msg_{step_index}_{self._replies}"  # unique per reply, as the real API's ids are
            result = self._stream_reply(step, step_index, render_stream(step, step_index, body.get("model", "claude-fake"),
                                                                         reply_id))
        with self._lock:
            self.statuses.append((step_index, result[0]))
        return result

    def _stream_reply(self, step, step_index, full):
        """The 200 answer carrying the SSE body FULL; the first step["drop"] times it is sent for this step,
        only its first half goes out, like a connection that breaks off mid-reply."""
        sent = full
        with self._lock:
            drops = self._failures.get(("drop", step_index), 0)
            if drops < step.get("drop", 0):
                self._failures[("drop", step_index)] = drops + 1
                sent = full[:len(full) // 2]
        return 200, {"content-type": "text/event-stream", "cache-control": "no-cache",
                     "content-length": str(len(full))}, sent


def run_cli(args, env, timeout=60, cwd=None, input=None):
    """Run `python runner.py ARGS` as a new user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(HERE, "runner.py"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


def stop_home(env):
    """`runner.py stop --force` for the home ENV names, in this process: a class's fixtures end with it, and a new
    interpreter (its imports) for each cost a second of CPU in every five the suite spends on stopping."""
    import argparse
    import contextlib
    import io

    import commands
    import runner
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            commands.cmd_stop(runner.Config.load(env), argparse.Namespace(force=True))
    except Exception:  # noqa: BLE001 - whatever in-process stopping trips on, the command itself is the fallback
        run_cli(["stop", "--force"], env, timeout=30)


def reap(proc):
    """A test's cleanup for a process it started: killed if it still runs, waited for, its pipes closed
    (else each leaves a ResourceWarning, or a zombie)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def pid_alive(pid):
    """True while PID exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class PongServer:
    """An HTTP server on a free loopback port that answers "pong" to every GET (is the network there?)."""

    def __init__(self):
        class Pong(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"pong\n")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Pong)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def fetch_command(self):
        """A shell command that prints what the server answers (no proxy), failing without the network."""
        code = f"import urllib.request as u; print(u.build_opener(u.ProxyHandler({{}})).open('{self.url}').read().decode())"
        return f"{sys.executable} -c \"{code}\""

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def sleep_tag():
    """A `sleep` duration no other process has (60.<random digits>), to find that sleep by its command line:
    a confined command sees the pids of its own PID namespace, so `echo $!` cannot name it on the host."""
    import uuid
    return "60." + str(uuid.uuid4().int)[:12]


def running(tag):
    """Pids of the live processes (zombies do not count) whose command line holds TAG: the sleep, the shell
    that started it and, in a confined mode, the bwrap around them."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if tag.encode() not in f.read():
                    continue
            if pid_alive(int(name)):
                found.append(int(name))
        except (OSError, ValueError):
            continue  # not a process, or gone
    return found


def run_workers(home):
    """Pids of the live processes whose output goes to HOME's logs/run-worker.log: the runs' own workers, started
    by their CLI or forked from the fork server (whose command line and environment block they keep)."""
    log = os.path.join(home, "logs", "run-worker.log")
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.readlink(f"/proc/{name}/fd/1") == log and pid_alive(int(name)):
                found.append(int(name))
        except OSError:
            continue
    return found


def survivors(tag, timeout=5):
    """running(TAG), once every SIGKILL has had up to TIMEOUT seconds to land."""
    deadline = time.monotonic() + timeout
    while running(tag) and time.monotonic() < deadline:
        time.sleep(0.01)
    return running(tag)


# ---- a fake OpenAI Chat Completions API (OpenAI, Gemini's compatible endpoint, Ollama, vLLM) ----

OPENAI_FINISH = {"end_turn": "stop", "tool_use": "tool_calls", "max_tokens": "length", "refusal": "content_filter",
                 "stop_sequence": "stop"}  # the Anthropic-style stop kinds of a script step, as finish_reason


def render_chat_stream(step, index, model="gpt-fake", include_usage=True, reply_id="chatcmpl-0"):
    """The SSE body of one scripted turn, as Chat Completions streams it."""
    def chunk(delta=None, finish=None, usage=None):
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish,
                                                      "logprobs": None}]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    out = [chunk({"role": "assistant", "content": ""})]
    text = step.get("text") or ""
    for piece in step.get("pieces") or [text[i:i + 16] for i in range(0, len(text), 16)]:
        out.append(chunk({"content": piece}))
    for n, (name, tool_input) in enumerate(step.get("tools", [])):
        raw = tool_input if isinstance(tool_input, str) else json.dumps(tool_input)
        out.append(chunk({"tool_calls": [{"index": n, "id": f"call_{index}_{n}", "type": "function",
                                          "function": {"name": name, "arguments": ""}}]}))
        for i in range(0, len(raw), 40):
            out.append(chunk({"tool_calls": [{"index": n, "function": {"arguments": raw[i:i + 40]}}]}))
    stop = step.get("finish") or OPENAI_FINISH.get(step.get("stop", "end_turn"), "stop")
    out.append(chunk({}, finish=stop))
    if include_usage:
        usage = step.get("usage", {})
        prompt = usage.get("input", 100) + usage.get("cache_read", 0)
        out.append(chunk(None, usage={"prompt_tokens": prompt, "completion_tokens": usage.get("output", 20),
                                      "total_tokens": prompt + usage.get("output", 20),
                                      "prompt_tokens_details": {"cached_tokens": usage.get("cache_read", 0)}}))
    out.append("data: [DONE]\n\n")
    return "".join(out).encode()


def check_chat_request(body):
    """What a real Chat Completions server would reject in this request body, or None."""
    messages = body.get("messages") or []
    if not messages:
        return "messages: must not be empty"
    for i, message in enumerate(messages):
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if not calls:
            continue
        answered = set()
        for later in messages[i + 1:]:
            if later.get("role") != "tool":
                break
            answered.add(later.get("tool_call_id"))
        missing = {c["id"] for c in calls} - answered
        if missing:
            return (f"An assistant message with 'tool_calls' must be followed by tool messages responding to "
                    f"each 'tool_call_id'. The following tool_call_ids did not have response messages: "
                    f"{sorted(missing)}")
        for call in calls:
            if not isinstance(call.get("function", {}).get("arguments"), str):
                return f"messages.{i}.tool_calls: arguments must be a string"
    return None


class FakeOpenAI(FakeAnthropic):
    """A scripted Chat Completions server on a free loopback port; the same scripts as FakeAnthropic.

    Any path ending in /chat/completions answers (/v1/..., Gemini's /v1beta/openai/...). KEY None
    accepts requests without a key, as Ollama does. A step's "errors" may hold "context" for the
    context-length error."""

    def __init__(self, script, key=OPENAI_KEY):
        super().__init__(script, key=key)
        self.paths = []
        self._replies = 0

    def _error(self, status, kind, message, headers=None, code=None):
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
        return status, {"content-type": "application/json", **(headers or {})}, body

    def _answer(self, path, headers, body):
        if not path.rstrip("/").endswith("/chat/completions"):
            return self._error(404, "invalid_request_error", f"Unknown request URL: POST {path}",
                               code="unknown_url")
        step_index = sum(1 for m in body.get("messages", []) if m.get("role") == "assistant")
        with self._lock:
            self.times.append(time.perf_counter())
            self.requests.append(body)
            self.paths.append(path)
            self._replies += 1
            reply_id = f"chatcmpl-{step_index}-{self._replies}"
            step, scripted_error = self._step(step_index, self.route(body))
        key = (headers.get("authorization") or "").removeprefix("Bearer ")
        if self.key is not None and key != self.key:
            result = self._error(401, "invalid_request_error", "Incorrect API key provided: sk-op***", code="invalid_api_key")
        elif (problem := check_chat_request(body)) is not None:
            result = self._error(400, "invalid_request_error", problem)
        elif scripted_error == "context":
            result = self._error(400, "invalid_request_error", "This model's maximum context length is 128000 "
                                 "tokens. However, your messages resulted in 130000 tokens.",
                                 code="context_length_exceeded")
        elif scripted_error is not None:
            status, message = scripted_error if isinstance(scripted_error, tuple) else (scripted_error, "scripted")
            kinds = {400: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
                     429: "rate_limit_exceeded", 500: "server_error"}
            result = self._error(status, kinds.get(status, "server_error"), message, {"retry-after": "0.05"},
                                 code="model_not_found" if status == 404 else None)
        else:
            if step.get("delay"):
                time.sleep(step["delay"])
            if step.get("gate"):  # a threading.Event the test sets when this reply may go
                step["gate"].wait(60)
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            result = self._stream_reply(step, step_index, render_chat_stream(
                step, step_index, body.get("model", "gpt-fake"), include, reply_id))
        with self._lock:
            self.statuses.append((step_index, result[0]))
        return result


def read_until(fd, needle, deadline):
    """Bytes read from FD (a pty's main side) until NEEDLE shows up (None: until EOF), EOF, or the
    time.monotonic() DEADLINE."""
    data = b""
    while needle is None or needle not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        try:
            piece = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the pty
            break
        if not piece:
            break
        data += piece
    return data


def files_containing(text, *roots):
    """The paths of the files under ROOTS whose bytes contain TEXT (a key that must be on no disk)."""
    found = []
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                try:
                    with open(path, "rb") as f:
                        if text.encode() in f.read():
                            found.append(path)
                except OSError:  # a socket, or gone meanwhile
                    pass
    return found


def assert_one_line(test, proc, code, *needles):
    """PROC (a CLI run) exited CODE with one line on stderr, no traceback, holding every NEEDLE.
    Used as a TestCase method: `assertOneLine = assert_one_line`."""
    test.assertEqual(proc.returncode, code, proc.stderr)
    test.assertNotIn("Traceback", proc.stderr)
    test.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
    for needle in needles:
        test.assertIn(needle, proc.stderr)


def wait_for(predicate, timeout=60.0, what="a condition"):
    """PREDICATE()'s first truthy value, polled until TIMEOUT seconds have passed; then an AssertionError
    naming WHAT. (Generous by default: only a failing test waits that long.)"""
    deadline = time.monotonic() + timeout
    while True:
        began = time.monotonic()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        # A predicate that runs a CLI costs a process start: poll it at most half of the time (the suite is CPU-bound).
        time.sleep(max(0.02, time.monotonic() - began))


# ---- a squatter: a gRPC server someone else started where a client might dial its daemon ----

class Squatter:
    """A gRPC server on ADDRESS (e.g. "[::1]:50051") that answers no call and records each call's method
    and metadata: a client that sends it an `authorization` header has handed its daemon token over."""

    def __init__(self, address):
        from concurrent import futures

        import grpc
        self.calls = []
        calls = self.calls

        class Record(grpc.GenericRpcHandler):
            def service(self, details):
                calls.append((details.method, dict(details.invocation_metadata or ())))
                return None  # UNIMPLEMENTED for the caller

        self._server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[Record()],
                                   options=[("grpc.so_reuseport", 0)])
        self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"the squatter cannot listen on {address}")
        self._server.start()

    def tokens(self):
        """Every authorization header it received."""
        return [md["authorization"] for _, md in self.calls if "authorization" in md]

    def stop(self):
        self._server.stop(0)


def private_hosts_argv(hosts_file, argv):
    """ARGV run in a private mount namespace in which /etc/hosts is HOSTS_FILE (root, or unshare able to map
    a user namespace), so that `localhost` resolves as that file says for ARGV only."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /etc/hosts && exec "$@"', hosts_file, *argv]


def private_hosts_problem(hosts_file):
    """Why private_hosts_argv cannot make `localhost` resolve to ::1 here (None when it can)."""
    if not sys.platform.startswith("linux"):
        return "private mount namespaces are Linux only"
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"no IPv6 loopback here ({exc})"
    probe = [sys.executable, "-c", "import socket; print(socket.getaddrinfo('localhost', 1, type=socket.SOCK_STREAM)"
                                   "[0][4][0])"]
    try:
        done = subprocess.run(private_hosts_argv(hosts_file, probe), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare does not run here ({exc})"
    if done.returncode != 0 or done.stdout.strip() != "::1":
        return f"cannot bind-mount a hosts file in a private mount namespace: {done.stderr.strip() or done.stdout}"
    return None
