"""ImageNet-style tree -> WebDataset shards, index files, pca.json, rejects.jsonl, manifest.json.

One Ray task per output shard. A task writes its shard under a temporary name, decodes every
JPEG it wrote once more, renames the shard into place and then writes a record of it under
`.parts/`; the record is what a rerun trusts (after checking the shard's sha256), so a run
killed at any moment resumes and ends with the same bytes as an uninterrupted one.
"""
import errno
import fcntl
import hashlib
import json
import logging
import re
import shutil
import uuid
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.lock import FolderLock
from pipeline.images import MAX_PIXELS, Rejected, read_bytes, to_sample
from pipeline.manifest import MANIFEST, PARTS, PCA, REJECTS, SPLITS, write_json
from pipeline.pca import Moments
from pipeline.shards import ShardWriter, replace_atomically, sha256_file

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


class JobFailed(Exception):
    """The job ran but its result must not be used; the message says why and what to do."""


@dataclass
class Tree:
    classes: list  # sorted folder names of train/; a class's index is its position
    splits: dict  # {split: [(relative path, class index or -1 if unlabelled)]}, sorted by path
    hidden: list  # paths of entries whose names start with "." (.ipynb_checkpoints, .DS_Store): skipped


def scan(src, val_labels=None, val_fraction=0.0, seed=0) -> Tree:
    """The inputs of a tree. val_fraction: hold out this share of every class of train/ as val
    (seeded), for a tree without val/."""
    src = Path(src)
    train = src / "train"
    if not train.is_dir():
        raise JobFailed(f"{train} is not a folder: --src must hold train/<class>/<image files>")
    classes = sorted(d.name for d in _visible(train, []) if d.is_dir())  # hidden ones counted below
    hidden = []
    if not classes:
        raise JobFailed(f"{train} has no class folders: expected train/<class>/<image files>")
    index = {c: i for i, c in enumerate(classes)}
    splits = {"train": _class_folders(src, "train", index, hidden), "val": []}
    has_val = val_labels is not None or (src / "val").is_dir()
    if val_fraction and has_val:
        raise JobFailed(f"--val-fraction holds out part of train/ for a tree without val/, and {src} has one: "
                        f"drop --val-fraction, or the val/ folder")
    if val_labels is not None:
        splits["val"] = _flat_folder(src / "val", Path(val_labels), index, hidden)
    elif has_val:
        splits["val"] = _class_folders(src, "val", index, hidden)
    elif val_fraction:
        splits["train"], splits["val"] = _hold_out(splits["train"], val_fraction, seed)
    return Tree(classes, splits, hidden)


def _visible(folder, hidden):
    """The entries of `folder` whose names do not start with "."; the others are added to `hidden`."""
    entries = sorted(folder.iterdir())
    hidden += [str(p) for p in entries if p.name.startswith(".")]
    return [p for p in entries if not p.name.startswith(".")]


def _class_folders(src, split, index, hidden):
    items = []
    for folder in (p for p in _visible(src / split, hidden) if p.is_dir()):
        if folder.name not in index:
            raise JobFailed(f"{folder} names a class that train/ does not have")
        items += [(f"{split}/{folder.name}/{f.name}", index[folder.name])
                  for f in _visible(folder, hidden) if not f.is_dir()]
    return items


