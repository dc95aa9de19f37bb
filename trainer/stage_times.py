"""The whole path at a count, one table: every stage's wall time, the driver's peak memory, the cost per image.

    python -m pipeline.miniature --out /data/mini --form tree --scale 0.01    # 1/100 of ImageNet's count
    python -m trainer.stage_times --src /data/mini --out /data/mini-shards --json stage-times.json

Stages, in order, all in this process (the driver) but the tasks: the scan; the plan and the Ray tasks
(on a local Ray of --cores), each task submitted as its shard is planned; the manifest (run()'s
stages); the trainer's shard check, first (every sha256) and second (the remembered ones); the
loader's start to its first batch, train and val; the trainer's start (model, optimiser, loaders) to
its first step; evaluation over val: --eval-batches of it
measured, the rest extrapolated (marked so). The peak RSS is this process's, as high as it has been by
the stage's end. --out should be a new folder: a finished run there would be resumed, its tasks
measuring nothing.
"""
import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from pipeline.cli import HelpFormatter
from pipeline.preprocess import Clock


def timed(stages, name, work, images):
    """Run work(), recording its wall time and the peak RSS at its end (run()'s Clock), and `images` for
    the cost per image."""
    clock = Clock()
    result = work()
    clock.lap(name)
    stages[name] = {**clock.laps[name], "images": images}
    return result


def measure(src, out, cores, batch_size, eval_batches) -> dict:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # this Ray of its own stays on 127.0.0.1
    import ray

    from pipeline.preprocess import STAGES, Settings, run

    stages = {}
    ray.init(address="local", num_cpus=cores, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False)
    try:
        manifest = run(src, out, Settings(), stages=stages)
    finally:
        ray.shutdown()
    import torch  # after the preprocessing: its driver's memory is its own, as in jobs/preprocess.py

    from pipeline import build_loader
    from pipeline.manifest import read_manifest
    from pipeline.verify import verify_checksums
    from trainer.config import Config
    from trainer.loop import Trainer

    inputs, val = manifest["totals"]["inputs"], manifest["splits"]["val"]["samples"]
    for stage in STAGES:
        stages[stage]["images"] = inputs
    for when in ("first", "second"):
        timed(stages, f"shard check, {when}", lambda: verify_checksums(out, read_manifest(out)), inputs)
    for split in ("train", "val"):
        timed(stages, f"loader start to first batch, {split}",
              lambda: next(iter(build_loader(out, split, batch_size, crops="random" if split == "train" else "center"))),
              batch_size)
    with tempfile.TemporaryDirectory() as run_folder:
        def first_step():
            trainer = Trainer(Config(shards=str(out), out=run_folder, batch_size=batch_size, device="cpu",
                                     verify_shards=False))
            trainer.train_step(*next(trainer.batches))
            return trainer

        trainer = timed(stages, "trainer start to first step", first_step, batch_size)
        trainer.model.eval()

        def some_batches():
            with torch.no_grad():
                batches = zip(range(eval_batches), trainer.val_loader)
                return sum(len(trainer.model(images)) for _, (images, _) in batches)

        seen = timed(stages, "evaluation over val", some_batches, val)
        stages["evaluation over val"].update(seconds=stages["evaluation over val"]["seconds"] / seen * val,
                                             measured_images=seen)
    return {"src": str(src), "inputs": inputs, "train": manifest["splits"]["train"]["samples"], "val": val,
            "shards": sum(len(s["shards"]) for s in manifest["splits"].values()), "cores": cores,
            "batch_size": batch_size, "stages": stages}


def rows(figures) -> list:
    lines = []
    for stage, f in figures["stages"].items():
        per = f"{f['images'] / f['seconds']:12,.0f} img/s" if stage == "plan and tasks" else \
            f"{1e6 * f['seconds'] / f['images']:9,.1f} µs/img"
        note = ""
        if "measured_images" in f:
            note = f"  extrapolated from {f['measured_images']:,} images"
        elif f["images"] != figures["inputs"]:
            note = f"  per image of a batch of {f['images']}"
        lines.append((stage, f"{f['seconds']:9,.2f} s  {f['peak_rss_mb']:7,.0f} MB  {per}{note}"))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer.stage_times", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--src", required=True, help="the images, in any form jobs/preprocess.py takes")
    p.add_argument("--out", required=True, help="the shard folder to write (kept)")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="the local Ray's CPUs")
    p.add_argument("--batch-size", type=int, default=128, help="the loader's, the trainer's and the evaluation's batch")
    p.add_argument("--eval-batches", type=int, default=5, help="val batches measured; the rest extrapolated")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from pipeline.bench import table

    figures = measure(Path(args.src), Path(args.out), args.cores, args.batch_size, args.eval_batches)
    title = (f"the whole path: {figures['inputs']:,} inputs ({figures['train']:,} train, {figures['val']:,} val) "
             f"in {figures['shards']:,} shards, {args.cores} cores; wall, driver's peak RSS, cost")
    print(table(rows(figures), title))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
