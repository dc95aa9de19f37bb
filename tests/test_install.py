"""The install for machines without a package index (`make wheelhouse`): a wheelhouse installs with
--no-index into a fresh venv on a machine that already has torch and the rest, adding only the project."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO


def test_a_wheelhouse_installs_without_an_index_and_keeps_the_torch_there(tmp_path):
    wheelhouse, venv = tmp_path / "wheelhouse", tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no index, no find-links but the wheelhouse: nothing from elsewhere
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", wheelhouse, REPO],
                   check=True, capture_output=True, env=env, timeout=300)  # make wheelhouse's first step
    # the machine: torch (this venv's) and every other dependency, and not the project
    site, there = Path(torch.__file__).parents[1], tmp_path / "there"
    there.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(("alexnet_pipeline", "__editable__", "pipeline", "trainer")):
            (there / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    (next(venv.glob("lib/python*/site-packages")) / "machine.pth").write_text(f"{there}\n")
    python = venv / "bin" / "python"
    result = subprocess.run([*pip, "--python", python, "install", "--no-index", "--find-links", wheelhouse,
                             "alexnet-pipeline[test,cuda130]"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Successfully installed alexnet-pipeline-" in result.stdout and "torch" not in result.stdout.split(
        "Successfully installed")[1], result.stdout  # only the project: torch and the rest were there
    check = subprocess.run([*pip, "--python", python, "check"], capture_output=True, text=True, env=env, timeout=120)
    assert check.returncode == 0, check.stdout
    where = subprocess.run([python, "-c", "import pipeline.preprocess, trainer.run, torch; "
                                          "print(torch.__file__); print(pipeline.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert where[0] == str(there / "torch" / "__init__.py")  # the machine's torch, untouched
    assert where[1].startswith(str(venv)) and "site-packages" in where[1]  # the project, from the wheel
