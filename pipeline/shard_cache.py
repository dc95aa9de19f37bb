"""Shards in a bucket, read by DALI from copies on this node's disk.

    folder = local_copy("s3://imagenet/shards", ["train-000000.tar", "train-000000.idx", ...])

DALI's webdataset reader can read s3:// itself, but it fetches each sample's files with ranged GETs
of their own: 202 samples/s against 117,051 from a folder on the CPU here (docs/object-storage.md),
as NVIDIA/DALI#5551 reports for TFRecords. The nearest correct route: each shard and index is
fetched whole, one GET, into ~/.cache/alexnet-pipeline/shards/<hash of the URL>/ (THREADS at a
time), and DALI reads those. A copy is kept while the object's size and ETag stay those it was
fetched at (one paged listing gives them, every time a loader is built); an object replaced since
is fetched again.
Processes of one node that build their loaders at once may fetch the same object twice; each
writes under a name of its own and renames, so a copy is always whole. The copies cost disk the
size of the shards (~32 GB for ImageNet at 256 px): delete the folder to free it.
"""
import hashlib
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline import storage

log = logging.getLogger(__name__)

THREADS = 8  # concurrent GETs: each waits on the server, not the CPU
RECORD = ".objects.json"  # {name: {"size", "etag"}} of the copies


def cache_folder(url) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alexnet-pipeline" / "shards"
    key = hashlib.sha256(f"{storage.endpoint() or ''} {url}".encode()).hexdigest()[:16]
    return root / key


def local_copy(url, names) -> Path:
    """-> the folder holding a whole, current copy of each object `names` under `url`."""
    folder = cache_folder(url)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        record = {}
    start, there = time.perf_counter(), storage.objects(url)  # sizes and ETags: one paged listing
    missing = [name for name in names if name not in there]
    if missing:
        raise FileNotFoundError(f"{storage.join(url, missing[0])} does not exist")
    heads = {name: there[name] for name in names}
    stale = [name for name in names if not _current(folder / name, record.get(name), heads[name])]
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda name: _fetch(storage.join(url, name), folder / name), stale))
    record = {name: {"size": heads[name]["size"], "etag": heads[name]["etag"]} for name in names}
    tmp = folder / f"{RECORD}.{uuid.uuid4().hex[:12]}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / RECORD)
    if stale:
        fetched = sum(heads[name]["size"] for name in stale)
        log.info("copied %d objects of %s (%.1f MB) to %s in %.1fs", len(stale), url, fetched / 1e6, folder,
                 time.perf_counter() - start)
    return folder


def _current(path, kept, head) -> bool:
    """Whether the copy at `path` is of the object as it is now."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return False
    return kept == {"size": head["size"], "etag": head["etag"]} and size == head["size"]


def _fetch(url, path):
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            for chunk in storage.chunks(url):
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
