"""The trainer's one config: the dataclass (the paper's values as defaults), its flags, and its refusals.

Every field is a flag (`batch_size` -> `--batch-size`, booleans as `--x` / `--no-x`); the comment on
a field is its flag's help, so `python -m trainer.run --help` says what each does, its default and
its choices.
"""
import argparse
import dataclasses
import inspect
import json
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.loader import INPUTS
from trainer.recipes import RECIPES

@dataclass
class Config:
    shards: str = ""  # (required) a folder written by jobs/preprocess.py
    out: str = ""  # run folder; default runs/<time>
    epochs: int = 90  # passes over the training set (section 5: roughly 90 cycles)
    batch_size: int = 128  # images per step over all workers (section 5), split evenly over them
    lr: float = 0.01  # learning rate at the start (section 5)
    momentum: float = 0.9  # SGD's momentum (section 5)
    weight_decay: float = 5e-4  # L2 weight decay (section 5)
    lr_factor: float = 0.1  # what the lr is multiplied by when the validation error stops improving (section 5)
    lr_patience: int = 2  # epochs in a row without a val error better than the best by more than its noise before the lr is cut (trainer/schedule.py)
    optimizer: str = "sgd"  # sgd (section 5) or adam
    recipe: str = "caffe"  # the reference followed for the init, LRN and biases' lr and decay (trainer/recipes.py): paper (its text), cuda-convnet2 (Krizhevsky's released configs), caffe (bvlc_alexnet), torch (PyTorch's init)
    inputs: str = ""  # raw: x - mean in 0-255 units, the paper's (section 2); standardised: (x/255 - mean)/std; default the recipe's: standardised with torch, raw with the others
    dropout: float = 0.5  # dropout probability in fc6 and fc7 (section 4.2)
    augment: bool = True  # random crops, flips, Fancy PCA (section 4.1); else centre crops
    fancy_pca_sigma: float = 0.1  # std of Fancy PCA's per-image alpha (section 4.1)
    device: str = ""  # cpu or cuda; default cuda if present
    gpus_per_worker: int = 1  # (also --gpus) 2: tower 0 on the first GPU, tower 1 on the second (section 3.2)
    compile: bool = True  # torch.compile the training step's model on CUDA with --gpus 1 (AlexNet's step 1.8x faster on an H100, gpu-check measures it); eager on the CPU
    compile_mode: str = "default"  # torch.compile's mode: reduce-overhead replays the step as CUDA graphs (one per batch shape, the partial last batch its own); one process only
    dali_threads: int = 0  # DALI's CPU threads per pipeline; 0: on CUDA the worker's cores minus two (at least 1), a core left to the thread that launches the step; on the CPU all of them
    hw_decoder_load: float = 0.65  # on CUDA, the share of JPEGs for the hardware decoder (NVJPG engines, off the SMs); the rest nvJPEG's hybrid decode (DALI's default 0.65)
    prefetch_queue_depth: int = 2  # batches each DALI pipeline prepares ahead (DALI's default 2)
    uint8_handover: bool = False  # the train pipeline hands over uint8 crops and each image's mean [B, 3]; the step normalises (Fancy PCA's offset included) and casts: a quarter of the bytes
    async_checkpoint: bool = False  # write checkpoints in a thread from a copy in host memory, the steps going on (written whole or not at all either way)
    workers: int = 0  # data-parallel replicas on Ray Train; 0: this process alone (torchrun sets its own)
    cpus_per_worker: int = 0  # CPU cores of a worker (Ray Train, torchrun): its torch and DALI threads; 0: the node's cores divided by its workers (a Ray Train worker then asks Ray for 1)
    address: str = ""  # the Ray cluster for --workers; default $RAY_ADDRESS, else a private Ray on 127.0.0.1
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before a Ray Train run stops
    seed: int = 0  # seeds the initial weights, dropout masks, augmentation and shard order
    log_every: int = 20  # steps between log lines and metrics lines
    checkpoint_minutes: float = 10.0  # between checkpoints, besides the one at each epoch's end and at a SIGTERM
    steps_per_epoch: int = 0  # cap on training steps per epoch (0: the whole epoch)
    ten_crop: bool = True  # at the end: ten-crop top-1/top-5 error (section 4.1)
    verify_shards: bool = True  # sha256 of every shard against the manifest before the first step
    resume: bool = False  # continue from the run folder's checkpoint

    def __post_init__(self):
        self.inputs = self.inputs or (RECIPES[self.recipe].inputs if self.recipe in RECIPES else "")


