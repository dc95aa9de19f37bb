"""Top-1/top-5 error of a checkpoint on a shard folder's val split, and what it confuses.

    python -m trainer.evaluate --checkpoint runs/a/checkpoint.pt --shards shards/              # centre crop
    python -m trainer.evaluate --checkpoint runs/a/checkpoint.pt --shards shards/ --ten-crop   # section 4.1

The loop here is the trainer's own (Trainer.evaluate calls `errors`), with the normalisation the
checkpoint was trained with, so a checkpoint's error here is the one the trainer logged for it.
"""
import argparse
import logging
import sys
from collections import Counter

import torch

from pipeline.cli import HelpFormatter, add_device
from trainer.checkpoint import CheckpointError, read
from trainer.model import AlexNet

log = logging.getLogger("evaluate")


@torch.no_grad()
def errors(model, loader, ten_crop=False, desc="val", progress=True) -> dict:
    """-> {"top1", "top5": error rates, "total", "wrong1", "wrong5": counts, "confused": Counter of
    (true class, predicted class) over the top-1 mistakes, "predicted": [classes] bool tensor, the classes
    some image's top-1 was}; ten-crop averages the softmax over 10 crops.
    progress: show a bar (one rank of several shows it)."""
    from pipeline.progress import bar

    model, first = model.eval(), model.devices[0]
    wrong1 = wrong5 = total = 0
    confused, predicted = Counter(), None
    with bar(total=len(loader), desc=desc, unit="batch", leave=False, disable=not progress) as shown:
        for images, labels in loader:
            if not len(labels):  # one rank's share of the last batch may be empty
                shown.update(1)
                continue
            with torch.autocast(first.type, dtype=torch.bfloat16, enabled=first.type == "cuda"):
                if ten_crop:  # images [B, 10, 3, H, W]; scores: the mean of the 10 crops' probabilities
                    b = images.shape[0]
                    scores = model(images.flatten(0, 1)).float().softmax(1).view(b, 10, -1).mean(1)
                else:  # scores: the logits (the softmax keeps their order)
                    scores = model(images).float()
            top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
            if predicted is None:
                predicted = torch.zeros(scores.shape[1], dtype=torch.bool, device=first)
            predicted[top5[:, 0]] = True
            labels = labels.to(first)
            missed = top5[:, 0] != labels
            wrong1 += missed.sum().item()  # host sync: waits for the device
            wrong5 += (top5 != labels[:, None]).all(1).sum().item()
            total += len(labels)
            confused.update(map(tuple, torch.stack([labels, top5[:, 0]], 1)[missed].tolist()))
            shown.update(1)
    return {"top1": wrong1 / total, "top5": wrong5 / total, "total": total, "wrong1": wrong1, "wrong5": wrong5,
            "confused": confused, "predicted": predicted}


def load_checkpoint(path, device):
    """-> (AlexNet in eval mode on `device` with the checkpoint's weights, the checkpoint's dict);
    CheckpointError, one line saying what to do, for a damaged or missing one."""
    state = read(path)
    # the run's LRN: a checkpoint from before the recipes was the paper's
    model = AlexNet(len(state["classes"]), recipe=state.get("recipe", "paper"), devices=[device])
    model.load_state_dict(state["model"])
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), state


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt")
    p.add_argument("--shards", required=True, help="a folder written by jobs/preprocess.py, with a val split")
    p.add_argument("--ten-crop", action=argparse.BooleanOptionalAction, default=False,
                   help="average the softmax over the 10 crops of section 4.1; off, the centre crop, the error the "
                        "trainer logs every epoch (trainer.run's --ten-crop is the one figure it adds at the end)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch")
    add_device(p)
    p.add_argument("--confused", type=int, default=10, help="how many of the most confused pairs to list")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from pipeline import build_loader
    from pipeline.manifest import ShardDirError, class_labels, read_manifest

    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    try:
        model, state = load_checkpoint(args.checkpoint, device)
        manifest = read_manifest(args.shards)
        if manifest["classes"] != state["classes"]:
            raise ValueError(f"{args.shards} has other classes than {args.checkpoint} was trained on")
        if not manifest["splits"]["val"]["samples"]:
            raise ValueError(f"{args.shards} has no val split to evaluate on")
        gpu = device.type == "cuda"
        loader = build_loader(args.shards, "val", args.batch_size, device=device, crops="ten" if args.ten_crop else
                              "center", normalisation=state["normalisation"], channels_last=gpu,
                              dtype=torch.bfloat16 if gpu else torch.float32)
    except (OSError, ValueError, ShardDirError, CheckpointError, ImportError) as e:
        log.error("%s", e)
        return 2
    result = errors(model, loader, ten_crop=args.ten_crop)
    classes = class_labels(state["classes"], state.get("class_names"))
    crop = "ten-crop" if args.ten_crop else "centre crop"
    print(f"{args.checkpoint} (epoch {state['epoch']}, step {state['step']}) on {args.shards}, "
          f"{result['total']} val images, {crop}")
    print(f"top-1 error {100 * result['top1']:.2f}% ({result['wrong1']} of {result['total']}), "
          f"top-5 error {100 * result['top5']:.2f}% ({result['wrong5']} of {result['total']})")
    if result["confused"]:
        print("most often confused (true -> predicted):")
        for (true, predicted), n in result["confused"].most_common(args.confused):
            print(f"{n:8d}  {classes[true]} -> {classes[predicted]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
