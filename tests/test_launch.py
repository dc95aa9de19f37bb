"""Data-parallel training: DDP against one process, Ray Train (faults, two nodes), torchrun, on the CPU."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import BIN, REPO, free_port, numpy_errors, two_node_cluster, wait_for
from pipeline import storage
from test_trainer import STABLE, kill_group, losses_by_step, metrics, start, train
from trainer.bucket import BucketRun
from trainer.config import Config
from trainer.loop import Trainer

pytestmark = pytest.mark.slow


def exact_config(shards, out):
    """The paper's SGD (momentum, weight decay), no dropout: one step is a function of the batch alone."""
    return Config(shards=str(shards), out=str(out), batch_size=8, dropout=0.0, device="cpu", verify_shards=False)


def step(rank, world, port, shards, out, batch):
    """One training step of replica `rank` of `world` on its share of the batch; saves the weights before and after."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        run = Trainer(exact_config(shards, out / f"run{world}"))
        images, labels = torch.load(batch)
        share = len(labels) // world  # rank r takes the r-th share of the global batch
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        run.train_step(images[rank * share:(rank + 1) * share], labels[rank * share:(rank + 1) * share])
        torch.save((before, run.model.state_dict()), out / f"world{world}-rank{rank}.pt")
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_two_replicas_take_the_step_one_process_takes_with_the_whole_batch(shards, tmp_path):
    from pipeline import build_loader

    images, labels = next(iter(build_loader(shards, "train", batch_size=8, crops="center")))
    torch.save((images, labels), tmp_path / "batch.pt")
    for world in (1, 2):  # in processes of their own: this one stays free of their threads
        mp.spawn(step, args=(world, free_port(), shards, tmp_path, tmp_path / "batch.pt"), nprocs=world)

    before, after = torch.load(tmp_path / "world1-rank0.pt")
    moved = max((after[k] - before[k]).abs().max().item() for k in after)
    assert moved > 1e-3  # the step changed the weights far beyond the tolerance below
    for rank in range(2):  # the replicas start where the one process starts, and end where it ends
        start, state = torch.load(tmp_path / f"world2-rank{rank}.pt")
        for name, value in after.items():
            torch.testing.assert_close(start[name], before[name], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-7, msg=name)


def worker_pids(log):
    """{rank: pid} from the line rank 0 logs when the worker group starts."""
    line = next(line for line in log.read_text().splitlines() if "trainer: workers: " in line)
    return {int(r): int(p) for r, p in re.findall(r"(\d+): pid (\d+)", line.split("trainer: workers: ")[1])}


def kill_worker_mid_epoch(job, log, out, rank=1, after_step=2):
    """SIGKILL worker `rank` once the checkpoint is at least `after_step` steps into epoch 1 and Ray Train's
    controller has registered a checkpoint (its snapshot written: a worker group that replaces this one gets
    it; a kill before that starts the run again); -> its pid."""
    def checkpointed():
        assert job.poll() is None, log.read_text()[-3000:]
        registered = out / "ray-train" / "checkpoint_manager_snapshot.json"
        if not (out / "checkpoint.pt").exists() or not registered.exists():
            return False
        return torch.load(out / "checkpoint.pt", weights_only=True, mmap=True)["epoch_step"] >= after_step

    wait_for(checkpointed, timeout=400, interval=0.5)
    pid = worker_pids(log)[rank]
    os.kill(pid, signal.SIGKILL)
    return pid


ARGS = ["--epochs", 1, "--batch-size", 4, "--steps-per-epoch", 6, "--log-every", 1, "--checkpoint-minutes", 0,
        "--no-ten-crop", *STABLE, "--workers", 2]


TWO_EPOCHS = ["--epochs", 2, *ARGS[2:]]
NO_TIMED_CHECKPOINTS = ["--epochs", 2, "--batch-size", 4, "--steps-per-epoch", 6, "--log-every", 1, "--no-ten-crop",
                        *STABLE, "--workers", 2]  # checkpoints 10 minutes apart: none but the epochs' and the stop's


@pytest.fixture(scope="module")
def clean(shards, tmp_path_factory, ray_head):
    """Two epochs on two Ray Train workers, nothing in the way: the losses the others must give."""
    out = tmp_path_factory.mktemp("launch") / "clean"
    result = train(shards, out, *TWO_EPOCHS, "--address", ray_head)
    assert "workers: 0: pid" in result.stdout + result.stderr
    assert sorted(losses_by_step(out)) == list(range(1, 13))
    return out


def test_ray_train_reports_both_workers_and_checkpoints_both(clean):
    epoch = metrics(clean, "epoch")[-1]
    assert epoch["workers"] == 2 and 0 <= epoch["data_wait"] <= epoch["data_wait_max"] < 1
    state = torch.load(clean / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["loader"]) == len(state["rng"]) == 2


def validate(rank, world, port, shards, checkpoint, out):
    """Rank `rank` of `world` validates a checkpoint's net on its slice of val, centre and ten-crop;
    rank 0 writes the errors from the summed counts."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        run = Trainer(Config(shards=str(shards), out=str(out), batch_size=4, recipe="torch", device="cpu",
                             verify_shards=False))
        run.model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
        errors = {"centre": run.evaluate(run.val_loader), "ten": run.evaluate(run.ten_crop_loader(), ten_crop=True)}
        if rank == 0:
            (out / "errors.json").write_text(json.dumps(errors))
    finally:
        dist.destroy_process_group()


