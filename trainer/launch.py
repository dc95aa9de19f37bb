"""How `python -m trainer.run` is started: one process, torchrun's processes, or Ray Train's workers.

    python -m trainer.run --shards DIR --out RUN                                  # one process
    python -m trainer.run --shards DIR --out RUN --workers 4                      # Ray Train, 4 replicas
    python -m trainer.run --shards DIR --out RUN --workers 4 --gpus-per-worker 2  # the split net on 2 GPUs each
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m trainer.run --shards /shared/shards --out /shared/runs/a --workers 16
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HEAD:29500 -m trainer.run --shards DIR --out RUN

Each launcher sets up torch.distributed (NCCL on GPUs, gloo on CPUs), picks this process's
device(s) and calls trainer.loop.train, which knows only its rank and world size. With several
replicas, --out must be one folder every node sees (rank 0 writes it, every rank reads the
checkpoint when it resumes), and so must --shards; or either an s3:// URL, with any launcher: the
shards are fetched by each node (pipeline/shard_cache.py), the run folder kept in the bucket
(trainer/bucket.py), and Ray Train's own state kept there too (RUN/ray-train, its storage_path).

Ray Train: the cluster named by --address / $RAY_ADDRESS, else a private Ray on 127.0.0.1 for this
run. Rank 0 reports every checkpoint to Ray Train (a pointer to RUN/checkpoint.pt); when a worker
dies, Ray Train starts the worker group again, up to --max-failures times, and the new workers
resume from that checkpoint.

The run folder is locked for the run's life (RUN/.lock, pipeline/lock.py; in a bucket, an object made
by a conditional PUT): by this process, by the Ray Train driver, or by torchrun's rank 0. A second
trainer on it is refused, naming the holder.
SIGTERM and SIGINT stop the run with a checkpoint (trainer/stop.py).
"""
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import storage
from pipeline.lock import LockHeld, lock_for
from pipeline.tasks import unreachable
from trainer import checkpoint
from trainer.bucket import BucketRun
from trainer.config import Config
from trainer.loop import train
from trainer.stop import StopRequest, clear_request, request_file

log = logging.getLogger("trainer")


