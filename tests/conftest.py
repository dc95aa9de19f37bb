"""Fixtures: small generated image trees, a real Ray head on 127.0.0.1, and the job run on them."""
import colorsys
import functools
import json
import os
import secrets
import socket
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


def make_tree(root, classes=("n01", "n02", "n03"), train=8, val=3, seed=0, sizes=(60, 600), tinted=False):
    """SRC/train/<class>/<file> and SRC/val/<class>/<file>, of varied sizes and formats. tinted: each
    class leans to a hue of its own, an easy task, except every second val image, which leans to another
    class's hue: the opposite one in even classes, the next one in odd classes. A net soon tells the
    classes apart, and is wrong on those: far off (out of its top 5 too) on the opposite hues, near on the
    next ones (in its top 5)."""
    rng = np.random.default_rng(seed)
    n = 0
    for split, count in (("train", train), ("val", val)):
        for c, cls in enumerate(classes):
            folder = Path(root) / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                fmt = FORMATS[n % len(FORMATS)]
                h, w = rng.integers(*sizes, size=2)
                pixels = picture(rng, h, w, c)
                if tinted:
                    shift = len(classes) // 2 if c % 2 == 0 else 1  # the opposite hue, or the next one
                    hue = (c + shift * (split == "val" and i % 2)) / len(classes)
                    pixels = (0.4 * pixels + 0.6 * 255 * np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9))).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{cls}_{i}{EXTENSIONS[fmt]}", fmt)
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


@pytest.fixture(scope="session")
def local_shards(tree, tmp_path_factory):
    """The tree preprocessed on this machine's processes, without Ray: the gpu-marked tests' data, so that
    they run where torch and DALI are all there is (trainer.gpu_check on a GPU machine)."""
    from pipeline.preprocess import Settings, run

    out = tmp_path_factory.mktemp("local-shards")
    run(tree, out, Settings(shard_size=5), processes=2)
    return out


def fit(rank, shards, out, steps):
    """`steps` training steps on the whole of a tiny set, the demo's quick recipe at a constant lr,
    without dropout or augmentation; then the trainer's own val errors (centre, ten-crop) and a
    checkpoint. out/losses.json and out/errors.json hold what it measured."""
    from trainer.config import Config
    from trainer.loop import Trainer

    trainer = Trainer(Config(shards=str(shards), out=str(out), batch_size=10, augment=False, dropout=0.0,
                             recipe="torch", optimizer="adam", lr=1e-4, device="cpu", verify_shards=False))
    losses = [trainer.train_step(*next(trainer.batches)).item() for _ in range(steps)]
    errors = {"centre": trainer.evaluate(trainer.val_loader), "ten": trainer.evaluate(trainer.ten_crop_loader(), True)}
    trainer.save()
    (out / "losses.json").write_text(json.dumps(losses))
    (out / "errors.json").write_text(json.dumps(errors))


