"""The training loop: the model, its optimiser and loaders, one epoch after another.

It knows its rank and world size (trainer/ranks.py) and nothing of how it was started
(trainer/launch.py). Around it: trainer/checkpoint.py writes and reads the run's state,
trainer/reports.py tells people about it, trainer/stop.py says when to stop early.
"""
import functools
import itertools
import logging
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer import checkpoint
from trainer.config import Config, write_config
from trainer.evaluate import errors
from trainer.model import AlexNet
from trainer.recipes import RECIPES, param_groups
from trainer.schedule import Plateau
from trainer.ranks import Ranks
from trainer.reports import Reports
from trainer.stop import StopRequest
from trainer.waits import Waits, clock_of

log = logging.getLogger("trainer")
EXPLODED = 2  # a step's loss above this many times chance's, ln(classes), in the first epoch: a collapse
LEARNING = 100  # steps after which a net that learns has left chance: its epoch's loss below it, several classes


class Compiled:
    """net under torch.compile, static shapes (an epoch's partial last batch adds one graph, once, and the
    full batch keeps its own). Where compiling fails (a GPU too old for Triton, no C compiler for its
    launcher), that is said in one line and net runs eager from then on: the failure comes while
    compiling, before the step ran. mode "reduce-overhead" replays CUDA graphs, one a batch shape; each
    call is a new step of them (their outputs are overwritten by the next replay)."""

    def __init__(self, net, warn=True, mode="default"):
        self.net, self.compiled, self.warn = net, torch.compile(net, dynamic=False, mode=mode), warn
        self.graphs = mode == "reduce-overhead"

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                if self.graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                return self.compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                if self.warn:
                    log.warning("torch.compile failed (%s): the model runs eager; --no-compile skips the attempt",
                                checkpoint.reason(e))
                self.compiled = None
        return self.net(*args)


