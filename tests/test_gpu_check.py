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
                   "train_pipeline, hw_decoder_load 0.0", "model: torch.compile",
                   "model: CUDA graphs (compile reduce-overhead)", "training, first epoch (2 steps), --gpus 1 (CPU)"):
        assert wanted in names, (wanted, names)
    rows = {name: value for name, _, value in report["rows"]}
    assert rows["model: torch.compile"] == "no GPU"  # without CUDA, its CUDA rows say so
    assert rows["baseline (webdataset + Pillow)"] == "webdataset is not installed"
    tests = report["gpu_tests"]  # the four gpu-marked tests: skipped here, run on a GPU; none needs Ray
    assert tests.get("passed", 0) + tests.get("skipped", 0) == 4 and not {"failed", "error", "errors"} & set(tests)
    assert f"gpu tests: {tests.get('passed', 0)} passed, 0 failed, 0 errors, {tests.get('skipped', 0)} skipped" in table
    ratio = rows["train_pipeline"] / rows["model: fp32, eager"]
    assert report["headline"] == f"{ratio:.2f}" and f"**headline: train_pipeline / model = {ratio:.2f}**" in table
    for name, batch, value in report["rows"]:  # each row of the JSON is a row of the table
        shown = f"{value:,.0f}" if isinstance(value, float) else value
        assert f"| {name} | {batch} | {shown} |" in table, name
    assert re.search(r"\| training, data wait \(share of step time\), last epoch, --gpus 1 \| 8 \| \d+\.\d%", table)
    assert re.search(r"\| training, data wait by quarter of the last epoch, --gpus 1 \| 8 \| \d+\.\d% / \d+\.\d% \|", table)
    shards = json.loads((tmp_path / "report" / "shards" / "manifest.json").read_text())
    assert shards["splits"]["train"]["samples"] + shards["splits"]["val"]["samples"] == 48
