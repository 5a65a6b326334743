"""The results directory (``--out``): checked before the model loads, and held by one run at a time.

``prepare_out_dir`` refuses, with one ``EvalError`` line, a ``--out`` that is a file, a directory that
cannot be written, or a path that cannot be created (its nearest existing ancestor is a file or is not
writable), and creates it otherwise; so a bad path costs no model load and no computed sample.

``OutLock`` is the lock file ``--out/.twilight-eval.lock``: it holds the owner's pid, host, start time and
command, is taken before any work and removed when the run ends. A second run into the same ``--out`` is
refused while the owner lives; a lock whose pid no longer runs on this host (a run that was killed) is taken
over, with a note. Where ``fcntl`` exists the owner also holds an ``flock`` on the file for its whole run, so
two runs started at the same moment cannot both take it.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time

from .common import EvalError

LOCK_FILE = ".twilight-eval.lock"

try:
    import fcntl
except ImportError:  # Windows: the pid in the file is the only guard
    fcntl = None


def _nearest_existing(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    return parent


def prepare_out_dir(out_dir: str, files: tuple[str, ...] = ()) -> None:
    """Create ``out_dir`` if needed; ``EvalError`` naming ``--out`` when it cannot hold the results.

    Args:
        files: names of the files the run writes in ``out_dir``: one that exists must be a writable file.
    """
    what = f"--out {out_dir}"
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        kind = "a broken link" if os.path.islink(out_dir) and not os.path.exists(out_dir) else "a file"
        raise EvalError(f"{what}: exists and is {kind}, not a directory; give a directory")
    if os.path.isdir(out_dir):
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise EvalError(f"{what}: the directory is not writable")
        for name in files:
            path = os.path.join(out_dir, name)
            if os.path.isdir(path) or (os.path.exists(path) and not os.access(path, os.W_OK)):
                raise EvalError(f"{what}: {name} in it is {'a directory' if os.path.isdir(path) else 'read-only'}")
        return
    parent = _nearest_existing(out_dir)
    if not os.path.isdir(parent):
        raise EvalError(f"{what}: cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EvalError(f"{what}: cannot be created: {parent} is not writable")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise EvalError(f"{what}: cannot be created: {err.strerror or err}") from err


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def read_owner(path: str) -> dict | None:
    """The owner recorded in a lock file (``pid``, ``host``, ...), ``None`` when missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "another twilight eval (pid unknown)"
    since = f" since {owner['started']}" if owner.get("started") else ""
    return f"another twilight eval (pid {owner['pid']} on {owner.get('host', '?')}{since})"


class OutLock:
    """``--out``'s lock file; ``acquire`` before any work, ``release`` at the end (or use ``with``)."""

    def __init__(self, out_dir: str, command: str | None = None):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_FILE)
        self.command = command if command is not None else " ".join(sys.argv)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _refuse(self, owner: dict | None) -> EvalError:
        return EvalError(f"--out {self.out_dir}: {_describe(owner)} is writing there; wait for it to end or use "
                         f"another --out (if that run is gone, delete {self.path})")

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over, ``EvalError`` when another live run
        holds it (or when the lock file cannot be written)."""
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise EvalError(f"--out {self.out_dir}: cannot write its lock file: {err.strerror or err}") from err
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    os.close(fd)
                    if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise EvalError(f"--out {self.out_dir}: cannot lock {self.path}: {err.strerror}") from err
                    raise self._refuse(self._wait_for_owner()) from None
                try:   # the holder may have removed the file between our open and our flock: lock the new one
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            owner = read_owner(self.path)
            note = None
            if owner is not None and (owner["pid"], owner.get("host")) != (me["pid"], me["host"]):
                if owner.get("host") != me["host"] or pid_alive(owner["pid"]):
                    os.close(fd)
                    raise self._refuse(owner)
                note = (f"--out {self.out_dir}: took over the lock of pid {owner['pid']} on {owner['host']}, which "
                        f"no longer runs (that run ended without releasing it)")
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(me) + "\n").encode("utf-8"))
                os.fsync(fd)
            except OSError as err:
                os.close(fd)
                raise EvalError(f"--out {self.out_dir}: cannot write its lock file: {err.strerror or err}") from err
            self._fd = fd
            return note
        raise EvalError(f"--out {self.out_dir}: cannot take its lock file {self.path}: it keeps being replaced")

    def _wait_for_owner(self, seconds: float = 2.0) -> dict | None:
        """The live holder's record; it may still be writing it just after taking the lock."""
        deadline = time.monotonic() + seconds
        while True:
            owner = read_owner(self.path)
            if owner is not None or time.monotonic() > deadline:
                return owner
            time.sleep(0.05)

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                os.remove(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "OutLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