CHOICES = {"optimizer": ("sgd", "adam"), "recipe": tuple(RECIPES), "inputs": INPUTS, "device": ("cpu", "cuda"),
           "gpus_per_worker": (1, 2), "compile_mode": ("default", "reduce-overhead")}
AT_LEAST = {"epochs": 1, "batch_size": 1, "log_every": 1, "cpus_per_worker": 0, "workers": 0, "max_failures": 0,
            "steps_per_epoch": 0, "checkpoint_minutes": 0, "lr": 0, "momentum": 0, "weight_decay": 0,
            "lr_factor": 0, "lr_patience": 1, "dropout": 0, "fancy_pca_sigma": 0, "dali_threads": 0,
            "hw_decoder_load": 0, "prefetch_queue_depth": 1}
BELOW = {"lr_factor": 1, "dropout": 1}
AT_MOST = {"hw_decoder_load": 1}


def field_help() -> dict:
    """{field name: the comment on its line in Config}: the comments are the flags' help."""
    lines = inspect.getsource(Config).splitlines()
    return {m[1]: m[2] for m in (re.match(r"\s+(\w+): \w+ = .*?#\s*(.*)$", line) for line in lines) if m}


def parse_args(argv=None, doc=None) -> Config:
    """The command line as a Config, refused with one line (exit 2) where it cannot be run.
    doc: the command's description (trainer/run.py's docstring)."""
    p = argparse.ArgumentParser(prog="python -m trainer.run", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help()
    for field in dataclasses.fields(Config):
        flags = ["--" + field.name.replace("_", "-")] + (["--gpus"] if field.name == "gpus_per_worker" else [])
        default = ("on" if field.default else "off") if field.type is bool else field.default
        kwargs = dict(help=helps[field.name] + ("" if default == "" else f" (default: {default})"))
        if field.name == "resume":  # a flag to ask for, never one to refuse: no --no-resume
            p.add_argument(*flags, action="store_true", **kwargs)
        elif field.type is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=field.default, **kwargs)
        else:
            p.add_argument(*flags, type=field.type, default=field.default, required=field.name == "shards",
                           choices=CHOICES.get(field.name), **kwargs)
    config = Config(**vars(p.parse_args(argv)))  # an unknown flag or choice is an argparse error
    for name, least in AT_LEAST.items():
        if not getattr(config, name) >= least:  # nan too
            p.error(f"--{name.replace('_', '-')} must be {least} or more, not {getattr(config, name)}")
    for name, bound in BELOW.items():
        if not getattr(config, name) < bound:
            p.error(f"--{name.replace('_', '-')} must be below {bound}, not {getattr(config, name)}")
    for name, bound in AT_MOST.items():
        if not getattr(config, name) <= bound:
            p.error(f"--{name.replace('_', '-')} must be {bound} or less, not {getattr(config, name)}")
    world = config.workers or int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets WORLD_SIZE
    if config.compile_mode == "reduce-overhead" and world > 1:  # DDP's all-reduce hooks are not captured in a graph
        p.error("--compile-mode reduce-overhead (CUDA graphs) is for one process; with several use the default")
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
    # Ray Train's workers and a resumed job start elsewhere: every path they see is absolute. Inside
    # `ray job submit --working-dir` the current folder is a copy that Ray deletes when the job ends.
    for name in ("shards", "out"):
        value = getattr(config, name)
        if value.startswith("s3://"):  # a bucket is the same from every node
            continue
        if "runtime_resources" in os.getcwd() and not os.path.isabs(value):
            p.error(f"--{name} {value} is relative to the job's copy of the working dir, which Ray deletes: "
                    f"give a path every node sees, absolute")
        setattr(config, name, str(Path(value).absolute()))
    return config


def write_config(config: Config):
    """RUN/config.json: the resolved config and the git commit it ran, and the same in the log."""
    (Path(config.out) / "config.json").write_text(json.dumps({**dataclasses.asdict(config),
                                                              "git_commit": git_commit()}, indent=1) + "\n")
    logging.getLogger("trainer").info("config: %s", json.dumps(dataclasses.asdict(config)))


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except OSError:
        return None
