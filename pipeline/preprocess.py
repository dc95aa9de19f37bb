"""ImageNet, in any form it is downloaded in -> WebDataset shards, index files, pca.json, rejects.jsonl,
manifest.json.

One Ray task per output shard. A task writes its shard under a temporary name, decodes every
JPEG it wrote once more, renames the shard into place and then writes a record of it under
`.parts/`; the record is what a rerun trusts (after checking the shard's sha256), so a run
killed at any moment resumes and ends with the same bytes as an uninterrupted one.
"""
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import operator
import re
import resource
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import __version__, imagenet, storage
from pipeline.lock import lock_for
from pipeline.images import MAX_PIXELS, Rejected, read_bytes, to_sample
from pipeline.manifest import MANIFEST, PARTS, PCA, REJECTS, SPLITS, write_json
from pipeline.pca import Moments
from pipeline.source import source_of
from pipeline.shards import ShardWriter, replace_atomically, sha256_file
from pipeline.tasks import JobFailed, parallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    size: int = 256  # output side; paper section 2: shorter side to 256, then the central 256x256
    quality: int = 90  # JPEG quality of the written samples
    # 1,000 samples of ~25 KB: ~25 MB shards, 1,282 for ImageNet's train split, so a cluster of
    # hundreds of cores has work for all, a task lasts ~10 s, and ranks split shards evenly
    shard_size: int = 1000
    seed: int = 0  # the permutation that spreads every class over every shard
    max_pixels: int = MAX_PIXELS  # decompression-bomb cap, width x height of the stored image


@dataclass
class Tree:
    classes: list  # sorted folder names (wnids) of train; a class's index is its position
    # {split: [(name, class index or -1 if unlabelled, where)]}, sorted by name (train: by class, then file). name: the image's path in
    # the extracted tree (train/<class>/<file>, val/<file>), whatever the form, so that every form of the
    # same images gives the same shards; where: how to read it, a path in src, (archive, offset, size),
    # or None for an image that labels name but val lacks
    splits: dict
    hidden: list  # paths of entries whose names start with "." (.ipynb_checkpoints, .DS_Store): skipped
    names: list  # per class, its words ("tabby, tabby cat") where the source names them, else ""
    form: str  # "archives", "kaggle" or "tree" (pipeline.imagenet)


