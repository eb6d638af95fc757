"""STIGMER_HOME: its privacy, its locks, and which processes recorded in it are alive, without /proc.

    private_home("/home/me/.stigmer")              # 0700; warns when others can read an existing one
    fd = private_open(path, os.O_WRONLY | os.O_APPEND)   # created 0600 by whoever comes first
    with held(os.path.join(home, "start.lock"), timeout=60): ...   # one starter at a time
    lock_holder(os.path.join(home, "daemon.lock"))    # the pid holding it, or None

Liveness is a lock, not a process table: the process a pid file names holds an flock on that
file for its whole life (the spawner locks it and hands the open file to the child), so "the
file is locked" means "that process still runs", on Linux and macOS alike, with no pid-reuse
mistakes and no /proc. Standard library only.
"""
import fcntl
import os
import sys
import time

WARNED = set()  # homes already warned about in this process


class LockTimeout(Exception):
    """A lock stayed held by someone else for the whole wait."""


def private_home(home, warn=None):
    """Create HOME with mode 0700, or warn (once) when an existing HOME is open to other users."""
    try:
        os.makedirs(home, mode=0o700)
        os.chmod(home, 0o700)  # makedirs' mode is filtered by the umask
        return
    except FileExistsError:
        pass
    mode = os.stat(home).st_mode & 0o777
    if mode & 0o077 and home not in WARNED:
        WARNED.add(home)
        message = (f"STIGMER_HOME {home} is readable by other users (mode {mode:04o}): "
                   f"run `chmod 700 {home}` to keep prompts and tool output private")
        (warn or (lambda m: print(f"stigmer: warning: {m}", file=sys.stderr)))(message)


def private_dirs(path):
    """os.makedirs PATH with every directory it creates 0700 (makedirs gives the missing parents the
    umask's default mode, which would leave a new STIGMER_HOME readable by others)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        private_dirs(parent)
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        pass


def private_open(path, flags, mode=0o600):
    """os.open PATH creating it 0600 (the umask aside); an existing file keeps its mode."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        if os.fstat(fd).st_mode & 0o077 and os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, mode)
    except OSError:
        pass
    return fd


def private_file(path):
    """Create PATH empty and 0600 unless it exists (so that SQLite's WAL and SHM copy its mode)."""
    os.close(private_open(path, os.O_RDONLY))


def try_lock(fd, shared=False):
    """True when the flock on FD was taken without waiting."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def lock(path, timeout=0.0):
    """An fd of PATH (created 0600) holding an exclusive flock, waiting up to TIMEOUT seconds;
    raises LockTimeout. The lock lasts until every copy of the fd (a child's too) is closed."""
    fd = private_open(path, os.O_RDWR)
    deadline = time.monotonic() + timeout
    while not try_lock(fd):
        if time.monotonic() >= deadline:
            os.close(fd)
            raise LockTimeout(path)
        time.sleep(0.02)
    return fd


class held:
    """`with held(path, timeout):` an exclusive flock on PATH for the block."""

    def __init__(self, path, timeout):
        self.path, self.timeout = path, timeout

    def __enter__(self):
        self.fd = lock(self.path, self.timeout)
        return self.fd

    def __exit__(self, *exc):
        os.close(self.fd)


def write_record(fd, *fields):
    """Replace the content of the (locked) file FD with FIELDS, one per line."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, "".join(f"{f}\n" for f in fields).encode(), 0)


def lock_record(path):
    """The fields (lines) of PATH while some process holds its flock, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if try_lock(fd, shared=True):
            return None  # our shared lock goes with the close below
        return os.pread(fd, 4096, 0).decode(errors="replace").split()
    finally:
        os.close(fd)


def lock_holder(path):
    """The first field (a pid) of PATH while some process holds its flock: 0 when held but the
    pid is not written yet; None when nobody holds it (or there is no such file)."""
    record = lock_record(path)
    if record is None:
        return None
    try:
        return int(record[0])
    except (ValueError, IndexError):
        return 0


def pid_alive(pid):
    """True while PID exists (os.kill(pid, 0); no /proc)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_pid(path, wait=1.0):
    """The pid recorded in the pid file PATH if its process still runs (it holds the file's lock),
    else None. Waits up to WAIT seconds for a spawner that has locked the file but not written yet."""
    deadline = time.monotonic() + wait
    while True:
        pid = lock_holder(path)
        if pid is None:
            return None
        if pid and pid_alive(pid):
            return pid
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)
