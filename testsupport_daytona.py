"""A loopback stand-in for Daytona's HTTP API, for tests that drive the real `daytona` SDK.

    from testsupport_daytona import FakeDaytona
    fake = FakeDaytona(api_key="dtn_test")          # starts serving on 127.0.0.1:<free port>
    client = daytona.Daytona(daytona.DaytonaConfig(api_key="dtn_test", api_url=fake.api_url,
                                                   target="local"))
    made = client.create()                             # a real temporary directory per sandbox
    fake.fail("POST", "/api/sandbox$", 429, times=2)   # script failures: 401, 404, 408, 429, 500
    fake.stall("GET", "/files/info", 5.0)              # or a response that takes its time
    fake.close()

Control plane under /api: create, get, delete, stop, list by labels, the toolbox proxy URL
(also in every sandbox record). Toolbox under <base>/toolbox/<sandbox id>: process execute and
sessions (create, exec async or not, command, logs, delete), files (info, list, bulk upload,
bulk download, search by name, find in contents, folder, delete). Commands run for real with
/bin/sh in the sandbox's directory; paths in the sandbox are host paths. The behaviour copies
Daytona's daemon where the SDK depends on it: session output is logged line by line (a last
unfinished line gets a newline when the stream ends), the exit code is known when the shell
exits, find skips files with a NUL in their first 512 bytes, search lists files only.
"""
import email.parser
import email.policy
import fnmatch
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sandbox as host_sandbox


