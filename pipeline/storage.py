"""Object storage: an `s3://bucket/prefix` URL wherever a folder is accepted, through obstore.

    from pipeline import storage
    storage.is_url("s3://imagenet/shards")            # True; a plain path is a folder as before
    storage.head("s3://imagenet/shards/train-000000.tar")   # {"size", "etag", "last_modified"}

Credentials, region and endpoint follow the AWS conventions, with no flags of ours. With
AWS_ACCESS_KEY_ID in the environment, obstore reads them there: AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN),
AWS_REGION, and AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for a server other than AWS (MinIO, Ceph,
SeaweedFS, GCS's S3 API); an http:// endpoint is allowed; boto3 is not imported. Without it, botocore
resolves them once a process as the AWS CLI does: AWS_PROFILE (else the default profile) in
~/.aws/credentials and ~/.aws/config, its `endpoint_url` or `services` section, SSO, assume-role,
credential_process, web identity, the instance's role; obstore's Boto3CredentialProvider hands the
keys over and refreshes them. The loader's shards are fetched through this module too, whole
(pipeline.shard_cache): DALI reading s3:// itself fetched a sample at a time.

Why obstore (python -m pipeline.bench_storage, docs/object-storage.md): on a SeaweedFS on loopback it
listed 28-51 k keys/s (boto3 8-10 k), read 690-805 ranged GETs/s (boto3 320-410) and wrote 74-82 MB/s
in multipart (boto3 69-77), beside pyarrow.fs's 35-42 k, 710-750 and 78-79; and of the three, pyarrow.fs
has no conditional PUT, which the lock needs (`If-None-Match: *`, obstore's mode="create").

A PUT makes an object whole or not at all (S3 writes nothing visible until the request, or the
multipart upload, completes), so a killed writer leaves the old object or none. Throttling (503
SlowDown) and other transient failures are retried by obstore with exponential backoff, RETRIES times
within RETRY_S seconds; a server that does not answer is said after that, in one line.
"""
import datetime
import functools
import io
import os
from pathlib import Path

SCHEME = "s3://"
RETRIES = 6  # backoff 0.1 s doubling to at most 10 s: ~6 s of retries, jittered (boto3's standard mode: 3 tries)
RETRY_S = 30  # seconds: how long a request keeps retrying before its failure is said
CONNECT_S = 5  # seconds to open a connection


class StorageError(ConnectionError):
    """Object storage that cannot be used: wrong credentials, a missing bucket, a server that does not
    answer. The message is one line that names the URL and what to check."""


def is_url(path) -> bool:
    return str(path).startswith(SCHEME)


def join(base, *names) -> str:
    """A folder's path or a bucket's URL, with names appended; a str either way."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return str(Path(base, *names))


def split(url) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    bucket, _, key = str(url)[len(SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"{url}: no bucket named (s3://bucket/prefix)")
    return bucket, key.strip("/")


@functools.cache
def _store(bucket, pid, endpoint, region, provider):
    """One client a bucket, process and access: obstore's runtime does not survive a fork (pid in the key)."""
    from obstore.store import S3Store

    return S3Store(bucket, endpoint=endpoint, credential_provider=provider, **({"region": region} if region else {}),
                   client_options={"allow_http": bool(endpoint and endpoint.startswith("http://")),
                                   "connect_timeout": f"{CONNECT_S}s"},
                   retry_config={"max_retries": RETRIES, "retry_timeout": datetime.timedelta(seconds=RETRY_S),
                                 "backoff": {"init_backoff": datetime.timedelta(milliseconds=100),
                                             "max_backoff": datetime.timedelta(seconds=10), "base": 2}})


def _access() -> dict:
    """How this process reaches S3: {"endpoint": URL, None for AWS's own; "region" and "provider", None
    where obstore reads the environment; "check": what to check when access is denied}."""
    if "AWS_ACCESS_KEY_ID" in os.environ:
        return {"endpoint": os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
                "region": None, "provider": None, "check": "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"}
    import botocore.exceptions

    try:
        return _profile(os.getpid())
    except botocore.exceptions.BotoCoreError as e:  # a profile that is not there, a config that does not parse
        raise StorageError(f"the AWS configuration does not read: {str(e).rstrip('.')}: check AWS_PROFILE, "
                           f"~/.aws/config and ~/.aws/credentials") from None


