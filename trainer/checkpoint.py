"""A run folder's checkpoints: written whole or not at all, the last two kept, a damaged one named.

    RUN/checkpoint.pt           the latest
    RUN/checkpoint-previous.pt  the one before it: a damaged latest always has a good one behind it

A checkpoint is written under a temporary name, fsynced, then renamed over the latest (which
becomes the previous one), so a reader sees a whole checkpoint or the one before. The oldest is
dropped before the new one is written: a run folder never holds more than two checkpoints and the
one being written, and needs room for two (`check_room`, before the first step). A write that
fails (a full disk, a quota) removes its temporary file, keeps the latest, and raises
CheckpointError with the bytes needed and free.

`Writer` takes the write off the training step's path: it copies the state to host memory (the
step waits for that copy, a device-to-host transfer of the weights and optimiser state, 455 MB for
AlexNet with momentum), then writes it in a thread of its own while the steps go on, one write at a
time. A crash during that write leaves the temporary file, never a half checkpoint: the last good
one stays the latest.

What a checkpoint holds (written by trainer/loop.py): model, optimizer, scheduler, epoch, step,
epoch_step, world_size, per rank its loader state, RNG states and running loss sum, and what
trainer.evaluate and trainer.predict need: classes, class_names, normalisation, preprocessing.
"""
import io
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from pipeline import storage

log = logging.getLogger("trainer")

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint-previous.pt"
TEMPORARY = ".checkpoint.pt.tmp"
REQUIRED = ("model", "epoch", "step", "classes")  # what every reader of a checkpoint uses


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message is one line and says what to do."""


class Damaged(CheckpointError):
    def __init__(self, path, why):
        super().__init__(damaged(path, why))
        self.path, self.why = path, why


def checkpoints(out) -> list[Path]:
    """The run folder's checkpoints, latest first."""
    return [path for path in (Path(out) / CHECKPOINT, Path(out) / PREVIOUS) if path.exists()]


def save(out, state: dict) -> Path:
    """Write `state` as the run folder's latest checkpoint; the latest so far becomes the previous one."""
    out = Path(out)
    latest, previous, tmp = out / CHECKPOINT, out / PREVIOUS, out / TEMPORARY
    if latest.exists():
        previous.unlink(missing_ok=True)  # at most two checkpoints on disk, and the one being written
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the latest
    except (OSError, RuntimeError) as e:  # torch's zip writer raises RuntimeError for a short write
        tmp.unlink(missing_ok=True)
        kept = f"the last good checkpoint, {latest}, is kept" if latest.exists() else "no checkpoint is kept"
        raise CheckpointError(f"could not write a checkpoint in {out}: it needs {nbytes(state):,} bytes and "
                              f"{shutil.disk_usage(out).free:,} are free ({reason(e)}); {kept}. Free some space "
                              f"or give --out a larger disk, then continue with --resume") from None
    if latest.exists():
        os.replace(latest, previous)
    os.replace(tmp, latest)
    return latest


