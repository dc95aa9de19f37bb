"""s3:// URLs in place of folders, against a real S3 server (SeaweedFS on 127.0.0.1, the `s3` fixture)."""
import json
import os
import signal
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import REPO, preprocess, wait_for
from pipeline import storage


def put_tree(folder, url):
    """Every file under `folder` as an object under `url`, keyed by its relative path."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            storage.upload(path, storage.join(url, path.relative_to(folder).as_posix()))
    return url


def put_folder(folder, url):
    """Every file directly in `folder` as an object under `url` (what `aws s3 cp --recursive` would do)."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            storage.upload(path, storage.join(url, path.name))
    return url


@pytest.fixture(scope="module")
def bucket_shards(s3, local_shards):
    """The local shards copied into the bucket."""
    return put_folder(local_shards, s3.url("shards"))


@pytest.fixture(scope="module")
def small_shards(tree, tmp_path_factory):
    """The tree preprocessed into a folder in shards of 2 (17 of them): a job long enough to be cut."""
    from pipeline.preprocess import Settings, run as preprocess_run

    out = tmp_path_factory.mktemp("small-shards")
    preprocess_run(tree, out, Settings(shard_size=2), processes=2)
    return out


def copy_shards(bucket_shards, url):
    for name in storage.listing(bucket_shards):
        storage.write_bytes(storage.join(url, name), storage.read_bytes(storage.join(bucket_shards, name)))
    return url


def environ(env=None):
    """This process's environment with `env` over it; a name given None is dropped."""
    return {name: value for name, value in {**os.environ, **(env or {})}.items() if value is not None}


def run(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=environ(env))


def test_objects_round_trip(s3):
    url = s3.url("storage", "a.bin")
    storage.write_bytes(url, b"0123456789")
    assert storage.read_bytes(url) == b"0123456789"
    assert storage.read_range(url, 3, 4) == b"3456"
    assert storage.head(url)["size"] == 10
    assert storage.listing(s3.url("storage")) == {"a.bin": 10}
    storage.delete(url)
    assert not storage.exists(url)


def test_conditional_put_refuses_a_second_writer(s3):
    url = s3.url("storage", "lock")
    storage.write_bytes(url, b"first", create=True)
    with pytest.raises(FileExistsError):
        storage.write_bytes(url, b"second", create=True)
    assert storage.read_bytes(url) == b"first"


def test_verify_reads_shards_in_a_bucket(bucket_shards):
    result = run("pipeline.verify", bucket_shards)
    assert result.returncode == 0 and "verify: ok: 24 train and 9 val samples" in result.stdout, result.stderr


def test_an_object_truncated_after_the_manifest_is_named(s3, bucket_shards):
    url = copy_shards(bucket_shards, s3.url("truncated"))
    tar = storage.join(url, "train-000001.tar")
    storage.write_bytes(tar, storage.read_bytes(tar)[:-512])
    result = run("pipeline.verify", url, "--no-deep")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{tar} has" in result.stderr and "the manifest says" in result.stderr


def test_checksums_of_objects_are_remembered_until_one_is_replaced(s3, bucket_shards, monkeypatch, tmp_path):
    from pipeline.manifest import ShardDirError, read_manifest
    from pipeline.verify import verify_checksums

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    url = copy_shards(bucket_shards, s3.url("remembered"))
    manifest = read_manifest(url)
    files = 2 * sum(len(manifest["splits"][s]["shards"]) for s in ("train", "val"))
    assert verify_checksums(url, manifest) == {"hashed": files, "remembered": 0}
    assert verify_checksums(url, manifest) == {"hashed": 0, "remembered": files}
    tar = storage.join(url, "train-000002.tar")
    data = bytearray(storage.read_bytes(tar))
    data[2000:2016] = bytes(255 - b for b in data[2000:2016])  # same size, other bytes
    storage.write_bytes(tar, bytes(data))
    with pytest.raises(ShardDirError, match=r"1 file\(s\) in s3://.* do not match their sha256 .*: train-000002.tar"):
        verify_checksums(url, manifest)


def test_the_loader_reads_the_same_batches_from_a_bucket_as_from_a_folder(s3, bucket_shards, local_shards, monkeypatch,
                                                                          tmp_path):
    from pipeline import build_loader
    from pipeline.shard_cache import cache_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def batches(shards):
        return [(x.clone(), y.clone()) for x, y in build_loader(shards, "val", batch_size=4, crops="center",
                                                               num_threads=1)]
    local, remote = batches(local_shards), batches(bucket_shards)
    assert len(local) == len(remote) == 3
    for (x, y), (rx, ry) in zip(local, remote):
        assert torch.equal(x, rx) and torch.equal(y, ry)

    url = copy_shards(bucket_shards, s3.url("replaced"))
    batches(url)
    tar = storage.join(url, "val-000000.tar")
    data = bytearray(storage.read_bytes(tar))
    data[-1100] ^= 0xFF  # same size, another byte: a copy made before is stale
    storage.write_bytes(tar, bytes(data))
    batches(url)
    assert (cache_folder(url) / "val-000000.tar").read_bytes() == bytes(data)