@pytest.fixture(scope="session")
def fitted(tmp_path_factory, ray_head):
    """-> (tree, shards, run folder) of a net fitted to ten tinted classes (20 train, 20 val images):
    its predictions differ from image to image, it is wrong on half of val (make_tree's foreign hues),
    in its top 5 too on the opposite hues: top-1 and top-5 errors apart."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("fitted")
    tree = make_tree(root / "tree", classes=tuple(f"n{i:02d}" for i in range(10)), train=2, val=2, tinted=True)
    # names for all but the last class, as Kaggle's LOC_synset_mapping.txt gives them
    (tree / "LOC_synset_mapping.txt").write_text("".join(f"n{i:02d} hue {36 * i} degrees\n" for i in range(9)))
    preprocess(tree, root / "shards", "--shard-size", 5, address=ray_head)
    mp.spawn(fit, args=(root / "shards", root / "run", 30), nprocs=1)  # a process of its own, and its threads
    return tree, root / "shards", root / "run"


@functools.cache  # the same checkpoint for several tests: its net runs once
def numpy_errors(checkpoint, shards) -> dict:
    """A checkpoint's val errors, by a computation of the tests' own: the val JPEGs read from the tars
    with tarfile, decoded by OpenCV (libjpeg-turbo, as DALI on the CPU), cropped and normalised in numpy,
    the checkpoint's net run on them, top-1 and top-5 counted in numpy over the logits (ten-crop: over
    the mean of the 10 crops' softmax). -> {"centre": (top-1 wrong, top-5 wrong), "ten": (...), "total",
    "predicted": the centre crops' top-1 classes}."""
    import tarfile

    import cv2
    import torch

    from trainer.model import AlexNet

    state = torch.load(checkpoint, weights_only=True)
    pca = json.loads((Path(shards) / "pca.json").read_text())
    images, labels = [], []
    for entry in json.loads((Path(shards) / "manifest.json").read_text())["splits"]["val"]["shards"]:
        with tarfile.open(Path(shards) / entry["name"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in files if n.endswith(".jpg")):
            images.append(cv2.imdecode(np.frombuffer(files[name], np.uint8), cv2.IMREAD_COLOR)[..., ::-1])
            labels.append(int(files[name[:-4] + ".cls"]))
    if state["normalisation"]["inputs"] == "raw":
        scale, shift = np.ones(3), 255 * np.array(pca["mean"])
    else:
        scale, shift = 255 * np.array(pca["std"]), 255 * np.array(pca["mean"])
    span, c = 256 - 227, (256 - 227) // 2
    corners = [(0, 0), (span, 0), (0, span), (span, span), (c, c)]
    crops = np.stack([[image[y:y + 227, x:x + 227, :][:, ::-1 if flip else 1] for flip in (0, 1) for x, y in corners]
                      for image in images])  # [N, 10, 227, 227, 3]
    x = ((crops - shift) / scale).astype(np.float32).transpose(0, 1, 4, 2, 3)
    model = AlexNet(len(state["classes"]), recipe="torch").eval()
    model.load_state_dict(state["model"])
    with torch.no_grad():
        logits = model(torch.from_numpy(x).flatten(0, 1)).numpy().astype(np.float64).reshape(len(images), 10, -1)
    labels = np.array(labels)

    def wrong(scores):
        ranked = np.argsort(-scores, axis=1)
        return int((ranked[:, 0] != labels).sum()), int((ranked[:, :5] != labels[:, None]).all(1).sum())

    softmax = np.exp(logits - logits.max(2, keepdims=True))
    softmax /= softmax.sum(2, keepdims=True)
    return {"centre": wrong(logits[:, 4]), "ten": wrong(softmax.mean(1)), "total": len(labels),
            "predicted": logits[:, 4].argmax(1)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_cluster():
    """A Ray cluster of two nodes of one CPU each on 127.0.0.1 (ray.cluster_utils); shutdown() it."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "gcs_server_port": free_port(),
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    # a node is registered before the head's scheduler counts its CPU: until two SPREAD tasks run on two
    # nodes, a job's tasks may all land on the head (seen once in a full run)
    subprocess.run([sys.executable, "-c", SPREAD_PROBE, cluster.address], check=True, capture_output=True, timeout=180)
    return cluster


SPREAD_PROBE = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
node = lambda: time.sleep(0.2) or ray.get_runtime_context().get_node_id()
where = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(node)
deadline = time.monotonic() + 120
while len(set(ray.get([where.remote(), where.remote()]))) < 2:
    if time.monotonic() > deadline:
        sys.exit("the two nodes never both ran a task")
"""


def wait_for(condition, timeout=120, interval=0.05):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def free_port_pair():
    """A free port p on 127.0.0.1 whose p + 10000 is free too: SeaweedFS serves gRPC there."""
    while True:
        port = free_port()
        if port < 55000:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


PROBE = """
import sys, obstore
from obstore.store import S3Store
store = S3Store(sys.argv[1], endpoint=sys.argv[2], client_options={"allow_http": True}, retry_config={"max_retries": 0})
obstore.put(store, ".probe", b"probe")
assert bytes(obstore.get(store, ".probe").bytes()) == b"probe"
next(iter(obstore.list(store)))
obstore.delete(store, ".probe")
"""


class SeaweedS3:
    """A SeaweedFS (`weed mini`: master, volume, filer and S3 in one process) on 127.0.0.1, its S3 API
    on a free port, with credentials of its own; stop() and start() again keep its data."""

    def __init__(self, root, bucket="alexnet"):
        self.root, self.bucket = Path(root), bucket
        self.root.mkdir(parents=True, exist_ok=True)
        self.key, self.secret = f"AK{secrets.token_hex(8).upper()}", secrets.token_hex(20)
        (self.root / "s3.json").write_text(json.dumps({"identities": [{
            "name": "tests", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.ports = {name: free_port_pair() for name in ("s3", "master", "volume", "filer", "admin")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                    "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": "us-east-1"}
        self.process = None

    def url(self, *names) -> str:
        return "/".join([f"s3://{self.bucket}", *names])

    def start(self):
        (self.root / "data").mkdir(exist_ok=True)
        p = self.ports
        self.process = subprocess.Popen(
            [BIN / "weed", "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-bucket={self.bucket}", f"-s3.config={self.root / 's3.json'}", f"-s3.port={p['s3']}",
             f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
             f"-admin.port={p['admin']}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
             "-s3.port.lance=0", "-s3.autoCreateBucket=false", "-master.volumeSizeLimitMB=64"],
            stdout=open(self.root / "weed.log", "ab"), stderr=subprocess.STDOUT)
        try:
            wait_for(self.answers, timeout=120, interval=0.2)
        except BaseException:  # a server that never became ready is not left running
            self.stop()
            raise
        return self

    def answers(self) -> bool:
        """Whether an object can be written, read back and listed with our credentials: the S3 gateway,
        the filer and a volume server all up (after a restart, the master learns where the volumes are
        from the volume server's first heartbeat; until then reads of older objects fail with 500)."""
        if self.process.poll() is not None:
            raise RuntimeError(f"weed exited: {(self.root / 'weed.log').read_text()[-2000:]}")
        result = subprocess.run([sys.executable, "-c", PROBE, self.bucket, self.endpoint], env={**os.environ, **self.env},
                                capture_output=True, timeout=60)
        return result.returncode == 0

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """The tests' S3 server, its credentials and endpoint in this process's environment (DALI and the
    subprocesses read them there). Stopped however the tests end."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    saved = {name: os.environ.get(name) for name in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
