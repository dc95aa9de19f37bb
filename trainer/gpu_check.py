"""One command that measures the whole GPU side and writes one report.

    make gpu-check                       # the same as: python -m trainer.gpu_check --out gpu-check
    python -m trainer.gpu_check --quick  # seconds, not minutes: what CI runs, on its CPU

It needs a checkout, torch (with CUDA for the GPU rows) and DALI; no Ray (the shards are made
in-process), no network. It writes OUT/report.json and OUT/report.md and prints the table:

  environment  the GPU (nvidia-smi's name), its driver, the CPU cores, the versions
  gpu tests    python -m pytest -m gpu: how many passed, failed, were skipped
  pipeline     at each batch size, on shards it makes (ImageNet-shaped: 256 x 256 baseline JPEGs):
               decode_only (nvJPEG, DALI's "mixed"), train_pipeline (build_loader on the GPU),
               cpu_decode (the same pipeline on the CPU), DALI threads at 1, 4 and all cores, and
               the hardware decoder's share (hw_decoder_load) at 0, DALI's default and 1
  model        AlexNet's training step, img/s: bf16 + channels_last eager, with cudnn.benchmark off,
               fp32 with TF32 and without, torch.compile, CUDA graphs (torch.compile's "reduce-overhead")
  headline     train_pipeline / model, the model compiled as the trainer runs it on CUDA (eager on
               the CPU): at 1 or more the GPU never waits on data
  training     about 300 steps of the paper's recipe (python -m trainer.run): img/s of the first
               epoch (compiling included) and of the last, the last one's data wait, whole and by
               quarter; with two GPUs, the split net (--gpus 2) beside it

Without a GPU every CUDA row says so and the rest runs on the CPU, so that CI runs all of it but
the CUDA calls. Figures are measured in this run; nothing is projected.
"""
import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cli import HelpFormatter
from trainer.checkpoint import reason

REPO = Path(__file__).resolve().parent.parent
LIMIT_S = 300  # for each subprocess (the gpu tests, each training run): the report must end


def measured(figure, *args, **kwargs):
    """figure(*args, **kwargs), or the row's reason when it fails: a GPU step that breaks is a finding
    of the report, not its end (GPU time comes in short stretches)."""
    try:
        return figure(*args, **kwargs)
    except Exception as e:
        return f"failed: {type(e).__name__}: {reason(e)}"


def environment() -> dict:
    gpus = []
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        gpus = [line.strip() for line in smi.stdout.splitlines() if line.strip()]
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("nvidia.dali", "numpy", "cv2"):
        try:
            versions[name] = __import__(name, fromlist=["__version__"]).__version__
        except ImportError:
            versions[name] = None
    return {"gpus": gpus or ["none"], "cuda_devices": torch.cuda.device_count(),
            "cpu_cores": len(os.sched_getaffinity(0)), "cpu": platform.processor() or platform.machine(),
            "versions": versions}


