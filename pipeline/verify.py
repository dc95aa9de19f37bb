"""Check a shard directory against its manifest.

    python -m pipeline.verify shards/            # counts, sizes, sha256, every JPEG decodes
    python -m pipeline.verify shards/ --no-deep  # counts and sizes only
    python -m pipeline.verify s3://bucket/shards # the same, on shards in object storage

Exits non-zero with a message naming the first problem.

`verify_checksums` is the check the trainer makes before its first step: the sha256 of every shard
and index file against the manifest, hashed on all cores, and remembered in `.verified.json` (in the
shard folder, or under ~/.cache where that is read-only) by file name, size, inode, mtime and ctime,
so that a second run on the same shards starts at once and a file changed since is hashed again
(writing a file changes its ctime, whatever its mtime is set back to). A file changed in the last
SETTLED_S seconds is hashed but not remembered. Shards in a bucket are streamed once each and
remembered under ~/.cache by size, ETag and last-modified (which every write of an object changes).
"""
import argparse
import hashlib
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline import storage
from pipeline.cli import HelpFormatter
from pipeline.images import decode_jpeg, jpeg_frame
from pipeline.manifest import PCA, SPLITS, ShardDirError, read_manifest, read_pca, write_json
from pipeline.shards import INDEX_VERSION, iter_samples, sha256_file
from pipeline.storage import join

VERIFIED = ".verified.json"
SETTLED_S = 2  # seconds since its last change before a file's check is remembered


def verify(shards, deep=True) -> dict:
    """-> the manifest, or raises ShardDirError naming the first problem found. `shards`: a folder or
    an s3:// URL (its objects' sizes from one listing)."""
    manifest = read_manifest(shards)
    redo = f"run the preprocessing into {shards} again (it redoes what is damaged)"
    sizes = _sizes(shards)
    if PCA not in sizes:
        raise ShardDirError(f"{join(shards, PCA)} is missing: {redo}")
    read_pca(shards)  # and is JSON
    size, classes = manifest["settings"]["size"], len(manifest["classes"])
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            for name in (shard["name"], shard["index"]):
                if name not in sizes:
                    raise ShardDirError(f"{join(shards, name)} is missing: {redo}")
            tar, idx = join(shards, shard["name"]), join(shards, shard["index"])
            if sizes[shard["name"]] != shard["bytes"]:
                raise ShardDirError(f"{tar} has {sizes[shard['name']]} bytes, the manifest says "
                                    f"{shard['bytes']}: {redo}")
            if _index_header(idx) != [INDEX_VERSION, str(shard["samples"])]:
                raise ShardDirError(f"{idx} does not index {shard['samples']} samples: {redo}")
            if deep:
                _verify_contents(tar, shard, size, classes, redo)
    return manifest


def _sizes(shards) -> dict:
    """{file name: bytes} of the folder's files, or of the objects directly under the URL."""
    if storage.is_url(shards):
        return {name: size for name, size in storage.listing(shards).items() if "/" not in name}
    return {p.name: p.stat().st_size for p in Path(shards).iterdir() if p.is_file()}


def _index_header(idx) -> list[str]:
    """The index file's first line, split: [version, samples]."""
    if storage.is_url(idx):
        return storage.read_range(idx, 0, 64).decode(errors="replace").split("\n")[0].split()
    with open(idx) as f:
        return f.readline().split()


def verify_checksums(shards, manifest, threads=None) -> dict:
    """Raise ShardDirError naming every shard or index file whose sha256 is not the manifest's;
    -> {"hashed": files hashed now, "remembered": files whose earlier check still holds}."""
    expected = {shard[name_key]: shard[sha_key] for split in SPLITS for shard in manifest["splits"][split]["shards"]
                for name_key, sha_key in (("name", "sha256"), ("index", "index_sha256")) if sha_key in shard}
    memory_path = _memory_path(shards)
    memory = remembered = _read_memory(memory_path)
    stats = _identities(shards, expected)
    todo = [name for name in expected if memory.get(name) != {**stats[name], "sha256": expected[name]}]
    with ThreadPoolExecutor(threads or len(os.sched_getaffinity(0))) as pool:  # hashlib releases the GIL
        digests = dict(zip(todo, pool.map(sha256_file, [join(shards, name) for name in todo])))
    bad = sorted(name for name, digest in digests.items() if digest != expected[name])
    memory = {name: entry for name, entry in memory.items() if name in expected and name not in bad}
    # git's "racy" rule: on a file system whose clock is coarse (1 s on some), a file changed within
    # the same tick as its check would keep its ctime; only a file older than that is remembered. An
    # object's ETag changes with every write: it is remembered at once.
    settled = time.time_ns() - SETTLED_S * 1e9
    memory.update({name: {**stats[name], "sha256": digest} for name, digest in digests.items()
                   if name not in bad and stats[name].get("ctime_ns", 0) < settled})
    if memory != remembered:  # a second run on unchanged shards writes nothing
        _write_memory(memory_path, memory)
    if bad:
        raise ShardDirError(
            f"{len(bad)} file(s) in {shards} do not match their sha256 in the manifest (damaged or changed "
            f"since preprocessing): {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}. Run the preprocessing "
            f"into {shards} again (it redoes exactly the damaged shards), or `python -m pipeline.verify {shards}` "
            f"to see what is wrong; --no-verify-shards skips this check")
    return {"hashed": len(todo), "remembered": len(expected) - len(todo)}


