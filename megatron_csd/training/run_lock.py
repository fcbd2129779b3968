"""One writer per output folder: an exclusive ``fcntl.flock`` on ``DIR/megatron_csd.lock``.

The logging rank takes the lock on the run's output dir and on its save dir for the whole run
(``RunLock.acquire``); a second run on either folder fails at start-up with the holder's host
and PID, which the holder writes into the lock file. The kernel drops a flock when the
holder's file descriptor closes, including when the process is killed, so a lock file left
behind by a dead run never blocks (the file itself is kept: deleting it while another process
may be opening it would let two runs lock two different files).

flock works per open file description: a second ``open`` of the same file in the same process
conflicts too, which is what an in-process relaunch wants. On NFS flock is emulated with
POSIX locks (Linux >= 2.6.12), which still exclude other hosts.
"""
from __future__ import annotations

import datetime
import errno
import os
import socket
from typing import Optional

LOCK_FILE = "megatron_csd.lock"


class OutputDirBusyError(ValueError):
    """Another live process holds the lock of an output folder."""


def _describe_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return " ".join(text.split()) or "unknown holder (it wrote no host/pid yet)"


class RunLock:
    """Exclusive, non-blocking locks on a set of folders (all or none)."""

    def __init__(self):
        self._fds: list[int] = []
        self.paths: list[str] = []

    def acquire(self, directories) -> "RunLock":
        """Lock ``DIR/megatron_csd.lock`` of every distinct directory; OutputDirBusyError if taken."""
        import fcntl

        seen = set()
        try:
            for directory in directories:
                real = os.path.realpath(directory)
                if real in seen:
                    continue
                seen.add(real)
                os.makedirs(real, exist_ok=True)
                path = os.path.join(real, LOCK_FILE)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    holder = _describe_holder(fd)
                    os.close(fd)
                    if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    raise OutputDirBusyError(
                        f"{directory} is in use by another run ({holder}; lock file {path}). "
                        "Wait for it to finish or stop it, or give this run a new --output-dir "
                        "/ --save") from None
                os.ftruncate(fd, 0)
                started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} since {started}\n"
                         .encode("utf-8"))
                self._fds.append(fd)
                self.paths.append(path)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Drop the locks (closing the descriptors releases them); the files stay. Idempotent."""
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.paths = []

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def __del__(self):
        self.release()


def lock_for(directories, *, enabled: bool) -> Optional[RunLock]:
    """A held RunLock over ``directories`` when ``enabled`` (the logging rank), else None."""
    return RunLock().acquire(directories) if enabled else None
