"""An ImageNet-shaped miniature: tiny JPEGs at ImageNet's counts (or a share of them), in any of the forms
ImageNet is downloaded in (pipeline.imagenet), with a devkit whose ID order is not the sorted one, its
ancestors, and ImageNet's dirty files (a PNG named .JPEG, CMYK JPEGs). The same seed writes the same
image bytes in every form.

    python -m pipeline.miniature --out /data/mini --form archives              # 1,281,167 + 50,000 images
    python -m pipeline.miniature --out /data/mini-tree --form tree --scale 0.01
"""
import argparse
import colorsys
import csv
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cli import HelpFormatter
from pipeline.imagenet import DEVKIT, GROUND_TRUTH, KAGGLE, KAGGLE_LABELS, KAGGLE_NAMES, META, TRAIN_TAR, VAL_TAR

FORMS = ("archives", "tree", "kaggle")
TRAIN, VAL_PER_CLASS, CLASSES = 1_281_167, 50, 1000
PER_CLASS = (732, 1300)  # the fewest and the most training images a class of ImageNet has


class Miniature:
    """What a miniature holds: wnids (sorted), per class its ILSVRC2012_ID and words, the train counts,
    and the class of each val image."""

    def __init__(self, classes=CLASSES, scale=1.0, seed=0):
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.wnids = sorted(f"n{n:08d}" for n in rng.choice(np.arange(1_000_000, 16_000_000), classes, replace=False))
        order = rng.permutation(classes)
        if (order == np.arange(classes)).all():  # the devkit's ID order must not be the sorted one
            order = order[::-1]
        self.ids = [int(i) + 1 for i in order]
        self.words = [f"synthetic {i}, class {w}" for i, w in zip(self.ids, self.wnids)]
        self.train = [max(1, round(n * scale)) for n in _train_counts(classes, rng)]
        val = [c for c in range(classes) for _ in range(max(1, round(VAL_PER_CLASS * scale)))]
        self.val = [int(c) for c in rng.permutation(val)]  # the class of ILSVRC2012_val_00000001, ...

    def train_images(self, c):
        """[(file name, bytes)] of class c's training images, in order."""
        wnid = self.wnids[c]
        return [(f"{wnid}_{n + 1}.JPEG", _image(self.seed, c, n, len(self.wnids), _dirt(c, n))) for n in range(self.train[c])]

    def val_images(self):
        return [(f"ILSVRC2012_val_{i + 1:08d}.JPEG", _image(self.seed, c, -1 - i, len(self.wnids), "cmyk" if i == 0 else None))
                for i, c in enumerate(self.val)]


