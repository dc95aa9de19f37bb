"""Benchmarks, each measured in one run on this machine and printed as one table.

    python -m pipeline.bench --src TREE      # the preprocessing job on all cores vs one bare loop
    python -m pipeline.bench --shards DIR    # the input pipeline (see bench_loader)

Figures are images per second. `--json FILE` writes the same figures as JSON.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path


def table(rows, title):
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * len(title)] + [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def bench_preprocess(src, cores):
    """images/s of jobs/preprocess on `cores` Ray workers beside one process running the bare
    decode -> resize -> encode loop over the same files. Ray start-up is not timed."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the bench's own Ray stays on 127.0.0.1
    import cv2
    import ray

    from pipeline.images import decode_rgb, encode_jpeg, read_bytes, resize_center_crop
    from pipeline.preprocess import Rejected, Settings, run, scan

    cv2.setNumThreads(1)
    _, splits = scan(src)
    paths = [Path(src) / rel for items in splits.values() for rel, _ in items]
    start = time.perf_counter()
    for path in paths:
        try:
            encode_jpeg(resize_center_crop(decode_rgb(read_bytes(path))))
        except Rejected:
            pass
    single = len(paths) / (time.perf_counter() - start)

    ray.init(address="local", num_cpus=cores, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False)
    try:
        # start every worker and import the task's modules before the clock starts
        warm = ray.remote(num_cpus=1)(_import_task_modules)
        ray.get([warm.remote() for _ in range(cores)])
        shard_size = max(1, math.ceil(len(paths) / (8 * cores)))  # >= 8 tasks a core: no idle tail
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            run(src, out, Settings(shard_size=shard_size), max_reject_fraction=1.0)
            job = len(paths) / (time.perf_counter() - start)
    finally:
        ray.shutdown()
    return {"images": len(paths), "cores": cores, "single_loop": single, "ray_job": job,
            "ratio_to_cores_x_single": job / (cores * single)}


def _import_task_modules():
    import pipeline.preprocess  # noqa: F401

    time.sleep(0.5)  # hold this worker, so that every warm-up call lands on another


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--src", help="an image tree: benchmark the preprocessing job")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="Ray workers for the job")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    figures = bench_preprocess(args.src, args.cores)
    print(table([
        ("images", f"{figures['images']:,}"),
        ("single-process loop (decode, resize, encode)", f"{figures['single_loop']:,.0f} img/s"),
        (f"Ray job on {figures['cores']} cores", f"{figures['ray_job']:,.0f} img/s"),
        ("job / (cores x loop)", f"{figures['ratio_to_cores_x_single']:.2f}  (target >= 0.8)"),
    ], f"preprocessing: {args.src}"))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
