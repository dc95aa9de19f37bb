"""python -m pipeline.verify names the first problem of a damaged shard folder."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def run_verify(folder, *args):
    return subprocess.run([sys.executable, "-m", "pipeline.verify", folder, *args],
                          cwd=REPO, capture_output=True, text=True)


def test_intact_folder_passes(shards):
    result = run_verify(shards)
    assert result.returncode == 0 and "verify: ok: 24 train and 9 val samples" in result.stdout


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "train-000001.tar").unlink(), "train-000001.tar is missing"),
    (lambda d: (d / "val-000000.idx").write_text("v1.2 1\n"), "val-000000.idx does not index 5 samples"),
    (lambda d: open(d / "train-000002.tar", "r+b").write(b"\xff" * 700), "train-000002.tar does not match its sha256"),
    (lambda d: (d / "train-000000.tar").open("ab").write(b"\0" * 512), "train-000000.tar has"),
    (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda d: (d / "manifest.json").write_text('{"splits": '), "manifest.json cannot be read (Expecting value"),
    (lambda d: (d / "pca.json").write_bytes(b"\xff\xfe"), "pca.json cannot be read ('utf-8' codec can't decode"),
])
def test_damage_is_named(shards, tmp_path, damage, message):
    folder = tmp_path / "copy"
    shutil.copytree(shards, folder)
    damage(folder)
    result = run_verify(folder)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_checksums_are_remembered_until_a_file_changes(shards, tmp_path, monkeypatch):
    from pipeline.manifest import ShardDirError, read_manifest
    from pipeline.verify import verify_checksums

    folder = tmp_path / "copy"
    shutil.copytree(shards, folder)
    manifest = read_manifest(folder)
    files = 2 * sum(len(manifest["splits"][s]["shards"]) for s in ("train", "val"))  # a tar and an idx each
    monkeypatch.setattr("pipeline.verify.SETTLED_S", 3600)  # files changed within the hour: too fresh to remember
    assert verify_checksums(folder, manifest) == {"hashed": files, "remembered": 0}
    assert verify_checksums(folder, manifest) == {"hashed": files, "remembered": 0}
    monkeypatch.setattr("pipeline.verify.SETTLED_S", 0)  # settled as soon as they are older than the check
    assert verify_checksums(folder, manifest) == {"hashed": files, "remembered": 0}
    assert verify_checksums(folder, manifest) == {"hashed": 0, "remembered": files}

    tar = folder / "train-000002.tar"
    stat = tar.stat()
    with open(tar, "r+b") as f:  # 16 bytes inside the first JPEG inverted, same size, mtime set back
        f.seek(2000)
        flipped = bytes(255 - b for b in f.read(16))
        f.seek(2000)
        f.write(flipped)
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ShardDirError, match=r"1 file\(s\) in .* do not match their sha256 .*: train-000002.tar\. "
                                            r"Run the preprocessing"):
        verify_checksums(folder, manifest)
    with pytest.raises(ShardDirError, match="train-000002.tar"):  # a damaged file is never remembered as good
        verify_checksums(folder, manifest)