def test_two_ranks_validate_as_numpy_counts(fitted, tmp_path):
    """Validation split over two ranks (10 images each, in batches of 2: the last one partial) gives
    the errors numpy counts over the logits of the whole val split, for a net whose predictions vary."""
    _, shards, out = fitted
    mp.spawn(validate, args=(2, free_port(), shards, out / "checkpoint.pt", tmp_path), nprocs=2)
    expected = numpy_errors(out / "checkpoint.pt", shards)
    got = json.loads((tmp_path / "errors.json").read_text())
    for crop in ("centre", "ten"):
        wrong1, wrong5 = expected[crop]
        assert 0 < wrong5 < wrong1 < expected["total"] == 20
        assert got[crop][:2] == pytest.approx([wrong1 / 20, wrong5 / 20], abs=1e-12), crop
    assert got["centre"][2] == len(set(expected["predicted"].tolist()))  # the classes predicted, over both ranks


def test_ray_train_survives_a_killed_worker_and_resumes_exactly(shards, clean, tmp_path, ray_head):
    out = tmp_path / "killed"
    job, log = start(shards, out, *TWO_EPOCHS, "--address", ray_head)
    try:
        kill_worker_mid_epoch(job, log, out)
        assert job.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        kill_group(job)
    text = log.read_text()
    assert "restarting from the latest checkpoint after a worker failure" in text
    assert re.search(rf"resumed {out} at epoch 1 step [2-5]\b", text)
    # the planned steps, each once, and the restarted workers took the batches the clean run took
    assert losses_by_step(out) == losses_by_step(clean)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_a_run_folder_in_a_bucket_under_ray_train_survives_a_killed_worker_then_torchrun_resumes_it(
        shards, clean, s3, tmp_path, ray_head):
    """The Ray head started before the bucket's keys were in the environment: the driver hands them on."""
    out, log = s3.url("runs", "workers"), tmp_path / "workers.log"
    with open(log, "w") as f:
        job = subprocess.Popen([sys.executable, "-m", "trainer.run", "--shards", str(shards), "--out", out,
                                *map(str, NO_TIMED_CHECKPOINTS), "--address", ray_head],
                               cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # a kill in epoch 2, once Ray Train has registered epoch 1's checkpoint (in the bucket)
        registered = storage.join(out, "ray-train", "checkpoint_manager_snapshot.json")
        wait_for(lambda: job.poll() is None and "epoch 2 step 2/6" in log.read_text() and storage.exists(registered),
                 timeout=400, interval=0.5)
        os.kill(worker_pids(log)[1], signal.SIGKILL)
        assert job.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        kill_group(job)
    text = log.read_text()
    assert "restarting from the latest checkpoint after a worker failure" in text
    assert f"resumed {out} at epoch 2 step 0" in text, text[-3000:]
    kept = storage.listing(out)
    assert {"checkpoint.pt", "checkpoint-previous.pt", "config.json", "metrics.jsonl"} <= kept.keys()
    assert ".lock" not in kept and ".stop" not in kept
    local = tmp_path / "metrics"
    local.mkdir()
    storage.download(storage.join(out, "metrics.jsonl"), local / "metrics.jsonl")
    assert losses_by_step(local) == losses_by_step(clean)  # the restarted group took the batches of the clean run

    torchrun = [BIN / "torchrun", "--standalone", "--nproc-per-node", 2, "-m", "trainer.run", "--shards", shards,
                "--out", out, "--epochs", 3, *NO_TIMED_CHECKPOINTS[2:-2], "--resume"]
    resumed = subprocess.run([*map(str, torchrun)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed {out} at epoch 3 step 0" in resumed.stderr
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(out, "checkpoint.pt"))), weights_only=True)
    assert state["epoch"] == 3 and state["world_size"] == 2
    assert not BucketRun(out, rank=1).local.exists()  # the other rank's copy of the checkpoint, once read
    shutil.rmtree(BucketRun(out).local)  # rank 0's, in this user's cache (the Ray head's workers do not see ours)


