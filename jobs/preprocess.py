"""Turn ImageNet, as downloaded, into 256x256 WebDataset shards, on Ray.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/preprocess.py --src /data/imagenet --out /data/shards   # paths every node sees, absolute
    python jobs/preprocess.py --src /data/imagenet --out /data/shards       # no cluster: starts Ray locally

--src is any of: the folder holding the official archives (ILSVRC2012_img_train.tar,
ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz), read in place; Kaggle's copy (ILSVRC/Data/CLS-LOC/,
LOC_val_solution.csv); or a tree train/<class>/ with val/<class>/ or a flat val/ (labelled by the devkit
beside it, or --val-labels). On a cluster, --src and --out must be paths that every node sees (NFS, a
shared volume) or s3:// URLs (docs/object-storage.md): each task reads its inputs and writes its shard
there directly.
"""
import argparse
import logging
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from pipeline import storage  # noqa: E402
from pipeline.cli import HelpFormatter  # noqa: E402
from pipeline.lock import LockHeld, lock_for  # noqa: E402
from pipeline.preprocess import JobFailed, Settings, run  # noqa: E402
from pipeline.progress import bar  # noqa: E402
from pipeline.tasks import unreachable  # noqa: E402

log = logging.getLogger("preprocess")


class Progress:
    """run()'s progress callback as a tqdm bar: shards done/total, images/s, ETA."""

    def __init__(self):
        self.bar, self.start = None, time.monotonic()

    def __call__(self, done, total, images):
        if self.bar is None:
            self.bar = bar(total=total, desc="shards", unit="shard")
        elapsed = time.monotonic() - self.start
        self.bar.set_postfix_str(f"{images / elapsed if elapsed else 0:,.0f} img/s", refresh=False)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.bar.close()


def parse_args(argv=None):
    defaults = {f.name: f.default for f in fields(Settings)}
    p = argparse.ArgumentParser(prog="python jobs/preprocess.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--src", required=True, help="ImageNet's archives, Kaggle's copy, or a tree train/<class>/<file> "
                                                "with val/<class>/<file> or a flat val/ (see above)")
    p.add_argument("--out", required=True, help="output folder or s3:// URL for shards, manifest, pca.json, rejects")
    p.add_argument("--val-labels", help="labels of a flat val, a file, folder or s3:// URL: the devkit "
                                        "(ILSVRC2012_devkit_t12.tar.gz or its folder), Kaggle's LOC_val_solution.csv, "
                                        "or lines '<file> <class>' (default: the devkit or Kaggle's CSV in --src)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="a tree without val/: hold out this share of every class of train/ as val (seeded)")
    p.add_argument("--size", type=int, default=defaults["size"], help="output side in pixels")
    p.add_argument("--quality", type=int, default=defaults["quality"], help="JPEG quality (1-100)")
    p.add_argument("--shard-size", type=int, default=defaults["shard_size"], help="samples per shard")
    p.add_argument("--seed", type=int, default=defaults["seed"], help="seed of the sample permutation")
    p.add_argument("--max-pixels", type=int, default=defaults["max_pixels"],
                   help="reject images larger than this (decompression bombs)")
    p.add_argument("--max-reject-fraction", type=float, default=0.01,
                   help="fail if more than this fraction of inputs is rejected")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to use ('auto': the one `ray start` began here; "
                        "default: $RAY_ADDRESS, else a new local Ray on 127.0.0.1 for this run)")
    args = p.parse_args(argv)
    if not 1 <= args.quality <= 100:
        p.error("--quality must be within 1..100")
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be within [0, 1)")
    if args.size < 1 or args.shard_size < 1 or args.max_pixels < 1:
        p.error("--size, --shard-size and --max-pixels must be positive")
    if "runtime_resources" in os.getcwd():  # a `ray job submit --working-dir` job runs in a copy
        for name in ("src", "out", "val_labels"):
            value = getattr(args, name)
            if value and not os.path.isabs(value) and not storage.is_url(value):
                p.error(f"--{name.replace('_', '-')} {value} is relative to the job's copy of the working "
                        f"dir, which Ray deletes: give a path every node sees, absolute")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.address:
        # A Ray of our own for this run: every one of its servers on 127.0.0.1 (Ray otherwise
        # binds the machine's public address; this switch is how it keeps to loopback).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    settings = Settings(size=args.size, quality=args.quality, shard_size=args.shard_size,
                        seed=args.seed, max_pixels=args.max_pixels)
    problem = args.address and unreachable(args.address)
    if problem:
        log.error("%s", problem)
        return 1
    lock = lock_for(args.out)
    try:
        lock.acquire()  # before Ray starts: a second run on --out refuses at once
    except LockHeld as e:
        log.error("%s", e)
        return 1
    except OSError as e:  # a read-only or forbidden --out: said before any work
        log.error("cannot write into --out %s: %s", args.out, e.strerror or e)
        return 1
    try:
        # the tasks read and write the bucket with the job's own endpoint and keys, wherever they run
        urls = storage.is_url(args.src) or storage.is_url(args.out)
        env = {"env_vars": storage.environment()} if urls and storage.environment() else None
        if args.address:
            ray.init(address=args.address, log_to_driver=True, runtime_env=env)
        else:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=env)
        try:
            manifest = run(args.src, args.out, settings, args.val_labels, args.max_reject_fraction,
                           args.val_fraction, progress=Progress(), lock=lock)
        finally:
            ray.shutdown()
    except (JobFailed, ConnectionError) as e:  # ConnectionError: --address auto with no Ray running here
        log.error("%s", e)
        return 1
    finally:
        lock.release()
    totals = manifest["totals"]
    log.info("done: %d samples in %s (%d train, %d val shards); manifest %s",
             totals["written"], args.out, len(manifest["splits"]["train"]["shards"]),
             len(manifest["splits"]["val"]["shards"]), storage.join(args.out, "manifest.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
