"""One run per output directory: an exclusive ``flock`` on ``<output_dir>/.lock``.

The lock is held for the whole run and names its holder (pid, host, start time) inside the file, so
a second run into the same directory is refused at once with the pid to look for. ``flock`` locks
belong to the open file: the operating system drops them when the process dies, however it dies
(SIGKILL, OOM killer, a crash), so a stale ``.lock`` left by a dead run is taken over without any
clean-up. The file itself is not deleted while the directory is in use (deleting it would let two
runs lock two different files of the same name); a run that created the directory and leaves nothing
else in it removes both (``remove_if_unused``). Under DeepSpeed/torchrun only global rank 0 takes
it: every rank of a run shares the output directory, and a second launch has a rank 0 of its own
that is refused.

``flock`` is advisory and local to one machine on most network filesystems (NFS emulates it with
POSIX locks, which work across clients; some FUSE filesystems ignore it): it guards against the
common mistake of starting a run twice, not against a determined second writer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["LOCK_FILE", "RunDirLock", "RunLockError"]

LOCK_FILE = ".lock"


class RunLockError(RuntimeError):
    """The output directory is in use by another run (or cannot be locked)."""


def _describe_holder(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "pid unknown: the holder is still writing its details"


class RunDirLock:
    """``RunDirLock(output_dir).acquire()`` ... ``release()`` (or use it as a context manager)."""

    def __init__(self, directory: str | os.PathLike, *, remove_if_unused: bool = False):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        # The run created the directory: when it releases the lock and the directory holds nothing
        # else (the run failed before writing anything), remove both rather than leave a bare .lock.
        self.remove_if_unused = remove_if_unused
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        """Take the lock (a no-op when this object holds it already); ``RunLockError`` when another
        process holds it, ``OSError`` when the file cannot be created (e.g. a read-only directory)."""
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 4096, 0) if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if holder is None:
                raise RunLockError(f"{self.path}: cannot lock the output directory ({exc.strerror})") from exc
            raise RunLockError(
                f"checkpoint.output_dir: {self.directory} is in use by another run "
                f"({_describe_holder(holder)}); wait for it to finish or use another output_dir"
            ) from None
        try:
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)  # also drops the lock
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if self.remove_if_unused:
                # Still locked here: a second run that opened the file meanwhile was refused. (One
                # that opens it between this unlink and the rmdir creates a new .lock, and the rmdir
                # fails harmlessly on the non-empty directory.)
                with contextlib.suppress(OSError):
                    if [entry.name for entry in self.directory.iterdir()] == [LOCK_FILE]:
                        os.unlink(self.path)
                        os.rmdir(self.directory)
            os.close(fd)  # closing the last descriptor of the open file drops the flock

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()
