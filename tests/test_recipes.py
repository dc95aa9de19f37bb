"""The recipes on real digits: the default leaves chance in a short run, and a run that collapses says so once."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's digits, 60 of each, preprocessed on this machine's processes: 480 train, 120 val."""
    from pipeline.preprocess import Settings, run
    from pipeline.sample import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "tree", per_class=60)
    run(root / "tree", root / "shards", Settings(), processes=2)
    return root / "shards"


def train(shards, out, *args):
    cmd = [sys.executable, "-m", "trainer.run", "--shards", str(shards), "--out", str(out), "--no-ten-crop",
           "--no-verify-shards", *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return result.stderr, lines


def board_texts(out) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out))
    board.Reload()
    return {tag: [e.step for e in board.Tensors(tag)] for tag in board.Tags()["tensors"]}


def test_the_papers_text_on_the_digits_collapses_and_the_run_says_so_once(digits, tmp_path):
    out = tmp_path / "paper"
    log, lines = train(digits, out, "--recipe", "paper", "--batch-size", 32, "--epochs", 1, "--steps-per-epoch", 15,
                       "--log-every", 5)
    warnings = [line for line in log.splitlines() if "the run has collapsed" in line]
    assert len(warnings) == 1, log[-3000:]
    assert "far above chance's ln 10 = 2.30" in warnings[0] and "--recipe" in warnings[0] and "--lr" in warnings[0]
    (collapse,) = [m for m in lines if m["kind"] == "collapse"]
    assert collapse["epoch"] == 1 and collapse["step"] in (5, 10, 15) and "far above" in collapse["why"]
    assert max(m["loss"] for m in lines if m["kind"] == "step") > 2 * 2.30  # what it reported
    assert board_texts(out).get("train/collapse/text_summary") == [collapse["step"]]


def test_the_default_recipe_leaves_chance_on_the_digits_in_a_short_run(digits, tmp_path):
    from trainer.config import Config

    out = tmp_path / "default"
    log, lines = train(digits, out, "--batch-size", 16, "--epochs", 2, "--log-every", 10)  # 2 x 30 steps
    assert json.loads((out / "config.json").read_text())["recipe"] == Config.recipe  # nothing asked: the default
    first, last = [m for m in lines if m["kind"] == "epoch"]
    assert last["top1"] < 0.6, (first, last)  # chance is 0.9; the same seeds give the same run each time
    assert last["classes_predicted"] >= 5 and last["train_loss"] < first["train_loss"]
    assert "collapsed" not in log and not [m for m in lines if m["kind"] == "collapse"]