def test_a_run_folder_in_a_bucket_resumes_and_survives_a_damaged_checkpoint(s3, bucket_shards, tree, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the verified sums and the local folder
    out = s3.url("runs", "a")
    steps = ["--batch-size", 4, "--steps-per-epoch", 2, "--log-every", 1, "--no-ten-crop", "--inputs", "standardised",
             "--device", "cpu"]
    first = run("trainer.run", "--shards", bucket_shards, "--out", out, "--epochs", 1, *steps)
    assert first.returncode == 0 and "epoch 1 step 2/2: loss" in first.stderr, first.stderr[-3000:]
    local = tmp_path / "cache" / "alexnet-pipeline" / "runs"
    assert f"run folder {out}, worked in {local}" in first.stderr and "tensorboard --logdir" in first.stderr
    kept = set(storage.listing(out))
    assert {"checkpoint.pt", "config.json", "metrics.jsonl"} <= kept and ".lock" not in kept
    assert json.loads(storage.read_bytes(storage.join(out, "config.json")))["out"] == out

    again = run("trainer.run", "--shards", bucket_shards, "--out", out, "--epochs", 1, *steps)
    assert again.returncode == 2 and f"{out} already holds a run: pass --resume" in again.stderr
    second = run("trainer.run", "--shards", bucket_shards, "--out", out, "--epochs", 2, "--resume", *steps)
    assert second.returncode == 0 and "resumed" in second.stderr and "epoch 2 step 2/2" in second.stderr, second.stderr
    assert "checkpoint-previous.pt" in storage.listing(out)
    epochs = [m["epoch"] for m in map(json.loads, storage.read_bytes(storage.join(out, "metrics.jsonl")).splitlines())
              if m["kind"] == "epoch"]
    assert epochs == [1, 2]

    storage.write_bytes(storage.join(out, "checkpoint.pt"), b"not a checkpoint")
    third = run("trainer.run", "--shards", bucket_shards, "--out", out, "--epochs", 3, "--resume", *steps)
    assert third.returncode == 0 and "is damaged" in third.stderr and "epoch 3 step 2/2" in third.stderr, third.stderr
    evaluated = run("trainer.evaluate", "--checkpoint", storage.join(out, "checkpoint.pt"), "--shards", bucket_shards,
                    "--device", "cpu")
    assert evaluated.returncode == 0 and "top-1 error" in evaluated.stdout, evaluated.stderr[-3000:]
    image = next((tree / "val").rglob("*.*"))
    predicted = run("trainer.predict", "--checkpoint", storage.join(out, "checkpoint.pt"), image, "--device", "cpu")
    assert predicted.returncode == 0 and image.name in predicted.stdout, predicted.stderr[-3000:]


def test_a_stop_request_reaches_rank_0_through_the_bucket(s3):
    """The Ray Train driver's request to its workers, where the run folder is a bucket's."""
    from trainer.stop import StopRequest, clear_request, request_file

    out, stop = s3.url("runs", "stopped"), StopRequest()
    stop.watch(out)
    request_file(out, signal.SIGINT)
    wait_for(lambda: stop.asked, timeout=30)
    assert stop.signal == signal.SIGINT
    clear_request(out)
    assert not storage.exists(storage.join(out, ".stop"))


def test_a_second_trainer_on_a_bucket_run_folder_is_refused_naming_the_holder(s3, bucket_shards):
    out = s3.url("runs", "held")
    holder = {"host": "elsewhere", "pid": 9, "token": "t", "since": "then", "command": "trainer on elsewhere"}
    storage.write_bytes(storage.join(out, ".lock"), json.dumps(holder).encode())
    result = run("trainer.run", "--shards", bucket_shards, "--out", out, "--device", "cpu")
    assert result.returncode == 2 and f"{out} is in use by pid 9 on elsewhere" in result.stderr
    assert "Traceback" not in result.stderr


def objects(url) -> dict:
    """{name: bytes} of the shard folder's outputs in a bucket (not its .parts/ or .lock)."""
    return {name: storage.read_bytes(storage.join(url, name)) for name in storage.listing(url)
            if "/" not in name and not name.startswith(".")}


def files(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_preprocessing_into_a_bucket_killed_then_rerun_is_byte_identical_to_a_folder(s3, tree, small_shards):
    out = s3.url("killed")
    cmd = [sys.executable, "jobs/preprocess.py", "--src", str(tree), "--out", out, "--shard-size", "2"]
    job = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sum(n.startswith(".parts/") for n in storage.listing(out)) >= 3 or job.poll() is not None)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started
        job.wait()
    assert not storage.exists(storage.join(out, "manifest.json")), "the job finished before it could be killed"
    assert json.loads(storage.read_bytes(storage.join(out, ".lock")))["pid"] == job.pid  # the killed run's

    result = preprocess(tree, out, "--shard-size", 2)
    assert f"took over {out}/.lock from pid {job.pid}" in result.stderr and "is gone" in result.stderr
    assert "shards were already complete and verified: kept" in result.stderr
    assert objects(out) == files(small_shards)
    assert not storage.exists(storage.join(out, ".lock"))


def test_a_second_run_on_a_bucket_is_refused_at_once_naming_the_holder(s3, tree):
    out = s3.url("held")
    holder = {"host": "elsewhere", "pid": 7, "token": "t", "since": "then", "command": "preprocess on elsewhere"}
    storage.write_bytes(storage.join(out, ".lock"), json.dumps(holder).encode())
    result = preprocess(tree, out, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{out} is in use by pid 7 on elsewhere" in result.stderr and "Wait for it to finish" in result.stderr


@pytest.mark.parametrize("form", ["tree", "kaggle", "archives"])
def test_images_in_a_bucket_give_the_shards_a_folder_gives(s3, form, tmp_path):
    from pipeline import miniature
    from pipeline.preprocess import Settings, run as preprocess_run

    classes, scale = 5, 0.004  # 23 train images, 5 val (as tests/test_imagenet.py)
    miniature.write(tmp_path / form, form, classes, scale)
    url = put_tree(tmp_path / form, s3.url(f"src-{form}"))
    from_folder = preprocess_run(tmp_path / form, tmp_path / "folder", Settings(shard_size=10), processes=2)
    from_bucket = preprocess_run(url, tmp_path / "bucket", Settings(shard_size=10), processes=2)
    assert from_bucket["source"] == form and from_bucket["class_names"] == from_folder["class_names"]
    assert from_bucket["splits"] == from_folder["splits"] and from_bucket["totals"] == from_folder["totals"]
    assert files(tmp_path / "bucket") == {**files(tmp_path / "folder"),
                                          "manifest.json": (tmp_path / "bucket" / "manifest.json").read_bytes()}


def test_val_labels_in_a_bucket_give_the_shards_the_local_file_gives(s3, tmp_path):
    from pipeline import miniature
    from pipeline.imagenet import DEVKIT
    from pipeline.preprocess import JobFailed, Settings, run as preprocess_run

    miniature.write(tmp_path / "src", "tree", 5, 0.004)  # a flat val/, its devkit beside it: moved out
    devkit = (tmp_path / "src" / f"{DEVKIT}.tar.gz").rename(tmp_path / f"{DEVKIT}.tar.gz")
    with tarfile.open(devkit) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    storage.upload(devkit, s3.url("labels", devkit.name))
    put_tree(tmp_path / "extracted", s3.url("labels", "extracted"))  # the folder form: every object under it
    local = preprocess_run(tmp_path / "src", tmp_path / "local", Settings(shard_size=10), val_labels=devkit,
                           processes=2)
    for name in (devkit.name, "extracted"):
        url = s3.url("labels", name)
        out = tmp_path / f"from-{name}"
        manifest = preprocess_run(tmp_path / "src", out, Settings(shard_size=10), val_labels=url, processes=2)
        assert manifest["settings"]["val_labels"] == url and manifest["splits"] == local["splits"]
        assert files(out) == {**files(tmp_path / "local"), "manifest.json": (out / "manifest.json").read_bytes()}
    with pytest.raises(JobFailed, match=r"^--val-labels s3://alexnet/labels/none does not exist: give the devkit"):
        preprocess_run(tmp_path / "src", tmp_path / "none", Settings(shard_size=10),
                       val_labels=s3.url("labels", "none"), processes=2)


class SlowDown:
    """A proxy on 127.0.0.1 in front of the S3 server that answers every distinct request (method, path,
    query, range) with 503 SlowDown the first time, and forwards it the next: throttling, as S3 does
    it to a prefix read too fast, planted so that each request is refused exactly once."""

    def __init__(self, target):
        import http.client
        import http.server
        import threading

        host, port = target.removeprefix("http://").split(":")
        seen, lock = set(), threading.Lock()
        self.refused = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                what = (self.command, self.path, self.headers.get("Range"))
                with lock:
                    first = what not in seen
                    seen.add(what)
                    proxy.refused += first
                if first:
                    text = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
                upstream = http.client.HTTPConnection(host, int(port), timeout=60)
                # the Host header as signed by the client (SigV4 signs it)
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    upstream.putheader(name, value)
                upstream.endheaders(body)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                head = self.command == "HEAD"  # its Content-Length is the object's, its body empty
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", *(() if head else ("content-length",))):
                        self.send_header(name, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_throttling_is_retried_with_backoff_and_the_job_finishes(s3, tree, local_shards, monkeypatch, tmp_path):
    from pipeline.preprocess import Settings, run as preprocess_run

    proxy = SlowDown(s3.endpoint)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        preprocess_run(tree, s3.url("throttled"), Settings(shard_size=5), processes=2)
        verified = run("pipeline.verify", s3.url("throttled"))
    finally:
        proxy.close()
    assert verified.returncode == 0, verified.stderr
    assert proxy.refused > 30  # every PUT, GET, HEAD and listing of the job and of verify, once each
    assert objects(s3.url("throttled")) == files(local_shards)


@pytest.mark.parametrize("env, said", [
    ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "access denied by http://127.0.0.1:"),
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "the server does not answer (endpoint http://127.0.0.1:9)"),
])
def test_wrong_credentials_and_a_silent_server_are_one_line(bucket_shards, tree, env, said):
    checked = run("pipeline.verify", bucket_shards, env=env)
    assert checked.returncode == 1 and said in checked.stderr and "Traceback" not in checked.stderr
    written = subprocess.run([sys.executable, "jobs/preprocess.py", "--src", str(tree), "--out", storage.join(
        bucket_shards, "never")], cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert written.returncode == 1 and said in written.stderr and "Traceback" not in written.stderr


def test_a_profile_of_aws_config_reaches_the_bucket_and_a_wrong_one_is_named(s3, bucket_shards, tmp_path):
    aws = tmp_path / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text(f"[tests]\naws_access_key_id = {s3.key}\naws_secret_access_key = {s3.secret}\n"
                                     f"[wrong]\naws_access_key_id = {s3.key}\naws_secret_access_key = wrong\n")
    (aws / "config").write_text(f"[profile tests]\nendpoint_url = {s3.endpoint}\nregion = us-east-1\n"
                                f"[profile wrong]\nservices = here\n"  # the endpoint from a services section
                                f"[services here]\ns3 =\n  endpoint_url = {s3.endpoint}\n")
    profile = {**{name: None for name in os.environ if name.startswith("AWS_")}, "HOME": str(tmp_path)}
    checked = run("pipeline.verify", bucket_shards, env={**profile, "AWS_PROFILE": "tests"})
    assert checked.returncode == 0 and "verify: ok: 24 train and 9 val samples" in checked.stdout, checked.stderr
    wrong = run("pipeline.verify", bucket_shards, env={**profile, "AWS_PROFILE": "wrong"})
    said = f"access denied by {s3.endpoint}: check the profile wrong in ~/.aws/credentials and the bucket's policy"
    assert wrong.returncode == 1 and said in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr

    imports = "import sys; from pipeline import storage; storage.listing(sys.argv[1]); print('boto3' in sys.modules)"
    for env, boto3 in (({**profile, "AWS_PROFILE": "tests"}, "True"), ({}, "False")):  # keys exported: no boto3
        listed = subprocess.run([sys.executable, "-c", imports, bucket_shards], cwd=REPO, capture_output=True,
                                text=True, timeout=60, env=environ(env))
        assert listed.stdout.strip() == boto3, listed.stderr


def test_a_missing_bucket_is_named(s3, tree):
    checked = run("pipeline.verify", "s3://no-such-bucket/shards")
    assert checked.returncode == 1 and "the bucket no-such-bucket does not exist" in checked.stderr
    written = preprocess(tree, "s3://no-such-bucket/shards", check=False)
    assert written.returncode == 1 and "the bucket no-such-bucket does not exist" in written.stderr
    assert "Traceback" not in checked.stderr + written.stderr


def test_the_server_stopped_mid_job_and_started_again_resumes_byte_identical(tree, small_shards, tmp_path, monkeypatch):
    from conftest import SeaweedS3

    server = SeaweedS3(tmp_path / "seaweedfs")  # a server of this test's own, to stop
    env = {**os.environ, **server.env}
    out = server.url("shards")
    cmd = [sys.executable, "jobs/preprocess.py", "--src", str(tree), "--out", out, "--shard-size", "2"]
    job = None
    try:
        server.start()
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        wait_for(lambda: any(n.startswith(".parts/") for n in storage.listing(out)) or job.poll() is not None)
        server.stop()
        log, _ = job.communicate(timeout=300)
        assert job.returncode == 1, f"the job finished before the server could be stopped:\n{log}"
        failed = [line for line in log.splitlines() if " ERROR " in line]
        assert len(failed) == 1 and "run the same command again" in failed[0] and "Traceback" not in log
        server.start()
        again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert "shards were already complete and verified: kept" in again.stderr
        assert objects(out) == files(small_shards)
    finally:
        if job and job.poll() is None:  # a failed assertion above: the job and the Ray it started
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        if server.process and server.process.poll() is None:
            server.stop()
