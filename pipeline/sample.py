"""A small real ImageNet-style tree from scikit-learn's bundled handwritten digits.

    python -m pipeline.sample --out data/digits      # 1,797 8x8 scans, 10 classes, 80/20 stratified

Writes train/<digit>/<n>.<ext> and val/<digit>/<n>.<ext>: real, tiny, odd-sized inputs, in turn
PNG, JPEG, BMP and 16-bit PNG, so the preprocessing sees more than one format.
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cli import HelpFormatter

FORMATS = [("png", "PNG"), ("jpg", "JPEG"), ("bmp", "BMP"), ("16.png", "PNG")]


def write_digits(out, val_fraction=0.2, per_class=None, seed=0) -> dict:
    """-> {"train": count, "val": count}. per_class: at most this many scans of each digit."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, labels = digits.images, digits.target  # [1797, 8, 8] in 0..16, [1797]
    index = np.arange(len(labels))
    if per_class:
        index = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    train, val = train_test_split(index, test_size=val_fraction, stratify=labels[index], random_state=seed)
    tmp = Path(out).with_name(f".{Path(out).name}.tmp")  # a killed run leaves no half tree behind
    shutil.rmtree(tmp, ignore_errors=True)
    for split, chosen in (("train", train), ("val", val)):
        for i in sorted(chosen):
            folder = tmp / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            ext, fmt = FORMATS[i % len(FORMATS)]
            scaled = images[i] / 16.0  # ink in 0..1
            if ext == "16.png":
                Image.fromarray(np.round(scaled * 65535).astype(np.uint16)).save(folder / f"{i:04d}.png", fmt)
            else:
                Image.fromarray(np.round(scaled * 255).astype(np.uint8)).save(folder / f"{i:04d}.{ext}", fmt)
    os.replace(tmp, out)
    return {"train": len(train), "val": len(val)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.sample", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="folder for train/ and val/")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each digit held out as val/")
    p.add_argument("--per-class", type=int, default=None, help="at most this many scans per digit")
    args = p.parse_args(argv)
    if (Path(args.out) / "train").exists():
        print(f"sample: {args.out} already holds a tree; kept")
        return 0
    try:
        counts = write_digits(args.out, args.val_fraction, args.per_class)
    except OSError as e:  # --out a file, a full disk, a forbidden place
        p.exit(2, f"sample: cannot write into --out {args.out}: {e.strerror or e}\n")
    print(f"sample: {counts['train']} train and {counts['val']} val images of 10 digits in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
