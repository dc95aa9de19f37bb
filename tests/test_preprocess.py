"""jobs/preprocess.py end to end: a real `ray job submit`, crash safety, planted bad inputs."""
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import BIN, REPO, make_tree, picture, preprocess, two_node_cluster, wait_for
from pipeline.manifest import ShardDirError
from pipeline.shards import iter_samples, sha256_file
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
    assert "shards: 100%|" in log and "9/9 [" in log and "\r" not in log  # tqdm, as plain lines in a log
    assert "written 33 of 33 inputs; rejected 0 (none)" in log
    manifest = verify(out)
    assert manifest["classes"] == ["n01", "n02", "n03"]
    assert manifest["splits"]["train"]["samples"] == 24 and manifest["splits"]["val"]["samples"] == 9
    assert manifest["totals"] == {"inputs": 33, "written": 33, "rejected": 0, "rejected_by_reason": {},
                                  "skipped_hidden": 0}
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [4] * 6
    labels = {int(f["cls"]) for s in manifest["splits"]["train"]["shards"] for _, f in iter_samples(out / s["name"])}
    assert labels == {0, 1, 2}


def test_two_ray_nodes_write_the_shards_one_node_writes(shards, tree, tmp_path):
    cluster = two_node_cluster()
    try:
        out = tmp_path / "two-nodes"
        preprocess(tree, out, "--shard-size", 5, address=cluster.address)
    finally:
        cluster.shutdown()
    nodes = {json.loads(p.read_text())["node"] for p in (out / ".parts").glob("*.json")}
    assert len(nodes) == 2 and None not in nodes  # tasks ran on both
    ours, one_node = ({k: v for k, v in outputs(folder).items() if not k.startswith(".")} for folder in (out, shards))
    assert ours == one_node  # shards, indexes, pca.json, rejects, manifest: byte for byte


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

    assert (out / ".lock").exists()  # the killed run's
    result = preprocess(src, out, *args)
    assert f"took over {out / '.lock'} from pid {job.pid}" in result.stderr and "is gone" in result.stderr
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
    Image.fromarray(picture(rng, 300, 280, 0)).save(src / "train" / "beside-the-classes.JPEG", "JPEG")
    labels = tmp_path / "labels.txt"
    labels.write_text("ILSVRC_1.JPEG n02\nILSVRC_2.JPEG n01\nILSVRC_3.JPEG n02\nmissing.JPEG n01\n")
    out = tmp_path / "out"
    result = preprocess(src, out, "--val-labels", labels, "--max-reject-fraction", 0.5, address=ray_head)
    assert "written 9 of 12 inputs; rejected 3 (missing 1, unlabelled 2)" in result.stderr
    assert {json.loads(line)["path"].rsplit("/", 1)[1] for line in (out / "rejects.jsonl").read_text().splitlines()} \
        == {"beside-the-classes.JPEG", "stray.JPEG", "missing.JPEG"}
    manifest = verify(out)
    (shard,) = manifest["splits"]["val"]["shards"]
    got = {key.split("_", 1)[1]: int(f["cls"]) for key, f in iter_samples(out / shard["name"])}
    assert got == {"ILSVRC_1": 1, "ILSVRC_2": 0, "ILSVRC_3": 1}

    labels.write_text("ILSVRC_1.JPEG n09\n")
    failed = preprocess(src, out, "--val-labels", labels, address=ray_head, check=False)
    assert failed.returncode == 1 and "class 'n09' (of ILSVRC_1.JPEG) is not a class of train" in failed.stderr


