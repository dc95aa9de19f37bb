"""ImageNet as downloaded (pipeline.imagenet): the archives read in place, Kaggle's copy, the devkit's
labels, on miniatures of each form (pipeline.miniature) whose devkit IDs are not in the sorted order."""
import io
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import preprocess
from pipeline import miniature
from pipeline.imagenet import DEVKIT, KAGGLE_LABELS, TRAIN_TAR, VAL_TAR, read_labels, tar_members
from pipeline.images import decode_jpeg, resize_center_crop
from pipeline.preprocess import JobFailed, Settings, run
from pipeline.shards import iter_samples
from pipeline.verify import verify

CLASSES, SCALE = 5, 0.004  # 23 train images (1 to 5 a class), 5 val


def shard_bytes(out, manifest):
    return {s["name"]: (out / s["name"]).read_bytes() for split in manifest["splits"].values() for s in split["shards"]}


def files_named(names, test_folder, since):
    """Files with any of `names` made after `since` (their ctime: extracting sets the mtime to the tar's)
    in the test's folder or anywhere in the temporary folder, Ray's workers' included."""
    roots = [test_folder, *(p for p in Path(tempfile.gettempdir()).iterdir() if not p.name.startswith("pytest-of-"))]
    found = [os.path.join(d, f) for root in roots for d, _, files in os.walk(root) for f in files if f in names]
    return [path for path in found if os.stat(path).st_ctime >= since]


def expected_labels(mini):
    """{image file stem: class index}, the index being the position among the sorted wnids."""
    train = {name.rsplit(".", 1)[0]: c for c in range(CLASSES) for name, _ in mini.train_images(c)}
    val = {f"ILSVRC2012_val_{i + 1:08d}": c for i, c in enumerate(mini.val)}
    return train, val


def labels_in(out, manifest, split):
    return {key.split("_", 1)[1]: int(f["cls"]) for s in manifest["splits"][split]["shards"]
            for key, f in iter_samples(out / s["name"])}


def test_every_form_gives_the_same_labels_and_the_same_shards(tmp_path, ray_head):
    archives = tmp_path / "archives"
    mini = miniature.write(archives, "archives", CLASSES, SCALE)
    assert mini.ids != sorted(mini.ids)  # the devkit's order is not the sorted one
    images = {name for c in range(CLASSES) for name, _ in mini.train_images(c)} | {n for n, _ in mini.val_images()}
    out, start = tmp_path / "out-archives", time.time()
    preprocess(archives, out, "--shard-size", 10, address=ray_head)  # the Ray job, its tasks reading byte ranges
    assert not files_named(images, tmp_path, start)  # none extracted, anywhere
    assert sorted(p.name for p in archives.iterdir()) == [f"{DEVKIT}.tar.gz", TRAIN_TAR, VAL_TAR]
    manifest = verify(out)
    assert manifest["source"] == "archives" and manifest["classes"] == mini.wnids
    assert manifest["class_names"] == mini.words and manifest["totals"]["rejected"] == 0  # the PNG and CMYK too
    train, val = expected_labels(mini)
    assert labels_in(out, manifest, "train") == train and labels_in(out, manifest, "val") == val

    for form in ("tree", "kaggle"):
        miniature.write(tmp_path / form, form, CLASSES, SCALE)
        other = run(tmp_path / form, tmp_path / f"out-{form}", Settings(shard_size=10), processes=2)
        assert other["source"] == form and other["class_names"] == mini.words
        assert shard_bytes(tmp_path / f"out-{form}", other) == shard_bytes(out, manifest), form
    assert (tmp_path / "out-tree" / "pca.json").read_bytes() == (out / "pca.json").read_bytes()

    # the dirty files became the pictures they hold: the PNG named .JPEG and the CMYK JPEG (inverted, it would be off by ~150)
    (png, png_bytes), (cmyk, cmyk_bytes) = mini.train_images(0)[:2]
    samples = {key.split("_", 1)[1]: f["jpg"] for s in manifest["splits"]["train"]["shards"]
               for key, f in iter_samples(out / s["name"])}
    for n, (name, data) in enumerate([(png, png_bytes), (cmyk, cmyk_bytes)]):
        assert data[:4] == (b"\x89PNG" if n == 0 else b"\xff\xd8\xff\xee")  # what they are: a PNG, an Adobe JPEG
        got = decode_jpeg(samples[name.rsplit(".", 1)[0]]).astype(int)
        want = resize_center_crop(miniature.pixels(0, 0, n, CLASSES))  # the picture, resized by OpenCV
        assert np.abs(got - want).mean() < 4, name


def test_the_index_is_built_once_and_kept(tmp_path):
    mini = miniature.write(tmp_path / "src", "archives", CLASSES, SCALE)
    out = tmp_path / "out"
    run(tmp_path / "src", out, Settings(shard_size=10), processes=2)
    kept = {p: p.stat().st_mtime_ns for p in (out / ".index").rglob("*.json")}
    assert len(kept) == 1 + CLASSES + 1  # the outer listing, one per inner tar, val
    inner = tar_members(tmp_path / "src" / TRAIN_TAR)
    with open(tmp_path / "src" / TRAIN_TAR, "rb") as f:  # the byte ranges are the images' bytes
        name, start, size = tar_members(tmp_path / "src" / TRAIN_TAR, inner[0][1], inner[0][2])[2]
        f.seek(start)
        assert f.read(size) == dict(mini.train_images(0))[name]
    run(tmp_path / "src", out, Settings(shard_size=10), processes=2)
    assert {p: p.stat().st_mtime_ns for p in (out / ".index").rglob("*.json")} == kept  # read, not built again