class Writer:
    """save() in a thread, on a copy of the state in host memory; one write at a time."""

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, out, state: dict):
        """Wait for the write before (raising its CheckpointError), copy `state` to the host, start writing it."""
        self.wait()
        state = to_host(state)  # the step may change the weights in place from here on

        def write():
            try:
                save(out, state)
            except CheckpointError as e:  # raised by the next save() or wait()
                self.error = e

        self.thread = threading.Thread(target=write, name="checkpoint")  # not a daemon: the process ends after it
        self.thread.start()

    def wait(self):
        """Until the last write is on disk; its CheckpointError if it failed."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if error is not None:
            raise error


def to_host(state):
    """A copy of `state` whose tensors are in host memory, detached: dicts, lists and tuples are walked."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)  # from a GPU: waits for the device, then copies
    if isinstance(state, dict):
        return {key: to_host(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_host(value) for value in state)
    return state


def check_room(out, state_bytes: int):
    """Refuse a run folder without room for the two checkpoints it keeps (those already there are replaced)."""
    out = Path(out)
    have = shutil.disk_usage(out).free + sum(path.stat().st_size for path in checkpoints(out))
    if have < 2 * state_bytes:
        raise CheckpointError(f"{out} has room for {have:,} bytes of checkpoints, and the two this run keeps need "
                              f"about {2 * state_bytes:,}: free some space or give --out a larger disk")


def read(path) -> dict:
    """A checkpoint's dict on the CPU; CheckpointError, naming the file and what to do, if it is damaged.
    `path` may be an s3:// URL (trainer.evaluate and trainer.predict read a bucket's run so)."""
    path = path if storage.is_url(path) else Path(path)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path,
                           map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: name a run's {CHECKPOINT}") from None
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # a truncated zip, a damaged pickle, not a checkpoint at all
        raise Damaged(path, reason(e)) from None
    if not isinstance(state, dict) or not set(REQUIRED) <= set(state):
        missing = ", ".join(k for k in REQUIRED if not isinstance(state, dict) or k not in state)
        raise Damaged(path, f"it lacks {missing}")
    return state


def read_latest(out) -> dict:
    """The run folder's latest good checkpoint, for --resume; afterwards it is RUN/checkpoint.pt. A damaged
    latest is moved aside (to checkpoint.pt.damaged) and the previous one taken, with a warning;
    CheckpointError if none is good."""
    out = Path(out)
    latest, previous = out / CHECKPOINT, out / PREVIOUS
    try:
        return read(latest)
    except CheckpointError as e:
        if not previous.exists():
            raise
        # missing: a crash between save's two renames left only the previous one
        why = e.why if isinstance(e, Damaged) else "missing"
    try:
        state = read(previous)
    except Damaged as e:
        raise CheckpointError(f"{latest} is damaged ({why}), and so is the one before it, {previous} ({e.why}): "
                              f"nothing to resume from; train again in a new --out") from None
    if latest.exists():
        os.replace(latest, out / f"{CHECKPOINT}.damaged")  # kept for a look; the next save must not rotate it in
    os.replace(previous, latest)
    log.warning("%s is %s: resuming from the checkpoint before it (epoch %d, step %d of it), now %s%s", latest,
                why if why == "missing" else f"damaged ({why})", state["epoch"] + 1, state.get("epoch_step", 0),
                latest, f"; the damaged one is kept as {latest}.damaged" if why != "missing" else "")
    return state


def damaged(path, why) -> str:
    """What to say of a damaged checkpoint: which, why, and the good one behind it if there is one."""
    if storage.is_url(path):
        return f"{path} is damaged ({why}): `python -m trainer.run --resume` with --out its run folder takes the one before it"
    path = Path(path)
    previous = path.with_name(PREVIOUS)
    if path.name == CHECKPOINT and previous.exists():
        try:
            state = torch.load(previous, map_location="cpu", weights_only=True, mmap=True)
            instead = (f"the one before it, {previous} (epoch {state['epoch'] + 1}, step {state.get('epoch_step', 0)} "
                       f"of it), is good: use it instead (`python -m trainer.run --resume` takes it by itself)")
        except Exception:  # noqa: BLE001 - the older one is damaged too
            instead = f"so is the one before it, {previous}: train again"
    else:
        instead = "use an older checkpoint of the run if there is one, or train again"
    return f"{path} is damaged ({why}): {instead}"


def reason(error: BaseException) -> str:
    """The first line of an error, short. torch.load's for a pickle it refuses begins with advice to load
    it unsafely (weights_only=False), which is not for a damaged file: its unpickler's words instead."""
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:
        text = "not a checkpoint's pickle: " + text.split("WeightsUnpickler error:", 1)[1].strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def nbytes(state) -> int:
    """Bytes torch.save writes for `state`, counted without writing them."""
    class Count:
        size = 0

        def write(self, data):
            self.size += len(data)
            return len(data)

        def flush(self):
            pass

    sink = Count()
    torch.save(state, sink)
    return sink.size
