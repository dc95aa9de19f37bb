"""Object storage measured: the library choice, and the bucket against a folder. One table each.

    export AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
    python -m pipeline.bench_storage s3://bucket/bench --libraries        # boto3, obstore, pyarrow.fs
    python -m pipeline.bench_storage s3://bucket/bench --shards DIR       # the loader: bucket vs folder, DALI's reader
    python -m pipeline.bench_storage s3://bucket/bench --src TREE         # the preprocessing: bucket vs folder
    python -m pipeline.bench_storage s3://bucket/bench --listing 133117   # the source's listing of N keys

--shards and --src copy the folder into the bucket once (under the URL) and measure the two in turn,
--rounds times each, so that their ratio is not the machine's drift. The loader reads a bucket's
shards from whole copies (pipeline.shard_cache); --shards also times DALI's reader alone over the
folder and over the bucket read by DALI itself. --listing writes N empty objects
in ImageNet's layout (train/<wnid>/<wnid>_<n>.JPEG over 1,000 classes) once, then times
pipeline.source's listing of them (spread over the class prefixes) and one serial paged listing,
and projects both to ImageNet's 1,331,167 keys (the listing's cost is per key, not per byte).

--libraries: three figures a library, each the job's own access pattern:
  list keys/s     a paged ListObjectsV2 over --keys small objects (the image tree's scan)
  ranged GET/s    --reads ranged GETs of 110 kB (ImageNet's mean JPEG) at random offsets of one
                  64 MB object, one after the other (the archives read in place)
  multipart MB/s  one --write-mb object written in 8 MB parts (a shard)
and whether it has a conditional PUT (If-None-Match: *), which the lock needs. The keys are written
once (with boto3, not timed) and left under the prefix for the next run; the rest is removed.
"""
import argparse
import io
import os
import sys
import time

import numpy as np

from pipeline.cli import HelpFormatter

RANGE = 110_000  # bytes: ImageNet's mean training JPEG
BIG = 64 << 20
PART = 8 << 20


