"""jobs/preprocess.py end to end: a real `ray job submit`, crash safety, planted bad inputs."""
import io
import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import BIN, REPO, make_tree, picture, preprocess, wait_for
from pipeline.manifest import ShardDirError
from pipeline.shards import iter_samples
from pipeline.verify import verify


def outputs(folder):
    """{name: bytes} of everything a user reads in a shard folder."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def test_ray_job_submit_on_a_real_head(tree, tmp_path, ray_head):
    out = tmp_path / "shards"
    result = subprocess.run(
        [BIN / "ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", REPO,
         "--", "python", "jobs/preprocess.py", "--src", tree, "--out", out, "--shard-size", "4"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    log = result.stdout + result.stderr
    assert "shards 9/9" in log and "written 33 of 33 inputs; rejected 0 (none)" in log
    manifest = verify(out)
    assert manifest["classes"] == ["n01", "n02", "n03"]
    assert manifest["splits"]["train"]["samples"] == 24 and manifest["splits"]["val"]["samples"] == 9
    assert manifest["totals"] == {"inputs": 33, "written": 33, "rejected": 0, "rejected_by_reason": {}}
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [4] * 6
    labels = {int(f["cls"]) for s in manifest["splits"]["train"]["shards"] for _, f in iter_samples(out / s["name"])}
    assert labels == {0, 1, 2}


def test_every_shard_mixes_classes_and_labels_follow_folders(shards, tree):
    manifest = json.loads((shards / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        classes = [int(f["cls"]) for _, f in iter_samples(shards / shard["name"])]
        assert len(set(classes)) > 1, f"{shard['name']} holds one class: {classes}"
    for shard in manifest["splits"]["val"]["shards"]:
        for key, files in iter_samples(shards / shard["name"]):
            cls_name = manifest["classes"][int(files["cls"])]
            assert key.split("_", 1)[1].startswith(cls_name)  # files are named <class>_<i>


def test_sigkill_then_rerun_is_byte_identical(tmp_path):
    src = make_tree(tmp_path / "src", train=14, val=4, seed=3, sizes=(400, 900))
    args = ("--shard-size", 2)
    preprocess(src, tmp_path / "clean", *args)

    out = tmp_path / "killed"
    cmd = [sys.executable, "jobs/preprocess.py", "--src", src, "--out", out, *map(str, args)]
    job = subprocess.Popen(cmd, cwd=REPO, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(list((out / ".parts").glob("*.json"))) >= 3 or job.poll() is not None)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started
        job.wait()
    assert not (out / "manifest.json").exists(), "the job finished before it could be killed"
    with pytest.raises(ShardDirError, match="manifest.json is missing"):
        verify(out)

    result = preprocess(src, out, *args)
    assert "shards were already complete and verified: kept" in result.stderr
    assert outputs(out) == outputs(tmp_path / "clean")


def png_bomb(path, side=40000):
    """A real 1-bit PNG of side x side black pixels (~200 KB on disk, 1.6 gigapixels)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + side // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def two_halves(h, w, first, second, axis=1):
    """[h, w, 3] uint8: `first` colour in the left (axis=1) or top (axis=0) half, `second` in the other."""
    img = np.empty((h, w, 3), np.uint8)
    img[:], cut = second, (w if axis == 1 else h) // 2
    img[(slice(None), slice(0, cut)) if axis == 1 else (slice(0, cut),)] = first
    return img


