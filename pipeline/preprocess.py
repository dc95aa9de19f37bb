"""ImageNet-style tree -> WebDataset shards, index files, pca.json, rejects.jsonl, manifest.json.

One Ray task per output shard. A task writes its shard under a temporary name, decodes every
JPEG it wrote once more, renames the shard into place and then writes a record of it under
`.parts/`; the record is what a rerun trusts (after checking the shard's sha256), so a run
killed at any moment resumes and ends with the same bytes as an uninterrupted one.
"""
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.images import MAX_PIXELS, Rejected, decode_jpeg, decode_rgb, encode_jpeg, read_bytes, \
    resize_center_crop
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


def scan(src, val_labels=None):
    """-> (classes, {split: [(relative path, class index or -1 if unlabelled)]}), sorted by path."""
    src = Path(src)
    train = src / "train"
    if not train.is_dir():
        raise JobFailed(f"{train} is not a folder: --src must hold train/<class>/<image files>")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    if not classes:
        raise JobFailed(f"{train} has no class folders: expected train/<class>/<image files>")
    index = {c: i for i, c in enumerate(classes)}
    splits = {"train": _class_folders(src, "train", index), "val": []}
    if val_labels is not None:
        splits["val"] = _flat_folder(src / "val", Path(val_labels), index)
    elif (src / "val").is_dir():
        splits["val"] = _class_folders(src, "val", index)
    return classes, splits


def _class_folders(src, split, index):
    items = []
    for folder in sorted(p for p in (src / split).iterdir() if p.is_dir()):
        if folder.name not in index:
            raise JobFailed(f"{folder} names a class that train/ does not have")
        items += [(f"{split}/{folder.name}/{f.name}", index[folder.name])
                  for f in sorted(folder.iterdir()) if not f.is_dir()]
    return items


def _flat_folder(folder, labels_file, index):
    labels = {}
    for n, line in enumerate(labels_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, cls = line.strip().rpartition(" ")
        if cls not in index:
            raise JobFailed(f"{labels_file}:{n}: class {cls!r} is not a folder of train/")
        labels[name.strip()] = index[cls]
    names = {f.name for f in folder.iterdir() if not f.is_dir()} if folder.is_dir() else set()
    return [(f"val/{name}", labels.get(name, -1)) for name in sorted(names | labels.keys())]


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
    moments, rejects = Moments(), []
    tmp_tar, tmp_idx = out / f".{name}.tar.tmp", out / f".{name}.idx.tmp"
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

    record = {"name": name, "split": spec["split"], "fingerprint": spec["fingerprint"],
              "inputs": len(spec["items"]), "samples": len(writer), "rejects": rejects,
              "moments": asdict(moments)}
    if len(writer):
        record.update(bytes=tmp_tar.stat().st_size, sha256=sha256_file(tmp_tar),
                      index_sha256=sha256_file(tmp_idx))
        replace_atomically(tmp_tar, tar_path)
        replace_atomically(tmp_idx, idx_path)
    else:
        tmp_tar.unlink()
        tmp_idx.unlink()
    write_json(record_path, record)
    return {**record, "resumed": False}


def _sample(path, cls, settings):
    """-> (JPEG bytes, the JPEG decoded back) or Rejected. The decode-back is the check that no
    JPEG that fails to decode reaches a shard (one such stops a DALI pipeline for good)."""
    if cls < 0:
        raise Rejected("unlabelled", "not listed in --val-labels")
    data = read_bytes(path)
    try:
        rgb = decode_rgb(data, settings.size, settings.max_pixels)
        jpeg = encode_jpeg(resize_center_crop(rgb, settings.size), settings.quality)
    except Rejected:
        raise
    except Exception as e:  # whatever a damaged input makes a decoder do, it stops only this input
        raise Rejected("corrupt", f"{type(e).__name__}: {e}") from None
    decoded = decode_jpeg(jpeg, rgb=False)
    if decoded is None or decoded.shape != (settings.size, settings.size, 3):
        raise Rejected("reencode", "the written JPEG did not decode back")
    return jpeg, decoded[..., ::-1]  # BGR -> RGB as a view: the moments copy it anyway


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


def run(src, out, settings=Settings(), val_labels=None, max_reject_fraction=0.01, progress=None):
    """Preprocess `src` into `out` on the Ray cluster this process is connected to.

    progress(shards_done, shards_total, images_processed) is called as shards finish.
    Returns the manifest; raises JobFailed if rejects exceed `max_reject_fraction`.
    """
    import ray

    out = Path(out)
    classes, splits = scan(src, val_labels)
    specs = [spec for split in SPLITS for spec in plan(split, splits[split], settings)]
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest is only ever there for a finished run
    _remove_stale(out, {spec["name"] for spec in specs})

    task = ray.remote(num_cpus=1)(write_shard)
    pending = {task.remote(spec, str(src), str(out), settings): spec["name"] for spec in specs}
    records, processed = {}, 0
    if progress:
        progress(0, len(specs), 0)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            record = ray.get(ref)
            records[pending.pop(ref)] = record
            processed += 0 if record["resumed"] else record["inputs"]
        if progress:
            progress(len(records), len(specs), processed)
    records = [records[spec["name"]] for spec in specs]
    resumed = sum(r["resumed"] for r in records)
    if resumed:
        log.info("%d of %d shards were already complete and verified: kept", resumed, len(records))
    return _finish(out, src, classes, records, settings, val_labels, max_reject_fraction)


def _remove_stale(out, planned):
    """Shards, records and temporary files that this plan does not produce (an older run's)."""
    for path in [*out.glob(".*.tmp"), *(out / PARTS).glob(".*.tmp")]:
        path.unlink()
    for pattern in ("*.tar", "*.idx", f"{PARTS}/*.json"):
        for path in out.glob(pattern):
            if re.fullmatch(r"(train|val)-\d{6}", path.stem) and path.stem not in planned:
                log.info("removing %s: not part of this run's plan", path)
                path.unlink()


def _finish(out, src, classes, records, settings, val_labels, max_reject_fraction):
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

    moments = Moments()
    for r in records:
        if r["split"] == "train":
            moments.merge(Moments(**r["moments"]))
    write_json(out / PCA, moments.pca())
    manifest = {
        "tool": f"alexnet-pipeline {__version__}",
        "classes": classes,
        "settings": {**asdict(settings), "src": str(src),
                     "val_labels": None if val_labels is None else str(val_labels)},
        "splits": {split: _split_entry([r for r in records if r["split"] == split]) for split in SPLITS},
        "totals": {"inputs": inputs, "written": written, "rejected": len(rejects),
                   "rejected_by_reason": by_reason},
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def _split_entry(records):
    shards = [{"name": f"{r['name']}.tar", "index": f"{r['name']}.idx", "samples": r["samples"],
               "bytes": r["bytes"], "sha256": r["sha256"]} for r in records if r["samples"]]
    return {"samples": sum(s["samples"] for s in shards), "shards": shards}
