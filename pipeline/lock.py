"""One run at a time on an output folder: `OUT/.lock`, held for the run's whole life.

    with FolderLock(out, "jobs/preprocess.py --src ... --out ..."):
        ...   # a second FolderLock on `out` raises LockHeld, naming this run

The lock file appears whole or not at all: the holder's description is written to a file of its
own and hard-linked to `.lock`, and link() fails when the name exists, atomically, on a local disk
and on NFS alike (the classic NFS-safe lock; O_EXCL creation is not safe on every NFS version).
The holder touches the lock every HEARTBEAT_S seconds. A lock is stale, and the next run takes it
over with a warning, when its holder's process is gone (a holder on this host) or its heartbeat is
older than STALE_S (a holder anywhere; the age is read on the file system's clock, not ours).

In a bucket (`OUT` an s3:// URL, `BucketLock`) the lock is the object `OUT/.lock`, created with a
conditional PUT (If-None-Match: *), which the server refuses when the object exists, atomically.
The heartbeat rewrites it; its age is its last-modified against that of an object the contender
writes (the server's clock both). A stale lock is deleted and created anew with the conditional
PUT: of two contenders, one creates it and the other is refused. S3 has no conditional DELETE on
every server, so a contender that read the stale lock just before another took it over may delete
the new one; the heartbeat of the run that lost it sees that within HEARTBEAT_S and says so, and
the job refuses to write its manifest.
"""
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from pipeline import storage

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 120.0  # 12 missed heartbeats: a holder this quiet is dead, or cut off from the folder


class LockHeld(Exception):
    """Another live run holds the folder; the message names it and says what to do."""


class FolderLock:
    def __init__(self, folder, command=None):
        self.folder, self.path = self._where(folder)
        self.token = uuid.uuid4().hex
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                     "since": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": command or " ".join(sys.argv)}
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, daemon=True, name="folder-lock")

    @staticmethod
    def _where(folder):
        """-> (the folder, its lock's path)."""
        return Path(folder), Path(folder) / ".lock"

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = self.folder / f".lock.{self.token}"
        mine.write_text(json.dumps(self.info) + "\n")
        try:
            for _ in range(5):  # a takeover can lose a race to another run's: look again
                try:
                    os.link(mine, self.path)
                    break
                except FileExistsError:
                    if os.stat(mine).st_nlink == 2:  # NFS: the link was made, its reply was lost
                        break
                    self._take_over_if_stale(mine)
            else:
                raise LockHeld(f"{self.path}: could not take the lock; another run keeps taking it")
        finally:
            mine.unlink(missing_ok=True)
        self._heartbeat.start()

    def release(self):
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join()
        if self.holds():
            self.path.unlink()

    def holds(self) -> bool:
        """Whether the lock is still this run's (a run whose heartbeat stalled may have lost it)."""
        holder = _read(self.path)
        return holder is not None and holder.get("token") == self.token

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            if not self.holds():
                log.error("%s was taken over by another run: this run's output can no longer be trusted", self.path)
                return
            os.utime(self.path)

    def _take_over_if_stale(self, mine):
        holder = _read(self.path)
        if holder is None:  # released (or half-read) meanwhile: try the link again
            return
        age = os.stat(mine).st_mtime - _mtime(self.path)  # both on the file system's clock
        who, reason = _judge(self.folder, holder, age)
        grave = self.folder / f".lock.stale.{self.token}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        taken = _read(grave)
        if taken is None or taken.get("token") != holder.get("token"):
            # another run took the stale lock over between our read and our rename: give it back
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
            grave.unlink()
            return
        grave.unlink()
        log.warning("took over %s from %s: %s", self.path, who, reason)


def _stale(holder, age) -> str | None:
    if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
        return f"its process {holder.get('pid')} is gone"
    if age > STALE_S:
        return f"no heartbeat for {age:.0f}s"
    return None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


def _read(path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _mtime(path) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return float("inf")  # gone: not stale, the next look decides


def lock_for(folder, command=None):
    """The lock of a folder (FolderLock) or of a bucket's prefix (BucketLock), by what `folder` is."""
    return (BucketLock if storage.is_url(folder) else FolderLock)(folder, command)


class BucketLock(FolderLock):
    """FolderLock's contract on an s3:// prefix: the object `.lock`, created by a conditional PUT."""

    @staticmethod
    def _where(folder):
        return str(folder).rstrip("/"), storage.join(folder, ".lock")

    def acquire(self):
        body = (json.dumps(self.info) + "\n").encode()
        for _ in range(5):  # a takeover can lose a race to another run's: look again
            try:
                storage.write_bytes(self.path, body, create=True)
                break
            except FileExistsError:
                self._take_over_if_stale()
        else:
            raise LockHeld(f"{self.path}: could not take the lock; another run keeps taking it")
        self._heartbeat.start()

    def release(self):
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join()
        try:
            if self.holds():
                storage.delete(self.path)
        except storage.StorageError as e:  # left behind: the next run takes it over once it is stale
            log.warning("could not release %s (%s): the next run takes it over %.0fs after its last heartbeat",
                        self.path, e, STALE_S)

    def holds(self) -> bool:
        holder = self._holder()
        return holder is not None and holder.get("token") == self.token

    def _holder(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.path))
        except (FileNotFoundError, ValueError):
            return None

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self.holds():
                    log.error("%s was taken over by another run: this run's output can no longer be trusted", self.path)
                    return
                storage.write_bytes(self.path, (json.dumps(self.info) + "\n").encode())
            except storage.StorageError as e:  # the next beat tries again; STALE_S is 12 beats
                log.warning("lock heartbeat: %s", e)

    def _take_over_if_stale(self, _mine=None):
        holder = self._holder()
        if holder is None:  # released meanwhile: try the conditional PUT again
            return
        probe = storage.join(self.folder, f".lock.{self.token}")
        storage.write_bytes(probe, b"")  # the server's clock now
        try:
            now, then = storage.head(probe)["last_modified"], storage.head(self.path)["last_modified"]
        except FileNotFoundError:
            return
        finally:
            storage.delete(probe)
        age = _seconds(now) - _seconds(then)
        who, reason = _judge(self.folder, holder, age)
        if self._holder() == holder:
            storage.delete(self.path)
            log.warning("took over %s from %s: %s", self.path, who, reason)


def _judge(folder, holder: dict, age: float) -> tuple[str, str]:
    """-> (who holds the lock, why it may be taken over) where it is stale (age: seconds since its last
    heartbeat); LockHeld, naming the holder, where it is not."""
    reason = _stale(holder, age)
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, running since {holder.get('since')} "
           f"({holder.get('command')})")
    if reason is None:
        raise LockHeld(f"{folder} is in use by {who}; its last heartbeat was {max(age, 0):.0f}s ago. "
                       f"Wait for it to finish or stop it; a lock whose holder has died is taken over "
                       f"by the next run ({STALE_S:.0f}s after its last heartbeat at most).")
    return who, reason


def _seconds(iso) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()