def launch(config: Config) -> int:
    """Start the run the way config and the environment ask for; -> exit status."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return torchrun(config)
    with run_folder(config) as problem:
        if problem:
            log.error("%s", problem)
            return 2
        if config.workers:
            return ray_train(config)
        stop = StopRequest()
        stop.install()
        return replica(config, stop=stop)


@contextlib.contextmanager
def run_folder(config: Config):
    """Hold the run folder's lock for the run's life (a folder's or a bucket's); yields why the run cannot
    go ahead there, or None. A folder it made that the run left empty (refused, or stopped before its
    first file: no Ray cluster at --address, too few CPUs) is removed again."""
    out, bucket = config.out, storage.is_url(config.out)
    made = not bucket and not Path(out).exists()
    lock = lock_for(out, " ".join(sys.argv))
    try:
        lock.acquire()
    except (LockHeld, storage.StorageError) as e:
        yield str(e)
        return
    except OSError as e:  # a file, a read-only or forbidden place
        yield f"cannot write into --out {out}: {'it is a file' if Path(out).is_file() else e.strerror or e}"
        return
    try:
        try:
            problem = refusal(config)
        except storage.StorageError as e:
            problem = str(e)
        yield problem
    finally:
        lock.release()
        if made and not any(Path(out).iterdir()):
            Path(out).rmdir()


def replica(config: Config, devices=None, on_save=None, stop=None) -> int:
    """train() in this process, alone or as one of the ranks; -> exit status. With --out s3:// it trains in a
    local folder that trainer/bucket.py keeps in the bucket: rank 0 copies the run's files in and PUTs its
    checkpoints back, every other rank copies in the checkpoint it resumes from."""
    if not storage.is_url(config.out):
        return train(config, devices, on_save=on_save, stop=stop)
    url = config.out
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    run = BucketRun(url, rank)
    try:
        problem = None
        if rank == 0:
            try:
                pull_run(run, config.resume and world > 1)
            except (storage.StorageError, checkpoint.CheckpointError) as e:
                problem = str(e)
        said = [problem]
        if world > 1:  # the others copy in what rank 0 resumes from, once it has chosen; any failure stops all
            device = devices[0] if config.device == "cuda" else None
            dist.broadcast_object_list(said, src=0, device=device)
            if rank and not said[0] and config.resume:
                try:
                    run.pull(names=(checkpoint.CHECKPOINT,))
                except storage.StorageError as e:
                    problem = str(e)
            said = [None] * world
            dist.all_gather_object(said, problem)
        if any(said):
            if problem:
                log.error("%s", problem)
            return 2
        config.out = str(run.local)
        if rank == 0:
            log.info("run folder %s, worked in %s: TensorBoard's event files and the pictures stay there "
                     "(`tensorboard --logdir %s`)", url, run.local, run.local)

        def saved(trainer):
            if rank == 0:  # before Ray Train is told of the checkpoint: a restart finds it in the bucket
                run.push_or_warn()
            if on_save:
                on_save(trainer)

        status = train(config, devices, on_save=saved, stop=stop, where=url)
        if rank == 0:
            run.push()
        return status
    except storage.StorageError as e:
        log.error("%s; the run's files are in %s: continue with --resume when the bucket answers", e, run.local)
        return 1
    finally:
        config.out = url
        if rank:
            shutil.rmtree(run.local, ignore_errors=True)  # a copy of the bucket's checkpoint, read


def pull_run(run: BucketRun, choose: bool):
    """Rank 0's copy of the bucket's run folder. choose: other ranks will copy in the latest checkpoint, so
    a damaged latest is set aside now (as --resume would) and the one before it PUT as the latest."""
    run.pull()
    if choose:
        checkpoint.read_latest(run.local)
        run.push()


def refusal(config: Config) -> str | None:
    """Why config.out (a folder, or a bucket's run folder) cannot take this run, or None."""
    out = config.out
    kept = any(storage.size(storage.join(out, name)) is not None
               for name in (checkpoint.CHECKPOINT, checkpoint.PREVIOUS))
    if kept and not config.resume:
        return f"{out} already holds a run: pass --resume to continue it, or choose another --out"
    if config.resume and not kept:
        return f"--resume: {out} has no {checkpoint.CHECKPOINT} to continue from: start the run without --resume"
    try:
        text = storage.read(storage.join(out, "config.json")) if config.resume else None
    except FileNotFoundError:
        text = None
    if text is not None:
        try:
            saved = json.loads(text)
        except ValueError as e:
            return (f"--resume: {storage.join(out, 'config.json')} is damaged ({e}): delete it to resume with the "
                    f"flags given (the same --batch-size, --seed, --augment, --inputs, --recipe, --gpus and --shards "
                    f"as before)")
        saved.setdefault("recipe", saved.get("init", config.recipe))  # a run from before the recipes: its init
        # what the saved state depends on; the number of workers may change
        for key in ("batch_size", "seed", "augment", "inputs", "recipe", "gpus_per_worker"):
            if saved.get(key, getattr(config, key)) != getattr(config, key):
                return (f"--resume: {out} was trained with --{key.replace('_', '-')} {saved[key]}, not "
                        f"{getattr(config, key)}: resume with the same, or start a new --out")
        if _where(saved.get("shards", config.shards)) != _where(config.shards):
            return (f"--resume: {out} was trained on --shards {saved['shards']}, not {config.shards}: "
                    f"resume with the same, or start a new --out")
    return None


def _where(shards) -> str:
    """--shards as a comparable string: a folder made absolute, a bucket's URL as it is."""
    return shards if shards.startswith("s3://") else str(Path(shards).absolute())


def torchrun(config: Config) -> int:
    """This process is rank $RANK of $WORLD_SIZE, started by torchrun (which set up the rendezvous).
    Rank 0 holds the run folder's lock; its refusal stops every rank."""
    local_rank, g = int(os.environ.get("LOCAL_RANK", 0)), config.gpus_per_worker
    devices = place(config, [torch.device(f"cuda:{local_rank * g + i}") for i in range(g)],
                    local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    stop = StopRequest()
    stop.install()
    dist.init_process_group("nccl" if config.device == "cuda" else "gloo")
    try:
        with run_folder(config) if dist.get_rank() == 0 else contextlib.nullcontext() as problem:
            box = [problem]
            dist.broadcast_object_list(box, src=0, device=devices[0] if config.device == "cuda" else None)
            if box[0]:
                if dist.get_rank() == 0:
                    log.error("%s", box[0])
                return 2
            return replica(config, devices, stop=stop)
    finally:
        dist.destroy_process_group()


def ray_train(config: Config) -> int:
    """config.workers replicas as the worker group of a Ray Train TorchTrainer; -> exit status."""
    address = config.address or os.environ.get("RAY_ADDRESS")
    if not address:  # every server of our own Ray on 127.0.0.1 (Ray binds the public address otherwise)
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    # the workers and Ray Train's controller reach a bucket with the driver's endpoint and keys, wherever they run
    buckets = storage.is_url(config.out) or storage.is_url(config.shards)
    env = {"env_vars": storage.environment()} if buckets and storage.environment() else None
    if address:
        problem = unreachable(address)
        if problem:
            log.error("%s", problem)
            return 2
        try:
            ray.init(address=address, runtime_env=env)
        except ConnectionError as e:  # "auto" with no Ray running here
            log.error("%s", e)
            return 2
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", runtime_env=env)
    try:
        have = ray.cluster_resources()
        config.device = config.device or ("cuda" if have.get("GPU") else "cpu")
        gpu = config.device == "cuda"
        resources = {"CPU": config.cpus_per_worker or 1, **({"GPU": config.gpus_per_worker} if gpu else {})}
        if any(config.workers * n > have.get(kind, 0) for kind, n in resources.items()):
            short = (f"{config.workers} workers with {resources} each do not fit in the cluster's "
                     f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs")
            if not address:  # a private Ray is all there will be
                log.error("%s: lower --workers or --cpus-per-worker, or name a larger cluster with --address", short)
                return 2
            log.warning("%s: Ray Train waits until the cluster has grown (an autoscaler adds nodes)", short)
        out = config.out
        log.info("Ray Train: %d workers with %s each, on %s", config.workers, resources, address or "a private Ray")
        # a signal to this driver reaches the workers as RUN/.stop, which rank 0 watches (trainer/stop.py)
        clear_request(out)
        StopRequest().install(on_first=lambda signum: request_file(out, signum))
        storage_path, filesystem = str(out), None
        if storage.is_url(out) and storage.endpoint():  # pyarrow's S3 would not find a profile's endpoint_url
            import pyarrow.fs

            storage_path, filesystem = out[len(storage.SCHEME):].rstrip("/"), pyarrow.fs.S3FileSystem(
                endpoint_override=storage.endpoint())
        trainer = TorchTrainer(
            worker, train_loop_config={"config": dataclasses.asdict(config)},
            scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=gpu,
                                                   resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name="ray-train", storage_path=storage_path, storage_filesystem=filesystem,
                failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            log.error("%s", stopped(e, config))
            return 1
        finally:
            clear_request(out)
        return result.return_value
    finally:
        ray.shutdown()


def worker(loop_config: dict) -> int:
    """One Ray Train worker: rank ray.train.get_context().get_world_rank() of the group."""
    import ray.train
    import ray.train.torch

    config, context = Config(**loop_config["config"]), ray.train.get_context()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
    for name in ("trainer", "pipeline"):  # ours, not Ray's chatter; warnings and errors from every rank
        logging.getLogger(name).setLevel(logging.INFO if context.get_world_rank() == 0 else logging.WARNING)
    devices = place(config, ray.train.torch.get_devices(), context.get_local_rank(), context.get_local_world_size())
    here = f"pid {os.getpid()} on {ray.util.get_node_ip_address()} (node {ray.get_runtime_context().get_node_id()[:8]})"
    everyone = [None] * config.workers
    dist.all_gather_object(everyone, here)
    log.info("workers: %s", ", ".join(f"{r}: {w}" for r, w in enumerate(everyone)))
    if ray.train.get_checkpoint() is not None:  # this worker group replaces one that failed
        log.info("restarting from the latest checkpoint after a worker failure")
        config.resume = True
    stop = StopRequest()
    if context.get_world_rank() == 0:  # no signal handler in a worker's thread: the driver's request file
        stop.watch(config.out)
    # rank 0's is the run's exit status
    return replica(config, devices, on_save=functools.partial(report_checkpoint, out=config.out), stop=stop)


def place(config: Config, gpus: list, local_rank: int, local_world: int) -> list:
    """This process's device(s): its GPUs with config.device "cuda" (the first made current: NCCL's
    objects travel on it), else the CPU, kept to cores of its own; torch's threads, one a core.
    config.cpus_per_worker 0 becomes this node's cores divided by its workers: on a GPU node, nvJPEG's
    host-side decoding and DALI's CPU operators get the node's cores, not one each."""
    config.cpus_per_worker = config.cpus_per_worker or max(1, len(os.sched_getaffinity(0)) // local_world)
    torch.set_num_threads(config.cpus_per_worker)
    if config.device == "cuda":
        torch.cuda.set_device(gpus[0])
        return gpus
    keep_to_cores(local_rank, local_world, config.cpus_per_worker)
    return [torch.device("cpu")]


def keep_to_cores(local_rank: int, local_world: int, count: int):
    """A CPU worker keeps to `count` cores of its own (its torch, DALI and gloo threads), where the node
    has enough for all its workers: no worker's threads preempt another's."""
    cores = sorted(os.sched_getaffinity(0))
    if local_world * count <= len(cores):
        mine = cores[local_rank * count:(local_rank + 1) * count]
        for thread in os.listdir("/proc/self/task"):  # the threads started so far; later ones inherit it
            os.sched_setaffinity(int(thread), mine)


def report_checkpoint(trainer, out):
    """Tell Ray Train of the checkpoint just written into the run folder `out`: a small folder naming it,
    from rank 0."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        pointer = None
        if trainer.ranks.master:
            Path(folder, "checkpoint.json").write_text(json.dumps(
                {"path": storage.join(out, checkpoint.CHECKPOINT), "epoch": trainer.epoch, "step": trainer.step}))
            pointer = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"epoch": trainer.epoch, "step": trainer.step}, checkpoint=pointer)


def stopped(error, config: Config) -> str:
    """What to say when Ray Train gives up: which worker died, and where to resume from."""
    failures = getattr(error, "worker_failures", {}) or {}
    said = []
    for rank, failure in sorted(failures.items()):
        text = str(failure)
        pid, ip = re.search(r"\bpid[:=]\s*(\d+)", text), re.search(r"\bip[:=]\s*'?([\w.:-]+)", text)
        where = f" (pid {pid[1]} on {ip[1]})" if pid and ip else ""
        reason = "its process died" if "actor died" in text.lower() else text.strip().splitlines()[-1]
        said.append(f"worker {rank}{where}: {reason}")
    who = "; ".join(said) or str(error).strip().splitlines()[-1]
    latest = storage.join(config.out, checkpoint.CHECKPOINT)
    if storage.size(latest) is not None:
        try:
            state = checkpoint.read(latest)
            resume = (f"the latest checkpoint is {latest} (epoch {state['epoch'] + 1}, step {state['epoch_step']} "
                      f"of it): continue with the same command and --resume")
        except checkpoint.CheckpointError as e:
            resume = str(e)
    else:
        resume = f"no checkpoint was written to {latest} yet: start the run again"
    return (f"training stopped after {config.max_failures} restart(s) of the worker group (--max-failures): "
            f"{who}; {resume}")
