"""WebDataset shards: a deterministic tar writer that also writes DALI's index, and a reader.

A sample is `<key>.cls` (class index, ASCII digits) and `<key>.jpg`. Every tar header has
mtime 0, owner 0:0 and mode 0644, so the same samples give the same bytes. The index is the
format `wds2idx` writes (v1.2): a header line `v1.2 <samples>`, then per sample
`ext offset size name` for each of its files, offsets to the file's data.
"""
import hashlib
import io
import os
import tarfile

from pipeline import storage

INDEX_VERSION = "v1.2"


class ShardWriter:
    def __init__(self, tar_path, idx_path):
        self.tar_path, self.idx_path = tar_path, idx_path
        self.tar = tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT)
        self.index_lines = []

    def write(self, key: str, files: dict):
        """files: {ext: bytes}, written in sorted ext order."""
        assert "/" not in key and "." not in key, key
        entries = []
        for ext in sorted(files):
            data = files[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            header = info.tobuf(self.tar.format, self.tar.encoding, self.tar.errors)
            entries.append(f"{ext} {self.tar.offset + len(header)} {len(data)} {info.name}")
            self.tar.addfile(info, io.BytesIO(data))
        self.index_lines.append(" ".join(entries))

    def close(self):
        self.tar.close()
        with open(self.idx_path, "w") as f:
            f.write(f"{INDEX_VERSION} {len(self.index_lines)}\n")
            f.writelines(line + "\n" for line in self.index_lines)

    def __len__(self):
        return len(self.index_lines)


def iter_samples(tar):
    """Yield (key, {ext: bytes}) in tar order, reading the archive (a path or a binary file object) as a
    stream (nothing is extracted)."""
    key, files = None, {}
    opened = tarfile.open(fileobj=tar, mode="r:") if hasattr(tar, "read") else tarfile.open(tar, "r:")
    with opened as tar:
        for member in tar:
            if not member.isfile():
                continue
            name_key, _, ext = member.name.partition(".")
            if name_key != key and files:
                yield key, files
                files = {}
            key = name_key
            files[ext] = tar.extractfile(member).read()
    if files:
        yield key, files


def sha256_file(path) -> str:
    """The sha256 of a file, or of an object (s3://), streamed once."""
    h = hashlib.sha256()
    if storage.is_url(path):
        for chunk in storage.chunks(path):
            h.update(chunk)
        return h.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def replace_atomically(tmp_path, final_path):
    """fsync then rename, so that a crash leaves either the old file or the whole new one."""
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, final_path)
