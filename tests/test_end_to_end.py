"""A miniature of `make demo` on a real Ray head: digits tree -> ray job submit -> training -> benchmarks."""
import json
import subprocess
import sys

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
              "--batch-size", 8, "--steps-per-epoch", 2, "--init", "torch", "--optimizer", "adam", "--lr", 1e-4,
              "--no-ten-crop", "--log-every", 1)
    assert "epoch 1: train loss" in log and (out / "kernels.png").exists()

    log = run(sys.executable, "-m", "trainer.bench", "--shards", shards, "--batch-size", 8, "--seconds", 0.5,
              "--json", tmp_path / "loader.json", "--plot", tmp_path / "loader.png")
    assert Image.open(tmp_path / "loader.png").info["Software"].startswith("Matplotlib")
    figures = json.loads((tmp_path / "loader.json").read_text())
    assert set(figures) >= {"decode_only", "train_pipeline", "baseline", "model", "device"}
    assert all(figures[k] > 0 for k in ("decode_only", "train_pipeline", "baseline", "model"))
    feed = figures["train_pipeline"] / figures["model"]
    assert f"verdict: the pipeline {'can' if feed >= 1 else 'cannot'} feed the model: {feed:,.1f} x" in log

    run(sys.executable, "-m", "pipeline.bench", "--src", tree, "--json", tmp_path / "job.json")
    figures = json.loads((tmp_path / "job.json").read_text())
    assert figures["images"] == 60 and figures["single_loop"] > 0 and figures["ray_job"] > 0