RED, BLUE, GREEN, WHITE = (220, 20, 20), (20, 20, 220), (20, 200, 20), (255, 255, 255)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A class folder of good images plus every kind of odd and broken input."""
    root = make_tree(tmp_path_factory.mktemp("planted"), classes=("n01",), train=4, val=0)
    d = root / "train" / "n01"
    buf = io.BytesIO()
    Image.fromarray(picture(np.random.default_rng(0), 300, 400, 1)).save(buf, "JPEG")
    (d / "truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    (d / "empty.JPEG").write_bytes(b"")
    (d / "text.JPEG").write_text("this is not an image\n" * 20)
    png_bomb(d / "bomb.png")
    (d / "dangling.JPEG").symlink_to(d / "no-such-file.JPEG")
    Image.fromarray(two_halves(300, 300, RED, BLUE)).save(d / "png_named.JPEG", "PNG")
    Image.fromarray(two_halves(300, 300, RED, GREEN)).convert("CMYK").save(d / "cmyk.JPEG", "JPEG", quality=95)
    rgba = np.zeros((300, 300, 4), np.uint8)
    rgba[:, :150] = (*BLUE, 255)  # left opaque blue, right fully transparent black
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(two_halves(300, 300, RED, BLUE)).convert("P").save(d / "palette.png")
    Image.fromarray(np.full((300, 300), 40000, np.uint16)).save(d / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(two_halves(300, 600, RED, BLUE)).save(d / "rotated.JPEG", "JPEG", exif=exif, quality=95)
    return root


def test_planted_inputs_rejected_or_written_correctly(planted, tmp_path, ray_head):
    out = tmp_path / "out"
    failed = preprocess(planted, out, "--shard-size", 3, address=ray_head, check=False)
    assert failed.returncode == 1
    assert "5 of 15 inputs rejected (33.3%), more than --max-reject-fraction 0.01" in failed.stderr
    assert not (out / "manifest.json").exists()

    result = preprocess(planted, out, "--shard-size", 3, "--max-reject-fraction", 0.5, address=ray_head)
    assert "written 10 of 15 inputs; rejected 5 (bomb 1, empty 1, not-an-image 1, truncated 1, unreadable 1)" \
        in result.stderr
    rejects = {Path(r["path"]).name: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").open())}
    assert set(rejects) == {"truncated.JPEG", "empty.JPEG", "text.JPEG", "bomb.png", "dangling.JPEG"}
    assert rejects["bomb.png"].startswith("bomb: 40000x40000 = 1600000000 pixels exceeds the cap")
    assert rejects["truncated.JPEG"].startswith("truncated:")

    manifest = verify(out)
    assert manifest["totals"]["inputs"] == 15 and manifest["totals"]["written"] == 10
    images = {key.split("_", 1)[1]: cv2.cvtColor(cv2.imdecode(np.frombuffer(f["jpg"], np.uint8), 1), cv2.COLOR_BGR2RGB)
              for s in manifest["splits"]["train"]["shards"] for key, f in iter_samples(out / s["name"])}
    assert len(images) == 10

    def near(region, colour, tol=24):
        return np.abs(region.reshape(-1, 3).mean(0) - colour).max() < tol

    left, right, top, bottom = np.s_[:, :100], np.s_[:, 156:], np.s_[:100], np.s_[156:]
    assert near(images["png_named"][left], RED) and near(images["png_named"][right], BLUE)
    assert near(images["cmyk"][left], RED) and near(images["cmyk"][right], GREEN)
    assert near(images["rgba"][left], BLUE) and near(images["rgba"][right], WHITE)  # composited on white
    assert near(images["palette"][left], RED) and near(images["palette"][right], BLUE)
    assert near(images["gray16"], (156, 156, 156), tol=2)  # 40000 >> 8
    assert near(images["rotated"][top], RED) and near(images["rotated"][bottom], BLUE)  # EXIF applied


def test_flat_val_folder_with_a_labels_file(tmp_path, ray_head):
    src = make_tree(tmp_path / "src", classes=("n01", "n02"), train=3, val=0)
    flat = src / "val"
    flat.mkdir(exist_ok=True)
    rng = np.random.default_rng(5)
    for name in ("ILSVRC_1.JPEG", "ILSVRC_2.JPEG", "ILSVRC_3.JPEG", "stray.JPEG"):
        Image.fromarray(picture(rng, 300, 280, 0)).save(flat / name, "JPEG")
    labels = tmp_path / "labels.txt"
    labels.write_text("ILSVRC_1.JPEG n02\nILSVRC_2.JPEG n01\nILSVRC_3.JPEG n02\nmissing.JPEG n01\n")
    out = tmp_path / "out"
    result = preprocess(src, out, "--val-labels", labels, "--max-reject-fraction", 0.5, address=ray_head)
    assert "written 9 of 11 inputs; rejected 2 (unlabelled 1, unreadable 1)" in result.stderr
    manifest = verify(out)
    (shard,) = manifest["splits"]["val"]["shards"]
    got = {key.split("_", 1)[1]: int(f["cls"]) for key, f in iter_samples(out / shard["name"])}
    assert got == {"ILSVRC_1": 1, "ILSVRC_2": 0, "ILSVRC_3": 1}

    labels.write_text("ILSVRC_1.JPEG n09\n")
    failed = preprocess(src, out, "--val-labels", labels, address=ray_head, check=False)
    assert failed.returncode == 1 and "class 'n09' is not a folder of train/" in failed.stderr
