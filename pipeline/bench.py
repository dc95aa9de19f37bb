"""Benchmarks, each measured in one run on this machine and printed as one table.

    python -m pipeline.bench --src TREE      # the preprocessing tasks on all cores vs one bare loop, on a sample
    python -m pipeline.bench --shards DIR    # the input pipeline beside its ceiling and a hand-written one
    python -m trainer.bench --shards DIR     # the same, and whether it can feed the model (needs the model)

Figures are images per second, and CPU time an image. `--json FILE` writes the same figures as JSON,
`--plot FILE` draws them as a bar chart (PNG). For --shards:
  decode_only     DALI's decode of every training image to RGB uint8, nothing else: the ceiling
  train_pipeline  build_loader(crops="random") on the device, tensors handed over; measured in turn with
                  decode_only, --rounds times each, so that their ratio is not this machine's drift
  CPU an image    the CPU time of each (the process's, all threads): decode_only's / train_pipeline's is
                  the ratio of their work; where it is above the img/s ratio, the pipeline left cores idle
                  (on a GPU, the host's share of the work alone)
  baseline        what a user writes today: webdataset + Pillow crop/flip/Fancy PCA/normalise in a
                  torch DataLoader with one worker per core
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from pipeline import shard_cache, storage
from pipeline.cli import HelpFormatter, add_device
from pipeline.manifest import ShardDirError
from pipeline.tasks import JobFailed

# what a user's shards, tree or install can raise: said in one line (exit status 2), not as a traceback
USER_ERRORS = (ShardDirError, JobFailed, ValueError, ImportError, ConnectionError)  # ConnectionError: a bucket's


def table(rows, title):
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * len(title)] + [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def bench_preprocess(src, cores, sample=2000, seed=0):
    """images/s of the preprocessing tasks on `cores` Ray workers beside one process running the bare
    decode -> resize -> encode loop, both over the same seeded sample of at most `sample` of the inputs
    (ImageNet's 1.33 M would take hours). Scanning `src` and Ray's start-up are not timed."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the bench's own Ray stays on 127.0.0.1
    import cv2
    import numpy as np
    import ray

    from pipeline.images import Rejected, decode_square, encode_jpeg, resize_center_crop
    from pipeline.preprocess import Settings, read_input, scan, write_shards

    cv2.setNumThreads(1)
    ray.init(address="local", num_cpus=cores, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False)
    try:
        inputs = [item for items in scan(src).splits.values() for item in items if item[1] >= 0 and item[2]]
        chosen = [inputs[i] for i in sorted(np.random.default_rng(seed).permutation(len(inputs))[:sample])]
        start = time.perf_counter()
        for _, _, where in chosen:
            try:
                encode_jpeg(resize_center_crop(decode_square(read_input(src, where))))
            except Rejected:
                pass
        single = len(chosen) / (time.perf_counter() - start)
        # start every worker and import the task's modules before the clock starts
        warm = ray.remote(num_cpus=1)(_import_task_modules)
        ray.get([warm.remote() for _ in range(cores)])
        settings = Settings(shard_size=max(1, math.ceil(len(chosen) / (8 * cores))))  # >= 8 tasks a core: no idle tail
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            write_shards({"train": chosen}, src, Path(out), settings)
            job = len(chosen) / (time.perf_counter() - start)
    finally:
        ray.shutdown()
    return {"images": len(chosen), "inputs": len(inputs), "cores": cores, "single_loop": single, "ray_job": job,
            "ratio_to_cores_x_single": job / (cores * single)}


def measure(batches, seconds, warmup=2) -> tuple[float, float]:
    """(images/s, CPU us an image) over an endless iterable of batch sizes, after `warmup` batches, for
    >= `seconds`. The CPU time is this process's, all its threads (DALI's and torch's included): steadier
    than images/s on a machine whose speed drifts, and beside it, how busy the cores were."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    images, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        images += next(it)
    return images / (time.perf_counter() - start), 1e6 * (time.process_time() - cpu_start) / images


def rate(batches, seconds, warmup=2) -> float:
    """images/s over an endless iterable of batch sizes, after `warmup` batches, for >= `seconds`."""
    return measure(batches, seconds, warmup)[0]


def _epochs(make_epoch):
    while True:
        yield from make_epoch()


def bench_loader(shards, device, batch_size, seconds, cores, rounds=3, baseline=True):
    """decode_only and train_pipeline measured in turn, `rounds` times each for `seconds` (this machine
    drifts: a ratio of two figures taken minutes apart is the drift's), then the baseline. The figures
    are the rounds' medians; "ratio" is the median of the rounds' train_pipeline / decode_only. Turns
    of a few seconds gave lower ratios here: keep them at 10 s or more for figures to quote.
    baseline=False leaves the baseline out (it needs webdataset, which a GPU machine may lack); shards in
    a bucket (s3://) have none."""
    import statistics

    import torch
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.manifest import read_manifest, read_pca

    gpu = torch.device(device).type == "cuda"
    entries = read_manifest(shards)["splits"]["train"]["shards"]
    # decode_only reads what build_loader reads: a bucket's shards from their local copies (pipeline.shard_cache)
    where = (str(shard_cache.local_copy(shards, [name for e in entries for name in (e["name"], e["index"])]))
             if storage.is_url(shards) else shards)
    tars = [storage.join(where, e["name"]) for e in entries]

    @pipeline_def(batch_size=batch_size, num_threads=cores,
                 device_id=(torch.device(device).index or 0) if gpu else None)
    def decode():
        jpg = fn.readers.webdataset(paths=tars, index_paths=[storage.join(where, e["index"]) for e in entries],
                                    ext=["jpg"], missing_component_behavior="error", random_shuffle=True)
        return fn.decoders.image(jpg, output_type=types.RGB,
                                 **({"device": "mixed", "jpeg_fancy_upsampling": True} if gpu else {"device": "cpu"}))

    pipe = decode()
    pipe.build()

    def decoded_batches():
        while True:
            (out,) = pipe.run()
            if gpu:
                torch.cuda.synchronize()
            yield len(out)

    decoded, trained = decoded_batches(), loader_batches(shards, device, batch_size, num_threads=cores)
    # one row a round: decode_only's img/s and CPU us an image, then train_pipeline's
    decode_rate, decode_cpu, train_rate, train_cpu = zip(*[(*measure(decoded, seconds), *measure(trained, seconds))
                                                           for _ in range(rounds)])
    del decoded, trained, pipe
    median = statistics.median
    figures = {"device": str(device), "batch_size": batch_size, "cores": cores, "rounds": rounds,
               "decode_only": median(decode_rate), "train_pipeline": median(train_rate),
               "ratio": median(t / d for d, t in zip(decode_rate, train_rate)),
               # CPU time an image: the ratio of the work each does, whatever the machine's drift or idle cores
               "decode_only_cpu_us": median(decode_cpu), "train_pipeline_cpu_us": median(train_cpu),
               "cpu_ratio": median(d / t for d, t in zip(decode_cpu, train_cpu))}
    if baseline and not storage.is_url(shards):  # webdataset's tar reader takes files
        figures["baseline"] = rate(_epochs(lambda: (len(y) for _, y in _baseline(tars, read_pca(shards), batch_size,
                                                                                  cores))), seconds)
    return figures


def loader_batches(shards, device, batch_size, **options):
    """An endless iterator of the batch sizes of build_loader(crops="random", **options) on `device`, the
    tensors handed over (and on CUDA, synchronised)."""
    import torch

    from pipeline import build_loader

    loader = build_loader(shards, batch_size=batch_size, device=device, crops="random", **options)
    gpu = torch.device(device).type == "cuda"

    def sync(n):
        if gpu:
            torch.cuda.synchronize()
        return n

    return (sync(len(batch[1])) for batch in _epochs(lambda: iter(loader)))  # (images, labels[, mean])


def loader_rate(shards, device, batch_size, seconds, **options) -> float:
    """img/s of build_loader(crops="random", **options) on `device`, the tensors handed over."""
    return rate(loader_batches(shards, device, batch_size, **options), seconds)


def _baseline(tars, pca, batch_size, workers):
    import torch
    import webdataset as wds

    dataset = wds.WebDataset(tars, shardshuffle=False, empty_check=False).shuffle(1000).decode("pil") \
        .to_tuple("jpg", "cls").map(_BaselineTransform(pca))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=True)


class _BaselineTransform:
    """Pillow crop and flip, numpy Fancy PCA and normalisation: a typical hand-written transform."""

    def __init__(self, pca, sigma=0.1):
        import numpy as np

        from pipeline.loader import CROP
        self.np, self.size, self.sigma = np, CROP, sigma
        self.mean, self.std = np.array(pca["mean"], np.float32), np.array(pca["std"], np.float32)
        self.P, self.scale = np.array(pca["eigenvectors"]), np.sqrt(np.maximum(pca["eigenvalues"], 0))

    def __call__(self, sample):
        import random

        import torch
        from PIL import Image
        image, cls = sample
        x, y = random.randint(0, image.width - self.size), random.randint(0, image.height - self.size)
        image = image.crop((x, y, x + self.size, y + self.size))
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        offset = self.P @ (self.np.random.normal(0, self.sigma, 3) * self.scale)
        pixels = (self.np.asarray(image, self.np.float32) / 255 + offset.astype(self.np.float32) - self.mean) / self.std
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), int(cls)


def _import_task_modules():
    import pipeline.preprocess  # noqa: F401

    time.sleep(0.5)  # hold this worker, so that every warm-up call lands on another


def add_loader_arguments(p):
    """The flags of an input-pipeline benchmark (this one's --shards, and trainer.bench's)."""
    add_device(p)
    p.add_argument("--batch-size", type=int, default=128, help="images per batch of the input pipeline")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each input-pipeline figure is measured (a turn)")
    p.add_argument("--rounds", type=int, default=3,
                   help="decode_only and train_pipeline are measured in turn, this many times each")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--plot", help="also draw the figures as a bar chart into this PNG")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__, formatter_class=HelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--src", help="an image tree: benchmark the preprocessing job")
    source.add_argument("--shards", help="a shard folder or s3:// URL: benchmark the input pipeline")
    p.add_argument("--sample", type=int, default=2000, help="--src: at most this many inputs, a seeded sample")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                   help="the Ray job's CPUs (--src); DALI's threads and the baseline's DataLoader workers (--shards)")
    add_loader_arguments(p)
    args = p.parse_args(argv)
    try:
        figures = (bench_loader(args.shards, pick_device(args), args.batch_size, args.seconds, args.cores, args.rounds)
                   if args.shards else bench_preprocess_report(args))
    except USER_ERRORS as e:
        p.exit(2, f"bench: {e}\n")
    if args.shards:
        print(table(loader_rows(figures), loader_title(args, figures)))
        bars = {name: figures[name] for name in ("decode_only", "train_pipeline", "baseline") if name in figures}
        title = f"input pipeline on {figures['device']}, batch {args.batch_size}, {args.cores} cores"
    else:
        bars = {"single-process loop": figures["single_loop"],
                f"{figures['cores']} x single loop (linear)": figures["cores"] * figures["single_loop"],
                f"Ray job on {figures['cores']} cores": figures["ray_job"]}
        title = f"preprocessing {figures['images']:,} images"
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    if args.plot:
        plot(bars, title, args.plot)
    return 0


