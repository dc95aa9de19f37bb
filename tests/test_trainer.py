"""python -m trainer.run on generated shards, on the CPU: learning, crash and resume, its run folder."""
import json
import os
import shutil
import signal
import subprocess
import sys

import cv2
import pytest
import torch
from PIL import Image

from conftest import REPO, make_tree, preprocess, wait_for

QUICK = ["--init", "torch", "--optimizer", "adam", "--lr", "1e-4"]  # the demo's quick recipe


def train(shards, out, *args, check=True, timeout=600):
    cmd = [sys.executable, "-m", "trainer.run", "--shards", str(shards), "--out", str(out), *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stderr[-5000:]}")
    return result


def metrics(out, kind):
    with open(out / "metrics.jsonl") as f:
        return [m for m in map(json.loads, f) if m["kind"] == kind]


def test_overfits_a_tiny_set(tmp_path, ray_head):
    tiny = tmp_path / "shards"
    preprocess(make_tree(tmp_path / "tree", train=3, val=1), tiny, address=ray_head)  # 9 images, 3 classes
    out = tmp_path / "run"
    train(tiny, out, "--epochs", 35, "--batch-size", 9, "--no-augment", "--dropout", 0, "--no-ten-crop",
          "--log-every", 1, "--lr-patience", 100, *QUICK)  # a constant lr
    losses = [m["loss"] for m in metrics(out, "step")]
    assert len(losses) == 35 and losses[0] > 0.9  # ~ln 3 for 3 classes
    assert min(losses[-5:]) < 0.1 and losses[-1] < 0.25, losses  # from ln 3; Adam wobbles near zero

    images = sorted((tmp_path / "tree" / "train").glob("*/*"))
    (tmp_path / "broken.JPEG").write_bytes(b"\xff\xd8\xff" + b"\0" * 100)
    cmd = [sys.executable, "-m", "trainer.predict", "--checkpoint", out / "checkpoint.pt", *images, tmp_path / "broken.JPEG"]
    result = subprocess.run([*map(str, cmd)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and f"{tmp_path / 'broken.JPEG'}: not predicted: " in result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert len(lines) == 9  # the broken file stopped nothing
    for image in images:  # the overfit net names the class of each of its training images, first
        first, probability = lines[str(image)].split(", ")[0].split()
        assert first == image.parent.name and float(probability) > 0.5, lines[str(image)]


def losses_by_step(out):
    return {m["step"]: m["loss"] for m in metrics(out, "step")}  # a re-run step's later line wins


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_losses(shards, tmp_path):
    args = ["--epochs", 2, "--batch-size", 4, "--steps-per-epoch", 4, "--log-every", 1,
            "--checkpoint-minutes", 0, "--no-ten-crop"]
    clean = tmp_path / "clean"
    train(shards, clean, *args)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "trainer.run", "--shards", str(shards), "--out", str(out), *map(str, args)]
    job = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "checkpoint.pt").exists() or job.poll() is not None, timeout=300)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and 0 < state["epoch_step"] < 4, "killed mid-epoch 1"

    result = train(shards, out, *args, "--resume")
    assert f"resumed {out} at epoch 1 step {state['epoch_step']}" in result.stderr
    expected, got = losses_by_step(clean), losses_by_step(out)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    assert got == expected  # the same batches, the same dropout masks, the same weights