def _train_counts(classes, rng):
    """ImageNet's train count spread over `classes` like ImageNet's: most 1,300, some fewer, one 732."""
    total = round(TRAIN * classes / CLASSES)
    counts = np.full(classes, PER_CLASS[1])
    short = rng.permutation(classes)[:max(1, classes // 25)]
    counts[short[0]] = PER_CLASS[0]
    rest = PER_CLASS[1] * classes - total - (PER_CLASS[1] - PER_CLASS[0])
    if len(short) > 1:
        share, extra = divmod(max(0, rest), len(short) - 1)
        counts[short[1:]] -= share
        counts[short[1:1 + extra]] -= 1
    return counts.tolist()


def _dirt(c, n):
    """ImageNet's own dirty files, in class 0: a PNG named .JPEG (n02105855_2933) and a CMYK JPEG."""
    return {(0, 0): "png", (0, 1): "cmyk"}.get((c, n))


def pixels(seed, c, n, classes) -> np.ndarray:
    """[h, w, 3] uint8 RGB of image n of class c (val images have n < 0): the class's hue, and noise."""
    rng = np.random.default_rng([seed, c, n + 2**20])
    h, w = rng.integers(12, 48, size=2)
    colour = 255 * np.array(colorsys.hsv_to_rgb(c / classes, 0.7, 0.9))
    return np.clip(colour + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _image(seed, c, n, classes, kind=None) -> bytes:
    image, buffer = Image.fromarray(pixels(seed, c, n, classes)), io.BytesIO()
    if kind == "png":
        image.save(buffer, "PNG")
    else:
        (image.convert("CMYK") if kind == "cmyk" else image).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write(out, form, classes=CLASSES, scale=1.0, seed=0, progress=None) -> Miniature:
    """The miniature in `form` (FORMS) under `out`; -> what it holds."""
    mini, out = Miniature(classes, scale, seed), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if form == "archives":
        with tarfile.open(out / TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
            for c, wnid in enumerate(mini.wnids):
                inner = io.BytesIO()
                with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tar:
                    for name, data in mini.train_images(c):
                        _add(tar, name, data)
                _add(outer, f"{wnid}.tar", inner.getvalue())
                if progress:
                    progress(c + 1, classes)
        with tarfile.open(out / VAL_TAR, "w", format=tarfile.GNU_FORMAT) as tar:
            for name, data in mini.val_images():
                _add(tar, name, data)
    else:
        base = out / KAGGLE if form == "kaggle" else out
        for c, wnid in enumerate(mini.wnids):
            folder = base / "train" / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in mini.train_images(c):
                (folder / name).write_bytes(data)
            if progress:
                progress(c + 1, classes)
        (base / "val").mkdir(parents=True, exist_ok=True)
        for name, data in mini.val_images():
            (base / "val" / name).write_bytes(data)
    if form == "kaggle":
        _write_kaggle_labels(out, mini)
    else:
        write_devkit(out / f"{DEVKIT}.tar.gz", mini)
    return mini


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_325_000_000, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_devkit(path, mini, ground_truth=None):
    """The devkit's archive: meta.mat's synsets (the leaves by mini.ids, then ancestors) and the val
    ground truth (`ground_truth`, else the miniature's own)."""
    import scipy.io

    leaves = len(mini.wnids)
    ancestors = max(2, round(0.86 * leaves))  # ImageNet: 1,000 leaves, 860 ancestors
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros(leaves + ancestors, dtype=[(f, object) for f in fields])
    by_id = sorted(range(leaves), key=lambda c: mini.ids[c])
    for row, c in enumerate(by_id):
        synsets[row] = (mini.ids[c], mini.wnids[c], mini.words[c], "a leaf", 0, np.zeros(0), 0, mini.train[c])
    for a in range(ancestors):  # wnids that sort before every leaf's: a reader that keeps them shifts every class
        synsets[leaves + a] = (leaves + a + 1, f"n{a:08d}", f"ancestor {a}", "an inner node", 2,
                               np.array([1, 2]), 1 + a % 5, 0)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    truth = "".join(f"{mini.ids[c]}\n" for c in mini.val) if ground_truth is None else ground_truth
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, f"{DEVKIT}/{META}", meta.getvalue())
        _add(tar, f"{DEVKIT}/{GROUND_TRUTH}", truth.encode())


def _write_kaggle_labels(out, mini):
    rng = np.random.default_rng([mini.seed, 7])
    with open(out / KAGGLE_LABELS, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["ImageId", "PredictionString"])
        for i in rng.permutation(len(mini.val)):  # in no particular order, as Kaggle's
            wnid = mini.wnids[mini.val[i]]
            boxes = " ".join(f"{wnid} {x} {x + 5} {x + 40} {x + 30}" for x in range(1, 2 + int(i) % 2))
            rows.writerow([f"ILSVRC2012_val_{i + 1:08d}", boxes])
    (out / KAGGLE_NAMES).write_text("".join(f"{w} {words}\n" for w, words in zip(mini.wnids, mini.words)))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.miniature", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the miniature into")
    p.add_argument("--form", choices=FORMS, default="archives", help="the form ImageNet is downloaded in")
    p.add_argument("--classes", type=int, default=CLASSES, help="how many classes")
    p.add_argument("--scale", type=float, default=1.0, help="share of ImageNet's per-class counts (at least 1)")
    p.add_argument("--seed", type=int, default=0, help="seeds all it draws: the same seed writes the same bytes in every form")
    args = p.parse_args(argv)
    if args.classes < 2 or args.scale <= 0:
        p.error("--classes must be at least 2 and --scale positive")
    from pipeline.progress import bar

    try:
        with bar(total=args.classes, desc="classes", unit="class") as progress:
            mini = write(args.out, args.form, args.classes, args.scale, args.seed,
                         progress=lambda done, _: progress.update(done - progress.n))
    except OSError as e:  # --out a file, a full disk, a forbidden place
        p.exit(2, f"miniature: cannot write into --out {args.out}: {e.strerror or e}\n")
    print(f"{args.out}: {sum(mini.train):,} train and {len(mini.val):,} val images in {args.classes:,} classes, "
          f"as {args.form}")


if __name__ == "__main__":
    main()