def many_small_images(root, classes=3, per_class=10, seed=0, side=500):
    """train/<class>/<i>.JPEG of side x side: enough work that a job runs for a few seconds."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = Path(root) / "train" / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(picture(rng, side, side, c)).save(folder / f"{i}.JPEG", quality=95)
    return Path(root)


def test_a_second_run_on_the_same_out_refuses_at_once(tmp_path, ray_head):
    src = many_small_images(tmp_path / "src", per_class=20)
    out = tmp_path / "out"
    cmd = [sys.executable, "jobs/preprocess.py", "--src", src, "--out", out, "--shard-size", 1, "--address", ray_head]
    first = subprocess.Popen([*map(str, cmd)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (out / ".lock").exists() or first.poll() is not None)
        second = preprocess(src, out, "--shard-size", 1, address=ray_head, check=False)
        assert first.poll() is None, "the first run ended before the second could try"
        assert second.returncode == 1
        assert f"{out} is in use by pid {first.pid}" in second.stderr and "Wait for it to finish" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        log, _ = first.communicate(timeout=300)
    assert first.returncode == 0, log
    assert verify(out)["totals"]["written"] == 60
    assert not (out / ".lock").exists() and not list(out.glob(".*.tmp"))


def test_a_lock_is_taken_over_only_from_a_dead_holder(tmp_path, caplog):
    from pipeline.lock import STALE_S, FolderLock, LockHeld

    out = tmp_path / "out"
    out.mkdir()
    live = {"host": "elsewhere", "pid": 1, "token": "t1", "since": "then", "command": "preprocess on elsewhere"}
    (out / ".lock").write_text(json.dumps(live))
    with pytest.raises(LockHeld, match="in use by pid 1 on elsewhere"):  # another host's fresh heartbeat
        FolderLock(out).acquire()

    old = (out / ".lock").stat().st_mtime - STALE_S - 5
    os.utime(out / ".lock", (old, old))  # its heartbeat stopped
    with FolderLock(out) as lock:
        assert lock.holds() and "no heartbeat for" in caplog.text
        with pytest.raises(LockHeld, match=f"in use by pid {os.getpid()}"):
            FolderLock(out).acquire()
    assert not (out / ".lock").exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(json.dumps({**live, "host": os.uname().nodename, "pid": int(dead.stdout)}))
    with FolderLock(out):  # this host's holder has exited: taken over at once
        assert f"its process {int(dead.stdout)} is gone" in caplog.text


def _write_shard_in_a_process(args):
    from pipeline.preprocess import write_shard

    barrier, spec, src, out, settings = args
    barrier.wait()
    return write_shard(spec, src, out, settings)


def test_two_attempts_at_one_shard_never_mix_their_bytes(tmp_path):
    """Ray may run a task again while an attempt it believes dead still writes. The two attempts
    here write different bytes (JPEG quality 90 and 60): the shard, its index and its record are all
    one attempt's."""
    import multiprocessing

    from pipeline.preprocess import Settings, plan, scan

    src = many_small_images(tmp_path / "src", per_class=12, side=700)
    settings = Settings(shard_size=36)
    (spec,) = plan("train", scan(src).splits["train"], settings)
    out = tmp_path / "out"
    (out / ".parts").mkdir(parents=True)
    spawn = multiprocessing.get_context("spawn")  # a fork would copy the locks of this process's threads
    with spawn.Pool(2) as pool:
        barrier = spawn.Manager().Barrier(2)
        attempts = [(barrier, spec, str(src), str(out), replace(settings, quality=q)) for q in (90, 60)]
        records = pool.map(_write_shard_in_a_process, attempts)
    assert [r["resumed"] for r in records] == [False, False], "both attempts wrote the shard"
    assert records[0]["sha256"] != records[1]["sha256"] and records[0]["bytes"] != records[1]["bytes"]
    tar, idx = out / f"{spec['name']}.tar", out / f"{spec['name']}.idx"
    kept = json.loads((out / ".parts" / f"{spec['name']}.json").read_text())
    assert {**kept, "resumed": False} in records  # one attempt's record, and that attempt's tar and index
    assert sha256_file(tar) == kept["sha256"] and tar.stat().st_size == kept["bytes"]
    assert sha256_file(idx) == kept["index_sha256"]
    assert len(list(iter_samples(tar))) == 36
    assert sorted(p.name for p in out.iterdir()) == [".parts", f"{spec['name']}.idx", f"{spec['name']}.tar"]