def make_shards(folder: Path, images: int, processes: int) -> Path:
    """ImageNet-shaped shards: photo-like pictures of 500 x 375, in 10 classes, drawn on `processes`
    processes, through the real preprocessing (256 x 256 baseline JPEGs at quality 90), without Ray.
    Every 8th picture is val: 4096 leave 3584 to train, 28 whole batches of 128 (a partial one would be
    compiled once more in the training run, a minute)."""
    from pipeline.preprocess import Settings, run
    from pipeline.tasks import parallel

    src, shards = folder / "src", folder / "shards"
    if (shards / "manifest.json").exists():
        return shards
    chunk = -(-images // processes)
    list(parallel(_pictures, ((first, (src, first, min(chunk, images - first))) for first in range(0, images, chunk)),
                  processes))
    run(src, shards, Settings(shard_size=max(8, images // 16)), processes=processes)
    return shards


def _pictures(src: Path, first: int, count: int):
    """Pictures first .. first + count - 1 of make_shards (one task's share), JPEGs at quality 90."""
    import cv2

    rng = np.random.default_rng([0, first])
    for i in range(first, first + count):
        cls = src / ("val" if i % 8 == 7 else "train") / f"c{i // 8 % 10}"  # every class in both
        cls.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth shapes, some texture
        picture = cv2.resize(coarse, (500, 375), interpolation=cv2.INTER_CUBIC)
        picture = np.clip(picture + rng.normal(0, 8, picture.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(cls / f"{i}.JPEG"), picture, [cv2.IMWRITE_JPEG_QUALITY, 90])


def pipeline_rows(shards, gpu, batch_sizes, seconds, cores) -> list:
    """[(name, batch size, img/s or a reason)]: the input pipeline's figures."""
    from pipeline.bench import bench_loader, loader_rate

    device = "cuda:0" if gpu else "cpu"
    rows = []

    def train_pipeline(**options):
        return measured(loader_rate, str(shards), options.pop("device", device), batch, seconds, **options)

    try:
        importlib.import_module("webdataset")  # the baseline's alone: a GPU machine may have torch and DALI only
        baseline = True
    except ImportError:
        baseline = False
    for batch in batch_sizes:
        figures = measured(bench_loader, str(shards), device, batch, seconds, cores, rounds=1, baseline=baseline)
        if isinstance(figures, str):  # every figure of the three failed with it
            figures = {"decode_only": figures, "train_pipeline": figures, "baseline": figures}
        rows += [("decode_only", batch, figures["decode_only"]), ("train_pipeline", batch, figures["train_pipeline"]),
                 ("baseline (webdataset + Pillow)", batch, figures.get("baseline", "webdataset is not installed"))]
        rows.append(("cpu_decode", batch, train_pipeline(device="cpu") if gpu else "no GPU: train_pipeline is it"))
    batch = batch_sizes[0]
    for threads in sorted({1, min(4, cores), cores}):
        rows.append((f"train_pipeline, {threads} DALI threads", batch, train_pipeline(num_threads=threads)))
    for load in (0.0, None, 1.0):
        name = f"train_pipeline, hw_decoder_load {'DALI default' if load is None else load}"
        rows.append((name, batch, train_pipeline(hw_decoder_load=load) if gpu else "no GPU"))
    return rows


def model_rows(gpu, batch_sizes, seconds) -> list:
    from trainer.bench import model_rate

    device = "cuda:0" if gpu else "cpu"
    rows = []
    for batch in batch_sizes:
        rows.append(("model: bf16, channels_last, eager" if gpu else "model: fp32, eager", batch,
                     measured(model_rate, device, batch, seconds)))
    batch = batch_sizes[0]
    if not gpu:
        return rows + [(name, batch, "no GPU") for name in (
            "model: cudnn.benchmark off", "model: fp32, TF32", "model: fp32, no TF32", "model: torch.compile",
            "model: CUDA graphs (compile reduce-overhead)")]
    torch.backends.cudnn.benchmark = False
    rows.append(("model: cudnn.benchmark off", batch, measured(model_rate, device, batch, seconds)))
    torch.backends.cudnn.benchmark = True
    for tf32 in (True, False):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        rows.append((f"model: fp32, {'TF32' if tf32 else 'no TF32'}", batch,
                     measured(model_rate, device, batch, seconds, bf16=False)))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for mode, name in (("default", "model: torch.compile"), ("reduce-overhead", "model: CUDA graphs (compile reduce-overhead)")):
        rows.append((name, batch, measured(model_rate, device, batch, seconds, compile_mode=mode)))
    return rows


def training_rows(shards, folder, gpu, steps, batch) -> list:
    """A run of about `steps` steps of the paper's recipe through python -m trainer.run (as many epochs of
    the shards as that takes), compiled on the GPU as the trainer runs; with two GPUs, the split net
    (--gpus 2) too. The first epoch's figures include the start (compiling, cuDNN's timing, the pipeline's
    first batches); the last epoch's are the steady state."""
    from pipeline.manifest import read_manifest

    per_epoch = min(steps, -(-read_manifest(shards)["splits"]["train"]["samples"] // batch))  # the loader's epochs
    epochs = -(-steps // per_epoch)
    runs = [("--gpus 1", ["--gpus", "1"])]
    runs += [("--gpus 2", ["--gpus", "2"])] if gpu and torch.cuda.device_count() >= 2 else []
    rows = []
    for label, flags in runs:
        out = folder / f"run{''.join(flags).replace('-', '')}"
        cmd = [sys.executable, "-m", "trainer.run", "--shards", str(shards), "--out", str(out), "--epochs", str(epochs),
               "--steps-per-epoch", str(per_epoch), "--batch-size", str(batch), "--no-ten-crop", "--no-verify-shards",
               "--log-every", str(max(1, per_epoch // 4)), "--checkpoint-minutes", "1000", *flags]
        started = time.perf_counter()
        name = f"training, first epoch ({per_epoch} steps), {label}" + ("" if gpu else " (CPU)")
        try:
            result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            rows.append((name, batch, f"failed: still running after {LIMIT_S} s"))
            continue
        if result.returncode:
            rows.append((name, batch, f"failed ({result.returncode}): {result.stderr.strip().splitlines()[-1][:200]}"))
            continue
        with open(out / "metrics.jsonl") as f:
            metrics = [json.loads(line) for line in f]
        epoch_figures = [m for m in metrics if m["kind"] == "epoch"]
        first, last = epoch_figures[0], epoch_figures[-1]
        windows = [m for m in metrics if m["kind"] == "step" and m["epoch"] == last["epoch"]]
        rows += [(name, batch, first["img_s"]),
                 (f"training, last epoch, {label}", batch, last["img_s"]),
                 (f"training, data wait (share of step time), last epoch, {label}", batch,
                  f"{100 * last['data_wait']:.1f}%"),
                 (f"training, data wait by quarter of the last epoch, {label}", batch,  # where in an epoch it waits
                  " / ".join(f"{100 * m['data_wait']:.1f}%" for m in windows)),
                 (f"training, wall time of {epochs} epochs, {label}", batch, f"{time.perf_counter() - started:.0f} s")]
    return rows


def gpu_tests() -> dict:
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                                cwd=REPO, capture_output=True, text=True, timeout=LIMIT_S)
    except subprocess.TimeoutExpired as e:
        return {"exit_status": None, "tail": f"still running after {LIMIT_S} s: {(e.stdout or b'')[-3000:]!r}"}
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", result.stdout)}
    return {"exit_status": result.returncode, **counts, "tail": (result.stdout + result.stderr)[-3000:]}


def markdown(report) -> str:
    env = report["environment"]
    lines = [f"# gpu-check, {report['date']}", "",
             f"GPU: {', '.join(env['gpus'])}; {env['cpu_cores']} CPU cores; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), ""]
    if "gpu_tests" in report:
        t = report["gpu_tests"]
        if {"passed", "failed", "skipped", "error", "errors"} & set(t):
            lines += [f"gpu tests: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                      f"{t.get('errors', t.get('error', 0))} errors, {t.get('skipped', 0)} skipped", ""]
        else:  # pytest missing, or no test collected: its last line says which
            last = (t["tail"].strip().splitlines() or [""])[-1]
            lines += [f"gpu tests: did not run (pytest's exit status {t['exit_status']}): {last}", ""]
    lines += [f"**headline: train_pipeline / model = {report['headline']}**", "",
              "| figure | batch | img/s |", "| --- | --- | --- |"]
    for name, batch, value in report["rows"]:
        lines.append(f"| {name} | {batch} | {value:,.0f} |" if isinstance(value, float) else f"| {name} | {batch} | {value} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer.gpu_check", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="gpu-check", help="where the report (and the shards it makes) go")
    p.add_argument("--quick", action="store_true", help="tiny sizes and short measurements (CI's check of the CPU parts)")
    p.add_argument("--tests", action=argparse.BooleanOptionalAction, default=True, help="run python -m pytest -m gpu first")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    images, batch_sizes, seconds, steps = (48, [8], 0.2, 2) if args.quick else (4096, [128, 256], 4.0, 300)
    cores = len(os.sched_getaffinity(0))
    folder = Path(args.out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.exit(2, f"gpu-check: cannot write into --out {folder}: {e.strerror or e}\n")
    if gpu:
        torch.backends.cudnn.benchmark = True  # the trainer's input shape is fixed
    started = time.perf_counter()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "gpu": gpu, "environment": environment()}
    print(f"gpu-check: {report['environment']['gpus'][0]}, {cores} cores, into {folder}", flush=True)
    report["rows"] = []

    def save():  # after each section: a run cut short still leaves what it measured
        first = {name: value for name, batch, value in report["rows"] if batch == batch_sizes[0]}
        pipe, model = first.get("train_pipeline"), first.get("model: torch.compile" if gpu else "model: fp32, eager")
        both = isinstance(pipe, float) and isinstance(model, float)
        report["headline"] = f"{pipe / model:.2f}" if both else "not measured"
        (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (folder / "report.md").write_text(markdown(report))

    if args.tests:
        report["gpu_tests"] = gpu_tests()
    shards = make_shards(folder, images, processes=cores)
    for section in (lambda: pipeline_rows(shards, gpu, batch_sizes, seconds, cores),
                    lambda: model_rows(gpu, batch_sizes, seconds),
                    lambda: training_rows(shards, folder, gpu, steps, batch_sizes[0])):
        report["rows"] += section()
        save()
        print(f"gpu-check: {len(report['rows'])} rows, {time.perf_counter() - started:.0f} s", flush=True)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
