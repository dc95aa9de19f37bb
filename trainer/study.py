"""The first steps of each recipe (trainer/recipes.py) on one shard folder: does it learn, or collapse?

    python -m trainer.study --shards data/digits-shards --batch-size 32 --steps 150
    python -m trainer.study --shards data/mini-shards --batch-size 128 --steps 100

Each recipe trains `--steps` steps with the trainer itself (SGD at a constant --lr, the same seed and
batches), logging every step's loss, as one epoch however many passes over the shards it takes, and is
then evaluated on val. One row each: the largest step loss,
the loss at the end (the mean of the last 10 steps), how many classes val's top-1 predictions take, the
val top-1 error, and the collapse the trainer reported, if any. Before the first step, on the first batch,
what the mechanism of a collapse turns on: fc8's input h (both towers' fc7 after ReLU), its size
sum(h^2) averaged over the images, and how alike it is from image to image (the mean cosine similarity
of two images' h). --json writes the rows.
"""
import argparse
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.cli import HelpFormatter
from trainer.config import parse_args
from trainer.recipes import RECIPES

log = logging.getLogger("study")


@torch.no_grad()
def fc8_input(model, images) -> dict:
    """{"h2": mean over images of sum(h^2), "alike": mean cosine similarity of two images' h}, h fc8's input."""
    seen = []
    hook = model.towers[0].fc8.register_forward_pre_hook(lambda module, args: seen.append(args[0].float()))
    model.eval()(images)
    hook.remove()
    h = seen[0]
    unit = F.normalize(h, dim=1)
    n = len(h)
    alike = ((unit @ unit.T).sum() - n) / max(n * (n - 1), 1)
    return {"h2": h.pow(2).sum(1).mean().item(), "alike": alike.item()}


def study(shards, recipe, out, batch_size, steps, lr, seed) -> dict:
    """One recipe's first `steps` steps in run folder `out`; -> its row."""
    from trainer.loop import Trainer

    config = parse_args(["--shards", shards, "--out", str(out), "--recipe", recipe, "--batch-size", str(batch_size),
                         "--lr", str(lr), "--epochs", "1", "--log-every", "1",
                         "--seed", str(seed), "--no-ten-crop", "--no-verify-shards", "--no-compile"])
    trainer = Trainer(config)
    trainer.steps = steps  # one epoch of exactly `steps` steps, over as many passes of the shards as that takes
    images, _ = next(trainer.batches)  # the same first batch for every recipe (the same seed)
    row = {"recipe": recipe, **fc8_input(trainer.model, images)}
    try:
        trainer.fit()
        diverged = None
    except FloatingPointError:  # the trainer stops at a non-finite loss: the row says where
        diverged = f"diverged: a non-finite loss at step {trainer.step}"
    metrics = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    losses = [m["loss"] for m in metrics if m["kind"] == "step"] or [math.nan]
    epoch = next((m for m in metrics if m["kind"] == "epoch"), {"classes_predicted": None, "top1": None})
    collapse = next((m["why"] for m in metrics if m["kind"] == "collapse"), None)
    return {**row, "steps": trainer.step, "max_loss": max(losses), "end_loss": sum(losses[-10:]) / len(losses[-10:]),
            "chance_loss": math.log(trainer.classes), "classes": trainer.classes,
            "classes_predicted": epoch["classes_predicted"], "top1": epoch["top1"],
            "collapse": "; ".join(filter(None, (diverged, collapse))) or None}


def table(rows) -> str:
    lines = ["| recipe | sum h^2 at init | h alike | largest loss | loss at the end | classes predicted | "
             "val top-1 error | collapse reported |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        predicted = "-" if r["top1"] is None else f"{r['classes_predicted']} of {r['classes']}"
        top1 = "-" if r["top1"] is None else f"{100 * r['top1']:.1f}%"
        h2 = f"{r['h2']:,.0f}" if r["h2"] >= 100 else f"{r['h2']:.3g}"  # torch's init: 0.206, not "0"
        lines.append(f"| {r['recipe']} | {h2} | {r['alike']:.4f} | {r['max_loss']:.3g} | "
                     f"{r['end_loss']:.4g} (chance {r['chance_loss']:.2f}) after {r['steps']} steps | {predicted} | "
                     f"{top1} | {r['collapse'] or 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer.study", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--shards", required=True, help="a folder written by jobs/preprocess.py, with a val split")
    p.add_argument("--recipes", nargs="+", choices=tuple(RECIPES), default=list(RECIPES), help="the recipes to run, in turn")
    p.add_argument("--batch-size", type=int, default=128, help="images a step")
    p.add_argument("--steps", type=int, default=100, help="steps of each recipe")
    p.add_argument("--lr", type=float, default=0.01, help="the lr, constant (section 5's at the start)")
    p.add_argument("--seed", type=int, default=0, help="the initial weights' and the batches' seed")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(logging.WARNING)  # a line a step otherwise; collapses still show
    rows = []
    with tempfile.TemporaryDirectory(prefix="study-") as runs:  # each run's checkpoint goes with it
        for recipe in args.recipes:
            log.info("%s: %d steps at batch %d", recipe, args.steps, args.batch_size)
            rows.append(study(args.shards, recipe, Path(runs) / recipe, args.batch_size, args.steps, args.lr,
                              args.seed))
            log.info("%s", json.dumps(rows[-1]))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
