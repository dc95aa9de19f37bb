"""A run folder in a bucket: `python -m trainer.run --shards ... --out s3://bucket/runs/a`.

    RUN (s3://)   checkpoint.pt, checkpoint-previous.pt, config.json, metrics.jsonl; .lock while a run
                  holds it; ray-train/, Ray Train's own state, with --workers
    LOCAL         ~/.cache/alexnet-pipeline/runs/<bucket>-<prefix>-<hash>: the folder rank 0 works in, as
                  with any --out; TensorBoard's event files, kernels.png and curves.png stay there.
                  Rank r > 0 (--workers, torchrun) reads its checkpoint from a folder of its own beside it,
                  <...>.rank<r>, removed when the run ends: those ranks write nothing

What a resume needs lives in the bucket; what a person looks at stays where they look, named in the
log. TensorBoard appends to its event files every few steps, and S3 has no append: each would be a
PUT of the whole file, and `tensorboard --logdir s3://` needs TensorFlow's S3 file system besides.

Before the run, the bucket's files are copied into LOCAL (a new run starts from an empty LOCAL); after
each checkpoint and at the end, LOCAL's are PUT back: the previous checkpoint first (a server-side
copy of the bucket's latest), then the latest, config.json and metrics.jsonl, each whole or not at
all. A run killed mid-upload leaves the bucket's latest whole (the old one or the new), with the one
before it behind it, as a folder's checkpoints are. The lock is pipeline.lock's BucketLock, held by
the process that starts the run (trainer/launch.py).
"""
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from pipeline import storage
from trainer import checkpoint

log = logging.getLogger("trainer")

# what a resume reads, in the order they are PUT: the previous checkpoint before the latest
KEPT = (checkpoint.PREVIOUS, checkpoint.CHECKPOINT, "config.json", "metrics.jsonl")


class BucketRun:
    def __init__(self, url, rank=0):
        self.url = url.rstrip("/")
        bucket, prefix = storage.split(self.url)
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alexnet-pipeline" / "runs"
        # the URL's hash keeps two runs of the same name in other buckets or endpoints apart
        key = hashlib.sha256(f"{storage.endpoint() or ''} {self.url}".encode()).hexdigest()[:12]
        self.local = cache / f"{bucket}-{prefix.replace('/', '-')}-{key}{f'.rank{rank}' if rank else ''}"
        self.pushed = {}  # {name: (size, mtime_ns)} of what the bucket holds of LOCAL

    def pull(self, names=KEPT):
        """LOCAL as the bucket's run folder: its files of `names` copied in, a new run's LOCAL emptied."""
        there = {name for name in storage.listing(self.url) if name in names}
        if not there and self.local.exists():
            shutil.rmtree(self.local)  # another run's events and pictures under the same name
        self.local.mkdir(parents=True, exist_ok=True)
        for name in names:
            if name in there:
                storage.download(storage.join(self.url, name), self.local / name)
            else:
                (self.local / name).unlink(missing_ok=True)
        self.pushed = self._stats()

    def push(self):
        """LOCAL's changed files PUT into the bucket, the previous checkpoint before the latest."""
        stats = self._stats()
        for name in KEPT:
            if name not in stats or stats[name] == self.pushed.get(name):
                continue
            if name == checkpoint.PREVIOUS and stats[name] == self.pushed.get(checkpoint.CHECKPOINT):
                # the latest the bucket holds became the previous one: copied there, not sent again
                storage.copy(storage.join(self.url, checkpoint.CHECKPOINT), storage.join(self.url, name))
            elif name == "config.json":  # the run folder a reader of config.json must look in is the bucket's
                saved = json.loads((self.local / name).read_text())
                storage.write_bytes(storage.join(self.url, name),
                                    (json.dumps({**saved, "out": self.url}, indent=1) + "\n").encode())
            else:
                storage.upload(self.local / name, storage.join(self.url, name))
            self.pushed[name] = stats[name]

    def push_or_warn(self, _trainer=None):
        """push(), after a checkpoint: a bucket that does not answer now is told and tried again at the
        next checkpoint and at the end (the local checkpoint is whole meanwhile)."""
        try:
            self.push()
        except storage.StorageError as e:
            log.warning("the checkpoint stays in %s for now: %s", self.local, e)

    def _stats(self) -> dict:
        return {name: (st.st_size, st.st_mtime_ns) for name in KEPT
                if (st := _stat(self.local / name)) is not None}


def _stat(path):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