def _identities(shards, names) -> dict:
    """{name: what changes when the file or object does}: a file's size, inode, mtime and ctime; an
    object's size, ETag and last-modified (one paged listing gives them all)."""
    if not storage.is_url(shards):
        return {name: _identity(Path(shards) / name) for name in names}
    there = storage.objects(shards)
    missing = sorted(set(names) - there.keys())
    if missing:
        raise ShardDirError(f"{join(shards, missing[0])} is missing: run the preprocessing into {shards} again")
    return {name: there[name] for name in names}


def _identity(path) -> dict:
    """What changes when a file does; a file that is missing raises ShardDirError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ShardDirError(f"{path} is missing: run the preprocessing into {path.parent} again") from None
    return {"size": st.st_size, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _memory_path(shards) -> Path:
    """.verified.json in the shard folder; under ~/.cache for a folder this process cannot write, and
    for a bucket (a reader of shards need not be allowed to write there)."""
    if not storage.is_url(shards):
        shards = Path(shards)
        if os.access(shards, os.W_OK):
            return shards / VERIFIED
        shards = shards.resolve()
    key = hashlib.sha256(str(shards).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alexnet-pipeline" / "verified"
    return cache / f"{key}.json"


def _read_memory(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_memory(path, memory):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, memory)
    except OSError:  # a cache that cannot be written costs the next run time, nothing else
        pass


def _verify_contents(tar, shard, size, classes, redo):
    if sha256_file(tar) != shard["sha256"]:
        raise ShardDirError(f"{tar} does not match its sha256 in the manifest: {redo}")
    count = 0
    for key, files in iter_samples(io.BytesIO(storage.read_bytes(tar)) if storage.is_url(tar) else tar):
        count += 1
        if set(files) != {"cls", "jpg"}:
            raise ShardDirError(f"{tar}: sample {key} has {sorted(files)}, expected cls and jpg")
        frame = jpeg_frame(files["jpg"])
        if frame != "baseline":
            raise ShardDirError(f"{tar}: {key}.jpg is a {frame or 'headerless'} JPEG, not baseline (the GPU's "
                                f"hardware decoder takes baseline only): {redo}")
        image = decode_jpeg(files["jpg"])
        if image is None or image.shape != (size, size, 3):
            got = "nothing" if image is None else "x".join(map(str, image.shape))
            raise ShardDirError(f"{tar}: {key}.jpg decodes to {got}, expected {size}x{size}x3")
        if not files["cls"].isdigit() or int(files["cls"]) >= classes:
            raise ShardDirError(f"{tar}: {key}.cls is {files['cls']!r}, not a class index")
    if count != shard["samples"]:
        raise ShardDirError(f"{tar} holds {count} samples, the manifest says {shard['samples']}: {redo}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("shards", help="a folder or s3:// URL written by jobs/preprocess.py")
    p.add_argument("--deep", action=argparse.BooleanOptionalAction, default=True,
                   help="also check sha256 and decode every JPEG")
    args = p.parse_args(argv)
    try:
        manifest = verify(args.shards, deep=args.deep)
    except (ShardDirError, storage.StorageError) as e:
        print(f"verify: {e}", file=sys.stderr)
        return 1
    counts = {split: manifest["splits"][split]["samples"] for split in SPLITS}
    print(f"verify: ok: {counts['train']} train and {counts['val']} val samples in {args.shards}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
