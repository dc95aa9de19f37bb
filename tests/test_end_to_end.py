"""A miniature of `make demo` on a real Ray head: digits tree -> ray job submit -> training -> benchmarks."""
import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from conftest import BIN, REPO


def run(*cmd, timeout=600):
    result = subprocess.run([*map(str, cmd)], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_miniature_demo(tmp_path, ray_head):
    tree, shards, out = tmp_path / "digits", tmp_path / "shards", tmp_path / "run"
    assert "48 train and 12 val images" in run(sys.executable, "-m", "pipeline.sample", "--out", tree,
                                                   "--per-class", 6)
    log = run(BIN / "ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", REPO, "--",
              "python", "jobs/preprocess.py", "--src", tree, "--out", shards, "--shard-size", 16)
    assert "written 60 of 60 inputs; rejected 0 (none)" in log
    assert "shards were already complete" in run(sys.executable, "jobs/preprocess.py", "--src", tree, "--out",
                                                 shards, "--shard-size", 16, "--address", ray_head)

    log = run(sys.executable, "-m", "trainer.run", "--shards", shards, "--out", out, "--epochs", 1,
              "--batch-size", 8, "--steps-per-epoch", 2, "--recipe", "torch", "--optimizer", "adam", "--lr", 1e-4,
              "--no-ten-crop", "--log-every", 1)
    assert "epoch 1: train loss" in log and (out / "kernels.png").exists()

    log = run(sys.executable, "-m", "trainer.bench", "--shards", shards, "--batch-size", 8, "--seconds", 0.5,
              "--json", tmp_path / "loader.json", "--plot", tmp_path / "loader.png")
    assert Image.open(tmp_path / "loader.png").info["Software"].startswith("Matplotlib")
    figures = json.loads((tmp_path / "loader.json").read_text())
    assert set(figures) >= {"decode_only", "train_pipeline", "ratio", "baseline", "model", "device"}
    for name in ("decode_only", "train_pipeline", "baseline", "model"):  # the table says what the JSON holds
        assert re.search(rf"{name} +{figures[name]:,.0f} img/s", log), (name, log)
    f = figures
    assert f"{f['ratio']:.2f} x decode_only (the median of 3 rounds" in log
    assert re.search(rf"CPU an image +{f['train_pipeline_cpu_us']:,.0f} us +train_pipeline, against decode_only's "
                     rf"{f['decode_only_cpu_us']:,.0f} us: {f['cpu_ratio']:.2f} x the work", log), log
    assert f"train_pipeline is {f['train_pipeline'] / f['baseline']:.1f} x" in log
    feed = figures["train_pipeline"] / figures["model"]
    verdict = f"the pipeline can feed the model: {feed:,.1f} x" if feed >= 1 else \
        f"the pipeline cannot feed the model: {feed:,.1f} x"
    assert f"verdict: {verdict}" in log

    printed = run(sys.executable, "-m", "pipeline.bench", "--src", tree, "--sample", 40, "--json", tmp_path / "job.json")
    figures = json.loads((tmp_path / "job.json").read_text())
    assert figures["images"] == 40 and figures["inputs"] == 60 and figures["cores"] >= 1
    assert re.search(r"images +40 \(a seeded sample of the 60 inputs\)", printed), printed
    assert figures["ratio_to_cores_x_single"] == pytest.approx(
        figures["ray_job"] / (figures["cores"] * figures["single_loop"]))


@pytest.mark.parametrize("module", ["pipeline.bench", "trainer.bench"])
def test_the_benchmarks_say_bad_shards_in_one_line(tmp_path, module):
    (tmp_path / "half").mkdir()  # a preprocessing that has not finished: no manifest
    for shards, said in ((tmp_path / "none", "does not exist: make shards with"),
                         (tmp_path / "half", "manifest.json is missing: the preprocessing has not finished")):
        result = subprocess.run([sys.executable, "-m", module, "--shards", str(shards)], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.startswith(f"bench: {shards}") and said in result.stderr
        assert result.stderr.count("\n") == 1 and not result.stdout
