"""Which object-storage library: boto3, obstore and pyarrow.fs measured on the same bucket, one table.

    AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
        python -m pipeline.bench_storage s3://bucket/bench --keys 5000

Three figures a library, each the job's own access pattern:
  list keys/s     a paged ListObjectsV2 over --keys small objects (the image tree's scan)
  ranged GET/s    --reads ranged GETs of 110 kB (ImageNet's mean JPEG) at random offsets of one
                  64 MB object, one after the other (the archives read in place)
  multipart MB/s  one --write-mb object written in 8 MB parts (a shard)
and whether it has a conditional PUT (If-None-Match: *), which the lock needs. The keys are written
once (with boto3, not timed) and left under the prefix for the next run; the rest is removed.
"""
import argparse
import os
import sys
import time

import numpy as np

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
    import io
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="s3://bucket/prefix to use (AWS_ENDPOINT_URL and credentials from the environment)")
    p.add_argument("--keys", type=int, default=5000, help="objects to list")
    p.add_argument("--reads", type=int, default=300, help="ranged GETs")
    p.add_argument("--write-mb", type=int, default=128, help="size of the multipart write")
    args = p.parse_args(argv)
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
