"""The files a shard directory holds, the contract between preprocessing and training.

    <split>-NNNNNN.tar   WebDataset shard: <key>.jpg (size x size RGB JPEG), <key>.cls (class index)
    <split>-NNNNNN.idx   its DALI index (the format wds2idx writes)
    pca.json             mean, std, cov [3][3], eigenvalues [3] (descending), eigenvectors [3][3]
                         (eigenvector i is column i), pixels: over every training pixel as the
                         shards hold it, in [0, 1] units
    rejects.jsonl        one {"path", "reason"} per input that was not written
    manifest.json        written last: classes (sorted folder names, wnids: a class's index is its
                         position), class_names (per class its words, "tabby, tabby cat", where the
                         source names them, else ""), source (archives, kaggle or tree), per split the shards (name, index, samples, bytes,
                         sha256, index_sha256), totals (inputs, written, rejected, rejected_by_reason,
                         skipped_hidden), settings, tool
    .parts/              one record per finished shard, so that a rerun resumes
    .lock                held by the run writing the folder (pipeline.lock)
"""
import json
import os
import uuid
from pathlib import Path

from pipeline import storage

MANIFEST, PCA, REJECTS, PARTS = "manifest.json", "pca.json", "rejects.jsonl", ".parts"
SPLITS = ("train", "val")


class ShardDirError(Exception):
    """A shard directory that cannot be used; the message says what to run."""


def json_bytes(obj) -> bytes:
    """manifest.json, pca.json, .verified.json as written: sorted keys, one-space indent, a final newline."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def write_json(path, obj):
    """Write JSON under a temporary name, fsync, rename: readers see the old file or the new one (an
    object: one PUT, whole or not at all)."""
    if storage.is_url(path):
        storage.write_bytes(path, json_bytes(obj))
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # a name no other writer uses
    with open(tmp, "wb") as f:
        f.write(json_bytes(obj))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def class_labels(classes, names=None) -> list[str]:
    """How each class is printed: its wnid, then its words where the source named them
    ("n02123045 tabby, tabby cat"); a plain tree's classes keep their folder names alone."""
    return [f"{c} {n}" if n else c for c, n in zip(classes, names or [""] * len(classes))]


def read_manifest(shards) -> dict:
    if storage.is_url(shards):
        if not storage.exists(storage.join(shards, MANIFEST)):
            storage.listing_level(shards)  # a missing bucket is said as such (a HEAD's 404 does not tell)
            raise ShardDirError(f"{storage.join(shards, MANIFEST)} does not exist: make shards with "
                                f"`python jobs/preprocess.py --src TREE --out {shards}`, or let it finish")
        return _read_json(shards, MANIFEST)
    path = Path(shards) / MANIFEST
    if not Path(shards).is_dir():
        raise ShardDirError(f"{shards} does not exist: make shards with "
                            f"`python jobs/preprocess.py --src TREE --out {shards}`")
    if not path.exists():
        raise ShardDirError(f"{path} is missing: the preprocessing has not finished; run "
                            f"`python jobs/preprocess.py --src TREE --out {shards}` again")
    return _read_json(shards, MANIFEST)


def read_pca(shards) -> dict:
    return _read_json(shards, PCA)


def _read_json(shards, name) -> dict:
    """A JSON file of the shard folder; one missing or damaged is a ShardDirError that says what to run."""
    path = storage.join(shards, name)
    try:
        return json.loads(storage.read(path).decode())
    except storage.StorageError:
        raise
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise ShardDirError(f"{path} cannot be read ({e}): run `python jobs/preprocess.py --src TREE --out {shards}` "
                            f"again, which writes it anew") from None