@functools.cache
def _profile(pid) -> dict:
    """_access() through botocore's chain, once a process (pid: its sessions are not shared across a fork)."""
    import boto3
    import botocore.config
    import botocore.session
    from obstore.auth.boto3 import Boto3CredentialProvider

    core = botocore.session.Session()  # its config variables name the files read
    session = boto3.Session(botocore_session=core)
    # the endpoint a client resolves (AWS_ENDPOINT_URL(_S3), the profile's, its services section's), against
    # the one it resolves ignoring those: AWS's own, which obstore finds by the region itself
    configured = session.client("s3").meta.endpoint_url
    aws = session.client("s3", config=botocore.config.Config(ignore_configured_endpoint_urls=True)).meta.endpoint_url
    credentials = session.get_credentials()
    if credentials is None:
        raise StorageError(f"no AWS credentials: none in the environment, the profile {session.profile_name} or "
                           f"the instance's metadata; export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or set "
                           f"AWS_PROFILE to a profile of ~/.aws/credentials")
    files = {"shared-credentials-file": "credentials_file", "config-file": "config_file"}
    if credentials.method in files:
        check = f"the profile {session.profile_name} in {core.get_config_variable(files[credentials.method])}"
    elif credentials.method in ("iam-role", "container-role"):
        check = f"this machine's role ({credentials.method})"
    else:
        check = (f"the profile {session.profile_name} in {core.get_config_variable('config_file')} "
                 f"({credentials.method})")
    return {"endpoint": configured if configured != aws else None,
            "region": os.environ.get("AWS_REGION") or session.region_name,
            "provider": Boto3CredentialProvider(session), "check": check}


def _call(url, do):
    """do(store, key) with obstore's failures said as one line: FileNotFoundError for a missing object
    (as a folder's file would), FileExistsError for a conditional PUT that lost, StorageError else."""
    import obstore.exceptions as oe

    bucket, key = split(url)
    access = _access()
    try:
        return do(_store(bucket, os.getpid(), access["endpoint"], access["region"], access["provider"]), key)
    except (FileNotFoundError, oe.NotFoundError) as e:
        if "NoSuchBucket" in str(e):
            raise StorageError(f"{url}: the bucket {bucket} does not exist (endpoint {_endpoint()})") from None
        raise FileNotFoundError(f"{url} does not exist") from None
    except oe.AlreadyExistsError:
        raise FileExistsError(f"{url} exists") from None
    except (oe.PermissionDeniedError, oe.UnauthenticatedError):
        raise StorageError(f"{url}: access denied by {_endpoint()}: check {access['check']} and the bucket's "
                           f"policy") from None
    except (oe.BaseError, OSError) as e:
        if "NoSuchBucket" in str(e):
            raise StorageError(f"{url}: the bucket {bucket} does not exist (endpoint {_endpoint()})") from None
        raise StorageError(f"{url}: {_reason(e)} (endpoint {_endpoint()})") from None


def environment() -> dict:
    """The AWS_* variables of this process (endpoint, keys, region, AWS_PROFILE): what a Ray task elsewhere
    needs to reach the same bucket as its driver (a profile is read from that node's ~/.aws)."""
    return {name: value for name, value in os.environ.items() if name.startswith("AWS_")}


def endpoint() -> str | None:
    """The S3 endpoint this process uses; None for AWS's own."""
    return _access()["endpoint"]


def _endpoint() -> str:
    return endpoint() or "AWS S3 (no endpoint configured)"


def _reason(e) -> str:
    """obstore's message is many lines (its debug dump follows): its first, shortened, and the S3 code."""
    text = str(e)
    for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "NoSuchBucket", "SlowDown"):
        if code in text:
            return code
    first = text.splitlines()[0] if text else type(e).__name__
    if "error sending request" in text or "Connection refused" in text or "connect" in first.lower():
        return "the server does not answer"
    return first[:300]


def head(url) -> dict:
    """-> {"size": bytes, "etag", "last_modified": ISO 8601}; FileNotFoundError if there is none."""
    import obstore

    meta = _call(url, lambda store, key: obstore.head(store, key))
    return {"size": meta["size"], "etag": meta["e_tag"], "last_modified": meta["last_modified"].isoformat()}


def read(path) -> bytes:
    """The bytes of a file, or of an object where `path` is an s3:// URL; FileNotFoundError for neither."""
    return read_bytes(path) if is_url(path) else Path(path).read_bytes()


