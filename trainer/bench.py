"""Can the input pipeline feed the model? pipeline.bench's figures beside AlexNet's own rate, one table.

    python -m trainer.bench --shards DIR [--device cuda] [--batch-size 128] [--plot bench.png]

  model    the trainer's AlexNet forward+backward (one SGD step) on synthetic batches of the same size,
           on CUDA as the trainer runs it: bf16 autocast, channels_last, torch.compile
  verdict  train_pipeline / model: at 1 or more the GPUs (or cores) never wait on data

It lives here, not in pipeline/, because it needs the model: the pipeline never imports the trainer.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch

from pipeline.cli import HelpFormatter
from pipeline.bench import (USER_ERRORS, add_loader_arguments, bench_loader, loader_rows, loader_title, pick_device,
                            plot, rate, table)
from pipeline.loader import CROP
from trainer.model import AlexNet


def model_rate(device, batch_size, seconds, bf16=True, channels_last=None, compile_mode=None, beside=None) -> float:
    """img/s of AlexNet's training step (1000 classes) on random [batch_size, 3, 227, 227] batches, as the
    trainer takes it: bf16 autocast (`bf16`) and channels_last memory (default: on CUDA). compile_mode:
    torch.compile's mode for the model ("default"; "reduce-overhead" replays CUDA graphs), None: eager.
    beside: an endless iterator of the input pipeline's batches, one taken and thrown away each step: the
    step on its fixed batch while the pipeline shares the device (and the cores) with it."""
    gpu = torch.device(device).type == "cuda"
    memory = torch.channels_last if (gpu if channels_last is None else channels_last) else torch.contiguous_format
    model = AlexNet(num_classes=1000).to(device).to(memory_format=memory)
    net = torch.compile(model, mode=compile_mode) if compile_mode else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, CROP, CROP, device=device).to(memory_format=memory)
    y = torch.randint(0, 1000, (batch_size,), device=device)

    def steps():
        while True:
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=gpu and bf16):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if beside is not None:
                next(beside)
            if gpu:
                torch.cuda.synchronize()
            yield batch_size

    return rate(steps(), seconds, warmup=3 if compile_mode else 1)  # compiling, CUDA graphs' recording


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer.bench", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--shards", required=True, help="a shard folder written by jobs/preprocess.py")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                   help="DALI's threads and the baseline's DataLoader workers")
    add_loader_arguments(p)
    args = p.parse_args(argv)
    device = pick_device(args)
    try:
        figures = bench_loader(args.shards, device, args.batch_size, args.seconds, args.cores, args.rounds)
    except USER_ERRORS as e:
        p.exit(2, f"bench: {e}\n")
    gpu = torch.device(device).type == "cuda"
    figures["model"] = model_rate(device, args.batch_size, args.seconds, compile_mode="default" if gpu else None)
    feed = figures["train_pipeline"] / figures["model"]
    rows = loader_rows(figures) + [
        ("model", f"{figures['model']:9,.0f} img/s  AlexNet forward+backward, batch {args.batch_size}")]
    print(table(rows, loader_title(args, figures)))
    print(f"verdict: the pipeline {'can' if feed >= 1 else 'cannot'} feed the model: {feed:,.1f} x what it consumes")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    if args.plot:
        bars = {name: figures[name] for name in ("decode_only", "train_pipeline", "baseline", "model")}
        plot(bars, f"input pipeline on {device}, batch {args.batch_size}, {args.cores} cores", args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