def strip(h, w, centre, rest):
    """[h, w, 3]: `rest`, with its central min(h, w) square in `centre`."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rest
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img[top:top + side, left:left + side] = centre
    return img


PEAK_RSS = """
import sys
from pipeline.images import decode_square, read_bytes, resize_center_crop
def status(field):  # kB; VmHWM is this process's own peak (ru_maxrss carries the parent's over a fork)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
resize_center_crop(decode_square(read_bytes(sys.argv[2])))  # OpenCV's and Pillow's first-call costs
data = read_bytes(sys.argv[1])
before = status("VmRSS:")
out = resize_center_crop(decode_square(data))
print(1024 * (status("VmHWM:") - before), *out[128, 128])
"""


def test_an_extreme_shape_costs_only_its_central_square(tmp_path, ray_head):
    src = make_tree(tmp_path / "src", classes=("n01",), train=3, val=0)
    folder = src / "train" / "n01"
    Image.fromarray(strip(2, 30000, RED, BLUE)).save(folder / "wide.png")  # 180 KB: was 3.4 GB and 10 s
    Image.fromarray(strip(30000, 2, GREEN, BLUE)).save(folder / "tall.png")
    Image.fromarray(strip(1, 1_000_000, RED, BLUE)).save(folder / "line.png")  # was 196 GB
    out = tmp_path / "out"
    result = preprocess(src, out, address=ray_head)
    assert "written 6 of 6 inputs; rejected 0" in result.stderr
    images = {key.split("_", 1)[1]: cv2.imdecode(np.frombuffer(f["jpg"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
              for key, f in iter_samples(out / "train-000000.tar")}
    for name, colour in [("wide", RED), ("tall", GREEN), ("line", RED)]:
        assert images[name].shape == (256, 256, 3)
        assert np.abs(images[name].reshape(-1, 3).astype(int) - colour).max() < 8, name  # the square alone

    peak = subprocess.run([sys.executable, "-c", PEAK_RSS, folder / "line.png", folder / "n01_0.JPEG"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    grew, *pixel = map(int, peak.stdout.split())
    # 9-45 MB seen (allocator noise); resizing the whole line first would need 196 GB
    assert grew < 256 * 2**20 and np.abs(np.array(pixel) - RED).max() < 8


def test_hidden_entries_are_skipped_and_val_is_held_out_per_class(tmp_path, ray_head):
    src = make_tree(tmp_path / "src", classes=("n01", "n02"), train=10, val=0)
    shutil.rmtree(src / "val")
    hidden = src / "train" / ".ipynb_checkpoints"
    hidden.mkdir()
    Image.fromarray(picture(np.random.default_rng(1), 300, 300, 0)).save(hidden / "copy.png")
    (src / "train" / "n01" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + b"\0" * 100)
    (src / "train" / "n03").mkdir()
    for i in range(4):  # a third class of 4: 0.25 of it is 1
        Image.fromarray(picture(np.random.default_rng(i), 300, 300, 2)).save(src / "train" / "n03" / f"x{i}.png")
    out = tmp_path / "out"
    result = preprocess(src, out, "--val-fraction", 0.25, address=ray_head)
    assert "skipped 2 hidden entries (names starting with '.')" in result.stderr
    manifest = verify(out)
    assert manifest["classes"] == ["n01", "n02", "n03"]
    assert manifest["totals"]["skipped_hidden"] == 2 and manifest["totals"]["rejected"] == 0

    def keys(folder, split):
        return sorted((int(f["cls"]), key.split("_", 1)[1]) for s in json.loads((folder / "manifest.json")
                      .read_text())["splits"][split]["shards"] for key, f in iter_samples(folder / s["name"]))

    val, train = keys(out, "val"), keys(out, "train")
    assert [sum(1 for c, _ in val if c == cls) for cls in range(3)] == [2, 2, 1]  # round(0.25 n) of 10, 10, 4
    assert len(train) + len(val) == 24 and not set(train) & set(val)

    again = tmp_path / "again"
    preprocess(src, again, "--val-fraction", 0.25, address=ray_head)
    assert keys(again, "val") == val  # seeded
    other = tmp_path / "other"
    preprocess(src, other, "--val-fraction", 0.25, "--seed", 1, address=ray_head)
    assert keys(other, "val") != val

    both = preprocess(make_tree(tmp_path / "with-val"), tmp_path / "x", "--val-fraction", 0.25, check=False,
                      address=ray_head)
    assert both.returncode == 1 and "--val-fraction holds out part of train for a source without val" in both.stderr

    nowhere = preprocess(src, "/proc/shards", check=False, address=ray_head)  # not writable, even by root
    assert nowhere.returncode == 1 and "cannot write into --out /proc/shards: " in nowhere.stderr
    assert "Traceback" not in nowhere.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 400 kB tmpfs; skipped where this user cannot mount one."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", folder], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=True)


def test_a_full_disk_says_so_in_one_line_and_the_rerun_resumes(tmp_path, small_disk, ray_head):
    src = many_small_images(tmp_path / "src", per_class=10, side=300)
    out = small_disk / "shards"
    full = preprocess(src, out, "--shard-size", 2, address=ray_head, check=False)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, full.stderr[-3000:]
    (line,) = errors
    assert f"no space left on the device of {out}:" in line and "B more needed for the other" in line
    assert "run the same command again: the finished shards are kept" in line
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.tmp"))
    kept = len(list(out.glob("*.tar")))

    subprocess.run(["mount", "-o", "remount,size=16m", small_disk], check=True)
    result = preprocess(src, out, "--shard-size", 2, address=ray_head)
    assert "shards were already complete and verified: kept" in result.stderr and kept > 0
    assert verify(out)["totals"]["written"] == 30


def test_a_tree_without_usable_images_is_said_in_one_line(tmp_path):
    from pipeline.preprocess import JobFailed, Settings, run

    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / "train" / c).mkdir(parents=True)
    with pytest.raises(JobFailed, match=f"^{src} has 2 classes and no images in them: expected train/<class>/"):
        run(src, tmp_path / "out", Settings(), processes=1)
    (src / "train" / "a" / "notes.jpg").write_text("not an image")
    with pytest.raises(JobFailed, match=f"^every training image was rejected: see {tmp_path / 'out' / 'rejects.jsonl'}$"):
        run(src, tmp_path / "out", Settings(), max_reject_fraction=1.0, processes=1)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_an_address_where_no_ray_answers_is_said_at_once(tmp_path):
    result = preprocess(tmp_path, tmp_path / "out", address="127.0.0.1:1", check=False)  # said before any scan
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no Ray cluster answers at 127.0.0.1:1 (Connection refused): start one there" in result.stderr
