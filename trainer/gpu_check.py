"""One command that measures the whole GPU side and writes one report.

    make gpu-check                       # the same as: python -m trainer.gpu_check --out gpu-check
    python -m trainer.gpu_check --quick  # seconds, not minutes: what CI runs, on its CPU

It needs a checkout, torch (with CUDA for the GPU rows) and DALI; no Ray (the shards are made
in-process), no network. It writes OUT/report.json and OUT/report.md and prints the table:

  environment  the GPU (nvidia-smi's name), its driver, the CPU cores, the versions
  gpu tests    python -m pytest -m gpu: how many passed, failed, were skipped
  pipeline     on shards it makes (ImageNet-shaped: 256 x 256 baseline JPEGs), batch 128: decode_only
               (nvJPEG, DALI's "mixed"), train_pipeline (build_loader on the GPU), cpu_decode (the same
               pipeline on the CPU), DALI threads at 1, 4, the cores minus two and all cores, the uint8
               hand-over
  model        AlexNet's training step alone, img/s: torch.compile, CUDA graphs (torch.compile's
               "reduce-overhead"), fp32 eager on the CPU; and compiled beside the pipeline, which runs
               on the same GPU with its batches thrown away (what sharing the device costs the step)
  training     the real loop (python -m trainer.run), 4 epochs of 28 steps, at the defaults and under
               each option alone (all cores for DALI, hw_decoder_load 1, the uint8 hand-over, CUDA
               graphs), then the options that beat the defaults together; each row: img/s over the last
               half of the epochs without each epoch's first quarter (after the val pass and the
               checkpoint, given apart), its share of the step alone, the data wait and the device wait
               (trainer/waits.py); with two GPUs, the split net (--gpus 2) beside them
  headline     the defaults' run img/s / the step alone, compiled as the trainer runs it (eager on the
               CPU): at 1 the GPU never waits on anything but the step

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
    for threads in sorted({1, min(4, cores), max(1, cores - 2), cores}):  # cores - 2: the trainer's default on CUDA
        rows.append((f"train_pipeline, {threads} DALI threads", batch, train_pipeline(num_threads=threads)))
    rows.append(("train_pipeline, uint8 hand-over", batch, train_pipeline(uint8=True)))
    return rows


def model_rows(shards, gpu, batch_sizes, seconds) -> list:
    """AlexNet's step alone, compiled and under CUDA graphs on CUDA, eager on the CPU (as the trainer runs
    it there); and the same beside the input pipeline, whose batches it throws away."""
    import itertools

    from pipeline import build_loader
    from trainer.bench import model_rate

    device = "cuda:0" if gpu else "cpu"
    batch = batch_sizes[0]
    rows = [] if gpu else [("model: fp32, eager", batch, measured(model_rate, device, batch, seconds))]
    modes = (("default", "model: torch.compile"), ("reduce-overhead", "model: CUDA graphs (compile reduce-overhead)"))
    rows += [(name, batch, measured(model_rate, device, batch, seconds, compile_mode=mode) if gpu else "no GPU")
             for mode, name in modes]

    def beside():
        loader = build_loader(str(shards), batch_size=batch, device=device, channels_last=gpu,
                              dtype=torch.bfloat16 if gpu else torch.float32)
        return (images for _ in itertools.count() for images, _ in loader)

    rows.append((f"{'model: torch.compile' if gpu else 'model: fp32, eager'}, the pipeline beside it "
                 f"(its batches thrown away)", batch,
                 measured(lambda: model_rate(device, batch, seconds, compile_mode="default" if gpu else None,
                                             beside=beside()))))
    return rows


def training_options(cores) -> list:
    """[(row, trainer.run's flags)]: the training loop under each option that keeps the pipeline out of the
    step's way (docs/benchmarks.md, "On a GPU"), each alone against the defaults."""
    return [("defaults", []), (f"DALI threads {cores} (all cores)", ["--dali-threads", str(cores)]),
            ("hw_decoder_load 1", ["--hw-decoder-load", "1"]), ("uint8 hand-over", ["--uint8-handover"]),
            ("CUDA graphs", ["--compile-mode", "reduce-overhead"])]


def training_run(shards, out, flags, steps, batch) -> dict | str:
    """python -m trainer.run for about `steps` steps of the default recipe (whole epochs of the shards),
    compiled on the GPU as the trainer runs; -> its figures, or why it failed. steady: the last half of
    the epochs without each epoch's first quarter, which follows the val pass and the checkpoint
    (`first_quarter`, apart); img/s, data wait and device wait pooled over those windows' time."""
    from pipeline.manifest import read_manifest

    per_epoch = min(steps, -(-read_manifest(shards)["splits"]["train"]["samples"] // batch))  # the loader's epochs
    epochs = -(-steps // per_epoch)
    every = max(1, per_epoch // 4)
    cmd = [sys.executable, "-m", "trainer.run", "--shards", str(shards), "--out", str(out), "--epochs", str(epochs),
           "--steps-per-epoch", str(per_epoch), "--batch-size", str(batch), "--no-ten-crop", "--no-verify-shards",
           "--log-every", str(every), "--checkpoint-minutes", "1000", *flags]
    started = time.perf_counter()
    try:
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        return f"failed: still running after {LIMIT_S} s"
    if result.returncode:
        return f"failed ({result.returncode}): {result.stderr.strip().splitlines()[-1][:200]}"
    with open(out / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    windows, last = [], {}  # per logged window: epoch, first of its epoch, images, seconds, data wait s, device wait s
    for m in (m for m in metrics if m["kind"] == "step"):
        images = (m["step"] - last.get(m["epoch"], (m["epoch"] - 1) * per_epoch)) * batch
        seconds = images / m["img_s"]
        windows.append((m["epoch"], m["epoch"] not in last, images, seconds, m["data_wait"] * seconds,
                        m["device_wait"] * seconds))
        last[m["epoch"]] = m["step"]
    steady = [w for w in windows if w[0] > epochs // 2 and not w[1]] or [w for w in windows if w[0] == epochs]

    def pooled(ws):  # -> img/s, data wait, device wait over the windows' time
        images, seconds, data, device = (sum(w[i] for w in ws) for i in (2, 3, 4, 5))
        return images / seconds, data / seconds, device / seconds

    img_s, data_wait, device_wait = pooled(steady)
    return {"img_s": img_s, "data_wait": data_wait, "device_wait": device_wait,
            "first_quarter_img_s": pooled([w for w in windows if w[1]])[0],
            "first_epoch_img_s": next(m for m in metrics if m["kind"] == "epoch")["img_s"], "epochs": epochs,
            "steps_per_epoch": per_epoch, "wall_s": time.perf_counter() - started}


def training_rows(shards, folder, gpu, steps, batch, cores, step_alone) -> tuple[list, dict]:
    """The training loop under each option, then under every option that beat the defaults together; with
    two GPUs, the split net (--gpus 2). -> (rows, {row: figures}); step_alone: the step's img/s alone,
    each row's share of it."""
    runs = training_options(cores)
    figures, rows = {}, []
    suffix = "" if gpu else " (CPU)"

    def run(label, flags):
        out = folder / ("run-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-"))
        figures[label] = result = training_run(shards, out, flags, steps, batch)
        if isinstance(result, str):
            rows.append((f"training, {label}{suffix}", batch, result))
            return
        share = f" ({result['img_s'] / step_alone:.2f} of the step alone)" if isinstance(step_alone, float) else ""
        rows.append((f"training, {label}{suffix}", batch,
                     f"{result['img_s']:,.0f} img/s{share}, data wait {100 * result['data_wait']:.1f}%, device wait "
                     f"{100 * result['device_wait']:.1f}%; each epoch's first quarter "
                     f"{result['first_quarter_img_s']:,.0f} img/s; first epoch {result['first_epoch_img_s']:,.0f} "
                     f"img/s; {result['epochs']} epoch(s) of {result['steps_per_epoch']} steps in "
                     f"{result['wall_s']:.0f} s"))

    for label, flags in runs:
        run(label, flags)
    base = figures["defaults"]
    better = [flags for label, flags in runs[1:] if isinstance(base, dict) and isinstance(figures[label], dict)
              and figures[label]["img_s"] > base["img_s"]]
    if len(better) > 1:  # one alone is its own row already
        together = [f for flags in better for f in flags]
        run("best combination: " + " ".join(together), together)
    if gpu and torch.cuda.device_count() >= 2:
        run("--gpus 2", ["--gpus", "2"])
    return rows, figures


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
    lines += [f"**headline: the run's img/s / the step alone = {report['headline']}**", "",
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
    images, batch_sizes, seconds, steps = (48, [8], 0.2, 2) if args.quick else (4096, [128], 4.0, 112)
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

    def step_alone():  # as the trainer runs it: compiled on CUDA, eager on the CPU
        return {name: value for name, _, value in report["rows"]}.get("model: torch.compile" if gpu else
                                                                       "model: fp32, eager")

    def save():  # after each section: a run cut short still leaves what it measured
        run, step = report["training"].get("defaults"), step_alone()
        both = isinstance(run, dict) and isinstance(step, float)
        report["headline"] = f"{run['img_s'] / step:.2f}" if both else "not measured"
        (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (folder / "report.md").write_text(markdown(report))

    def training():
        rows, report["training"] = training_rows(shards, folder, gpu, steps, batch_sizes[0], cores, step_alone())
        return rows

    if args.tests:
        report["gpu_tests"] = gpu_tests()
    shards = make_shards(folder, images, processes=cores)
    report["training"] = {}
    for section in (lambda: pipeline_rows(shards, gpu, batch_sizes, seconds, cores),
                    lambda: model_rows(shards, gpu, batch_sizes, seconds), training):
        report["rows"] += section()
        save()
        print(f"gpu-check: {len(report['rows'])} rows, {time.perf_counter() - started:.0f} s", flush=True)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