def size(path) -> int | None:
    """The size of a file, or of an object where `path` is an s3:// URL; None where there is none."""
    try:
        return head(path)["size"] if is_url(path) else os.stat(path).st_size
    except FileNotFoundError:
        return None


def exists(url) -> bool:
    try:
        head(url)
    except FileNotFoundError:
        return False
    return True


def read_bytes(url) -> bytes:
    import obstore

    return _call(url, lambda store, key: bytes(obstore.get(store, key).bytes()))


def read_range(url, start, length) -> bytes:
    import obstore

    return _call(url, lambda store, key: bytes(obstore.get_range(store, key, start=start, length=length)))


def chunks(url):
    """The object's bytes as they stream in (a few MB at a time): hashing it holds no copy of it."""
    import obstore

    stream = _call(url, lambda store, key: obstore.get(store, key).stream(min_chunk_size=4 << 20))
    try:
        for chunk in stream:
            yield bytes(chunk)
    except Exception as e:  # noqa: BLE001 -- obstore raises its own types mid-stream
        raise StorageError(f"{url}: {_reason(e)} while reading (endpoint {_endpoint()})") from None


def write_bytes(url, data: bytes, create=False):
    """PUT, whole or not at all; create: only if there is no object there (If-None-Match: *), else
    FileExistsError."""
    import obstore

    _call(url, lambda store, key: obstore.put(store, key, data, mode="create" if create else "overwrite"))


def upload(path, url):
    """A local file to `url`, in multipart above 10 MB; the object appears when the whole has arrived."""
    import obstore

    _call(url, lambda store, key: obstore.put(store, key, Path(path), chunk_size=8 << 20))


class Window(io.RawIOBase):
    """`size` bytes of something, as a seekable binary file: a subclass reads them with fetch(offset, n)
    (wrap it in io.BufferedReader)."""

    def __init__(self, size):
        super().__init__()
        self.size, self.pos = size, 0

    def fetch(self, offset, n) -> bytes:
        raise NotImplementedError

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + pos
        return self.pos

    def readinto(self, buffer):
        n = max(0, min(len(buffer), self.size - self.pos))
        if not n:
            return 0
        data = self.fetch(self.pos, n)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


class RangeReader(Window):
    """An object as a seekable binary file, each read a ranged GET."""

    def __init__(self, url):
        super().__init__(head(url)["size"])
        self.url = url

    def fetch(self, offset, n):
        return read_range(self.url, offset, n)


def download(url, path):
    """The object into a local file, under a temporary name renamed when whole."""
    tmp = Path(f"{path}.part")
    with open(tmp, "wb") as f:
        for chunk in chunks(url):
            f.write(chunk)
    os.replace(tmp, path)


def copy(source, target):
    """A server-side copy of an object within its bucket: no byte travels through this machine."""
    import obstore

    _call(source, lambda store, key: obstore.copy(store, key, split(target)[1]))


def delete(url):
    import obstore

    _call(url, lambda store, key: obstore.delete(store, key))


def listing(url) -> dict:
    """{name below url: size} of every object under url/ (paged ListObjectsV2, 1,000 keys a page)."""
    return {name: meta["size"] for name, meta in objects(url).items()}


def objects(url) -> dict:
    """{name below url: {"size", "etag", "last_modified"}} of every object under url/, as head() gives
    them, from the same paged listing."""
    import obstore

    prefix = split(url)[1]
    prefix = f"{prefix}/" if prefix else ""

    def do(store, key):
        return {m["path"][len(prefix):]: {"size": m["size"], "etag": m["e_tag"],
                                          "last_modified": m["last_modified"].isoformat()}
                for batch in obstore.list(store, prefix or None) for m in batch}
    return _call(url, do)


def listing_level(url) -> tuple[list, dict]:
    """-> (names of the prefixes directly under url/, {name: size} of the objects directly under it):
    one level, ListObjectsV2 with the delimiter "/"."""
    import obstore

    prefix = split(url)[1]
    prefix = f"{prefix}/" if prefix else ""

    def do(store, key):
        found = obstore.list_with_delimiter(store, prefix or None)
        return ([p[len(prefix):].rstrip("/") for p in found["common_prefixes"]],
                {m["path"][len(prefix):]: m["size"] for m in found["objects"]})
    return _call(url, do)
