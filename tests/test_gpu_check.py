"""trainer.gpu_check's report, from its CPU parts: what CI can run of it."""
import json
import os
import re
import subprocess
import sys

import torch

from conftest import REPO


def test_the_report_holds_every_section_and_the_table_says_what_the_json_holds(tmp_path):
    """On a machine as the GPU machines are lent: torch and DALI, without Ray or webdataset (planted as
    modules that fail to import), the gpu-marked tests included."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for module in ("ray", "webdataset"):
        (bare / f"{module}.py").write_text(f"raise ImportError('no module named {module} on this machine')\n")
    cmd = [sys.executable, "-m", "trainer.gpu_check", "--quick", "--out", str(tmp_path / "report")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(bare)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    table = (tmp_path / "report" / "report.md").read_text()
    assert table in result.stdout  # printed as written
    env = report["environment"]
    assert env["cpu_cores"] >= 1 and env["versions"]["torch"] == torch.__version__ and env["versions"]["nvidia.dali"]
    names = [name for name, _, _ in report["rows"]]
    for wanted in ("decode_only", "train_pipeline", "cpu_decode", "train_pipeline, 1 DALI threads",
                   "train_pipeline, uint8 hand-over",
                   "model: torch.compile", "model: CUDA graphs (compile reduce-overhead)",
                   "model: fp32, eager, the pipeline beside it (its batches thrown away)"):
        assert wanted in names, (wanted, names)
    rows = {name: value for name, _, value in report["rows"]}
    assert rows["model: torch.compile"] == "no GPU"  # without CUDA, its CUDA rows say so
    assert rows["baseline (webdataset + Pillow)"] == "webdataset is not installed"
    assert isinstance(rows["model: fp32, eager, the pipeline beside it (its batches thrown away)"], float)
    tests = report["gpu_tests"]  # the five gpu-marked tests: skipped here, run on a GPU; none needs Ray
    assert tests.get("passed", 0) + tests.get("skipped", 0) == 5 and not {"failed", "error", "errors"} & set(tests)
    assert f"gpu tests: {tests.get('passed', 0)} passed, 0 failed, 0 errors, {tests.get('skipped', 0)} skipped" in table
    # the training loop under each option, its CPU side: every row ran, with both waits
    training = report["training"]
    assert list(training)[:5] == ["defaults", f"DALI threads {env['cpu_cores']} (all cores)", "hw_decoder_load 1",
                                  "uint8 hand-over", "CUDA graphs"]
    for label, figures in training.items():
        assert isinstance(figures, dict), (label, figures)
        assert figures["img_s"] > 0 and 0 <= figures["data_wait"] < 1
        assert figures["device_wait"] < 1e-3  # the CPU's step is synchronous
        assert re.search(rf"\| training, {re.escape(label)} \(CPU\) \| 8 \| [\d,]+ img/s \(\d+\.\d\d of the step alone\), "
                         rf"data wait \d+\.\d%, device wait 0\.0%", table), label
    ratio = training["defaults"]["img_s"] / rows["model: fp32, eager"]
    assert report["headline"] == f"{ratio:.2f}"
    assert f"**headline: the run's img/s / the step alone = {ratio:.2f}**" in table
    for name, batch, value in report["rows"]:  # each row of the JSON is a row of the table
        shown = f"{value:,.0f}" if isinstance(value, float) else value
        assert f"| {name} | {batch} | {shown} |" in table, name
    shards = json.loads((tmp_path / "report" / "shards" / "manifest.json").read_text())
    assert shards["splits"]["train"]["samples"] + shards["splits"]["val"]["samples"] == 48
