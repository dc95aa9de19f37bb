"""python -m trainer.run on generated shards, on the CPU: learning, crash and resume, its run folder."""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, make_tree, numpy_errors, preprocess, wait_for



def train(shards, out, *args, check=True, timeout=600):
    cmd = [sys.executable, "-m", "trainer.run", "--shards", str(shards), "--out", str(out), *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stderr[-5000:]}")
    return result


def start(shards, out, *args, env=None):
    """The trainer in the background, its output in out.log; -> (Popen, log path)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    cmd = [sys.executable, "-m", "trainer.run", "--shards", str(shards), "--out", str(out), *map(str, args)]
    with open(log, "w") as f:
        job = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, **(env or {})})
    return job, log


def held(pid):
    """Whether every thread of pid has stopped: SIGSTOP takes effect as each thread leaves its system call, so
    a write under way when it is sent still lands after send_signal returns."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            states.append(Path(task, "stat").read_text().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return all(state == "T" for state in states)


def kill_group(job):
    """SIGKILL whatever is left of a job started by `start` (its session: the job and its children)."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:  # all of it has ended
        pass
    job.wait()


def metrics(out, kind):
    with open(out / "metrics.jsonl") as f:
        return [m for m in map(json.loads, f) if m["kind"] == kind]


# how predict and evaluate name the fitted net's classes: conftest's names, and none for the last class
LABELS = [f"n{i:02d} hue {36 * i} degrees" for i in range(9)] + ["n09"]


def test_overfits_a_tiny_set_and_predict_names_what_the_checkpoint_computes(fitted, tmp_path):
    tree, _, out = fitted
    losses = json.loads((out / "losses.json").read_text())
    assert len(losses) == 30 and losses[0] > 2.1  # ~ln 10 for 10 classes
    assert min(losses) < 0.1, losses  # it learned; Adam may wobble after, so no claim about the last step

    images = sorted((tree / "train").glob("*/*"))
    (tmp_path / "broken.JPEG").write_bytes(b"\xff\xd8\xff" + b"\0" * 100)
    cmd = [sys.executable, "-m", "trainer.predict", "--checkpoint", out / "checkpoint.pt", *images, tmp_path / "broken.JPEG"]
    result = subprocess.run([*map(str, cmd)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and f"{tmp_path / 'broken.JPEG'}: not predicted: " in result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert len(lines) == 20  # the broken file stopped nothing

    # independently: the checkpoint's net on the centre crop, normalised in numpy, its softmax ranked
    from pipeline.images import read_bytes, to_sample
    from trainer.model import AlexNet

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["class_names"] == [f"hue {36 * i} degrees" for i in range(9)] + [""]
    model = AlexNet(10, recipe="torch").eval()
    model.load_state_dict(state["model"])
    mean, std = (np.array(state["normalisation"][k], np.float32) for k in ("mean", "std"))
    for image in images:
        _, rgb = to_sample(read_bytes(image), 256, state["preprocessing"]["quality"])
        x = (rgb[14:241, 14:241].astype(np.float32) / 255 - mean) / std  # (256 - 227) // 2 = 14
        with torch.no_grad():
            p = model(torch.from_numpy(x.transpose(2, 0, 1)[None].copy()))[0].softmax(0).numpy()
        said = [(label, float(v)) for label, v in (entry.rsplit(" ", 1) for entry in lines[str(image)].split(", "))]
        assert said[0][0] == LABELS[p.argmax()]
        assert [v for _, v in said] == pytest.approx(sorted(p.tolist(), reverse=True)[:5], abs=2e-3)  # top 5, in order
        assert all(v == pytest.approx(p[LABELS.index(label)], abs=2e-3) for label, v in said), lines[str(image)]


def losses_by_step(out):
    return {m["step"]: m["loss"] for m in metrics(out, "step")}  # a re-run step's later line wins


# Standardised inputs: at batches this small, the paper's raw inputs at lr 0.01 diverge within a few
# steps (docs/training.md, "The paper's inputs"); these tests are about what happens around the steps.
STABLE = ["--inputs", "standardised"]
STEPS = ["--epochs", 2, "--batch-size", 4, "--steps-per-epoch", 6, "--log-every", 1, "--no-ten-crop", *STABLE]


@pytest.fixture(scope="module")
def clean(shards, tmp_path_factory):
    """Two epochs of 6 steps, nothing in the way: the losses a killed or stopped run must give."""
    out = tmp_path_factory.mktemp("trainer") / "clean"
    train(shards, out, *STEPS)
    assert sorted(losses_by_step(out)) == list(range(1, 13))
    return out


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_losses(shards, clean, tmp_path):
    args = [*STEPS, "--checkpoint-minutes", 0]  # a checkpoint at every logged step
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "trainer.run", "--shards", str(shards), "--out", str(out), *map(str, args)]
    job = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (out / "checkpoint.pt").exists() or job.poll() is not None, timeout=300)
    finally:
        kill_group(job)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and 0 < state["epoch_step"] < 6, "killed mid-epoch 1"
    other = tmp_path / "other"
    shutil.copytree(out, other)

    result = train(shards, out, *STEPS, "--resume")  # without a checkpoint at every step: the same batches
    assert f"resumed {out} at epoch 1 step {state['epoch_step']}" in result.stderr
    assert losses_by_step(out) == losses_by_step(clean)  # the same batches, the same dropout masks, the same weights

    # without Fancy PCA the loader is another DALI graph, which the saved loader state does not fit
    changed = train(shards, other, *STEPS, "--resume", "--fancy-pca-sigma", 0)
    assert (f"{other / 'checkpoint.pt'}'s loader state does not fit this pipeline (another version of it, or "
            f"another --fancy-pca-sigma: " in changed.stderr and "Traceback" not in changed.stderr)
    assert (f"so epoch 1 starts again from its first batch (the {state['epoch_step']} step(s) taken in it stay "
            f"in the weights)") in changed.stderr
    k = state["step"]  # epoch 1's 6 steps again after the k taken, then epoch 2's
    assert sorted(losses_by_step(other)) == list(range(1, k + 13))


def test_a_short_run_writes_its_run_folder(shards, tmp_path):
    out = tmp_path / "run"
    result = train(shards, out, "--epochs", 1, "--batch-size", 8, "--log-every", 1)
    assert "epoch 1 step 3/3: loss" in result.stderr and "data wait" in result.stderr and "device wait" in result.stderr
    assert "ten-crop: val top-1 error" in result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 0.01 and config["momentum"] == 0.9 and config["weight_decay"] == 5e-4
    assert config["batch_size"] == 8 and config["recipe"] == "caffe" and len(config["git_commit"]) == 40
    assert config["inputs"] == "raw"  # the paper's, with Caffe's recipe as with the text's
    steps, (epoch,), (final,) = metrics(out, "step"), metrics(out, "epoch"), metrics(out, "final")
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert {"loss", "lr", "img_s", "data_wait", "device_wait"} <= set(steps[0])
    assert {"top1", "top5", "data_wait", "train_loss", "lr"} <= set(epoch) and 0 <= epoch["data_wait"] < 1
    assert epoch["device_wait"] < 1e-3  # the CPU's step is synchronous: the host never waits for it
    assert 0 <= final["top1_ten_crop"] <= 1
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and set(state) >= {"model", "optimizer", "scheduler", "rng", "loader"}
    pca = json.loads((shards / "pca.json").read_text())
    assert state["normalisation"] == {"inputs": "raw", "mean": pca["mean"], "std": [1 / 255] * 3}
    total = json.loads((shards / "manifest.json").read_text())["splits"]["val"]["samples"]
    wrong = round(epoch["top1"] * total)
    assert f"top-1 error {said(wrong, total)}" in evaluate(out / "checkpoint.pt", shards)  # with the raw inputs too
    for png in ("kernels.png", "curves.png"):
        assert Image.open(out / png).info["Software"].startswith("Matplotlib"), png
    assert cv2.imread(str(out / "kernels.png")).shape[0] > 100

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(out))
    board.Reload()
    scalars = {tag: board.Scalars(tag) for tag in board.Tags()["scalars"]}
    assert [e.step for e in scalars["train/loss"]] == [1, 2, 3]  # float32 in the events
    assert [e.value for e in scalars["train/loss"]] == pytest.approx([m["loss"] for m in steps], rel=1e-6)
    assert {"train/lr", "train/img_s", "train/data_wait", "train/device_wait", "val/top5_error", "val/top1_error_ten_crop"} <= set(scalars)
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in scalars["val/top1_error"]] == [(1, epoch["top1"])]
    assert board.Tags()["images"] == ["conv1/kernels"] and len(board.Images("conv1/kernels")) == 1
    assert "_hparams_/experiment" in board.PluginTagToContent("hparams")

    other = train(shards, out, "--epochs", 2, "--batch-size", 4, "--resume", check=False)
    assert other.returncode == 2 and "was trained with --batch-size 8, not 4" in other.stderr
    (out / "config.json").write_text('{"batch_size": 8,')
    other = train(shards, out, "--epochs", 2, "--batch-size", 8, "--resume", check=False)
    assert other.returncode == 2 and f"--resume: {out / 'config.json'} is damaged (" in other.stderr
    assert "Traceback" not in other.stderr


def evaluate(checkpoint, shards, *args) -> str:
    """python -m trainer.evaluate's output."""
    cmd = [sys.executable, "-m", "trainer.evaluate", "--checkpoint", checkpoint, "--shards", shards, *args]
    result = subprocess.run([*map(str, cmd)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def said(wrong, total):
    """How trainer.evaluate prints a count of `wrong` of `total`."""
    return f"{100 * wrong / total:.2f}% ({wrong} of {total})"


def test_the_trainers_val_errors_and_evaluates_are_numpys(fitted):
    """A net whose predictions vary, on ten classes: the trainer's own val errors (centre crop, as at
    an epoch's end, and ten-crop, as at the run's) and trainer.evaluate's on its checkpoint, each
    against numpy's count over the logits."""
    _, shards, out = fitted
    expected = numpy_errors(out / "checkpoint.pt", shards)
    total = expected["total"]
    assert total == 20 and len(set(expected["predicted"].tolist())) >= 5  # not one class for every image
    logged = json.loads((out / "errors.json").read_text())
    assert logged["centre"][2] == len(set(expected["predicted"].tolist()))  # the classes some image's top-1 was
    for crop, args in (("centre", []), ("ten", ["--ten-crop"])):
        wrong1, wrong5 = expected[crop]
        assert 0 < wrong5 < wrong1 < total, crop  # counts that a wrong count would show
        assert logged[crop][:2] == pytest.approx([wrong1 / total, wrong5 / total], abs=1e-12), crop
        printed = evaluate(out / "checkpoint.pt", shards, *args)
        assert f"top-1 error {said(wrong1, total)}, top-5 error {said(wrong5, total)}" in printed, crop
        confused = printed.split("(true -> predicted):\n")[1].splitlines()
        assert confused and all(set(re.fullmatch(r" +\d+  (.+) -> (.+)", line).groups()) <= set(LABELS)
                                for line in confused), printed  # by name where the class has one


def test_without_dali_evaluate_says_what_to_install_in_one_line(fitted, tmp_path):
    _, shards, out = fitted
    planted = tmp_path / "nvidia" / "dali"  # found before the installed DALI: as if it were missing or broken
    planted.mkdir(parents=True)
    (planted.parent / "__init__.py").write_text("")
    (planted / "__init__.py").write_text("raise ImportError('No module named nvidia.dali')\n")
    cmd = [sys.executable, "-m", "trainer.evaluate", "--checkpoint", out / "checkpoint.pt", "--shards", shards]
    result = subprocess.run([*map(str, cmd)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "NVIDIA DALI does not import (No module named nvidia.dali): pip install 'alexnet-pipeline[cuda130]'" in line


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    result = train(shards, out, "--epochs", 3, "--batch-size", 4, "--lr", 1e12, "--log-every", 1,
                   "--checkpoint-minutes", 0, "--no-ten-crop", check=False)
    assert result.returncode == 1
    assert "the training loss (or a weight) is" in result.stderr and "last good checkpoint" in result.stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # step 1's: its loss was finite, its weights too
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert "is inf at epoch 1 step 2" in result.stderr or "is nan at epoch 1 step 2" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--shards", "/nonexistent/shards"], "does not exist: make shards with"),
    (["--shards", "SHARDS", "--warmup", "3"], "unrecognized arguments: --warmup"),
    (["--shards", "SHARDS", "--optimizer", "lamb"], "argument --optimizer: invalid choice: 'lamb'"),
    (["--shards", "SHARDS", "--inputs", "scaled"], "argument --inputs: invalid choice: 'scaled'"),
    (["--shards", "SHARDS", "--log-every", "0"], "--log-every must be 1 or more, not 0"),
    (["--shards", "SHARDS", "--lr", "-0.01"], "--lr must be 0 or more, not -0.01"),
    (["--shards", "SHARDS", "--momentum", "nan"], "--momentum must be 0 or more, not nan"),
    (["--shards", "SHARDS", "--lr-factor", "10"], "--lr-factor must be below 1, not 10.0"),
    (["--shards", "SHARDS", "--dropout", "1"], "--dropout must be below 1, not 1.0"),
    (["--shards", "SHARDS", "--hw-decoder-load", "1.5"], "--hw-decoder-load must be 1 or less, not 1.5"),
    (["--shards", "SHARDS", "--prefetch-queue-depth", "0"], "--prefetch-queue-depth must be 1 or more, not 0"),
    (["--shards", "SHARDS", "--compile-mode", "max-autotune"], "argument --compile-mode: invalid choice"),
    (["--shards", "SHARDS", "--workers", "2", "--compile-mode", "reduce-overhead"],
     "--compile-mode reduce-overhead (CUDA graphs) is for one process"),
    (["--shards", "SHARDS", "--out", "README.md"], "cannot write into --out " + str(REPO / "README.md") + ": it is a file"),
    (["--shards", "SHARDS", "--workers", "2", "--address", "127.0.0.1:1"],
     "no Ray cluster answers at 127.0.0.1:1 (Connection refused): start one there"),
    (["--shards", "SHARDS", "--workers", "3"], "--batch-size 128 is the global batch and must split evenly over 3"),
    (["--shards", "SHARDS", "--workers", "64"], "64 workers with {'CPU': 1} each do not fit in the cluster's"),
])
def test_refuses_bad_input_with_a_message(shards, args, message, tmp_path):
    out = tmp_path / "run"
    args = [str(shards) if a == "SHARDS" else a for a in args] + ([] if "--out" in args else ["--out", str(out)])
    result = subprocess.run([sys.executable, "-m", "trainer.run", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr
    assert not out.exists()  # a refused run leaves no run folder behind, even one Ray refused


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


def test_shards_without_val_divide_the_lr_when_the_training_loss_stops_improving(tmp_path, ray_head):
    tiny = tmp_path / "shards"
    src = make_tree(tmp_path / "tree", train=3, val=0)
    shutil.rmtree(src / "val")
    preprocess(src, tiny, address=ray_head)
    out = tmp_path / "run"
    # an lr too small to move the weights (yet large enough that torch applies a tenth of it), no
    # momentum, dropout or augmentation: every epoch's training loss is the first one's (the same images
    # through the same net, in other batches), a plateau from epoch 2 on
    result = train(tiny, out, "--epochs", 3, "--batch-size", 4, "--log-every", 1, "--lr", 1e-6, "--lr-patience", 1,
                   "--recipe", "torch", "--momentum", 0, "--dropout", 0, "--no-augment")
    assert result.stderr.count("has no val split: training without validation") == 1
    assert "epoch 3: train loss" in result.stderr and "no val split" in result.stderr
    assert "ten-crop" not in result.stderr and "Traceback" not in result.stderr
    epochs = metrics(out, "epoch")
    assert [m["top1"] for m in epochs] == [None, None, None]
    losses = [m["train_loss"] for m in epochs]
    assert losses[1:] == pytest.approx(losses[:1] * 2, rel=5e-5)  # float32 rounding of other batchings: no
    # improvement by the schedule's measure for a loss (1e-4 relative)
    assert [m["lr"] for m in epochs] == pytest.approx([1e-6, 1e-7, 1e-8], rel=1e-9)  # divided on each plateau


def test_a_run_holds_its_folder_and_a_sigterm_stops_it_with_a_checkpoint_that_resumes_exactly(shards, clean,
                                                                                               tmp_path):
    out = tmp_path / "stopped"
    job, log = start(shards, out, *STEPS)  # no timed checkpoint in the run's first 10 minutes
    try:
        wait_for(lambda: "epoch 1 step 1/6" in log.read_text() or job.poll() is not None, timeout=300)
        job.send_signal(signal.SIGSTOP)  # held where it is while a second trainer tries its folder: no race
        wait_for(lambda: held(job.pid), timeout=30)
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        for args in ([], ["--resume"]):
            second = train(shards, out, *STEPS, *args, check=False)
            assert second.returncode == 2 and f"{out} is in use by pid {job.pid} on " in second.stderr, second.stderr
            assert "Traceback" not in second.stderr
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing of the first touched
        job.send_signal(signal.SIGCONT)

        wait_for(lambda: "epoch 1 step 2/6" in log.read_text() or job.poll() is not None, timeout=300)
        job.send_signal(signal.SIGTERM)  # to the trainer alone, as Kubernetes sends it
        assert job.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        kill_group(job)
    text = log.read_text()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and 2 <= state["epoch_step"] < 6, "stopped mid-epoch 1, after the step under way"
    assert (f"stopped by SIGTERM at epoch 1 step {state['epoch_step']}/6: the checkpoint is {out}/checkpoint.pt; "
            f"continue with the same command and --resume") in text and "Traceback" not in text
    assert not (out / ".lock").exists()  # the lock goes with the run

    result = train(shards, out, *STEPS, "--resume")
    assert f"resumed {out} at epoch 1 step {state['epoch_step']}" in result.stderr
    assert losses_by_step(out) == losses_by_step(clean) and sorted(losses_by_step(out)) == list(range(1, 13))
    # the epoch's loss is the mean over all its steps, those before the stop included
    assert [m["train_loss"] for m in metrics(out, "epoch")] == [m["train_loss"] for m in metrics(clean, "epoch")]
    steps = [m["loss"] for m in metrics(clean, "step")]
    assert metrics(clean, "epoch")[0]["train_loss"] == pytest.approx(sum(steps[:6]) / 6, rel=1e-9)


def test_a_second_signal_stops_at_once_unless_it_echoes_the_first():
    code = """if True:
        import os, signal, time
        from trainer.stop import ECHO_S, StopRequest
        stop = StopRequest()
        stop.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.asked and stop.signal == signal.SIGTERM and stop.exit_status == 143
        os.kill(os.getpid(), signal.SIGINT)  # within ECHO_S: the same request, passed on by a launcher
        print("asked and still running", flush=True)
        time.sleep(ECHO_S)
        os.kill(os.getpid(), signal.SIGINT)
        print("not stopped")
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGINT and result.stdout == "asked and still running\n", result.stderr
    assert "SIGTERM: stopping after this step with a checkpoint" in result.stderr


def in_small_disk(size_mb, folder, script):
    """Run the shell `script` with a tmpfs of size_mb mounted on `folder`, seen by it alone (a mount
    namespace of its own: no root needed where user namespaces are allowed); -> CompletedProcess."""
    if subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -Urm` (user and mount namespaces) to mount a small tmpfs")
    folder.mkdir(parents=True, exist_ok=True)
    wrapped = f"mount -t tmpfs -o size={size_mb}m tmpfs {folder} && {script}"
    return subprocess.run(["unshare", "-Urm", "sh", "-c", wrapped], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_a_run_folder_without_room_for_two_checkpoints_is_refused_before_the_first_step(shards, tmp_path):
    out = tmp_path / "small"
    result = in_small_disk(64, out, f"{sys.executable} -m trainer.run --shards {shards} --out {out} {' '.join(map(str, STEPS))}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(rf"{out} has room for [\d,]+ bytes of checkpoints, and the two this run keeps need about "
                     r"[\d,]+: free some space or give --out a larger disk", result.stderr), result.stderr[-3000:]
    assert "step 1" not in result.stderr


def test_a_disk_that_fills_during_the_run_fails_the_checkpoint_cleanly_and_keeps_the_last_good_one(shards, tmp_path):
    out = tmp_path / "filling"
    trainer = (f"{sys.executable} -m trainer.run --shards {shards} --out {out} --epochs 1 --batch-size 4 "
               f"--steps-per-epoch 6 --log-every 1 --checkpoint-minutes 0 --no-ten-crop {' '.join(STABLE)}")
    # room for two checkpoints at the start; once the first is there, 300 MB of other files fill the disk
    script = (f"{trainer} & pid=$!; until [ -e {out}/checkpoint.pt ]; do sleep 0.05; done; kill -STOP $pid; "
              f"head -c 300M /dev/zero > {out}/other-files; kill -CONT $pid; wait $pid; echo exit $?; "
              f"ls -a {out}; {sys.executable} -c 'import torch; print(\"epoch_step\", torch.load(\"{out}/checkpoint.pt\", "
              f"weights_only=True)[\"epoch_step\"])'")
    result = in_small_disk(1000, out, script)
    assert "exit 1" in result.stdout and "Traceback" not in result.stderr, result.stdout + result.stderr[-3000:]
    line = next(line for line in result.stderr.splitlines() if "could not write a checkpoint" in line)
    needed, free = map(lambda s: int(s.replace(",", "")), re.search(
        rf"could not write a checkpoint in {out}: it needs ([\d,]+) bytes and ([\d,]+) are free", line).groups())
    assert free < needed and "the last good checkpoint, " in line and "then continue with --resume" in line
    files = result.stdout.split()
    assert ".checkpoint.pt.tmp" not in files and "checkpoint.pt" in files
    assert re.search(r"epoch_step [1-5]\b", result.stdout)  # a whole checkpoint from before the disk filled


def test_a_damaged_checkpoint_is_named_and_the_one_before_it_taken(shards, tree, tmp_path):
    out = tmp_path / "run"
    args = ["--batch-size", 4, "--steps-per-epoch", 1, "--no-ten-crop"]
    train(shards, out, "--epochs", 2, *args)
    latest, previous = out / "checkpoint.pt", out / "checkpoint-previous.pt"
    assert [torch.load(p, weights_only=True)["epoch"] for p in (latest, previous)] == [2, 1]
    data = latest.read_bytes()
    latest.write_bytes(data[:len(data) // 2])  # truncated, as by a copy cut short

    image = next(tree.glob("train/*/*.JPEG"))
    for tool, extra in (("trainer.evaluate", ["--shards", shards]), ("trainer.predict", [image])):
        cmd = [sys.executable, "-m", tool, "--checkpoint", latest, *extra]
        result = subprocess.run([*map(str, cmd)], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert f"{latest} is damaged (" in result.stderr and (f"the one before it, {previous} (epoch 2, step 0 of "
                                                              f"it), is good: use it instead") in result.stderr

    resumed = train(shards, out, "--epochs", 3, *args, "--resume")
    assert f"{latest} is damaged (" in resumed.stderr
    assert f"resuming from the checkpoint before it (epoch 2, step 0 of it), now {latest}" in resumed.stderr
    assert [m["epoch"] for m in metrics(out, "epoch")] == [1, 2, 2, 3]  # epoch 2 again, from the older checkpoint
    assert (out / "checkpoint.pt.damaged").read_bytes() == data[:len(data) // 2]
    assert [torch.load(p, weights_only=True)["epoch"] for p in (latest, previous)] == [3, 2]

    for path in (latest, previous):
        path.write_bytes(b"not a checkpoint")
    result = train(shards, out, "--epochs", 4, *args, "--resume", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{latest} is damaged" in result.stderr and "nothing to resume from; train again in a new --out" in result.stderr
    assert f"{latest} is damaged (not a checkpoint's pickle: " in result.stderr and "weights_only" not in result.stderr


def test_help_says_what_each_flag_does_its_default_and_choices():
    result = subprocess.run([sys.executable, "-m", "trainer.run", "--help"], cwd=REPO, capture_output=True, text=True)
    text = " ".join(result.stdout.split())  # as wide as the terminal: compare words, not lines
    assert result.returncode == 0 and text.startswith("usage: python -m trainer.run")
    assert ("--lr-patience LR_PATIENCE epochs in a row without a val error better than the best by more than its "
            "noise before the lr is cut (trainer/schedule.py) (default: 2)") in text
    assert "--recipe {paper,cuda-convnet2,caffe,torch}" in text and "caffe (bvlc_alexnet)" in text
    assert "(default: caffe)" in text
    assert "--optimizer {sgd,adam} sgd (section 5) or adam (default: sgd)" in text
    assert "--ten-crop, --no-ten-crop at the end: ten-crop top-1/top-5 error (section 4.1) (default: on)" in text
    from trainer.config import Config, field_help
    assert set(field_help()) == {f.name for f in dataclasses.fields(Config)}  # every field has its comment


def test_paths_are_absolute_and_refused_relative_inside_a_ray_job(tmp_path, monkeypatch, capsys):
    from trainer.config import parse_args

    monkeypatch.chdir(tmp_path)
    config = parse_args(["--shards", "shards", "--out", "runs/a"])
    assert (config.shards, config.out) == (str(tmp_path / "shards"), str(tmp_path / "runs/a"))
    job_copy = tmp_path / "session/runtime_resources/working_dir_files/_ray_pkg_0"
    job_copy.mkdir(parents=True)
    monkeypatch.chdir(job_copy)
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--shards", "/data/shards", "--out", "runs/a"])
    assert stopped.value.code == 2
    assert "--out runs/a is relative to the job's copy of the working dir, which Ray deletes" in capsys.readouterr().err


def test_a_model_that_does_not_compile_runs_eager_after_one_warning(monkeypatch, caplog):
    """Where torch.compile fails (an old GPU, no C compiler for Triton), the trainer's step runs eager.
    Planted: a C++ compiler that is not there, which inductor needs on the CPU as Triton needs its C one."""
    import torch._inductor.config

    from trainer.loop import Compiled

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    net, x = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()), torch.randn(3, 4)  # a kernel to generate
    step = Compiled(net)
    with caplog.at_level("WARNING", logger="trainer"):
        outputs = [step(x), step(x)]
    assert all(torch.equal(out, net(x)) for out in outputs) and step.compiled is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "trainer"]
    assert len(warnings) == 1 and re.match(r"torch\.compile failed \(.*InvalidCxxCompiler.*\): the model runs eager",
                                           warnings[0]), warnings


def test_the_uint8_hand_over_trains_as_the_float_one(local_shards, tmp_path):
    """The same seed, the same steps: the step normalising the uint8 crops (Fancy PCA's offsets in their
    means) gives the float hand-over's losses, to float32's rounding on the CPU."""
    from trainer.config import Config
    from trainer.loop import Trainer

    losses = {}
    for uint8 in (False, True):
        trainer = Trainer(Config(shards=str(local_shards), out=str(tmp_path / f"uint8-{uint8}"), batch_size=4,
                                 recipe="torch", optimizer="adam", lr=1e-4, device="cpu", verify_shards=False,
                                 uint8_handover=uint8, dali_threads=2 if uint8 else 0))
        # DALI's threads: all the cores on the CPU by default (the step's cores minus two on CUDA), or as asked
        assert trainer.loader_options["num_threads"] == (2 if uint8 else len(os.sched_getaffinity(0)))
        batches = [next(trainer.batches) for _ in range(2)]
        assert [len(b) for b in batches] == [3 if uint8 else 2] * 2 and batches[0][0].dtype == (
            torch.uint8 if uint8 else torch.float32)
        losses[uint8] = [trainer.train_step(*batch).item() for batch in batches]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
