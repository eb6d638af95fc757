"""A real redis-server for the tests and bench.py: on a free loopback port, in a temporary directory.

    from testsupport_redis import RedisServer, requires_redis
    server = RedisServer().start()          # redis-server --port N --bind 127.0.0.1 --save '' ...
    url = server.url                        # redis://127.0.0.1:N/0 (redis://:PW@... with password="PW")
    server.restart()                        # same port, same directory (aof=True keeps the data)
    server.stop()

Tests that need it are decorated with @requires_redis, which skips them (with the reason)
when redis-server or the redis package is missing: `apt-get install redis-server` and
`pip install -e '.[cloud]'`.
"""
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

from testsupport import free_port

REDIS_SERVER = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server")
                                                else None)
START_TIMEOUT = 10.0  # seconds to wait for the first PONG


def _missing():
    if not REDIS_SERVER:
        return "redis-server is not installed (apt-get install redis-server)"
    if importlib.util.find_spec("redis") is None:
        return "the redis package is not installed (pip install -e '.[cloud]')"
    return None


requires_redis = unittest.skipIf(_missing(), _missing() or "")


def ping(port, timeout=0.5, password=None):
    """True when a Redis on 127.0.0.1:PORT answers PING (raw RESP; no client library), after AUTH PASSWORD."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall((f"AUTH {password}\r\n" if password else "").encode() + b"PING\r\n")
            answer = b""
            while answer.count(b"\r\n") < (2 if password else 1):
                chunk = s.recv(64)
                if not chunk:
                    return False
                answer += chunk
            return answer.splitlines()[-1].startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; .url, .port, .dir. aof=True turns on the append-only file
    (fsync every write) so that restart() keeps everything."""

    def __init__(self, aof=False, password=None):
        self.aof, self.password = aof, password  # PASSWORD: clients must AUTH (requirepass); it is in .url
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="stigmer-redis-")
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self.process = None

    def start(self):
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.aof else "no", "--dir", self.dir,
                "--logfile", os.path.join(self.dir, "redis.log")]
        if self.aof:
            args += ["--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not ping(self.port, password=self.password):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}; see {self.dir}/redis.log")
            time.sleep(0.02)
        return self

    def stop(self, remove=True):
        """Stop it (SIGTERM: a clean shutdown that flushes the AOF); REMOVE its directory too."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self, down_for=0.0):
        """Stop and start again on the same port and directory, DOWN_FOR seconds apart."""
        self.stop(remove=False)
        time.sleep(down_for)
        return self.start()
