"""python -m pipeline.sample: scikit-learn's digits as an ImageNet-style tree."""
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from sklearn.datasets import load_digits

from conftest import REPO

from pipeline.images import decode_square, read_bytes
from pipeline.sample import write_digits


def test_digits_tree_is_a_stratified_split_of_all_scans(tmp_path):
    counts = write_digits(tmp_path / "digits")
    assert counts == {"train": 1437, "val": 360}
    per_class = {split: Counter(p.parent.name for p in (tmp_path / "digits" / split).rglob("*.*"))
                 for split in ("train", "val")}
    assert set(per_class["train"]) == set(per_class["val"]) == {str(d) for d in range(10)}
    for digit, n in Counter(load_digits().target).items():  # 80/20 within every class
        assert per_class["train"][str(digit)] + per_class["val"][str(digit)] == n
        assert abs(per_class["val"][str(digit)] - 0.2 * n) <= 1
    files = sorted((tmp_path / "digits").rglob("*.*"))
    assert Counter(p.suffix for p in files) .keys() == {".png", ".jpg", ".bmp"}
    scans = load_digits().images
    for path in files[:40]:
        rgb = decode_square(read_bytes(path))
        assert rgb.shape == (8, 8, 3)
        if path.suffix != ".jpg":  # lossless: the scan itself, 0..16 -> 0..255
            expected = np.round(scans[int(path.stem)] / 16 * 255)
            assert np.abs(rgb[..., 0].astype(float) - expected).max() <= 1


@pytest.mark.parametrize("module", ["pipeline.sample", "pipeline.miniature"])
def test_an_out_that_is_a_file_is_said_in_one_line(tmp_path, module):
    out = tmp_path / "a-file"
    out.write_text("")
    result = subprocess.run([sys.executable, "-m", module, "--out", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"{module.split('.')[1]}: cannot write into --out {out}: ")