def scan(src, val_labels=None, val_fraction=0.0, seed=0, out=None, processes=None) -> Tree:
    """The inputs in `src`: ImageNet's archives, Kaggle's copy, or a tree of train/<class>/ and either
    val/<class>/ or a flat val/ with labels (pipeline.imagenet). The archives are indexed into
    OUT/.index/ on Ray (or `processes`). val_fraction: hold out this share of every class of train as
    val (seeded), for a source without val."""
    view, hidden = source_of(src), []
    if not view.is_dir():
        raise JobFailed(f"{src} is a file: --src is a folder, an image tree or the one that holds ImageNet's archives"
                        if view.exists() else
                        f"{src} does not exist: --src is an image tree or the folder of ImageNet's archives")
    if view.exists(imagenet.TRAIN_TAR):
        form, labels = "archives", val_labels or imagenet.devkit_beside(view)
        train, val = imagenet.read_archives(src, out, processes, hidden)
        val = {"": val} if view.exists(imagenet.VAL_TAR) else None
        where = view.name(imagenet.VAL_TAR)
    else:
        kaggle = view.is_dir(f"{imagenet.KAGGLE}/train")
        form, base = ("kaggle", imagenet.KAGGLE) if kaggle else ("tree", "")
        if not view.is_dir(f"{base}/train".lstrip("/")):
            raise JobFailed(f"{src} holds neither train/<class>/ folders, nor {imagenet.TRAIN_TAR}, nor Kaggle's "
                            f"{imagenet.KAGGLE}/train/: --src must be one of them (docs/imagenet.md)")
        train = _folders(view, base, "train", hidden)
        val = _folders(view, base, "val", hidden) if view.is_dir(f"{base}/val".lstrip("/")) else None
        labels = val_labels or (view.local(imagenet.KAGGLE_LABELS) if kaggle and view.exists(imagenet.KAGGLE_LABELS)
                                else None if kaggle else imagenet.devkit_beside(view))
        where = view.name(f"{base}/val".lstrip("/"))
    loose = train.pop("", [])  # files beside the class folders: no class
    classes = sorted(train)
    if not classes:
        raise JobFailed(f"{src} has no classes: expected train/<class>/<image files>")
    index = {c: i for i, c in enumerate(classes)}
    names = imagenet.read_names(view.local(imagenet.KAGGLE_NAMES)) if view.is_file(imagenet.KAGGLE_NAMES) else {}
    splits = {"train": loose + list(itertools.chain.from_iterable(train[c] for c in classes)), "val": []}
    if not splits["train"]:
        raise JobFailed(f"{src} has {len(classes)} classes and no images in them: expected train/<class>/<image files>")
    if val_fraction and (val is not None or val_labels):
        raise JobFailed(f"--val-fraction holds out part of train for a source without val, and {src} has one: "
                        f"drop --val-fraction, or the val images")
    foldered, flat = {c: v for c, v in (val or {}).items() if c and v}, (val or {}).get("", [])
    if foldered and flat:
        raise JobFailed(f"{where} holds both class folders and loose files: keep one form (docs/preprocessing.md)")
    if foldered:  # val/<class>/<file>
        if val_labels:
            raise JobFailed(f"{where} has class folders, which label its images: drop --val-labels")
        if foldered.keys() - index.keys():
            raise JobFailed(f"{where}/{min(foldered.keys() - index.keys())} names a class that train does not have")
        splits["val"] = [(name, index[c], at) for c in sorted(foldered) for name, _, at in foldered[c]]
    elif flat or val_labels:
        if not labels:
            raise JobFailed(f"{where} holds images without class folders, and nothing labels them: put the devkit "
                            f"({imagenet.DEVKIT}.tar.gz) in {src}, or give --val-labels: {imagenet.LABEL_FORMS}")
        splits["val"], words = _labelled(flat, labels, index)
        names = {**words, **names}
    elif val_fraction:
        splits["train"], splits["val"] = _hold_out(splits["train"], val_fraction, seed)
    return Tree(classes, splits, sorted(hidden), [names.get(c, "") for c in classes], form)


def _folders(view, base, split, hidden) -> dict:
    """{class: [(name, class index, where)]} of src/base/split/<class>/<entry>, with "" (index -1) for
    the files of split/ itself; name = split/<class>/<entry>, sorted; the index is the class's position
    among the sorted folders. No stat per file: a scandir of split/, a listdir of each class folder (where
    a folder, as an input, is rejected as unreadable: nothing is skipped quietly); in a bucket, the listing."""
    folder = f"{base}/{split}".lstrip("/")
    classes, files = view.listing(folder, hidden)
    found = {"": [(f"{split}/{f}", -1, f"{base}/{split}/{f}".lstrip("/")) for f in files]} if files else {}
    for label, c in enumerate(classes):
        prefix, entries = f"{split}/{c}/", view.entries(f"{folder}/{c}", hidden)
        found[c] = ([(prefix + e, label, f"{base}/{prefix}{e}") for e in entries] if base
                    else [(name := prefix + e, label, name) for e in entries])  # where is name: one string
    return found


def _labelled(flat, labels_path, index):
    """-> (val items, {wnid: words}) of a flat list [(name, -1, where)], by the labels in `labels_path` (any
    of pipeline.imagenet's forms); a file they label that val lacks is an item without a where."""
    files = [name.rsplit("/", 1)[-1] for name, _, _ in flat]
    labels, words = imagenet.read_labels(labels_path, files)
    unknown = next((file for file, wnid in labels.items() if wnid not in index), None)
    if unknown is not None:
        raise JobFailed(f"{labels_path}: class {labels[unknown]!r} (of {unknown}) is not a class of train; "
                        f"give the labels of these images")
    items = [(name, index[labels[file]] if file in labels else -1, at) for file, (name, _, at) in zip(files, flat)]
    missing = sorted(labels.keys() - set(files))
    return sorted(items + [(f"val/{file}", index[labels[file]], None) for file in missing]), words