def _flat_folder(folder, labels_file, index, hidden):
    labels = {}
    for n, line in enumerate(labels_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, cls = line.strip().rpartition(" ")
        if cls not in index:
            raise JobFailed(f"{labels_file}:{n}: class {cls!r} is not a folder of train/")
        labels[name.strip()] = index[cls]
    names = {f.name for f in _visible(folder, hidden) if not f.is_dir()} if folder.is_dir() else set()
    return [(f"val/{name}", labels.get(name, -1)) for name in sorted(names | labels.keys())]


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


def sample_key(position: int, rel_path: str) -> str:
    """A tar-safe key: no '/', no '..', no '.' (WebDataset splits the extension at the first dot)."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(rel_path).stem)[:64]
    return f"{position:08d}_{stem}"


def plan(split, items, settings: Settings) -> list[dict]:
    """Shard specs for one split: a seeded permutation of all its items, cut into shards."""
    order = np.random.default_rng(settings.seed).permutation(len(items))
    specs = []
    for n, start in enumerate(range(0, len(items), settings.shard_size)):
        chosen = [(sample_key(int(i), items[i][0]), *items[i]) for i in order[start:start + settings.shard_size]]
        spec = {"name": f"{split}-{n:06d}", "split": split, "items": chosen}
        blob = json.dumps({"items": chosen, "settings": asdict(settings), "tool": __version__})
        spec["fingerprint"] = hashlib.sha256(blob.encode()).hexdigest()
        specs.append(spec)
    return specs


def write_shard(spec, src, out, settings: Settings) -> dict:
    """The Ray task: one shard, or the record of an identical one already written."""
    src, out, name = Path(src), Path(out), spec["name"]
    tar_path, idx_path, record_path = out / f"{name}.tar", out / f"{name}.idx", out / PARTS / f"{name}.json"
    record = _finished(record_path, tar_path, idx_path, spec["fingerprint"])
    if record is not None:
        return {**record, "resumed": True}

    import cv2
    cv2.setNumThreads(1)  # one task per core already
    # Names of this attempt's own: when Ray runs a task again while an attempt it believes dead
    # still writes, neither writes into the other's files; the tar, its index and its record are
    # put in place under a lock, so the last attempt to finish wins whole.
    attempt = uuid.uuid4().hex[:12]
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
    for key, rel, cls in spec["items"]:
        path = src / rel
        try:
            jpeg, decoded = _sample(path, cls, settings)
        except Rejected as e:
            rejects.append({"path": str(path), "reason": str(e)})
            continue
        if spec["split"] == "train":
            moments.add_image(decoded)
        writer.write(key, {"cls": str(cls).encode(), "jpg": jpeg})
    writer.close()
    record = {"name": spec["name"], "split": spec["split"], "fingerprint": spec["fingerprint"],
              "inputs": len(spec["items"]), "samples": len(writer), "rejects": rejects,
              "moments": asdict(moments)}
    if len(writer):
        record.update(bytes=tmp_tar.stat().st_size, sha256=sha256_file(tmp_tar),
                      index_sha256=sha256_file(tmp_idx))
    return record


def _sample(path, cls, settings):
    """-> (JPEG bytes, the JPEG decoded back) or Rejected."""
    if cls < 0:
        raise Rejected("unlabelled", "not listed in --val-labels")
    return to_sample(read_bytes(path), settings.size, settings.quality, settings.max_pixels)


def _finished(record_path, tar_path, idx_path, fingerprint):
    """The record of this exact shard if it and its files are intact, else None."""
    try:
        with open(record_path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint:
        return None
    if record["samples"] == 0:
        return record
    intact = (tar_path.exists() and idx_path.exists()
              and tar_path.stat().st_size == record["bytes"]
              and sha256_file(tar_path) == record["sha256"]
              and sha256_file(idx_path) == record["index_sha256"])
    return record if intact else None


def run(src, out, settings=Settings(), val_labels=None, max_reject_fraction=0.01, val_fraction=0.0,
        progress=None, lock=None, processes=None):
    """Preprocess `src` into `out` on the Ray cluster this process is connected to, or with
    `processes`, on that many processes of this machine without Ray (trainer.gpu_check does).

    progress(shards_done, shards_total, images_processed) is called as shards finish. lock: the
    FolderLock on `out` the caller holds already; without one, run() takes it.
    Returns the manifest; raises JobFailed if rejects exceed `max_reject_fraction`, if the disk
    fills up, or LockHeld if another run is writing `out`.
    """
    out = Path(out)
    tree = scan(src, val_labels, val_fraction, settings.seed)
    if tree.hidden:
        log.info("skipped %d hidden entries (names starting with '.'), e.g. %s", len(tree.hidden), tree.hidden[0])
    specs = [spec for split in SPLITS for spec in plan(split, tree.splits[split], settings)]
    with nullcontext(lock) if lock else FolderLock(out) as lock:
        records = _write_shards(specs, src, out, settings, progress, processes)
        try:
            return _finish(out, src, tree, records, settings, val_labels, val_fraction, max_reject_fraction, lock)
        except OSError as e:  # the driver's own writes: rejects, pca.json, the manifest
            raise JobFailed(_write_failed(out, e, specs, {r["name"]: r for r in records}, settings.size)) from None


def _write_shards(specs, src, out, settings, progress, processes) -> list[dict]:
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest is only ever there for a finished run
    _remove_stale(out, {spec["name"] for spec in specs})
    records, processed = {}, 0
    if progress:
        progress(0, len(specs), 0)
    try:
        for name, record in (_on_processes if processes else _on_ray)(specs, src, out, settings, processes):
            records[name] = record
            processed += 0 if record["resumed"] else record["inputs"]
            if progress:
                progress(len(records), len(specs), processed)
    except OSError as e:  # a task could not write (a full disk, a quota): the others were cancelled
        raise JobFailed(_write_failed(out, e, specs, records, settings.size)) from None
    records = [records[spec["name"]] for spec in specs]
    resumed = sum(r["resumed"] for r in records)
    if resumed:
        log.info("%d of %d shards were already complete and verified: kept", resumed, len(records))
    return records


def _on_ray(specs, src, out, settings, _):
    """Yield (shard name, record) as the Ray tasks finish; raise the OSError that stops one, the others
    cancelled (their references stay alive with the traceback: Ray says nothing of their errors)."""
    import ray

    task = ray.remote(num_cpus=1)(write_shard)
    pending = {task.remote(spec, str(src), str(out), settings): spec["name"] for spec in specs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            name = pending.pop(ref)  # finished: cancelling it too crashes Ray 2.60's driver (a failed check)
            try:
                yield name, ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if not isinstance(cause, OSError):
                    raise
                for other in pending:
                    ray.cancel(other)
                raise cause from None


def _on_processes(specs, src, out, settings, processes):
    """The same, from a pool of `processes` processes of this machine."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(write_shard, spec, str(src), str(out), settings): spec["name"] for spec in specs}
        try:
            for future in as_completed(pending):
                yield pending[future], future.result()
        finally:  # a failed write stops the rest
            for future in pending:
                future.cancel()


# A 256 x 256 JPEG at quality 90 of a photo: ~25 KB, 0.38 bytes a pixel (ImageNet-shaped test data)
JPEG_BYTES_PER_PIXEL = 0.38


def _write_failed(out, error, specs, records, size) -> str:
    """One line for a write into `out` that failed: a full disk says how much more it needs."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return (f"writing into {out} failed: {error.strerror or error} ({error.filename or out}); "
                f"fix that and run the same command again: finished shards are kept")
    finished = [r for r in records.values() if r["samples"]]
    per_sample = (sum(r["bytes"] for r in finished) / sum(r["samples"] for r in finished) if finished
                  else JPEG_BYTES_PER_PIXEL * size ** 2)
    remaining = sum(len(spec["items"]) for spec in specs if spec["name"] not in records)
    written = sum(r["bytes"] for r in finished)
    free = shutil.disk_usage(out).free
    return (f"no space left on the device of {out}: {len(records)} of {len(specs)} shards written "
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


def _finish(out, src, tree, records, settings, val_labels, val_fraction, max_reject_fraction, lock):
    rejects = [reject for r in records for reject in r["rejects"]]
    with open(out / f".{REJECTS}.tmp", "w") as f:
        f.writelines(json.dumps(reject) + "\n" for reject in rejects)
    replace_atomically(out / f".{REJECTS}.tmp", out / REJECTS)

    inputs = sum(r["inputs"] for r in records)
    by_reason = dict(sorted(Counter(r["reason"].split(":")[0] for r in rejects).items()))
    written = inputs - len(rejects)
    summary = ", ".join(f"{reason} {n}" for reason, n in by_reason.items()) or "none"
    log.info("written %d of %d inputs; rejected %d (%s)", written, inputs, len(rejects), summary)
    if inputs and len(rejects) > max_reject_fraction * inputs:
        raise JobFailed(f"{len(rejects)} of {inputs} inputs rejected ({len(rejects) / inputs:.1%}), "
                        f"more than --max-reject-fraction {max_reject_fraction:g}: see {out / REJECTS}; "
                        f"fix or remove those inputs, or raise --max-reject-fraction, and run again")
    for r in records:  # nothing but this run wrote here since (a stray writer would have changed a size)
        tar = out / f"{r['name']}.tar"
        if r["samples"] and (not tar.exists() or tar.stat().st_size != r["bytes"]):
            raise JobFailed(f"{tar} changed while this run wrote {out}: another writer was at work; "
                            f"run the same command again")
    if not lock.holds():
        raise JobFailed(f"another run took {out / '.lock'} over while this one wrote: run the same command again")

    moments = Moments()
    for r in records:
        if r["split"] == "train":
            moments.merge(Moments(**r["moments"]))
    write_json(out / PCA, moments.pca())
    manifest = {
        "tool": f"alexnet-pipeline {__version__}",
        "classes": tree.classes,
        "settings": {**asdict(settings), "src": str(src), "val_fraction": val_fraction,
                     "val_labels": None if val_labels is None else str(val_labels)},
        "splits": {split: _split_entry([r for r in records if r["split"] == split]) for split in SPLITS},
        "totals": {"inputs": inputs, "written": written, "rejected": len(rejects),
                   "rejected_by_reason": by_reason, "skipped_hidden": len(tree.hidden)},
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def _split_entry(records):
    shards = [{"name": f"{r['name']}.tar", "index": f"{r['name']}.idx", "samples": r["samples"],
               "bytes": r["bytes"], "sha256": r["sha256"], "index_sha256": r["index_sha256"]}
              for r in records if r["samples"]]
    return {"samples": sum(s["samples"] for s in shards), "shards": shards}