def test_hidden_members_of_the_archives_are_skipped_and_counted(tmp_path):
    miniature.write(tmp_path / "src", "archives", CLASSES, SCALE)
    with tarfile.open(tmp_path / "src" / TRAIN_TAR, "a") as tar:  # what a Mac leaves beside a file it copied
        miniature._add(tar, "._n00000001.tar", b"\0\5\26\7" + bytes(100))
    with tarfile.open(tmp_path / "src" / VAL_TAR, "a") as tar:
        miniature._add(tar, "._ILSVRC2012_val_00000001.JPEG", b"\0\5\26\7" + bytes(100))
    manifest = run(tmp_path / "src", tmp_path / "out", Settings(shard_size=10), processes=1)
    assert manifest["totals"]["skipped_hidden"] == 2 and manifest["totals"]["rejected"] == 0
    assert manifest["classes"] == miniature.Miniature(CLASSES, SCALE).wnids


def test_val_labels_from_the_devkit_its_folder_kaggles_csv_and_lines(tmp_path):
    mini = miniature.write(tmp_path / "kaggle", "kaggle", CLASSES, SCALE)
    miniature.write_devkit(tmp_path / "devkit.tar.gz", mini)
    with tarfile.open(tmp_path / "devkit.tar.gz") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    files = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(len(mini.val))]
    want = {file: mini.wnids[c] for file, c in zip(files, mini.val)}
    (tmp_path / "lines.txt").write_text("".join(f"{file} {wnid}\n" for file, wnid in want.items()))
    for labels in ("devkit.tar.gz", "extracted", f"extracted/{DEVKIT}", f"kaggle/{KAGGLE_LABELS}", "lines.txt"):
        assert read_labels(tmp_path / labels, files)[0] == want, labels
    assert read_labels(tmp_path / "extracted", files)[1] == dict(zip(mini.wnids, mini.words))


@pytest.fixture(scope="module")
def sound(tmp_path_factory):
    root = tmp_path_factory.mktemp("sound")
    return root, miniature.write(root, "archives", CLASSES, SCALE)


def inner_not_a_tar(src):
    """The train tar with its second inner tar's bytes replaced by a JPEG's."""
    with tarfile.open(src / TRAIN_TAR) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(src / TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as tar:
        for n, (member, data) in enumerate(members):
            data = miniature._image(0, 0, 0, 2) if n == 1 else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def cut(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("damage, said", [
    ("truncated", f"{TRAIN_TAR} is truncated (it ends after"),
    ("truncated between members", f"{TRAIN_TAR} is truncated (it ends after"),
    ("inner member not a tar", "is not a tar ("),
    ("no devkit", f"holds images without class folders, and nothing labels them: put the devkit ({DEVKIT}.tar.gz)"),
    ("ground truth of another length", "has 4 labels for 5 val images"),
    ("binary labels", "is a binary file, not labels: give the devkit"),
])
def test_a_bad_archive_gets_one_line_and_nothing_looks_complete(sound, tmp_path, damage, said):
    root, mini = sound
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(root, src)
    run(src, out, Settings(shard_size=10), processes=1)  # a finished run's manifest: it must not survive
    args = {}
    inner = tar_members(src / TRAIN_TAR)
    if damage == "truncated":
        cut(src / TRAIN_TAR, inner[2][1] + 700)  # inside the third inner tar
    elif damage == "truncated between members":
        cut(src / TRAIN_TAR, inner[1][1] + inner[1][2] + 511 & ~511)  # right after the second inner tar
    elif damage == "inner member not a tar":
        inner_not_a_tar(src)
    elif damage == "no devkit":
        (src / f"{DEVKIT}.tar.gz").unlink()
    elif damage == "ground truth of another length":
        miniature.write_devkit(src / f"{DEVKIT}.tar.gz", mini, ground_truth="1\n2\n3\n4\n")
    else:
        args["val_labels"] = src / VAL_TAR.replace(".tar", ".bin")
        args["val_labels"].write_bytes(miniature._image(0, 0, 0, 2))
    shutil.rmtree(out / ".index")  # built again from the damaged archive
    with pytest.raises(JobFailed) as failed:
        run(src, out, Settings(shard_size=10), processes=1, **args)
    assert said in str(failed.value) and "\n" not in str(failed.value)
    assert not (out / "manifest.json").exists()


def test_the_job_says_a_bad_archive_in_one_line(sound, tmp_path, ray_head):
    root, _ = sound
    labels = tmp_path / "labels.bin"
    labels.write_bytes(bytes(range(256)))
    result = preprocess(root, tmp_path / "out", "--val-labels", labels, address=ray_head, check=False)
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert result.returncode == 1 and len(errors) == 1 and "is a binary file, not labels" in errors[0]
    assert "Traceback" not in result.stderr


def test_a_src_that_is_not_a_folder_is_said_in_one_line(tmp_path):
    archive = tmp_path / TRAIN_TAR
    archive.write_bytes(b"")  # the archive itself given as --src
    for src, said in ((tmp_path / "none", f"{tmp_path / 'none'} does not exist: --src is an image tree or"),
                      (archive, f"{archive} is a file: --src is a folder, an image tree or the one that holds")):
        with pytest.raises(JobFailed) as failed:
            run(src, tmp_path / "out", Settings(), processes=1)
        assert str(failed.value).startswith(said) and "\n" not in str(failed.value)
