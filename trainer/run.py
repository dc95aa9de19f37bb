"""Train the two-tower AlexNet on a shard folder with the paper's recipe.

    python -m trainer.run --shards shards/                        # best device present, paper's recipe
    python -m trainer.run --shards shards/ --gpus 2               # one tower per GPU, as in the paper
    python -m trainer.run --shards shards/ --out runs/a --resume  # continue a killed run, mid-epoch too
    python -m trainer.run --shards shards/ --workers 4            # 4 data-parallel replicas on Ray Train
    torchrun --nproc-per-node 8 -m trainer.run --shards shards/   # 8 replicas under torchrun

With several replicas (trainer/launch.py starts them) --batch-size is the global batch, split evenly;
gradients are averaged by torch DDP, and rank 0 alone writes the run folder.

The run folder holds config.json (the resolved config and git commit), metrics.jsonl (one line per
logged step and per epoch), TensorBoard's event files (`tensorboard --logdir runs/`), checkpoint.pt
(with the class names, normalisation and preprocessing settings that trainer.evaluate and
trainer.predict need), kernels.png (conv1, per tower) and curves.png.
"""
import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.evaluate import errors
from trainer.model import AlexNet
from trainer.pictures import curves_png, kernels_grid, kernels_png

log = logging.getLogger("trainer")