def stop_after_step(job, log, pid, after=2):
    """SIGTERM to `pid` once the run has logged step `after` (of the run, counted from 1); -> the job's exit status."""
    epoch, step = divmod(after - 1, 6)
    try:
        wait_for(lambda: f"epoch {epoch + 1} step {step + 1}/6" in log.read_text() or job.poll() is not None,
                 timeout=400, interval=0.1)
        os.kill(pid, signal.SIGTERM)
        return job.wait(timeout=300)
    finally:
        kill_group(job)


def stopped_checkpoint(out, text):
    """The checkpoint a stopped two-worker run left, checked against what rank 0 said."""
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and 2 <= state["step"] < 12, "stopped with a checkpoint of both workers"
    where = f"at epoch {state['epoch'] + 1} step {state['epoch_step']}/6" if state["epoch_step"] else \
        f"after epoch {state['epoch']}"  # a stop at an epoch's end
    assert (f"stopped by SIGTERM {where}: the checkpoint is {out}/checkpoint.pt; continue with the same command "
            f"and --resume") in text, text[-3000:]
    return state


def test_sigterm_to_the_ray_train_driver_then_to_torchrun_stops_both_workers_at_one_step_each_time(
        shards, clean, tmp_path, ray_head):
    out = tmp_path / "stopped"
    job, log = start(shards, out, *NO_TIMED_CHECKPOINTS, "--address", ray_head)  # the driver alone gets the signal
    assert stop_after_step(job, log, job.pid) == 128 + signal.SIGTERM, log.read_text()[-5000:]
    first = stopped_checkpoint(out, log.read_text())
    assert not (out / ".stop").exists() and not (out / ".lock").exists()

    # the same run resumed by torchrun's two ranks (no Ray), stopped again through torchrun
    torchrun = [BIN / "torchrun", "--standalone", "--nproc-per-node", 2, "-m", "trainer.run", "--shards", shards,
                "--out", out, *NO_TIMED_CHECKPOINTS[:-2], "--resume"]  # its ranks, not --workers
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:
        job = subprocess.Popen([*map(str, torchrun)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                               start_new_session=True)
    assert stop_after_step(job, log, job.pid, after=first["step"] + 1) != 0  # torchrun forwards it, then says so
    text = log.read_text()
    assert text.count("trainer: SIGTERM: stopping after this step with a checkpoint") == 2  # each rank heard it
    second = stopped_checkpoint(out, text)
    assert second["step"] > first["step"]

    resumed = subprocess.run([*map(str, torchrun)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert losses_by_step(out) == losses_by_step(clean)  # torchrun's two ranks take the batches Ray Train's take


def test_past_max_failures_it_names_the_worker_and_resumes_with_another_count(shards, tmp_path, ray_head):
    out = tmp_path / "run"
    job, log = start(shards, out, *ARGS, "--max-failures", 0, "--address", ray_head)
    try:
        pid = kill_worker_mid_epoch(job, log, out)
        assert job.wait(timeout=300) == 1
    finally:
        kill_group(job)
    text = log.read_text()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert f"worker 1 (pid {pid} on 127.0.0.1): its process died" in text, text[-3000:]
    assert (f"the latest checkpoint is {out.resolve()}/checkpoint.pt (epoch 1, step {state['epoch_step']} of it): "
            f"continue with the same command and --resume") in text

    resumed = train(shards, out, *ARGS[:-2], "--resume")  # one process instead of two workers
    assert (f"was written by 2 worker(s), this run has 1: the loaders cannot continue where those stopped, so "
            f"epoch 1 starts again from its first batch (the {state['epoch_step']} step(s)") in resumed.stderr
    steps = [m["step"] for m in metrics(out, "step")]
    assert steps[-6:] == list(range(state["step"] + 1, state["step"] + 7))  # a whole epoch, after the kept steps
    assert torch.load(out / "checkpoint.pt", weights_only=True)["world_size"] == 1


def test_two_ray_nodes_one_worker_each(shards, tmp_path):
    cluster = two_node_cluster()
    try:
        out = tmp_path / "run"
        result = train(shards, out, "--epochs", 1, "--batch-size", 4, "--steps-per-epoch", 2, "--no-ten-crop",
                       "--workers", 2, "--address", cluster.address)
    finally:
        cluster.shutdown()
    text = result.stdout + result.stderr
    nodes = re.findall(r"\d: pid \d+ on 127\.0\.0\.1 \(node (\w+)\)", text)
    assert len(nodes) == 2 and nodes[0] != nodes[1], text[-3000:]
    assert [m["workers"] for m in metrics(out, "epoch")] == [2]


def test_torchrun_two_nodes_on_loopback(shards, tmp_path):
    out, port = tmp_path / "run", free_port()
    args = ["--epochs", 1, "--batch-size", 4, "--steps-per-epoch", 2, "--log-every", 1, "--no-ten-crop"]
    nodes = []
    for node in range(2):
        cmd = [BIN / "torchrun", "--nnodes", 2, "--nproc-per-node", 1, "--node-rank", node, "--rdzv-backend",
               "static", "--master-addr", "127.0.0.1", "--master-port", port, "-m", "trainer.run",
               "--shards", shards, "--out", out, *args]
        nodes.append(subprocess.Popen([*map(str, cmd)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [node.communicate(timeout=400)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "epoch 1 step 2/2: loss" in logs[0] and "trainer: epoch" not in logs[1]  # rank 0 alone reports
    assert [m["workers"] for m in metrics(out, "step")] == [2, 2]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_torchrun_on_every_gpu_with_nccl(local_shards, tmp_path):
    gpus, out = torch.cuda.device_count(), tmp_path / "run"
    # torchrun by its module: a GPU machine's python may keep its scripts off PATH and away from sys.executable
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", gpus, "-m",
           "trainer.run", "--shards", local_shards, "--out", out, "--epochs", 1, "--batch-size", 4 * gpus,
           "--steps-per-epoch", 2, "--log-every", 1, "--no-compile"]  # NCCL's test: compiling would take a minute
    result = subprocess.run([*map(str, cmd)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["workers"] for m in metrics(out, "step")] == [gpus, gpus]
    assert metrics(out, "final")[0]["top1_ten_crop"] is not None