def test_a_short_run_writes_its_run_folder(shards, tmp_path):
    out = tmp_path / "run"
    result = train(shards, out, "--epochs", 1, "--batch-size", 8, "--log-every", 1)
    assert "epoch 1 step 3/3: loss" in result.stderr and "data wait" in result.stderr
    assert "ten-crop: val top-1 error" in result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 0.01 and config["momentum"] == 0.9 and config["weight_decay"] == 5e-4
    assert config["batch_size"] == 8 and config["init"] == "paper" and len(config["git_commit"]) == 40
    steps, (epoch,), (final,) = metrics(out, "step"), metrics(out, "epoch"), metrics(out, "final")
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert {"loss", "lr", "img_s", "data_wait"} <= set(steps[0])
    assert {"top1", "top5", "data_wait", "train_loss", "lr"} <= set(epoch) and 0 <= epoch["data_wait"] < 1
    assert 0 <= final["top1_ten_crop"] <= 1
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and set(state) >= {"model", "optimizer", "scheduler", "rng", "loader"}
    for png in ("kernels.png", "curves.png"):
        assert Image.open(out / png).info["Software"].startswith("Matplotlib"), png
    assert cv2.imread(str(out / "kernels.png")).shape[0] > 100

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(out))
    board.Reload()
    scalars = {tag: board.Scalars(tag) for tag in board.Tags()["scalars"]}
    assert [e.step for e in scalars["train/loss"]] == [1, 2, 3]  # float32 in the events
    assert [e.value for e in scalars["train/loss"]] == pytest.approx([m["loss"] for m in steps], rel=1e-6)
    assert {"train/lr", "train/img_s", "train/data_wait", "val/top5_error", "val/top1_error_ten_crop"} <= set(scalars)
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in scalars["val/top1_error"]] == [(1, epoch["top1"])]
    assert board.Tags()["images"] == ["conv1/kernels"] and len(board.Images("conv1/kernels")) == 1
    assert "_hparams_/experiment" in board.PluginTagToContent("hparams")

    def evaluate(*args):
        cmd = [sys.executable, "-m", "trainer.evaluate", "--checkpoint", out / "checkpoint.pt", "--shards", shards]
        result = subprocess.run([*map(str, cmd), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    total = json.loads((shards / "manifest.json").read_text())["splits"]["val"]["samples"]
    centre, ten = evaluate(), evaluate("--ten-crop")
    assert f"top-1 error {100 * epoch['top1']:.2f}% ({round(epoch['top1'] * total)} of {total})" in centre
    assert f"top-5 error {100 * epoch['top5']:.2f}% ({round(epoch['top5'] * total)} of {total})" in centre
    assert f"top-1 error {100 * final['top1_ten_crop']:.2f}% ({round(final['top1_ten_crop'] * total)} of" in ten
    if epoch["top1"]:
        assert "most often confused (true -> predicted):" in centre

    other = train(shards, out, "--epochs", 2, "--batch-size", 4, "--resume", check=False)
    assert other.returncode == 2 and "was trained with --batch-size 8, not 4" in other.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    result = train(shards, out, "--epochs", 3, "--batch-size", 4, "--lr", 1e12, "--log-every", 1,
                   "--checkpoint-minutes", 0, "--no-ten-crop", check=False)
    assert result.returncode == 1
    assert "the training loss (or a weight) is" in result.stderr and "last good checkpoint" in result.stderr
    if (out / "checkpoint.pt").exists():
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("args, message", [
    (["--shards", "/nonexistent/shards"], "does not exist: make shards with"),
    (["--shards", "SHARDS", "--warmup", "3"], "unrecognized arguments: --warmup"),
    (["--shards", "SHARDS", "--optimizer", "lamb"], "--optimizer must be one of"),
    (["--shards", "SHARDS", "--workers", "3"], "--batch-size 128 is the global batch and must split evenly over 3"),
    (["--shards", "SHARDS", "--workers", "64"], "64 workers with {'CPU': 1} each do not fit in the cluster's"),
])
def test_refuses_bad_input_with_a_message(shards, args, message):
    args = [str(shards) if a == "SHARDS" else a for a in args]
    result = subprocess.run([sys.executable, "-m", "trainer.run", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr


def flip_jpeg_bytes(tar, count=5):
    """16 bytes inside each of the first `count` JPEGs of a shard: its size stays, its sha256 does not."""
    from pipeline.shards import iter_samples

    data = bytearray(tar.read_bytes())
    for _, files in list(iter_samples(tar))[:count]:
        at = data.find(files["jpg"]) + len(files["jpg"]) // 2
        data[at:at + 16] = bytes(255 - b for b in data[at:at + 16])
    tar.write_bytes(bytes(data))


def test_a_damaged_shard_is_refused_before_the_first_step(shards, tmp_path):


    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    flip_jpeg_bytes(folder / "train-000001.tar")
    args = ["--epochs", 1, "--batch-size", 4, "--steps-per-epoch", 1, "--no-ten-crop"]
    result = train(folder, tmp_path / "run", *args, check=False)
    assert result.returncode == 2 and "step" not in result.stderr
    assert "do not match their sha256 in the manifest" in result.stderr and "train-000001.tar" in result.stderr
    assert f"Run the preprocessing into {folder} again" in result.stderr and "Traceback" not in result.stderr

    skipped = train(folder, tmp_path / "unchecked", *args, "--no-verify-shards")  # for those who verify elsewhere
    assert "sha256" not in skipped.stderr and "epoch 1: train loss" in skipped.stderr


def test_shards_without_val_train_on_the_training_loss(tmp_path, ray_head):
    tiny = tmp_path / "shards"
    src = make_tree(tmp_path / "tree", train=3, val=0)
    shutil.rmtree(src / "val")
    preprocess(src, tiny, address=ray_head)
    out = tmp_path / "run"
    result = train(tiny, out, "--epochs", 2, "--batch-size", 4, "--log-every", 1)
    assert result.stderr.count("has no val split: training without validation") == 1
    assert "epoch 2: train loss" in result.stderr and "no val split" in result.stderr
    assert "ten-crop" not in result.stderr and "Traceback" not in result.stderr
    assert [m["top1"] for m in metrics(out, "epoch")] == [None, None]
