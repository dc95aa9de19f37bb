"""Check a shard directory against its manifest.

    python -m pipeline.verify shards/            # counts, sizes, sha256, every JPEG decodes
    python -m pipeline.verify shards/ --no-deep  # counts and sizes only

Exits non-zero with a message naming the first problem.
"""
import argparse
import sys
from pathlib import Path

from pipeline.images import decode_jpeg
from pipeline.manifest import PCA, SPLITS, ShardDirError, read_manifest
from pipeline.shards import INDEX_VERSION, iter_samples, sha256_file


def verify(shards, deep=True) -> dict:
    """-> the manifest, or raises ShardDirError naming the first problem found."""
    shards = Path(shards)
    manifest = read_manifest(shards)
    redo = f"run the preprocessing into {shards} again (it redoes what is damaged)"
    if not (shards / PCA).exists():
        raise ShardDirError(f"{shards / PCA} is missing: {redo}")
    size, classes = manifest["settings"]["size"], len(manifest["classes"])
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            tar, idx = shards / shard["name"], shards / shard["index"]
            for path in (tar, idx):
                if not path.exists():
                    raise ShardDirError(f"{path} is missing: {redo}")
            if tar.stat().st_size != shard["bytes"]:
                raise ShardDirError(f"{tar} has {tar.stat().st_size} bytes, the manifest says "
                                    f"{shard['bytes']}: {redo}")
            with open(idx) as f:
                header = f.readline().split()
            if header != [INDEX_VERSION, str(shard["samples"])]:
                raise ShardDirError(f"{idx} does not index {shard['samples']} samples: {redo}")
            if deep:
                _verify_contents(tar, shard, size, classes, redo)
    return manifest


def _verify_contents(tar, shard, size, classes, redo):
    if sha256_file(tar) != shard["sha256"]:
        raise ShardDirError(f"{tar} does not match its sha256 in the manifest: {redo}")
    count = 0
    for key, files in iter_samples(tar):
        count += 1
        if set(files) != {"cls", "jpg"}:
            raise ShardDirError(f"{tar}: sample {key} has {sorted(files)}, expected cls and jpg")
        image = decode_jpeg(files["jpg"])
        if image is None or image.shape != (size, size, 3):
            got = "nothing" if image is None else "x".join(map(str, image.shape))
            raise ShardDirError(f"{tar}: {key}.jpg decodes to {got}, expected {size}x{size}x3")
        if not files["cls"].isdigit() or int(files["cls"]) >= classes:
            raise ShardDirError(f"{tar}: {key}.cls is {files['cls']!r}, not a class index")
    if count != shard["samples"]:
        raise ShardDirError(f"{tar} holds {count} samples, the manifest says {shard['samples']}: {redo}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="a folder written by jobs/preprocess.py")
    p.add_argument("--deep", action=argparse.BooleanOptionalAction, default=True,
                   help="also check sha256 and decode every JPEG")
    args = p.parse_args(argv)
    try:
        manifest = verify(args.shards, deep=args.deep)
    except ShardDirError as e:
        print(f"verify: {e}", file=sys.stderr)
        return 1
    counts = {split: manifest["splits"][split]["samples"] for split in SPLITS}
    print(f"verify: ok: {counts['train']} train and {counts['val']} val samples in {args.shards}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