class Trainer:
    """One training run: model, optimiser, loaders, and the run folder they report to.

    Under torch.distributed this is one of world_size replicas: its loaders read rank r of
    world_size, DDP averages the gradients, the figures it logs are reduced over all replicas, and
    rank 0 alone writes the run folder."""

    def __init__(self, config: Config, devices=None, on_save=None, stop=None):
        """A new run, or with config.resume the one in config.out, restored from its checkpoint.
        devices: the towers' device(s), by default from config; on_save(trainer): called on every rank
        after each checkpoint (Ray Train reports it); stop: the StopRequest this process answers to."""
        from pipeline import build_loader  # the data half; the trainer only sees torch tensors
        from pipeline.loader import StaleLoaderState, normalisation_of, normalise
        from pipeline.manifest import read_manifest, read_pca

        self.config, self.out, self.on_save = config, Path(config.out), on_save
        self.stop = stop or StopRequest()
        gpu = config.device == "cuda"
        if devices is None:
            devices = ["cuda:0", "cuda:1"] if config.gpus_per_worker == 2 else ["cuda:0" if gpu else "cpu"]
        self.device = torch.device(devices[0])
        self.ranks = Ranks(self.device)
        manifest = read_manifest(config.shards)  # ShardDirError before any work
        self.classes, pca = len(manifest["classes"]), read_pca(config.shards)
        # what trainer.evaluate and trainer.predict need, kept in every checkpoint
        self.about = {"classes": manifest["classes"], "class_names": manifest.get("class_names"), "recipe": config.recipe,
                      "normalisation": normalisation_of(pca, config.inputs),
                      "preprocessing": {k: manifest["settings"][k] for k in ("size", "quality", "max_pixels")}}
        if config.verify_shards:
            self.on_master(lambda: self.verify_shards(manifest))
        torch.manual_seed(config.seed)
        self.model = AlexNet(self.classes, dropout=config.dropout, recipe=config.recipe, devices=devices)
        if gpu:
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # the input shape is fixed: cuDNN times its kernels once
        if self.ranks.rank:  # the same initial weights everywhere (DDP checks), a dropout stream of each rank's own
            torch.manual_seed(config.seed + self.ranks.rank)
        params = param_groups(self.model, RECIPES[config.recipe], config.lr, config.weight_decay)
        self.optimizer = (torch.optim.SGD(params, momentum=config.momentum) if config.optimizer == "sgd"
                          else torch.optim.Adam(params))
        self.scheduler = Plateau(self.optimizer, config.lr_factor, config.lr_patience,
                                 val_images=manifest["splits"]["val"]["samples"])
        self.epoch, self.step, self.epoch_step = 0, 0, 0
        # the epoch's training loss, summed over every step on the device: [sum of loss x images, images]
        self.loss_sum = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.loss_peak = torch.zeros((), device=self.device)  # the largest step loss since the last log step
        self.collapse = None  # why the run was found dead, once it was: said once
        loader_state = self.restore() if config.resume else None
        if self.ranks.master:
            self.out.mkdir(parents=True, exist_ok=True)
        self.on_master(lambda: checkpoint.check_room(self.out, self.state_bytes()))
        # DDP: gradients averaged over the replicas during backward; a module over two GPUs works too
        self.net = (nn.parallel.DistributedDataParallel(self.model, gradient_as_bucket_view=True)  # no copy into buckets
                    if self.ranks.world > 1 else self.model)
        # --uint8-handover: the step normalises the uint8 crops, [B, 3] means in pixel units, in one pass
        self.normalise = functools.partial(normalise, std=self.about["normalisation"]["std"],
                                           dtype=torch.bfloat16 if gpu else torch.float32)
        if gpu and config.compile and len(set(devices)) == 1:  # compiled at the first step; eval stays eager
            self.net = Compiled(self.net, warn=self.ranks.master, mode=config.compile_mode)
            self.normalise = Compiled(self.normalise, warn=False)  # one kernel: uint8 in, bf16 out
            if self.ranks.master:
                log.info("the model is compiled at its first step and at the first partial batch (about a minute "
                         "each on an H100); --no-compile runs it eager")
        cores = config.cpus_per_worker or len(os.sched_getaffinity(0))  # a worker's (trainer/launch.py)
        self.loader_options = dict(device=self.device, channels_last=gpu, rank=self.ranks.rank,
                                   world_size=self.ranks.world, dtype=torch.bfloat16 if gpu else torch.float32,
                                   normalisation=self.about["normalisation"],
                                   num_threads=config.dali_threads or (max(1, cores - 2) if gpu else cores),
                                   hw_decoder_load=config.hw_decoder_load,
                                   prefetch_queue_depth=config.prefetch_queue_depth)
        self.batch_size = config.batch_size // self.ranks.world  # parse_args checked that it divides
        # one seed for all: the loader shares the shard order and gives each rank augmentation of its own
        train_options = dict(seed=config.seed, crops="random" if config.augment else "center",
                             fancy_pca_sigma=config.fancy_pca_sigma, uint8=config.uint8_handover and config.augment,
                             **self.loader_options)
        try:
            self.train_loader = build_loader(config.shards, "train", self.batch_size, state=loader_state,
                                             **train_options)
        except StaleLoaderState as e:
            self.restart_epoch(f"{self.out / checkpoint.CHECKPOINT}'s loader state does not fit this pipeline "
                               f"(another version of it, or another --fancy-pca-sigma: {e})")
            self.train_loader = build_loader(config.shards, "train", self.batch_size, **train_options)
        self.val_loader = None
        if manifest["splits"]["val"]["samples"]:
            self.val_loader = build_loader(config.shards, "val", self.batch_size, crops="center",
                                           **self.loader_options)
        elif not config.resume and self.ranks.master:
            log.warning("%s has no val split: training without validation, the lr following the training loss "
                        "(jobs/preprocess.py --val-fraction holds part of train out as val)", config.shards)
        self.steps = min(len(self.train_loader), config.steps_per_epoch or len(self.train_loader))
        self.reports = None
        if self.ranks.master:
            self.reports = Reports(self.out, config, resume_step=self.step if config.resume else None)
        # training batches without end: a capped epoch (--steps-per-epoch) and the loader's epoch
        # need not coincide
        self.batches = (batch for _ in itertools.count() for batch in self.train_loader)
        self.waits = Waits(clock_of(self.device))
        self.writer = checkpoint.Writer() if config.async_checkpoint else None

    def on_master(self, work):
        """Run work() on rank 0 alone; what it raised is raised on every rank (none waits for rank 0 forever)."""
        problem = None
        if self.ranks.master:
            try:
                work()
            except Exception as e:  # handed to the other ranks, then raised everywhere
                problem = e
        problem = self.ranks.broadcast(problem)
        if problem is not None:
            raise problem

    def verify_shards(self, manifest):
        """sha256 of every shard and index file against the manifest."""
        from pipeline.verify import verify_checksums

        started = time.perf_counter()
        checked = verify_checksums(self.config.shards, manifest)
        log.info("sha256 of %d shard and index files: ok (%d hashed, %d unchanged since an earlier check) in %.1fs",
                 checked["hashed"] + checked["remembered"], checked["hashed"], checked["remembered"],
                 time.perf_counter() - started)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """About what a checkpoint of this run takes: the weights, and the optimiser's state per weight."""
        slots = 2 if self.config.optimizer == "adam" else int(self.config.momentum > 0)
        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        return weights * (1 + slots) + (1 << 20) * self.ranks.world  # + loader and RNG states

    def save(self):
        """Rank 0 writes every rank's state in one checkpoint (trainer/checkpoint.py); never with
        non-finite weights. Called on every rank at once."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            self.check_finite(float("nan"))
        mine = {"loader": torch.frombuffer(bytearray(self.train_loader.state_dict()["dali"]), dtype=torch.uint8),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "loss_sum": self.loss_sum.cpu()}
        ranks = self.ranks.gather(mine)

        def write():
            (self.writer.save if self.writer else checkpoint.save)(self.out, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "epoch_step": self.epoch_step, "world_size": self.ranks.world,
                **{key: [r[key] for r in ranks] for key in mine},  # one entry per rank
                **self.about})

        self.on_master(write)
        if self.on_save:
            self.written()  # Ray Train is told of the file: it must be there
            self.on_save(self)

    def written(self):
        """Until the checkpoint being written in the background is on disk (raising its CheckpointError on
        every rank). Called on every rank at once."""
        if self.writer:
            self.on_master(self.writer.wait)

    def restore(self) -> dict | None:
        """Restore everything but the loader from the run's latest good checkpoint; -> this rank's loader
        state, or None where the checkpoint was written by another number of ranks (the epoch then
        starts again)."""
        read = {}  # rank 0 reads the latest good one (setting a damaged latest aside), the others after it
        self.on_master(lambda: read.update(state=checkpoint.read_latest(self.out)))
        state = read.get("state") or checkpoint.read(self.out / checkpoint.CHECKPOINT)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.epoch_step = state["epoch"], state["step"], state["epoch_step"]
        if "world_size" not in state:  # written by one process before data-parallel training
            state.update(world_size=1, **{key: [state[key]] for key in ("loader", "rng", "cuda_rng")})
        rank, world = self.ranks.rank, self.ranks.world
        if state["world_size"] != world:
            self.restart_epoch(f"{self.out / checkpoint.CHECKPOINT} was written by {state['world_size']} "
                               f"worker(s), this run has {world}")
            return None
        torch.set_rng_state(state["rng"][rank])
        if state["cuda_rng"][rank]:
            torch.cuda.set_rng_state_all(state["cuda_rng"][rank])
        if "loss_sum" in state:
            self.loss_sum = state["loss_sum"][rank].to(self.device)
        return {"dali": state["loader"][rank].numpy().tobytes()}

    def restart_epoch(self, why: str):
        """The checkpoint's loaders cannot be continued (`why`): this epoch starts again with new ones."""
        if self.ranks.master:
            restart = (f"epoch {self.epoch + 1} starts again from its first batch (the {self.epoch_step} "
                       f"step(s) taken in it stay in the weights)" if self.epoch_step else
                       f"epoch {self.epoch + 1} starts with new loaders")
            log.warning("%s: the loaders cannot continue where those stopped, so %s", why, restart)
        self.epoch_step = 0
        self.loss_sum.zero_()

    # -- the loop ------------------------------------------------------------------------------

    def train_step(self, images, labels, mean=None) -> torch.Tensor:
        """One SGD step on this rank's batch (DDP averages the gradients over the ranks); -> its loss.
        mean: with --uint8-handover, the images are uint8 crops and mean [B, 3] their normalisation's."""
        if mean is not None:
            images = self.normalise(images, mean)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            # a rank's last batch of an epoch may be partial, even empty: a sum over none is 0, not NaN
            loss = F.cross_entropy(self.net(images), labels.to(self.device), reduction="sum") / max(len(labels), 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def train_epoch(self) -> dict | None:
        """The rest of this epoch's steps; -> its figures, or None if the run was asked to stop (a checkpoint
        is written)."""
        config = self.config
        started, first_step = time.perf_counter(), self.epoch_step
        wait = np.zeros(2)  # seconds: [data wait, device wait] of the epoch (trainer/waits.py)
        window_wait = np.zeros(2)  # the same since the last log line
        window_start, window_images, images_seen, last_checkpoint = started, 0, 0, time.monotonic()
        self.model.train()
        self.waits.idle()  # after a val pass and a checkpoint, or at the start
        while self.epoch_step < self.steps:
            images, labels, *mean = self.waits.next_batch(self.batches)  # mean: with --uint8-handover
            loss = self.train_step(images, labels, *mean)
            self.waits.stepped()
            self.loss_sum[0] += loss.double() * len(labels)  # stays on the device: no sync a step
            self.loss_sum[1] += len(labels)
            torch.maximum(self.loss_peak, loss, out=self.loss_peak)
            self.step, self.epoch_step = self.step + 1, self.epoch_step + 1
            window_images, images_seen = window_images + len(labels), images_seen + len(labels)
            if self.epoch_step % config.log_every == 0 or self.epoch_step == self.steps:
                elapsed = time.perf_counter() - window_start
                due = time.monotonic() - last_checkpoint > 60 * config.checkpoint_minutes
                value = self.waits.item(loss)  # host sync: waits for the device, so the waits' markers are reached
                waited = self.waits.read()
                wait, window_wait = wait + waited, window_wait + waited
                # over the ranks: the batch-weighted loss, and the largest step loss since the last log step
                ranks = self.ranks.all_ranks([value * len(labels), len(labels), window_images, *window_wait, due,
                                              self.loss_peak.item()])
                loss_sum, n, window_images, window_data, window_device, due, _ = ranks.sum(0).tolist()
                worst, value, peak = ranks[:, 3].max().item(), loss_sum / n, ranks[:, 6].max().item()
                self.check_finite(value)
                self.loss_peak.zero_()
                if self.epoch == 0 and peak > EXPLODED * math.log(self.classes):
                    self.collapsed(f"a training loss of {peak:.1f} in epoch 1, far above chance's "
                                   f"ln {self.classes} = {math.log(self.classes):.2f}")
                done = self.epoch_step - first_step
                if self.reports:
                    self.reports.step(self.epoch + 1, self.step, self.epoch_step, self.steps, value,
                                      self.optimizer.param_groups[0]["lr"], window_images / elapsed,
                                      window_data / self.ranks.world / elapsed, worst / elapsed,
                                      window_device / self.ranks.world / elapsed, self.ranks.world,
                                      eta=(self.steps - self.epoch_step) * (time.perf_counter() - started) / done)
                window_start, window_images, window_wait = time.perf_counter(), 0, np.zeros(2)
                if due:  # checked at log steps, where the ranks agree on it
                    self.save()
                    self.waits.idle()  # the checkpoint copied the weights to the host: the device's queue is done
                    last_checkpoint = time.monotonic()
            if self.ranks.vote_to_stop(self.stop.asked) and self.epoch_step < self.steps:
                self.ranks.end_vote()  # the vote begun beside this step: nothing left running behind the stop
                self.save()
                return None
        self.ranks.end_vote()  # an ask from the last step is answered at the epoch's end
        elapsed = time.perf_counter() - started
        ranks = self.ranks.all_ranks([images_seen, *wait, *self.loss_sum.tolist()])  # host sync, once an epoch
        (images_seen, data_wait, device_wait, loss_sum, n), max_wait = ranks.sum(0).tolist(), ranks[:, 1].max().item()
        self.loss_sum.zero_()
        return {"train_loss": loss_sum / max(n, 1), "data_wait": data_wait / self.ranks.world / elapsed,
                "data_wait_max": max_wait / elapsed, "device_wait": device_wait / self.ranks.world / elapsed,
                "img_s": images_seen / elapsed}

    def collapsed(self, why: str):
        """The run looks dead (`why`): said once, in the log, metrics.jsonl and TensorBoard."""
        if self.collapse is None and self.reports:
            self.reports.collapse(self.epoch + 1, self.step, why)
        self.collapse = self.collapse or why

    def check_learning(self, train_loss, predicted):
        """After an epoch, once the run has taken LEARNING steps: a training loss not below chance's, or one class
        for every val image, is a collapse."""
        if self.step < LEARNING:
            return
        if train_loss >= math.log(self.classes):
            self.collapsed(f"a training loss of {train_loss:.3f} over epoch {self.epoch + 1}, not below chance's "
                           f"ln {self.classes} = {math.log(self.classes):.2f}")
        if predicted == 1 and self.classes > 1:
            self.collapsed(f"one class predicted for every val image after epoch {self.epoch + 1}")

    def check_finite(self, value):
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the training loss (or a weight) is {value} at epoch {self.epoch + 1} step {self.epoch_step}: "
                f"stopped; the last good checkpoint ({self.out / checkpoint.CHECKPOINT}) is kept. Try a lower --lr.")

    def evaluate(self, loader, ten_crop=False):
        """-> (top-1 error, top-5 error, how many classes were some image's top-1) on val, from the counts
        summed over the ranks' slices of it; ten-crop averages the softmax over the 10 crops."""
        result = errors(self.model, loader, ten_crop, desc="ten-crop" if ten_crop else "val",
                        progress=self.ranks.master)
        predicted = result["predicted"]
        predicted = [0.0] * self.classes if predicted is None else predicted.tolist()  # None: an empty slice
        ranks = self.ranks.all_ranks([result["wrong1"], result["wrong5"], result["total"], *predicted]).sum(0)
        wrong1, wrong5, total = ranks[:3].tolist()
        return wrong1 / total, wrong5 / total, int((ranks[3:] > 0).sum())

    def ten_crop_loader(self):
        """This rank's slice of val, ten crops an image (section 4.1)."""
        from pipeline import build_loader

        return build_loader(self.config.shards, "val", self.batch_size, crops="ten", **self.loader_options)

    def fit(self) -> int:
        """Train to config.epochs, or until asked to stop; -> exit status."""
        config = self.config
        try:
            while self.epoch < config.epochs:
                stats = self.train_epoch()
                if stats is None:
                    return self.stopped()
                top1 = top5 = predicted = None
                if self.val_loader is not None:
                    top1, top5, predicted = self.evaluate(self.val_loader)
                self.scheduler.step(stats["train_loss"] if top1 is None else top1)
                if self.reports:
                    self.reports.epoch(self.epoch + 1, self.step, stats, top1, top5, predicted,
                                       self.optimizer.param_groups[0]["lr"], self.ranks.world)
                self.check_learning(stats["train_loss"], predicted)
                self.epoch, self.epoch_step = self.epoch + 1, 0
                self.save()
                if self.reports:
                    self.reports.pictures(self.model, self.epoch, self.steps)
                if self.epoch < config.epochs and self.ranks.any(self.stop.asked):
                    return self.stopped()
            if config.ten_crop and self.val_loader is not None:
                top1, top5, _ = self.evaluate(self.ten_crop_loader(), ten_crop=True)
                if self.reports:
                    self.reports.final(self.epoch, top1, top5)
            self.written()
            return 0
        finally:
            if self.reports:
                self.reports.close()

    def stopped(self) -> int:
        """The checkpoint is written; -> the exit status of a run stopped by a signal."""
        self.written()
        if self.ranks.master:
            where = (f"at epoch {self.epoch + 1} step {self.epoch_step}/{self.steps}" if self.epoch_step else
                     f"after epoch {self.epoch}")
            log.warning("stopped by %s %s: the checkpoint is %s; continue with the same command and --resume",
                        self.stop.signal.name if self.stop.asked else "a signal to another worker", where,
                        self.out / checkpoint.CHECKPOINT)
        return self.stop.exit_status if self.stop.asked else 128 + signal.SIGTERM


