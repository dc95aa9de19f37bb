"""python -m pipeline.verify names the first problem of a damaged shard folder."""
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
])
def test_damage_is_named(shards, tmp_path, damage, message):
    folder = tmp_path / "copy"
    shutil.copytree(shards, folder)
    damage(folder)
    result = run_verify(folder)
    assert result.returncode == 1
    assert message in result.stderr