@dataclass
class Config:
    shards: str = ""  # a folder written by jobs/preprocess.py
    out: str = ""  # run folder; default runs/<time>
    epochs: int = 90  # section 5: roughly 90 cycles through the training set
    batch_size: int = 128  # section 5
    lr: float = 0.01  # section 5
    momentum: float = 0.9  # section 5
    weight_decay: float = 5e-4  # section 5
    lr_factor: float = 0.1  # section 5: lr divided by 10 when the validation error stops improving
    lr_patience: int = 1  # epochs without a better validation error before the lr is divided
    optimizer: str = "sgd"  # "sgd" (section 5) or "adam" (the demo's quick recipe)
    init: str = "paper"  # "paper" (section 5: N(0, 0.01), biases 1 in conv2/4/5, fc6/7) or "torch"
    dropout: float = 0.5  # section 4.2, in fc6 and fc7
    augment: bool = True  # random crops, flips, Fancy PCA (section 4.1); else centre crops
    fancy_pca_sigma: float = 0.1  # section 4.1
    device: str = ""  # "cpu" or "cuda"; default cuda if present
    gpus_per_worker: int = 1  # (also --gpus) 2: tower 0 on the first GPU, tower 1 on the second (section 3.2)
    workers: int = 0  # data-parallel replicas on Ray Train; 0: this process alone (torchrun sets its own)
    cpus_per_worker: int = 1  # CPU cores of a Ray Train worker: its torch threads and DALI threads
    address: str = ""  # the Ray cluster for --workers; default $RAY_ADDRESS, else a private Ray on 127.0.0.1
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before a Ray Train run stops
    seed: int = 0
    log_every: int = 20  # steps between log lines and metrics lines
    checkpoint_minutes: float = 10.0  # besides the one at each epoch's end
    steps_per_epoch: int = 0  # cap on training steps per epoch (0: the whole epoch)
    ten_crop: bool = True  # at the end: ten-crop top-1/top-5 error (section 4.1)
    verify_shards: bool = True  # sha256 of every shard against the manifest before the first step
    resume: bool = False  # continue from the run folder's checkpoint


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Config):
        flags = ["--" + field.name.replace("_", "-")] + (["--gpus"] if field.name == "gpus_per_worker" else [])
        if field.type is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            p.add_argument(*flags, type=field.type, default=field.default, required=field.name == "shards")
    config = Config(**vars(p.parse_args(argv)))  # an unknown flag is an argparse error
    for name, allowed in [("optimizer", ("sgd", "adam")), ("init", ("paper", "torch")),
                          ("device", ("", "cpu", "cuda")), ("gpus_per_worker", (1, 2))]:
        if getattr(config, name) not in allowed:
            p.error(f"--{name.replace('_', '-')} must be one of {allowed}, not {getattr(config, name)!r}")
    for name in ("workers", "max_failures"):
        if getattr(config, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more, not {getattr(config, name)}")
    if config.cpus_per_worker < 1:
        p.error(f"--cpus-per-worker must be 1 or more, not {config.cpus_per_worker}")
    world = config.workers or int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets WORLD_SIZE
    if config.batch_size % world:
        p.error(f"--batch-size {config.batch_size} is the global batch and must split evenly over {world} "
                f"workers: choose a multiple of {world}")
    if not config.workers:  # Ray Train's workers use the cluster's GPUs, which need not be this machine's
        config.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if config.gpus_per_worker == 2 and config.device != "cuda":
            p.error("--gpus 2 places the towers on two CUDA GPUs: it needs --device cuda")
        needed = 2 * int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if config.gpus_per_worker == 2 else 0
        if torch.cuda.device_count() < needed:
            p.error(f"--gpus 2 needs {needed} CUDA GPUs here; this machine has {torch.cuda.device_count()}")
    config.out = config.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    return config


class Run:
    """One training run: model, optimiser, loaders, and the run folder they report to.

    Under torch.distributed (trainer/launch.py starts the processes) this is one of world_size
    replicas: its loaders read rank r of world_size, DDP averages the gradients, the figures it logs
    are reduced over all replicas, and rank 0 alone writes the run folder."""

    def __init__(self, config: Config, devices=None, on_save=None):
        """A new run, or with config.resume the one in config.out, restored from its checkpoint.
        devices: the towers' device(s), by default from config; on_save(run): called on every rank
        after each checkpoint (Ray Train reports it)."""
        from torch.utils.tensorboard import SummaryWriter

        from pipeline import build_loader  # the data half; the trainer only sees torch tensors
        from pipeline.manifest import read_manifest, read_pca

        self.config, self.out, self.on_save = config, Path(config.out), on_save
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.master = self.rank == 0
        manifest = read_manifest(config.shards)  # ShardDirError before any work
        self.classes, pca = len(manifest["classes"]), read_pca(config.shards)
        # what trainer.evaluate and trainer.predict need, kept in every checkpoint
        self.about = {"classes": manifest["classes"], "normalisation": {"mean": pca["mean"], "std": pca["std"]},
                      "preprocessing": {k: manifest["settings"][k] for k in ("size", "quality", "max_pixels")}}
        self.checkpoint_path = self.out / "checkpoint.pt"
        gpu = config.device == "cuda"
        if devices is None:
            devices = ["cuda:0", "cuda:1"] if config.gpus_per_worker == 2 else ["cuda:0" if gpu else "cpu"]
        self.device = torch.device(devices[0])
        if config.verify_shards:
            self.verify_shards(manifest)
        torch.manual_seed(config.seed)
        self.model = AlexNet(self.classes, dropout=config.dropout, init=config.init, devices=devices)
        if gpu:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.rank:  # the same initial weights everywhere (DDP checks), a dropout stream of each rank's own
            torch.manual_seed(config.seed + self.rank)
        params = self.model.parameters()
        self.optimizer = (torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                          weight_decay=config.weight_decay) if config.optimizer == "sgd"
                          else torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay))
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience)
        self.epoch, self.step, self.epoch_step = 0, 0, 0
        loader_state = self.load() if config.resume else None
        # DDP: gradients averaged over the replicas during backward; a module over two GPUs works too
        self.net = (nn.parallel.DistributedDataParallel(self.model, gradient_as_bucket_view=True)  # no copy into buckets
                    if self.world > 1 else self.model)
        self.loader_options = dict(device=self.device, channels_last=gpu, rank=self.rank, world_size=self.world,
                                   dtype=torch.bfloat16 if gpu else torch.float32,
                                   num_threads=config.cpus_per_worker if self.world > 1 else None)
        self.batch_size = config.batch_size // self.world  # parse_args checked that it divides
        self.train = build_loader(config.shards, "train", self.batch_size, seed=config.seed,
                                  state=loader_state, crops="random" if config.augment else "center",
                                  fancy_pca_sigma=config.fancy_pca_sigma, **self.loader_options)
        self.val = None
        if manifest["splits"]["val"]["samples"]:
            self.val = build_loader(config.shards, "val", self.batch_size, crops="center", **self.loader_options)
        elif not config.resume and self.master:
            log.warning("%s has no val split: training without validation, the lr following the training loss "
                        "(jobs/preprocess.py --val-fraction holds part of train out as val)", config.shards)
        self.steps = min(len(self.train), config.steps_per_epoch or len(self.train))
        self.board = None
        if self.master:
            self.out.mkdir(parents=True, exist_ok=True)
            # a resumed run's events from the steps it redoes are dropped by TensorBoard (purge_step)
            self.board = SummaryWriter(self.out, purge_step=self.step + 1 if config.resume else None)
            if not config.resume:
                self.board_hparams()
        # training batches without end: a capped epoch (--steps-per-epoch) and the loader's epoch
        # need not coincide
        self.batches = (batch for _ in itertools.count() for batch in self.train)

    def verify_shards(self, manifest):
        """sha256 of every shard and index file against the manifest, on rank 0; every rank raises what it found."""
        from pipeline.verify import verify_checksums

        problem = None
        if self.master:
            started = time.perf_counter()
            try:
                checked = verify_checksums(self.config.shards, manifest)
                log.info("sha256 of %d shard and index files: ok (%d hashed, %d unchanged since an earlier check) "
                         "in %.1fs", checked["hashed"] + checked["remembered"], checked["hashed"],
                         checked["remembered"], time.perf_counter() - started)
            except Exception as e:  # handed to the other ranks, then raised everywhere
                problem = e
        problem = self.broadcast(problem)
        if problem is not None:
            raise problem

    # -- collectives: no-ops in one process --------------------------------------------------------

    def broadcast(self, obj):
        """Rank 0's obj on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's obj, in rank order, on rank 0; None elsewhere."""
        if self.world == 1:
            return [obj]
        objs = [None] * self.world if self.master else None
        dist.gather_object(obj, objs, dst=0)
        return objs

    def all_ranks(self, values) -> torch.Tensor:
        """Every rank's numbers in one exchange: a [world, len(values)] float64 tensor on the CPU, row r rank r's."""
        mine = torch.tensor([values], dtype=torch.float64, device=self.device)  # NCCL exchanges device tensors
        if self.world == 1:
            return mine.cpu()
        rows = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(rows, mine)
        return torch.cat(rows).cpu()

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self):
        """Rank 0 writes every rank's state in one checkpoint, under a temporary name, then renames it;
        never with non-finite weights. Called on every rank at once."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            self.check_finite(float("nan"))
        mine = {"loader": torch.frombuffer(bytearray(self.train.state_dict()["dali"]), dtype=torch.uint8),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        ranks = self.gather(mine)
        if self.master:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                     "epoch_step": self.epoch_step, "world_size": self.world,
                     **{key: [r[key] for r in ranks] for key in mine},  # one entry per rank
                     **self.about}
            tmp = self.checkpoint_path.with_name(".checkpoint.pt.tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.checkpoint_path)
        if self.on_save:
            self.on_save(self)

    def load(self) -> dict | None:
        """Restore everything but the loader from the checkpoint; -> this rank's loader state, or None
        where the checkpoint was written by another number of ranks (the epoch then starts again)."""
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.epoch_step = state["epoch"], state["step"], state["epoch_step"]
        if "world_size" not in state:  # written by one process before data-parallel training
            state.update(world_size=1, **{key: [state[key]] for key in ("loader", "rng", "cuda_rng")})
        if state["world_size"] != self.world:
            if self.master:
                restart = (f"epoch {self.epoch + 1} starts again from its first batch (the {self.epoch_step} "
                           f"step(s) taken in it stay in the weights)" if self.epoch_step else
                           f"epoch {self.epoch + 1} starts with new loaders")
                log.warning("%s was written by %d worker(s), this run has %d: the loaders cannot continue where "
                            "those stopped, so %s", self.checkpoint_path, state["world_size"], self.world, restart)
            self.epoch_step = 0
            return None
        torch.set_rng_state(state["rng"][self.rank])
        if state["cuda_rng"][self.rank]:
            torch.cuda.set_rng_state_all(state["cuda_rng"][self.rank])
        return {"dali": state["loader"][self.rank].numpy().tobytes()}

    # -- the loop ------------------------------------------------------------------------------

    def metric(self, **fields):
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(fields) + "\n")

    def train_step(self, images, labels) -> torch.Tensor:
        """One SGD step on this rank's batch (DDP averages the gradients over the ranks); -> its loss."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            # a rank's last batch of an epoch may be partial, even empty: a sum over none is 0, not NaN
            loss = F.cross_entropy(self.net(images), labels.to(self.device), reduction="sum") / max(len(labels), 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def train_epoch(self):
        config = self.config
        started, first_step = time.perf_counter(), self.epoch_step
        wait = window_wait = 0.0
        window_start, window_images, images_seen, last_checkpoint = started, 0, 0, time.monotonic()
        losses = []
        self.model.train()
        while self.epoch_step < self.steps:
            t0 = time.perf_counter()
            images, labels = next(self.batches)  # blocks only if the pipeline is behind: the data wait
            waited = time.perf_counter() - t0
            wait, window_wait = wait + waited, window_wait + waited
            loss = self.train_step(images, labels)
            self.step, self.epoch_step = self.step + 1, self.epoch_step + 1
            window_images, images_seen = window_images + len(labels), images_seen + len(labels)
            if self.epoch_step % config.log_every == 0 or self.epoch_step == self.steps:
                elapsed = time.perf_counter() - window_start
                due = time.monotonic() - last_checkpoint > 60 * config.checkpoint_minutes
                # host sync: .item() waits for the device; over the ranks: the batch-weighted loss
                ranks = self.all_ranks([loss.item() * len(labels), len(labels), window_images, window_wait, due])
                loss_sum, n, window_images, window_wait, due = ranks.sum(0).tolist()
                worst, value = ranks[:, 3].max().item(), loss_sum / n
                self.check_finite(value)
                losses.append(value)
                lr = self.optimizer.param_groups[0]["lr"]
                rate, share, worst = window_images / elapsed, window_wait / self.world / elapsed, worst / elapsed
                done = self.epoch_step - first_step
                eta = (self.steps - self.epoch_step) * (time.perf_counter() - started) / done
                if self.master:
                    spread = f" (worst worker {100 * worst:.1f}%)" if self.world > 1 else ""
                    log.info("epoch %d step %d/%d: loss %.4f, lr %.2g, %.1f img/s, data wait %.1f%%%s, ETA %.0fs",
                             self.epoch + 1, self.epoch_step, self.steps, value, lr, rate, 100 * share, spread, eta)
                    self.metric(kind="step", epoch=self.epoch + 1, step=self.step, loss=value, lr=lr,
                                img_s=rate, data_wait=share, data_wait_max=worst, workers=self.world)
                    for name, figure in (("loss", value), ("lr", lr), ("img_s", rate), ("data_wait", share),
                                         ("data_wait_max", worst)):
                        self.board.add_scalar(f"train/{name}", figure, self.step)
                window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
                if due:  # checked at log steps, where the ranks agree on it
                    self.save()
                    last_checkpoint = time.monotonic()
        elapsed = time.perf_counter() - started
        ranks = self.all_ranks([images_seen, wait])
        (images_seen, total_wait), max_wait = ranks.sum(0).tolist(), ranks[:, 1].max().item()
        return {"train_loss": sum(losses) / max(len(losses), 1), "data_wait": total_wait / self.world / elapsed,
                "data_wait_max": max_wait / elapsed, "img_s": images_seen / elapsed}

    def check_finite(self, value):
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the training loss (or a weight) is {value} at epoch {self.epoch + 1} step {self.epoch_step}: stopped; "
                f"the last good checkpoint ({self.checkpoint_path}) is kept. Try a lower --lr.")

    def evaluate(self, loader, ten_crop=False):
        """-> (top-1 error, top-5 error) on val, from the counts summed over the ranks' slices of it;
        ten-crop averages the softmax over the 10 crops."""
        result = errors(self.model, loader, ten_crop, desc="ten-crop" if ten_crop else "val", progress=self.master)
        wrong1, wrong5, total = self.all_ranks([result["wrong1"], result["wrong5"], result["total"]]).sum(0).tolist()
        return wrong1 / total, wrong5 / total

    def board_hparams(self):
        """The run's config as TensorBoard hparams, its metrics the val errors logged each epoch."""
        from torch.utils.tensorboard.summary import hparams

        config = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "resume"}
        for summary in hparams(config, {"val/top1_error": 0.0, "val/top5_error": 0.0}):
            self.board.file_writer.add_summary(summary)

    def pictures(self):
        towers = [t.conv1.weight for t in self.model.towers]
        kernels_png(self.out / "kernels.png", towers)
        self.board.add_image("conv1/kernels", kernels_grid(towers), self.epoch, dataformats="HWC")
        steps, epochs = [], []
        with open(self.out / "metrics.jsonl") as f:
            for m in map(json.loads, f):
                if m["kind"] == "step":
                    steps.append((m["step"] / self.steps, m["loss"]))
                elif m["kind"] == "epoch":
                    epochs.append((m["epoch"], m["top1"], m["top5"], m["lr"]))
        curves_png(self.out / "curves.png", steps, epochs)

    def run(self):
        config = self.config
        try:
            while self.epoch < config.epochs:
                stats = self.train_epoch()
                top1 = top5 = None
                if self.val is not None:
                    top1, top5 = self.evaluate(self.val)
                self.scheduler.step(stats["train_loss"] if top1 is None else top1)
                self.epoch, self.epoch_step = self.epoch + 1, 0
                if self.master:
                    self.report_epoch(stats, top1, top5)
                self.save()
                if self.master:
                    self.pictures()
            if config.ten_crop and self.val is not None:
                from pipeline import build_loader
                ten = build_loader(config.shards, "val", self.batch_size, crops="ten", **self.loader_options)
                top1, top5 = self.evaluate(ten, ten_crop=True)
                if self.master:
                    log.info("ten-crop: val top-1 error %.2f%%, top-5 error %.2f%%", 100 * top1, 100 * top5)
                    self.metric(kind="final", epoch=self.epoch, top1_ten_crop=top1, top5_ten_crop=top5)
                    self.board.add_scalar("val/top1_error_ten_crop", top1, self.epoch)
                    self.board.add_scalar("val/top5_error_ten_crop", top5, self.epoch)
        finally:
            if self.board:
                self.board.close()  # events are flushed however the run ends

    def report_epoch(self, stats, top1, top5):
        val = "no val split" if top1 is None else f"val top-1 error {100 * top1:.2f}%, top-5 error {100 * top5:.2f}%"
        spread = f" (worst worker {100 * stats['data_wait_max']:.1f}%)" if self.world > 1 else ""
        log.info("epoch %d: train loss %.4f, %s, %.1f img/s, data wait %.1f%%%s", self.epoch,
                 stats["train_loss"], val, stats["img_s"], 100 * stats["data_wait"], spread)
        self.metric(kind="epoch", epoch=self.epoch, step=self.step, top1=top1, top5=top5,
                    lr=self.optimizer.param_groups[0]["lr"], workers=self.world, **stats)
        self.board.add_scalar("train/epoch_loss", stats["train_loss"], self.epoch)
        if top1 is not None:
            self.board.add_scalar("val/top1_error", top1, self.epoch)
            self.board.add_scalar("val/top5_error", top5, self.epoch)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except OSError:
        return None


