"""Fixtures: small generated image trees, a real Ray head on 127.0.0.1, and the job run on them."""
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Every Ray server on 127.0.0.1 (`--node-ip-address 127.0.0.1` alone still binds the public
# address), and token auth with a token of this session's own: `ray start` in token mode needs one,
# and without token mode a ~/.ray/auth_token left on the machine would turn auth on for the head
# but not for its clients. Subprocesses inherit all of it.
os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
                  GLOO_SOCKET_IFNAME="lo")  # gloo's sockets too (else on the address the host name resolves to)
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # as if the venv were activated: `python` in a job
FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "TIFF"]
EXTENSIONS = {"JPEG": ".JPEG", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


def picture(rng, h, w, hue):
    """A smooth colour field with some noise: compresses like a photo, not like pure noise."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(x / (7 + hue) + c * 2.1) * np.cos(y / 11) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def make_tree(root, classes=("n01", "n02", "n03"), train=8, val=3, seed=0, sizes=(60, 600)):
    """SRC/train/<class>/<file> and SRC/val/<class>/<file>, of varied sizes and formats."""
    rng = np.random.default_rng(seed)
    n = 0
    for split, count in (("train", train), ("val", val)):
        for c, cls in enumerate(classes):
            folder = Path(root) / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                fmt = FORMATS[n % len(FORMATS)]
                h, w = rng.integers(*sizes, size=2)
                Image.fromarray(picture(rng, h, w, c)).save(folder / f"{cls}_{i}{EXTENSIONS[fmt]}", fmt)
                n += 1
    return Path(root)


def preprocess(src, out, *args, address=None, timeout=300, check=True):
    """Run jobs/preprocess.py as a user would; -> CompletedProcess with its text output."""
    cmd = [sys.executable, "jobs/preprocess.py", "--src", str(src), "--out", str(out), *map(str, args)]
    if address:
        cmd += ["--address", address]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"preprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real Ray head on loopback; yields its GCS address. Stopped however the tests end."""
    subprocess.run([BIN / "ray", "start", "--head", "--node-ip-address", "127.0.0.1",
                    "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield "127.0.0.1:6379"
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="session")
def shards(tree, tmp_path_factory, ray_head):
    """The tree preprocessed on the Ray head, small shards so that there are several."""
    out = tmp_path_factory.mktemp("shards")
    preprocess(tree, out, "--shard-size", 5, address=ray_head)
    return out


def wait_for(condition, timeout=120, interval=0.05):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)
