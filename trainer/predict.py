"""The top-5 classes of image files, by a trained checkpoint.

    python -m trainer.predict --checkpoint runs/a/checkpoint.pt cat.jpg dog.png ...
    cat.jpg: n02123045 tabby, tabby cat 0.831, n02123159 tiger cat 0.092, ...

Each image is prepared exactly as the shards were (the same decode by content, EXIF orientation,
central square resized to the shards' size, JPEG at their quality and decoded back), its central
227x227 taken and normalised with the checkpoint's mean and std: the class names, the normalisation
and the preprocessing settings travel in the checkpoint, so no shard folder is needed. A file that
cannot be read is reported with the preprocessing's reason and the others are still predicted
(exit status 1 if any was not).
"""
import argparse
import sys

import numpy as np
import torch

from pipeline.cli import HelpFormatter, add_device
from pipeline.loader import CROP
from pipeline.manifest import class_labels
from trainer.checkpoint import CheckpointError
from trainer.evaluate import load_checkpoint


def prepare(path, state) -> np.ndarray:
    """-> [3, 227, 227] float32, (x/255 - mean)/std of the centre crop; or pipeline.images.Rejected."""
    from pipeline.images import read_bytes, to_sample

    settings = state["preprocessing"]
    _, rgb = to_sample(read_bytes(path), settings["size"], settings["quality"], settings["max_pixels"])
    at = (settings["size"] - CROP) // 2
    crop = rgb[at:at + CROP, at:at + CROP].astype(np.float32) / 255
    mean, std = (np.array(state["normalisation"][k], np.float32) for k in ("mean", "std"))
    return ((crop - mean) / std).transpose(2, 0, 1)


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, BMP, TIFF, ...)")
    p.add_argument("--top", type=int, default=5, help="how many classes to print per image")
    add_device(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    args = p.parse_args(argv)
    from pipeline.images import Rejected

    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    try:
        model, state = load_checkpoint(args.checkpoint, device)
    except (OSError, ValueError, CheckpointError) as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    classes, failed = class_labels(state["classes"], state.get("class_names")), 0
    for start in range(0, len(args.images), args.batch_size):
        paths, inputs = [], []
        for path in args.images[start:start + args.batch_size]:
            try:
                inputs.append(prepare(path, state))
                paths.append(path)
            except Rejected as e:
                print(f"{path}: not predicted: {e}", file=sys.stderr)
                failed += 1
        if not inputs:
            continue
        x = torch.from_numpy(np.stack(inputs)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            probs = model(x).float().softmax(1).cpu()
        top = probs.topk(min(args.top, len(classes)), dim=1)
        for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
            print(f"{path}: " + ", ".join(f"{classes[i]} {v:.3f}" for v, i in zip(values, indices)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