def train(config: Config, devices=None, on_save=None, stop=None, where=None) -> int:
    """Train in this process, alone or as one replica of several (the launcher has set up
    torch.distributed and holds the run folder's lock); -> exit status. devices, on_save, stop: as for Trainer;
    where: the run folder as the log names it, where config.out is a local copy of it (a bucket's)."""
    from pipeline.manifest import ShardDirError

    out = Path(config.out)
    where = where or out
    try:
        trainer = Trainer(config, devices, on_save, stop)  # the loaders refuse shards that do not match their manifest
    except (ShardDirError, checkpoint.CheckpointError, ImportError, ConnectionError) as e:  # ImportError: DALI's;
        # ConnectionError: a bucket that cannot be read (pipeline.storage.StorageError), one line each
        log.error("%s", e)
        return 2
    if config.resume:
        if trainer.epoch >= config.epochs:
            log.info("%s has already trained %d epochs (--epochs %d): nothing to do", where, trainer.epoch, config.epochs)
            return 0
        log.info("resumed %s at epoch %d step %d", where, trainer.epoch + 1, trainer.epoch_step)
    if trainer.ranks.master:
        write_config(config)
    try:
        status = trainer.fit()
    except (FloatingPointError, checkpoint.CheckpointError) as e:
        log.error("%s", e)
        return 1
    if status == 0 and where == out:
        log.info("run folder: %s (metrics.jsonl, checkpoint.pt, kernels.png, curves.png); "
                 "watch it with `tensorboard --logdir %s`", out, out.parent)
    elif status == 0:
        log.info("run folder: %s (metrics.jsonl, checkpoint.pt); kernels.png, curves.png and TensorBoard's events in "
                 "%s: watch it with `tensorboard --logdir %s`", where, out, out.parent)
    return status