class FakeDaytona:
    """The stand-in server; sandboxes maps id -> record dict (home, labels, sessions...)."""

    def __init__(self, api_key="dtn_test"):
        self.api_key = api_key
        self.tmp = tempfile.mkdtemp(prefix="fake-daytona-")
        self.sandboxes = {}
        self.calls = []          # (method, path) of every request, in order
        self.created = []        # ids of every sandbox ever created
        self.deleted = []        # ids, once per DELETE that found the sandbox
        self._script = []        # [method, regex, status, times, delay]
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.fake = self
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.api_url = self.base + "/api"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fail(self, method, path_regex, status, times=1):
        """Answer the next `times` requests matching method and path_regex with status."""
        with self._lock:
            self._script.append([method, re.compile(path_regex), status, times, 0.0])

    def stall(self, method, path_regex, seconds, times=1):
        """Delay the next `times` matching requests by seconds before serving them."""
        with self._lock:
            self._script.append([method, re.compile(path_regex), None, times, seconds])

    def add_sandbox(self, labels=None, home=None):
        """A started sandbox record made directly (for sweep tests); returns its id."""
        return self._create({"labels": labels or {}}, home)["id"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        for box in list(self.sandboxes.values()):
            _kill_sessions(box)
        remove(self.tmp)

    def _scripted(self, method, path):
        with self._lock:
            for entry in self._script:
                if entry[0] == method and entry[1].search(path) and entry[3] > 0:
                    entry[3] -= 1
                    return entry[2], entry[4]
        return None, 0.0

    def _create(self, body, home=None):
        sandbox_id = uuid.uuid4().hex[:12]
        home = home or os.path.join(self.tmp, sandbox_id)
        os.makedirs(home, exist_ok=True)
        record = {
            "id": sandbox_id, "organizationId": "org", "name": sandbox_id, "user": "daytona",
            "env": body.get("env") or {}, "labels": body.get("labels") or {}, "public": False,
            "networkBlockAll": False, "kvm": False, "target": body.get("target") or "local",
            "cpu": 1, "gpu": 0, "memory": 1, "disk": 3, "state": "started",
            "snapshot": body.get("snapshot"), "autoStopInterval": body.get("autoStopInterval"),
            "autoDeleteInterval": body.get("autoDeleteInterval"),
            "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "toolboxProxyUrl": self.base + "/toolbox",
        }
        with self._lock:
            self.sandboxes[sandbox_id] = {"record": record, "home": home, "sessions": {}}
            self.created.append(sandbox_id)
        return record


def remove(path):
    """Remove PATH's tree, folders made read-only inside it (a run's skills) included."""
    for top, dirs, _ in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(top, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


class _Command:
    """One session command running for real; output kept as the daemon logs it."""

    def __init__(self, command, cwd, env):
        self.id = uuid.uuid4().hex
        self.command = command
        self.exit_code = None
        self.out, self.err = bytearray(), bytearray()
        self.proc = subprocess.Popen(["/bin/sh", "-c", command], cwd=cwd, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.readers = [threading.Thread(target=self._drain, args=(pipe, buf), daemon=True)
                        for pipe, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _drain(self, pipe, buf):
        while True:
            chunk = pipe.read1(1 << 20)
            if not chunk:
                break
            buf += chunk
        pipe.close()

    def _wait(self):
        code = self.proc.wait()
        self.exit_code = code if code >= 0 else 128 - code

    def logs(self):
        def lines(buf, reader):
            data = bytes(buf)
            if reader.is_alive():  # the daemon logs whole lines until the stream ends
                return data[:data.rfind(b"\n") + 1]
            return data + b"\n" if data and not data.endswith(b"\n") else data
        out = lines(self.out, self.readers[0]).decode("utf-8", errors="replace")
        err = lines(self.err, self.readers[1]).decode("utf-8", errors="replace")
        return {"stdout": out, "stderr": err, "output": out + err}

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_sessions(box):
    for commands in box["sessions"].values():
        for command in commands.values():
            command.kill()
    box["sessions"].clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_DELETE(self):
        self._serve("DELETE")

    # ---- plumbing ----

    def _serve(self, method):
        fake = self.server.fake
        url = urllib.parse.urlsplit(self.path)
        self.query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        fake.calls.append((method, url.path))
        status, delay = fake._scripted(method, url.path)
        if delay:
            time.sleep(delay)
        if status is not None:
            return self._error(status, f"scripted failure {status}")
        if self.headers.get("Authorization") != f"Bearer {fake.api_key}":
            return self._error(401, "Invalid API key")
        try:
            self._route(method, url.path)
        except _Fail as e:
            self._error(e.status, e.message)

    def _send(self, status, data=b"", content_type="application/json"):
        if not isinstance(data, bytes):
            data = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status, message, code=None):
        body = {"statusCode": status, "message": message, "error": message}
        if code:
            body["code"] = code
        self._send(status, body)

    def _json(self):
        return json.loads(self.body or b"{}")

    def _box(self, sandbox_id):
        box = self.server.fake.sandboxes.get(sandbox_id)
        if box is None:
            raise _Fail(404, f"Sandbox with ID or name {sandbox_id} not found")
        return box

    def _route(self, method, path):
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if parts[:1] == ["api"]:
            return self._control(method, parts[1:])
        if parts[:1] == ["toolbox"] and len(parts) >= 3:
            box = self._box(parts[1])
            return self._toolbox(method, box, parts[2:])
        raise _Fail(404, f"no route for {method} {path}")

    # ---- control plane ----

    def _control(self, method, parts):
        fake = self.server.fake
        if parts == ["sandbox"] and method == "POST":
            return self._send(200, fake._create(self._json()))
        if parts == ["sandbox"] and method == "GET":
            wanted = json.loads(self.query.get("labels") or "{}")
            items = [b["record"] for b in list(fake.sandboxes.values())
                     if all(b["record"]["labels"].get(k) == v for k, v in wanted.items())]
            return self._send(200, {"items": items, "nextCursor": None})
        if len(parts) >= 2 and parts[0] == "sandbox":
            box = self._box(parts[1])
            record = box["record"]
            if len(parts) == 2 and method == "GET":
                return self._send(200, record)
            if len(parts) == 2 and method == "DELETE":
                with fake._lock:
                    fake.sandboxes.pop(parts[1], None)
                    fake.deleted.append(parts[1])
                _kill_sessions(box)
                remove(box["home"])
                return self._send(200, dict(record, state="destroyed"))
            if parts[2:] == ["stop"] and method == "POST":
                _kill_sessions(box)
                record["state"] = "stopped"
                return self._send(200, record)
            if parts[2:] == ["toolbox-proxy-url"] and method == "GET":
                return self._send(200, {"url": record["toolboxProxyUrl"]})
        raise _Fail(404, f"no route for {method} /api/{'/'.join(parts)}")

    # ---- toolbox: processes ----

    def _toolbox(self, method, box, parts):
        route = "/".join(parts)
        if parts[0] == "process":
            return self._process(method, box, parts[1:])
        if parts[0] == "files":
            return self._files(method, box, parts[1:])
        raise _Fail(404, f"no toolbox route for {method} /{route}")

    def _process(self, method, box, parts):
        env = dict(os.environ, **box["record"]["env"])
        if parts == ["execute"] and method == "POST":
            request = self._json()
            try:
                done = subprocess.run(["/bin/sh", "-c", request["command"]],
                                      cwd=request.get("cwd") or box["home"],
                                      env=dict(env, **(request.get("envs") or {})),
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, timeout=request.get("timeout"))
            except subprocess.TimeoutExpired:
                raise _Fail(408, "command execution timeout") from None
            return self._send(200, {"exitCode": done.returncode,
                                    "result": done.stdout.decode("utf-8", errors="replace")})
        sessions = box["sessions"]
        if parts == ["session"] and method == "POST":
            session_id = self._json()["sessionId"]
            if session_id in sessions:
                raise _Fail(409, "session already exists")
            sessions[session_id] = {}
            return self._send(201, b"")
        if parts == ["session"] and method == "GET":
            return self._send(200, [{"sessionId": s, "commands": []} for s in sessions])
        if len(parts) < 2 or parts[0] != "session" or parts[1] not in sessions:
            raise _Fail(404, "session not found")
        commands = sessions[parts[1]]
        if len(parts) == 2 and method == "DELETE":
            for command in commands.values():
                command.kill()
            del sessions[parts[1]]
            return self._send(204, b"")
        if parts[2:] == ["exec"] and method == "POST":
            request = self._json()
            command = _Command(request["command"], box["home"], env)
            commands[command.id] = command
            if request.get("runAsync") or request.get("async"):
                return self._send(202, {"cmdId": command.id})
            command.proc.wait()
            for reader in command.readers:
                reader.join()
            while command.exit_code is None:
                time.sleep(0.001)
            logs = command.logs()
            return self._send(200, {"cmdId": command.id, "exitCode": command.exit_code,
                                    "output": logs["output"], "stdout": logs["stdout"],
                                    "stderr": logs["stderr"]})
        if len(parts) >= 4 and parts[2] == "command" and parts[3] in commands:
            command = commands[parts[3]]
            if len(parts) == 4 and method == "GET":
                return self._send(200, {"id": command.id, "command": command.command,
                                        "exitCode": command.exit_code})
            if parts[4:] == ["logs"] and method == "GET":
                return self._send(200, command.logs())
        raise _Fail(404, "command not found")

    # ---- toolbox: files ----

    def _files(self, method, box, parts):
        route = "/".join(parts)
        path = self.query.get("path", "")
        if route == "" and method == "GET":
            if not os.path.isdir(path):
                raise _Fail(404 if not os.path.exists(path) else 400, f"not a directory: {path}")
            return self._send(200, [_info(os.path.join(path, n)) for n in sorted(os.listdir(path))
                                    if os.path.lexists(os.path.join(path, n))])
        if route == "" and method == "DELETE":
            if not os.path.lexists(path):
                raise _Fail(404, "file not found")
            if os.path.isdir(path) and not os.path.islink(path):
                if self.query.get("recursive") != "true":
                    raise _Fail(400, "directory is not empty; use recursive")
                shutil.rmtree(path)
            else:
                os.unlink(path)
            return self._send(204, b"")
        if route == "info" and method == "GET":
            return self._send(200, _info(path, missing=True))
        if route == "folder" and method == "POST":
            os.makedirs(path, mode=int(self.query.get("mode") or "755", 8), exist_ok=True)
            return self._send(201, b"")
        if route == "search" and method == "GET":
            return self._send(200, {"files": _search(path, self.query.get("pattern", ""))})
        if route == "find" and method == "GET":
            return self._send(200, _find(path, self.query.get("pattern", "")))
        if route == "bulk-upload" and method == "POST":
            return self._upload()
        if route == "bulk-download" and method == "POST":
            return self._download(self._json().get("paths") or [])
        raise _Fail(404, f"no toolbox route for {method} /files/{route}")

    def _upload(self):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + self.body)
        fields, files = {}, {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name.endswith(".path"):
                fields[name[:-5]] = part.get_content()
            else:
                files[name[:-5]] = part.get_payload(decode=True)
        for key, dest in fields.items():
            if os.path.isdir(dest):
                raise _Fail(400, f"{dest} is a directory")
            try:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "wb") as f:  # in place, so the mode is kept
                    f.write(files.get(key, b""))
            except (FileExistsError, NotADirectoryError):
                raise _Fail(400, f"part of {dest} is a file, not a directory") from None
            except PermissionError:
                raise _Fail(403, f"permission denied: {dest}") from None
        return self._send(200, b"")

    def _download(self, paths):
        boundary = uuid.uuid4().hex
        out = bytearray()
        for path in paths:
            label = urllib.parse.quote(path, safe="")
            try:
                with open(path, "rb") as f:
                    data, name, kind = f.read(), "file", "application/octet-stream"
            except OSError as e:
                status = 404 if isinstance(e, (FileNotFoundError, NotADirectoryError)) else 400
                data = json.dumps({"message": f"{path}: {e.strerror}", "statusCode": status,
                                   "code": "FILE_NOT_FOUND" if status == 404 else "BAD_REQUEST"}
                                  ).encode()
                name, kind = "error", "application/json"
            out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                    f"filename*=utf-8''{label}\r\nContent-Type: {kind}\r\n\r\n").encode()
            out += data + b"\r\n"
        out += f"--{boundary}--\r\n".encode()
        self._send(200, bytes(out), f"multipart/form-data; boundary={boundary}")


class _Fail(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


def _info(path, missing=False):
    try:
        st = os.stat(path)
    except OSError:
        if missing:
            raise _Fail(404, f"file not found: {path}") from None
        st = os.lstat(path)  # a dangling symlink in a listing
    return {"name": os.path.basename(path), "path": path, "isDir": stat.S_ISDIR(st.st_mode),
            "size": st.st_size, "mode": stat.filemode(st.st_mode),
            "permissions": oct(st.st_mode & 0o7777), "owner": str(st.st_uid),
            "group": str(st.st_gid), "modTime": time.ctime(st.st_mtime)}


def _walk(base):
    """(path, lstat) of everything under base, not following symlinks (Go's filepath.Walk)."""
    try:
        st = os.lstat(base)
    except OSError:
        return
    yield base, st
    if stat.S_ISDIR(st.st_mode):
        try:
            names = sorted(os.listdir(base))
        except OSError:
            return
        for name in names:
            yield from _walk(os.path.join(base, name))


def _search(base, pattern):
    """Files (not directories) under base whose path relative to base matches the glob."""
    regex = host_sandbox._glob_regex(pattern) if "/" in pattern or "**" in pattern else None
    found = []
    for path, st in _walk(base):
        if stat.S_ISDIR(st.st_mode):
            continue
        rel = os.path.relpath(path, base)
        if (regex.match(rel) if regex else fnmatch.fnmatchcase(os.path.basename(rel), pattern)):
            found.append(path)
    return found


def _find(base, pattern):
    """Lines holding pattern in regular files under base; a NUL in the first 512 bytes skips."""
    needle, matches = pattern.encode("utf-8", errors="surrogateescape"), []
    for path, st in _walk(base):
        if not stat.S_ISREG(st.st_mode):
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if b"\0" in data[:512]:
            continue
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for number, line in enumerate(lines, 1):
            line = line.removesuffix(b"\r")
            if needle in line:
                matches.append({"file": path, "line": number,
                                "content": line.decode("utf-8", errors="replace")})
    return matches
