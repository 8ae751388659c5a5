"""One run per ``--save`` directory: rank 0 holds an ``flock`` on ``SAVE/.megamoe-run.lock`` for
the whole run, and a second run on the same directory is refused at start-up, naming the first.

The kernel drops an ``flock`` when its holder exits, however it exits (killed, crashed), so a
dead run leaves no stale lock: the file stays, the lock does not.  That is also what lets a
``torchrun --max-restarts`` round resume on its own directory: torchrun stops every worker of
the failed round before it starts the next.  The file names its holder (host, pid, start time)
for the refusal.  A file system without ``flock`` (some Lustre mounts) runs unlocked, with a
line in the log saying so.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time

LOCK_FILE = ".megamoe-run.lock"


class SaveLock:
    """The lock on ``root`` (an existing directory); ``acquire`` once, ``release`` at the end."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> tuple[bool, str]:
        """``(True, "")`` when this process now holds the lock; ``(True, why)`` when the file
        system cannot lock (the run goes on unlocked); ``(False, holder)`` when another process
        holds it, ``holder`` being what it wrote."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return False, self._holder()
            return True, f"{self.path} cannot be locked ({err.strerror}): a second run on this --save would not be refused"
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n".encode())
        os.fsync(fd)
        return True, ""

    def _holder(self) -> str:
        # The holder writes its line just after locking: give it a moment before saying it is unknown.
        for _ in range(20):
            with open(self.path) as f:
                text = f.read().strip()
            if text:
                return text
            time.sleep(0.05)
        return "a process that has not written its name yet"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None