def _hold_out(items, fraction, seed):
    """-> (train, val): round(fraction * n) of each class's n items to val, chosen by a seeded draw."""
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the shard permutation uses `seed`
    by_class = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    val = []
    for cls in sorted(by_class):
        group = by_class[cls]
        val += [group[i] for i in rng.permutation(len(group))[:round(fraction * len(group))]]
    chosen = set(val)
    return [item for item in items if item not in chosen], sorted(val)


UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(position: int, rel_path: str) -> str:
    """A tar-safe key: no '/', no '..', no '.' (WebDataset splits the extension at the first dot).
    String operations, not pathlib: plan() makes 1.33 M of them for ImageNet."""
    file = rel_path[rel_path.rfind("/") + 1:]
    dot = file.rfind(".")
    stem = file[:dot] if 0 < dot < len(file) - 1 else file  # Path.stem's rule
    return f"{position:08d}_{UNSAFE.sub('_', stem)[:64]}"


def shard_names(split, count, settings: Settings) -> list[str]:
    """The names of the shards of a split of `count` items."""
    return [f"{split}-{n:06d}" for n in range(-(-count // settings.shard_size))]


def plan(split, items, settings: Settings):
    """Shard specs for one split, a seeded permutation of all its items cut into shards, each made as it
    is taken (so that its task can start while the next is made). A spec holds its items and their
    positions in the split; its task makes their keys (sample_key). Its fingerprint is of what the
    shard's bytes follow from: the split's names and classes and missing images, its positions, the
    settings and the tool; not where the images are read from (every form of the same images gives the
    same shard, so a rerun from another form keeps them)."""
    order = np.random.default_rng(settings.seed).permutation(len(items)).tolist()
    name, cls, where = (operator.itemgetter(k) for k in range(3))  # C-level passes: ImageNet has 1.33 M items
    digest = hashlib.sha256("\n".join(map(name, items)).encode())
    digest.update(np.fromiter(map(cls, items), np.int64, len(items)).tobytes())
    if None in map(where, items):  # images the val labels name and val lacks: their rejects are the shard's too
        digest.update("\n".join(name(item) for item in items if where(item) is None).encode())
    common = json.dumps({"split": digest.hexdigest(), "settings": asdict(settings), "tool": __version__}).encode()
    for shard, start in zip(shard_names(split, len(items), settings), range(0, len(items), settings.shard_size)):
        positions = order[start:start + settings.shard_size]
        fingerprint = hashlib.sha256(common)
        fingerprint.update(np.asarray(positions, np.int64).tobytes())
        yield {"name": shard, "split": split, "items": [items[i] for i in positions], "positions": positions,
               "fingerprint": fingerprint.hexdigest()}


def write_shard(spec, src, out, settings: Settings) -> dict:
    """The Ray task: one shard, or the record of an identical one already written."""
    src, name = src if storage.is_url(src) else Path(src), spec["name"]
    tar_path, idx_path = storage.join(out, f"{name}.tar"), storage.join(out, f"{name}.idx")
    record_path = storage.join(out, PARTS, f"{name}.json")
    record = _finished(record_path, tar_path, idx_path, spec["fingerprint"])
    if record is not None:
        return {**record, "resumed": True}

    import cv2
    cv2.setNumThreads(1)  # one task per core already
    if storage.is_url(out):
        # each PUT makes its object whole or not at all: the tar, its index, then the record a rerun
        # trusts; attempts of one task write the same bytes, so the last PUT of each may win
        with tempfile.TemporaryDirectory(prefix=f"{name}.") as tmp:
            record = _write_samples(spec, src, settings, Path(tmp, "tar"), Path(tmp, "idx"))
            if record["samples"]:
                storage.upload(Path(tmp, "tar"), tar_path)
                storage.upload(Path(tmp, "idx"), idx_path)
            write_json(record_path, record)
        return {**record, "resumed": False}
    # Names of this attempt's own: when Ray runs a task again while an attempt it believes dead
    # still writes, neither writes into the other's files; the tar, its index and its record are
    # put in place under a lock, so the last attempt to finish wins whole.
    out, attempt = Path(out), uuid.uuid4().hex[:12]
    tmp_tar, tmp_idx = out / f".{name}.{attempt}.tar.tmp", out / f".{name}.{attempt}.idx.tmp"
    try:
        record = _write_samples(spec, src, settings, tmp_tar, tmp_idx)
        with open(out / PARTS / f".{name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            if record["samples"]:
                replace_atomically(tmp_tar, tar_path)
                replace_atomically(tmp_idx, idx_path)
            write_json(record_path, record)
    finally:  # a failed attempt (a full disk, say) leaves nothing behind
        tmp_tar.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    return {**record, "resumed": False}


def _write_samples(spec, src, settings, tmp_tar, tmp_idx) -> dict:
    """Write the shard's samples to tmp_tar and tmp_idx; -> its record (without writing it)."""
    moments, rejects = Moments(), []
    writer = ShardWriter(tmp_tar, tmp_idx)
    for position, (name, cls, where) in zip(spec["positions"], spec["items"]):
        try:
            jpeg, decoded = _sample(src, where, cls, settings)
        except Rejected as e:
            path = (storage.join(src, where) if isinstance(where, str) else f"{storage.join(src, where[0])}:{name}"
                    if where else name)
            rejects.append({"path": str(path), "reason": str(e)})
            continue
        if spec["split"] == "train":
            moments.add_image(decoded)
        writer.write(sample_key(position, name), {"cls": str(cls).encode(), "jpg": jpeg})
    writer.close()
    record = {"name": spec["name"], "split": spec["split"], "fingerprint": spec["fingerprint"], "node": _node(),
              "inputs": len(spec["items"]), "samples": len(writer), "rejects": rejects,
              "moments": asdict(moments)}
    if len(writer):
        record.update(bytes=tmp_tar.stat().st_size, sha256=sha256_file(tmp_tar),
                      index_sha256=sha256_file(tmp_idx))
    return record


def _node():
    """The Ray node this task runs on, None outside Ray: each shard's record says where it was written."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else None


def _sample(src, where, cls, settings):
    """-> (JPEG bytes, the JPEG decoded back) or Rejected."""
    if cls < 0:
        raise Rejected("unlabelled", "in no class folder, and no val labels name it")
    if where is None:
        raise Rejected("missing", "the val labels name it, and val has no such image")
    return to_sample(read_input(src, where), settings.size, settings.quality, settings.max_pixels)


def read_input(src, where) -> bytes:
    """An input's bytes, by its `where` (Tree): a file (or object) in src, or a byte range of an archive in
    it (a ranged GET in a bucket)."""
    path = storage.join(src, where if isinstance(where, str) else where[0])
    return read_bytes(path) if isinstance(where, str) else read_bytes(path, *where[1:])


def _finished(record_path, tar_path, idx_path, fingerprint):
    """The record of this exact shard if it and its files (or objects) are intact, else None."""
    try:
        record = json.loads(storage.read(record_path))
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    if record["samples"] == 0:
        return record
    intact = (storage.size(tar_path) == record["bytes"] and storage.size(idx_path) is not None
              and sha256_file(tar_path) == record["sha256"]
              and sha256_file(idx_path) == record["index_sha256"])
    return record if intact else None


def run(src, out, settings=Settings(), val_labels=None, max_reject_fraction=0.01, val_fraction=0.0,
        progress=None, lock=None, processes=None, stages=None):
    """Preprocess `src` into `out` on the Ray cluster this process is connected to, or with
    `processes`, on that many processes of this machine without Ray (trainer.gpu_check does).

    progress(shards_done, shards_total, images_processed) is called as shards finish. lock: the
    FolderLock on `out` the caller holds already; without one, run() takes it. stages: a dict that
    gets {stage: {"seconds", "peak_rss_mb"}} for STAGES (the driver's peak RSS at the stage's end).
    Returns the manifest; raises JobFailed if rejects exceed `max_reject_fraction`, if the disk
    fills up, or LockHeld if another run is writing `out`.
    """
    out, clock = out if storage.is_url(out) else Path(out), Clock()
    with nullcontext(lock) if lock else lock_for(out) as lock:
        if storage.is_url(out):  # the manifest is only ever there for a finished run
            storage.delete(storage.join(out, MANIFEST))
        else:
            (out / MANIFEST).unlink(missing_ok=True)
        tree = scan(src, val_labels, val_fraction, settings.seed, out, processes)
        if tree.hidden:
            log.info("skipped %d hidden entries (names starting with '.'), e.g. %s", len(tree.hidden), tree.hidden[0])
        clock.lap("scan")
        records = write_shards(tree.splits, src, out, settings, progress, processes)
        clock.lap("plan and tasks")
        try:
            manifest = _finish(out, src, tree, records, settings, val_labels, val_fraction, max_reject_fraction, lock)
        except OSError as e:  # the driver's own writes: rejects, pca.json, the manifest
            raise JobFailed(_write_failed(out, e, sum(r["inputs"] for r in records), {r["name"]: r for r in records},
                                          len(records), settings.size)) from None
    clock.lap("manifest")
    log.info("stages: %s", ", ".join(f"{stage} {lap['seconds']:.1f}s" for stage, lap in clock.laps.items()))
    if stages is not None:
        stages.update(clock.laps)
    return manifest


STAGES = ("scan", "plan and tasks", "manifest")  # run()'s, in order: the driver's serial work is the first and last


class Clock:
    """Wall seconds and this process's peak RSS at the end of each lap."""

    def __init__(self):
        self.laps, self.start = {}, time.perf_counter()

    def lap(self, name):
        now = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        self.laps[name] = {"seconds": now - self.start, "peak_rss_mb": peak}
        self.start = now


def write_shards(splits, src, out, settings, progress=None, processes=None) -> list[dict]:
    """Every shard of `splits` ({split: items}, Tree.splits), on Ray or `processes`, each task submitted as
    its spec is made: the tasks start before the plan ends. -> their records, train's then val's."""
    names = [name for split in SPLITS for name in shard_names(split, len(splits.get(split, [])), settings)]
    if storage.is_url(out):
        _remove_stale_objects(out, set(names))
    else:
        (out / PARTS).mkdir(parents=True, exist_ok=True)
        _remove_stale(out, set(names))
    records, processed = {}, 0
    if progress:
        progress(0, len(names), 0)
    specs = (spec for split in SPLITS for spec in plan(split, splits.get(split, []), settings))
    try:
        for name, record in parallel(write_shard, ((s["name"], (s, str(src), str(out), settings)) for s in specs),
                                     processes):
            records[name] = record
            processed += 0 if record["resumed"] else record["inputs"]
            if progress:
                progress(len(records), len(names), processed)
    except storage.StorageError as e:  # a bucket that stopped answering: the others were cancelled
        raise JobFailed(f"{e}; run the same command again: the finished shards are kept") from None
    except OSError as e:  # a task could not write (a full disk, a quota): the others were cancelled
        inputs = sum(len(splits.get(split, [])) for split in SPLITS)
        raise JobFailed(_write_failed(out, e, inputs, records, len(names), settings.size)) from None
    records = [records[name] for name in names]
    resumed = sum(r["resumed"] for r in records)
    if resumed:
        log.info("%d of %d shards were already complete and verified: kept", resumed, len(records))
    return records


# A 256 x 256 JPEG at quality 90 of a photo: ~25 KB, 0.38 bytes a pixel (ImageNet-shaped test data)
JPEG_BYTES_PER_PIXEL = 0.38


def _write_failed(out, error, inputs, records, shards, size) -> str:
    """One line for a write into `out` that failed: a full disk says how much more it needs. inputs,
    shards: how many in all; records: {name: record} of the finished shards."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return (f"writing into {out} failed: {error.strerror or error} ({error.filename or out}); "
                f"fix that and run the same command again: finished shards are kept")
    finished = [r for r in records.values() if r["samples"]]
    per_sample = (sum(r["bytes"] for r in finished) / sum(r["samples"] for r in finished) if finished
                  else JPEG_BYTES_PER_PIXEL * size ** 2)
    remaining = inputs - sum(r["inputs"] for r in records.values())
    written = sum(r["bytes"] for r in finished)
    free = shutil.disk_usage(out).free
    return (f"no space left on the device of {out}: {len(records)} of {shards} shards written "
            f"({_size(written)}), about {_size(remaining * per_sample)} more needed for the other {remaining:,} "
            f"samples, {_size(free)} free now. Free space (or choose another --out) and run the same command "
            f"again: the finished shards are kept")


def _size(n) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kB"


def _remove_stale(out, planned):
    """Shards, records and temporary files that this plan does not produce (an older run's)."""
    for path in [*out.glob(".*.tmp"), *(out / PARTS).glob(".*.tmp")]:
        path.unlink()
    for pattern in ("*.tar", "*.idx", f"{PARTS}/*.json"):
        for path in out.glob(pattern):
            if re.fullmatch(r"(train|val)-\d{6}", path.stem) and path.stem not in planned:
                log.info("removing %s: not part of this run's plan", path)
                path.unlink()


def _remove_stale_objects(out, planned):
    """_remove_stale in a bucket: the shards and records of an older run's plan."""
    for name in storage.listing(out):
        stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if re.fullmatch(r"(train|val)-\d{6}", stem) and stem not in planned and name.count("/") <= 1:
            log.info("removing %s: not part of this run's plan", storage.join(out, name))
            storage.delete(storage.join(out, name))


def _finish(out, src, tree, records, settings, val_labels, val_fraction, max_reject_fraction, lock):
    rejects = [reject for r in records for reject in r["rejects"]]
    lines = "".join(json.dumps(reject) + "\n" for reject in rejects)
    if storage.is_url(out):
        storage.write_bytes(storage.join(out, REJECTS), lines.encode())
    else:
        (out / f".{REJECTS}.tmp").write_text(lines)
        replace_atomically(out / f".{REJECTS}.tmp", out / REJECTS)

    inputs = sum(r["inputs"] for r in records)
    by_reason = dict(sorted(Counter(r["reason"].split(":")[0] for r in rejects).items()))
    written = inputs - len(rejects)
    summary = ", ".join(f"{reason} {n}" for reason, n in by_reason.items()) or "none"
    log.info("written %d of %d inputs; rejected %d (%s)", written, inputs, len(rejects), summary)
    if inputs and len(rejects) > max_reject_fraction * inputs:
        raise JobFailed(f"{len(rejects)} of {inputs} inputs rejected ({len(rejects) / inputs:.1%}), "
                        f"more than --max-reject-fraction {max_reject_fraction:g}: see {storage.join(out, REJECTS)}; "
                        f"fix or remove those inputs, or raise --max-reject-fraction, and run again")
    for r in records:  # nothing but this run wrote here since (a stray writer would have changed a size)
        tar = storage.join(out, f"{r['name']}.tar")
        if r["samples"] and storage.size(tar) != r["bytes"]:
            raise JobFailed(f"{tar} changed while this run wrote {out}: another writer was at work; "
                            f"run the same command again")
    if not lock.holds():
        raise JobFailed(f"another run took {lock.path} over while this one wrote: run the same command again")

    moments = Moments()
    for r in records:
        if r["split"] == "train":
            moments.merge(Moments(**r["moments"]))
    if not moments.count:
        raise JobFailed(f"every training image was rejected: see {storage.join(out, REJECTS)}")
    write_json(storage.join(out, PCA), moments.pca())
    manifest = {
        "tool": f"alexnet-pipeline {__version__}",
        "classes": tree.classes,
        "class_names": tree.names,
        "source": tree.form,
        "settings": {**asdict(settings), "src": str(src), "val_fraction": val_fraction,
                     "val_labels": None if val_labels is None else str(val_labels)},
        "splits": {split: _split_entry([r for r in records if r["split"] == split]) for split in SPLITS},
        "totals": {"inputs": inputs, "written": written, "rejected": len(rejects),
                   "rejected_by_reason": by_reason, "skipped_hidden": len(tree.hidden)},
    }
    write_json(storage.join(out, MANIFEST), manifest)  # last: what readers take for a finished run
    return manifest


def _split_entry(records):
    shards = [{"name": f"{r['name']}.tar", "index": f"{r['name']}.idx", "samples": r["samples"],
               "bytes": r["bytes"], "sha256": r["sha256"], "index_sha256": r["index_sha256"]}
              for r in records if r["samples"]]
    return {"samples": sum(s["samples"] for s in shards), "shards": shards}
