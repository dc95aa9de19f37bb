"""Stopping a run early without losing it: SIGTERM, SIGINT, or a request from the Ray Train driver.

SIGTERM is what Kubernetes, SLURM and spot instances send before they kill. The first SIGTERM or
SIGINT asks the run to stop: the step under way finishes, the ranks agree on the step to stop
after (trainer/ranks.py), rank 0 writes a checkpoint, and the command exits with status 128 + the
signal's number and a line saying how to resume. A second signal kills at once; one within
ECHO_S of the first is taken for the same request passed on (torchrun forwards what it receives,
and a terminal's Ctrl-C or SLURM's scancel reach every process of the job as well).

Under Ray Train the training function runs in a thread of a Ray worker, where no signal handler
can be set: the driver (`python -m trainer.run --workers N`) takes the signal and writes
RUN/.stop, which rank 0 watches for (an object, where RUN is a bucket's run folder: one GET a second).
"""
import logging
import os
import signal
import threading
import time
from pathlib import Path

from pipeline import storage
from pipeline.manifest import write_json

log = logging.getLogger("trainer")

ECHO_S = 2.0
STOP_FILE = ".stop"
WATCH_S = 1.0  # how often rank 0 looks for RUN/.stop: one stat (or GET) a second


class StopRequest:
    """Whether this process was asked to stop, and by what. `install` takes SIGTERM and SIGINT (main
    thread only); `watch` polls a request file; `ask` is what both call."""

    def __init__(self):
        self.signal, self.at = None, None

    @property
    def asked(self) -> bool:
        return self.signal is not None

    def ask(self, signum: int):
        if not self.asked:
            self.signal, self.at = signal.Signals(signum), time.monotonic()

    def install(self, on_first=None):
        """SIGTERM and SIGINT ask; a second one, ECHO_S or more later, kills at once.
        on_first(signal): called once, at the first (the Ray driver passes the request on)."""
        def handler(signum, frame):
            if not self.asked:
                self.ask(signum)
                log.warning("%s: stopping after this step with a checkpoint (a second signal stops at once)",
                            self.signal.name)
                if on_first:
                    on_first(self.signal)
            elif time.monotonic() - self.at >= ECHO_S:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, handler)

    def watch(self, out):
        """A daemon thread that asks once RUN/.stop appears (written by request_file); RUN a folder or a
        bucket's run folder."""
        path = storage.join(out, STOP_FILE)

        def poll():
            while not self.asked:
                try:
                    self.ask(int(storage.read(path).strip() or signal.SIGTERM))
                except (FileNotFoundError, storage.StorageError):  # none yet, or a bucket that does not answer now
                    time.sleep(WATCH_S)

        threading.Thread(target=poll, daemon=True, name="stop-watch").start()

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signal)  # the shell's code for "ended by this signal"


def request_file(out, signum):
    """Ask the run writing `out` (a folder or a bucket's run folder) to stop (the Ray Train driver does, for
    its workers)."""
    write_json(storage.join(out, STOP_FILE), int(signum))


def clear_request(out):
    path = storage.join(out, STOP_FILE)
    if not storage.is_url(path):
        Path(path).unlink(missing_ok=True)
    elif storage.exists(path):
        storage.delete(path)
