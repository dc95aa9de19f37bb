"""Train the two-tower AlexNet on a shard folder with the paper's recipe.

    python -m trainer.run --shards shards/                        # best device present, paper's recipe
    python -m trainer.run --shards shards/ --gpus 2               # one tower per GPU, as in the paper
    python -m trainer.run --shards shards/ --out runs/a --resume  # continue a killed run, mid-epoch too

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
import torch.nn.functional as F

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
    gpus: int = 1  # 2: tower 0 on cuda:0, tower 1 on cuda:1 (section 3.2)
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
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            p.add_argument(flag, type=field.type, default=field.default, required=field.name == "shards")
    config = Config(**vars(p.parse_args(argv)))  # an unknown flag is an argparse error
    for name, allowed in [("optimizer", ("sgd", "adam")), ("init", ("paper", "torch")),
                          ("device", ("", "cpu", "cuda")), ("gpus", (1, 2))]:
        if getattr(config, name) not in allowed:
            p.error(f"--{name} must be one of {allowed}, not {getattr(config, name)!r}")
    config.device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if config.gpus == 2 and config.device != "cuda":
        p.error("--gpus 2 places the towers on two CUDA GPUs: it needs --device cuda")
    if config.gpus == 2 and torch.cuda.device_count() < 2:
        p.error(f"--gpus 2 needs two CUDA GPUs; this machine has {torch.cuda.device_count()}")
    config.out = config.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    return config


class Run:
    """One training run: model, optimiser, loaders, and the run folder they report to."""

    def __init__(self, config: Config):
        """A new run, or with config.resume the one in config.out, restored from its checkpoint."""
        from torch.utils.tensorboard import SummaryWriter

        from pipeline import build_loader  # the data half; the trainer only sees torch tensors
        from pipeline.manifest import read_manifest, read_pca
        from pipeline.verify import verify_checksums

        self.config, self.out = config, Path(config.out)
        manifest = read_manifest(config.shards)  # ShardDirError before any work
        self.classes, pca = len(manifest["classes"]), read_pca(config.shards)
        # what trainer.evaluate and trainer.predict need, kept in every checkpoint
        self.about = {"classes": manifest["classes"], "normalisation": {"mean": pca["mean"], "std": pca["std"]},
                      "preprocessing": {k: manifest["settings"][k] for k in ("size", "quality", "max_pixels")}}
        if config.verify_shards:
            started = time.perf_counter()
            checked = verify_checksums(config.shards, manifest)
            log.info("sha256 of %d shard and index files: ok (%d hashed, %d unchanged since an earlier check) "
                     "in %.1fs", checked["hashed"] + checked["remembered"], checked["hashed"],
                     checked["remembered"], time.perf_counter() - started)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.out / "checkpoint.pt"
        gpu = config.device == "cuda"
        self.device = torch.device("cuda:0" if gpu else "cpu")
        devices = ["cuda:0", "cuda:1"] if config.gpus == 2 else [self.device]
        torch.manual_seed(config.seed)
        self.model = AlexNet(self.classes, dropout=config.dropout, init=config.init, devices=devices)
        if gpu:
            self.model = self.model.to(memory_format=torch.channels_last)
        params = self.model.parameters()
        self.optimizer = (torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                          weight_decay=config.weight_decay) if config.optimizer == "sgd"
                          else torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay))
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience)
        self.epoch, self.step, self.epoch_step = 0, 0, 0
        loader_state = self.load() if config.resume else None
        self.loader_options = dict(device=self.device, channels_last=gpu,
                                   dtype=torch.bfloat16 if gpu else torch.float32)
        self.train = build_loader(config.shards, "train", config.batch_size, seed=config.seed,
                                  state=loader_state, crops="random" if config.augment else "center",
                                  fancy_pca_sigma=config.fancy_pca_sigma, **self.loader_options)
        self.val = None
        if manifest["splits"]["val"]["samples"]:
            self.val = build_loader(config.shards, "val", config.batch_size, crops="center", **self.loader_options)
        elif not config.resume:
            log.warning("%s has no val split: training without validation, the lr following the training loss "
                        "(jobs/preprocess.py --val-fraction holds part of train out as val)", config.shards)
        self.steps = min(len(self.train), config.steps_per_epoch or len(self.train))
        # a resumed run's events from the steps it redoes are dropped by TensorBoard (purge_step)
        self.board = SummaryWriter(self.out, purge_step=self.step + 1 if config.resume else None)
        if not config.resume:
            self.board_hparams()
        # training batches without end: a capped epoch (--steps-per-epoch) and the loader's epoch
        # need not coincide
        self.batches = (batch for _ in itertools.count() for batch in self.train)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self):
        """Write the checkpoint under a temporary name, then rename; never with non-finite weights."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            self.check_finite(float("nan"))
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                 "epoch_step": self.epoch_step, "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                 "loader": torch.frombuffer(bytearray(self.train.state_dict()["dali"]), dtype=torch.uint8),
                 **self.about}
        tmp = self.checkpoint_path.with_name(".checkpoint.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load(self) -> dict:
        """Restore everything but the loader from the checkpoint; -> the loader's state."""
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.epoch_step = state["epoch"], state["step"], state["epoch_step"]
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return {"dali": state["loader"].numpy().tobytes()}

    # -- the loop ------------------------------------------------------------------------------

    def metric(self, **fields):
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(fields) + "\n")

    def train_epoch(self):
        config, model = self.config, self.model.train()
        started, first_step = time.perf_counter(), self.epoch_step
        wait = window_wait = 0.0
        window_start, window_images, last_checkpoint = started, 0, time.monotonic()
        losses = []
        while self.epoch_step < self.steps:
            t0 = time.perf_counter()
            images, labels = next(self.batches)  # blocks only if the pipeline is behind: the data wait
            waited = time.perf_counter() - t0
            wait, window_wait = wait + waited, window_wait + waited
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                loss = F.cross_entropy(model(images), labels.to(self.model.devices[0]))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step, self.epoch_step = self.step + 1, self.epoch_step + 1
            window_images += len(labels)
            if self.epoch_step % config.log_every == 0 or self.epoch_step == self.steps:
                value = loss.item()  # host sync: waits for the GPU
                self.check_finite(value)
                losses.append(value)
                elapsed = time.perf_counter() - window_start
                lr = self.optimizer.param_groups[0]["lr"]
                rate, share = window_images / elapsed, window_wait / elapsed
                done = self.epoch_step - first_step
                eta = (self.steps - self.epoch_step) * (time.perf_counter() - started) / done
                log.info("epoch %d step %d/%d: loss %.4f, lr %.2g, %.1f img/s, data wait %.1f%%, ETA %.0fs",
                         self.epoch + 1, self.epoch_step, self.steps, value, lr, rate, 100 * share, eta)
                self.metric(kind="step", epoch=self.epoch + 1, step=self.step, loss=value, lr=lr,
                            img_s=rate, data_wait=share)
                for name, figure in (("loss", value), ("lr", lr), ("img_s", rate), ("data_wait", share)):
                    self.board.add_scalar(f"train/{name}", figure, self.step)
                window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
            if time.monotonic() - last_checkpoint > 60 * config.checkpoint_minutes:
                self.check_finite(loss.item())
                self.save()
                last_checkpoint = time.monotonic()
        elapsed = time.perf_counter() - started
        return {"train_loss": sum(losses) / max(len(losses), 1), "data_wait": wait / elapsed,
                "img_s": (self.epoch_step - first_step) * self.config.batch_size / elapsed}

    def check_finite(self, value):
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the training loss (or a weight) is {value} at epoch {self.epoch + 1} step {self.epoch_step}: stopped; "
                f"the last good checkpoint ({self.checkpoint_path}) is kept. Try a lower --lr.")

    def evaluate(self, loader, ten_crop=False):
        """-> (top-1 error, top-5 error) on val; ten-crop averages the softmax over the 10 crops."""
        result = errors(self.model, loader, ten_crop, desc="ten-crop" if ten_crop else "val")
        return result["top1"], result["top5"]

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
                val = ("no val split" if top1 is None
                       else f"val top-1 error {100 * top1:.2f}%, top-5 error {100 * top5:.2f}%")
                log.info("epoch %d: train loss %.4f, %s, %.1f img/s, data wait %.1f%%", self.epoch,
                         stats["train_loss"], val, stats["img_s"], 100 * stats["data_wait"])
                self.metric(kind="epoch", epoch=self.epoch, step=self.step, top1=top1, top5=top5,
                            lr=self.optimizer.param_groups[0]["lr"], **stats)
                self.board.add_scalar("train/epoch_loss", stats["train_loss"], self.epoch)
                if top1 is not None:
                    self.board.add_scalar("val/top1_error", top1, self.epoch)
                    self.board.add_scalar("val/top5_error", top5, self.epoch)
                self.save()
                self.pictures()
            if config.ten_crop and self.val is not None:
                from pipeline import build_loader
                ten = build_loader(config.shards, "val", config.batch_size, crops="ten", **self.loader_options)
                top1, top5 = self.evaluate(ten, ten_crop=True)
                log.info("ten-crop: val top-1 error %.2f%%, top-5 error %.2f%%", 100 * top1, 100 * top5)
                self.metric(kind="final", epoch=self.epoch, top1_ten_crop=top1, top5_ten_crop=top5)
                self.board.add_scalar("val/top1_error_ten_crop", top1, self.epoch)
                self.board.add_scalar("val/top5_error_ten_crop", top5, self.epoch)
        finally:
            self.board.close()  # events are flushed however the run ends


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except OSError:
        return None


def main(argv=None):
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from pipeline.manifest import ShardDirError

    out = Path(config.out)
    if (out / "checkpoint.pt").exists() and not config.resume:
        log.error("%s already holds a run: pass --resume to continue it, or choose another --out", out)
        return 2
    if config.resume and not (out / "checkpoint.pt").exists():
        log.error("--resume: %s has no checkpoint.pt to continue from", out)
        return 2
    if config.resume and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        for key in ("shards", "batch_size", "seed", "augment", "gpus"):  # what the saved state depends on
            if saved.get(key) != getattr(config, key):
                log.error("--resume: %s was trained with --%s %s, not %s: resume with the same, or start "
                          "a new --out", out, key.replace("_", "-"), saved.get(key), getattr(config, key))
                return 2
    try:
        run = Run(config)  # the loaders refuse a shard folder that does not match its manifest
    except ShardDirError as e:
        log.error("%s", e)
        return 2
    if config.resume:
        if run.epoch >= config.epochs:
            log.info("%s has already trained %d epochs (--epochs %d): nothing to do", out, run.epoch, config.epochs)
            return 0
        log.info("resumed %s at epoch %d step %d", out, run.epoch + 1, run.epoch_step)
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
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


if __name__ == "__main__":
    sys.exit(main())