def plot(bars, title, path):
    """bars: {name: img/s} as horizontal bars on a log scale, each labelled with its figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 0.6 * len(bars) + 1.2), dpi=100)
    names, values = list(bars)[::-1], list(bars.values())[::-1]
    axes.barh(names, values, color="tab:blue")
    axes.set(xscale="log", xlabel="images / s (log scale)", title=title)
    for y, value in enumerate(values):
        axes.text(value, y, f" {value:,.0f}", va="center")
    axes.set_xlim(right=max(values) * 4)
    axes.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def pick_device(args) -> str:
    import torch
    return "cuda:0" if args.device == "cuda" or (args.device is None and torch.cuda.is_available()) else "cpu"


def loader_title(args, figures) -> str:
    return f"input pipeline: {args.shards} on {figures['device']}, batch {args.batch_size}, {args.cores} cores"


def loader_rows(f) -> list:
    """The input pipeline's figures as table rows."""
    return [
        ("decode_only", f"{f['decode_only']:9,.0f} img/s  DALI decode to RGB uint8, nothing else (the ceiling)"),
        ("train_pipeline", f"{f['train_pipeline']:9,.0f} img/s  build_loader(crops='random'): "
                           f"{f['ratio']:.2f} x decode_only (the median of {f['rounds']} rounds, each measured in turn)"),
        ("CPU an image", f"{f['train_pipeline_cpu_us']:9,.0f} us     train_pipeline, against decode_only's "
                         f"{f['decode_only_cpu_us']:,.0f} us: {f['cpu_ratio']:.2f} x the work (all the process's threads)"),
    ] + ([("baseline", f"{f['baseline']:9,.0f} img/s  webdataset + Pillow, DataLoader with {f['cores']} workers: "
                        f"train_pipeline is {f['train_pipeline'] / f['baseline']:.1f} x")] if "baseline" in f else [])


def bench_preprocess_report(args):
    figures = bench_preprocess(args.src, args.cores, args.sample)
    print(table([
        ("images", f"{figures['images']:,}" + (f" (a seeded sample of the {figures['inputs']:,} inputs)"
                                               if figures["images"] < figures["inputs"] else "")),
        ("single-process loop (decode, resize, encode)", f"{figures['single_loop']:,.0f} img/s"),
        (f"Ray job on {figures['cores']} cores", f"{figures['ray_job']:,.0f} img/s"),
        ("job / (cores x loop)", f"{figures['ratio_to_cores_x_single']:.2f}  (target >= 0.8)"),
    ], f"preprocessing: {args.src}"))
    return figures


if __name__ == "__main__":
    sys.exit(main())