def split_url(url):
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def bench_boto3(bucket, prefix, keys, offsets, payload):
    import boto3
    from boto3.s3.transfer import TransferConfig

    s3 = boto3.client("s3")
    t = time.perf_counter()
    listed = sum(len(page.get("Contents", [])) for page in
                 s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/keys/"))
    list_s = time.perf_counter() - t
    t = time.perf_counter()
    for off in offsets:
        s3.get_object(Bucket=bucket, Key=f"{prefix}/big", Range=f"bytes={off}-{off + RANGE - 1}")["Body"].read()
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    s3.upload_fileobj(io.BytesIO(payload), bucket, f"{prefix}/written",
                      Config=TransferConfig(multipart_threshold=PART, multipart_chunksize=PART))
    write_s = time.perf_counter() - t
    return listed, list_s, read_s, write_s, "yes (IfNoneMatch='*')"


def obstore_store(bucket):
    from obstore.store import S3Store

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return S3Store(bucket, endpoint=endpoint, client_options={"allow_http": bool(endpoint)})


def bench_obstore(bucket, prefix, keys, offsets, payload):
    import obstore

    store = obstore_store(bucket)
    t = time.perf_counter()
    listed = sum(len(batch) for batch in obstore.list(store, f"{prefix}/keys/"))
    list_s = time.perf_counter() - t
    t = time.perf_counter()
    for off in offsets:
        obstore.get_range(store, f"{prefix}/big", start=off, length=RANGE)
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    obstore.put(store, f"{prefix}/written", iter([payload[i:i + PART] for i in range(0, len(payload), PART)]),
                chunk_size=PART)
    write_s = time.perf_counter() - t
    return listed, list_s, read_s, write_s, "yes (mode='create')"


def bench_pyarrow(bucket, prefix, keys, offsets, payload):
    from pyarrow import fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    s3 = fs.S3FileSystem(endpoint_override=endpoint.split("://")[-1] or None,
                         scheme="http" if endpoint.startswith("http://") else "https",
                         region=os.environ.get("AWS_REGION", "us-east-1"))
    t = time.perf_counter()
    listed = len(s3.get_file_info(fs.FileSelector(f"{bucket}/{prefix}/keys", recursive=True)))
    list_s = time.perf_counter() - t
    t = time.perf_counter()
    with s3.open_input_file(f"{bucket}/{prefix}/big") as f:
        for off in offsets:
            f.read_at(RANGE, off)
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    with s3.open_output_stream(f"{bucket}/{prefix}/written") as f:
        for i in range(0, len(payload), PART):
            f.write(payload[i:i + PART])
    write_s = time.perf_counter() - t
    return listed, list_s, read_s, write_s, "no"


IMAGENET_KEYS = 1_331_167  # 1,281,167 train and 50,000 val images


def bench_loader(url, shards, rounds, seconds, batch_size, cores):
    """The loader's img/s from the folder and from its copy in the bucket, in turn."""
    from pipeline import storage
    from pipeline.bench import loader_batches, measure

    remote = _copy(shards, storage.join(url, "shards"))
    streams = {"folder": loader_batches(str(shards), "cpu", batch_size, num_threads=cores),
               "bucket": loader_batches(remote, "cpu", batch_size, num_threads=cores)}
    figures = {name: [] for name in streams}
    for _ in range(rounds):
        for name, batches in streams.items():
            figures[name].append(measure(batches, seconds)[0])
    return figures


def bench_reader(url, shards, seconds, batch_size, cores):
    """-> {"folder", "s3 direct"}: samples/s of DALI's webdataset reader alone (no decoding), over the
    folder's files and over the bucket's objects read by DALI itself (what pipeline.shard_cache avoids)."""
    import json
    from pathlib import Path

    from nvidia.dali import fn, pipeline_def

    from pipeline import storage
    from pipeline.bench import rate

    entries = json.loads((Path(shards) / "manifest.json").read_text())["splits"]["train"]["shards"]
    figures = {}
    for name, base in (("folder", str(shards)), ("s3 direct", storage.join(url, "shards"))):
        @pipeline_def(batch_size=batch_size, num_threads=cores, device_id=None)
        def read():
            jpg, cls = fn.readers.webdataset(paths=[storage.join(base, e["name"]) for e in entries],
                                             index_paths=[storage.join(base, e["index"]) for e in entries],
                                             ext=["jpg", "cls"])
            return jpg, cls
        pipe = read()
        pipe.build()
        figures[name] = rate(iter(lambda: pipe.run() and batch_size, None), seconds)
        del pipe
    return figures


def bench_preprocess(url, src, rounds, cores):
    """The preprocessing's img/s (scan, tasks, manifest; on `cores` processes) from the tree and from its
    copy in the bucket, in turn, each into a new local folder."""
    import tempfile

    from pipeline import storage
    from pipeline.preprocess import Settings, run

    remote = _copy(src, storage.join(url, "src"))
    figures = {"folder": [], "bucket": []}
    for _ in range(rounds):
        for name, where in (("folder", str(src)), ("bucket", remote)):
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                manifest = run(where, out, Settings(shard_size=100), processes=cores)
                figures[name].append(manifest["totals"]["inputs"] / (time.perf_counter() - start))
    return figures


def bench_listing(url, keys):
    """-> (keys, seconds of pipeline.source's listing, seconds of one serial paged listing)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline import source, storage

    root = storage.join(url, f"listing-{keys}")
    names = [f"train/n{c:08d}/n{c:08d}_{i}.JPEG" for c in range(1000) for i in range(-(-keys // 1000))][:keys]
    if len(storage.listing(root)) != keys:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda name: storage.write_bytes(storage.join(root, name), b""), names))
    start = time.perf_counter()
    spread = len(source.listing(root))
    spread_s = time.perf_counter() - start
    start = time.perf_counter()
    serial = len(storage.listing(root))
    serial_s = time.perf_counter() - start
    assert spread == serial == keys, (spread, serial, keys)
    return keys, spread_s, serial_s


def _copy(folder, url) -> str:
    """Every file under `folder` into the bucket under `url`, unless all are there already."""
    from pathlib import Path

    from pipeline import storage

    files = {p.relative_to(folder).as_posix(): p for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    there = storage.listing(url)
    for name, path in files.items():
        if there.get(name) != path.stat().st_size:
            storage.upload(path, storage.join(url, name))
    return url


def print_versus(title, figures, unit):
    import statistics

    folder, bucket = statistics.median(figures["folder"]), statistics.median(figures["bucket"])
    ratio = statistics.median(b / f for f, b in zip(figures["folder"], figures["bucket"]))
    print(f"\n{title}\n{'-' * len(title)}")
    print(f"folder  {folder:9,.0f} {unit}")
    print(f"bucket  {bucket:9,.0f} {unit}  {ratio:.2f} x the folder (median of {len(figures['folder'])} rounds, "
          f"each measured in turn)")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.bench_storage", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("url", help="s3://bucket/prefix to use (AWS_ENDPOINT_URL and credentials from the environment)")
    p.add_argument("--libraries", action=argparse.BooleanOptionalAction, default=False,
                   help="boto3, obstore and pyarrow.fs side by side")
    p.add_argument("--keys", type=int, default=5000, help="--libraries: objects to list")
    p.add_argument("--reads", type=int, default=300, help="--libraries: ranged GETs")
    p.add_argument("--write-mb", type=int, default=128, help="--libraries: size of the multipart write")
    p.add_argument("--shards", help="a shard folder: the loader from it and from the bucket")
    p.add_argument("--src", help="an image tree: the preprocessing from it and from the bucket")
    p.add_argument("--listing", type=int, metavar="N", help="time the listing of N keys in ImageNet's layout")
    p.add_argument("--rounds", type=int, default=3, help="turns of each side of a comparison")
    p.add_argument("--seconds", type=float, default=10.0, help="--shards: how long each turn is measured")
    p.add_argument("--batch-size", type=int, default=64, help="--shards: the loader's batch")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="DALI threads, preprocessing processes")
    args = p.parse_args(argv)
    from pipeline import storage

    try:
        if args.shards:
            print_versus(f"loader, CPU, batch {args.batch_size}, {args.cores} threads: {args.shards}",
                         bench_loader(args.url, args.shards, args.rounds, args.seconds, args.batch_size, args.cores),
                         "img/s")
            reader = bench_reader(args.url, args.shards, args.seconds, args.batch_size, args.cores)
            title = "DALI's webdataset reader alone, no decoding"
            print(f"\n{title}\n{'-' * len(title)}")
            print(f"folder     {reader['folder']:9,.0f} samples/s")
            print(f"s3 direct  {reader['s3 direct']:9,.0f} samples/s  {reader['s3 direct'] / reader['folder']:.3f} x the "
                  f"folder: DALI reading the bucket itself, a ranged GET a sample's file")
        if args.src:
            print_versus(f"preprocessing, {args.cores} processes: {args.src}",
                         bench_preprocess(args.url, args.src, args.rounds, args.cores), "img/s")
        if args.listing:
            keys, spread_s, serial_s = bench_listing(args.url, args.listing)
            scale = IMAGENET_KEYS / keys
            title = f"listing {keys:,} keys in ImageNet's layout"
            print(f"\n{title}\n{'-' * len(title)}")
            print(f"spread over prefixes  {spread_s:7.2f} s  {keys / spread_s:9,.0f} keys/s  "
                  f"-> {spread_s * scale:6.1f} s at {IMAGENET_KEYS:,}")
            print(f"one serial listing    {serial_s:7.2f} s  {keys / serial_s:9,.0f} keys/s  "
                  f"-> {serial_s * scale:6.1f} s at {IMAGENET_KEYS:,}")
    except storage.StorageError as e:
        p.exit(2, f"bench_storage: {e}\n")
    if args.libraries:
        return bench_libraries(args)
    return 0


def bench_libraries(args):
    import boto3

    bucket, prefix = split_url(args.url)
    s3 = boto3.client("s3")
    have = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/keys/").get("KeyCount", 0)
    if have < min(args.keys, 1000):
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"{prefix}/keys/{i:08d}", Body=b"x"),
                          range(args.keys)))
    rng = np.random.default_rng(0)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/big", Body=rng.bytes(BIG))
    offsets = rng.integers(0, BIG - RANGE, args.reads).tolist()
    payload = rng.bytes(args.write_mb << 20)
    rows = []
    for name, bench in (("boto3", bench_boto3), ("obstore", bench_obstore), ("pyarrow.fs", bench_pyarrow)):
        listed, list_s, read_s, write_s, conditional = bench(bucket, prefix, args.keys, offsets, payload)
        rows.append((name, f"{listed / list_s:12,.0f}", f"{len(offsets) / read_s:12,.0f}",
                     f"{args.write_mb / write_s:14,.0f}", conditional))
    for key in ("big", "written"):
        s3.delete_object(Bucket=bucket, Key=f"{prefix}/{key}")
    header = ("library", "list keys/s", "ranged GET/s", "multipart MB/s", "conditional PUT")
    print(f"{header[0]:<11}{header[1]:>12}  {header[2]:>12}  {header[3]:>14}  {header[4]}")
    for row in rows:
        print(f"{row[0]:<11}{row[1]}  {row[2]}  {row[3]}  {row[4]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