def refusal(config) -> str | None:
    """Why config.out cannot take this run, or None."""
    out = Path(config.out)
    if (out / "checkpoint.pt").exists() and not config.resume:
        return f"{out} already holds a run: pass --resume to continue it, or choose another --out"
    if config.resume and not (out / "checkpoint.pt").exists():
        return f"--resume: {out} has no checkpoint.pt to continue from"
    if config.resume and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        # what the saved state depends on; the number of workers may change
        for key in ("shards", "batch_size", "seed", "augment", "gpus_per_worker"):
            if saved.get(key, getattr(config, key)) != getattr(config, key):
                return (f"--resume: {out} was trained with --{key.replace('_', '-')} {saved[key]}, not "
                        f"{getattr(config, key)}: resume with the same, or start a new --out")
    return None


def train(config: Config, devices=None, on_save=None) -> int:
    """Train in this process, alone or as one replica of several (the launcher has set up
    torch.distributed); -> exit status. devices, on_save: as for Run."""
    from pipeline.manifest import ShardDirError

    out = Path(config.out)
    try:
        run = Run(config, devices, on_save)  # the loaders refuse a shard folder that does not match its manifest
    except ShardDirError as e:
        log.error("%s", e)
        return 2
    if config.resume:
        if run.epoch >= config.epochs:
            log.info("%s has already trained %d epochs (--epochs %d): nothing to do", out, run.epoch, config.epochs)
            return 0
        log.info("resumed %s at epoch %d step %d", out, run.epoch + 1, run.epoch_step)
    elif run.master:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if run.master:
        (out / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "git_commit": git_commit()},
                                                    indent=1) + "\n")
        log.info("config: %s", json.dumps(dataclasses.asdict(config)))
    try:
        run.run()
    except FloatingPointError as e:
        log.error("%s", e)
        return 1
    log.info("run folder: %s (metrics.jsonl, checkpoint.pt, kernels.png, curves.png); "
             "watch it with `tensorboard --logdir %s`", out, out.parent)
    return 0


def main(argv=None):
    config = parse_args(argv)
    # one voice: under torchrun the other ranks log warnings and errors only
    level = logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    problem = refusal(config)
    if problem:
        log.error("%s", problem)
        return 2
    from trainer.launch import launch

    return launch(config)


if __name__ == "__main__":
    sys.exit(main())
