"""Where the preprocessing reads its inputs: a folder, or a bucket's prefix (s3://), asked the same questions.

    view = source_of("s3://imagenet/raw")       # or a folder
    view.is_dir("train"); view.listing("train", hidden); view.local("LOC_val_solution.csv")

A folder answers from the file system as it is asked (a scandir of train/, a listdir of each class
folder). A bucket is listed once, at the start, with paged ListObjectsV2: the prefix's first levels
with a delimiter, until there are SPREAD prefixes, then those prefixes at once on LIST_THREADS
threads (ImageNet's 1.33 M keys lie in ~1,000 class prefixes, 1,000 keys a page). A small file that
a reader opens by path (the val labels, Kaggle's names, the devkit) is copied from the bucket into a
temporary folder first.
"""
import bisect
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline import storage

SPREAD = 64  # prefixes before the listing is spread over threads
LIST_THREADS = 16  # concurrent listings: each waits on the server, not the CPU


def source_of(src):
    return Bucket(src) if storage.is_url(src) else Folder(src)


class Folder:
    def __init__(self, src):
        self.src = Path(src)

    def name(self, rel="") -> str:
        return str(self.src / rel)

    def exists(self, rel="") -> bool:
        return (self.src / rel).exists()

    def is_dir(self, rel="") -> bool:
        return (self.src / rel).is_dir()

    def is_file(self, rel) -> bool:
        return (self.src / rel).is_file()

    def local(self, rel) -> Path:
        return self.src / rel

    def listing(self, rel, hidden):
        """-> (sorted names of the folders in `rel`, sorted names of its other entries); entries whose
        names start with "." are added to `hidden` instead."""
        folders, files = [], []
        with os.scandir(self.src / rel) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    hidden.append(entry.path)
                else:
                    (folders if entry.is_dir() else files).append(entry.name)
        return sorted(folders), sorted(files)

    def entries(self, rel, hidden):
        """The sorted names in `rel`, those that start with "." added to `hidden` instead."""
        folder = self.src / rel
        names = sorted(os.listdir(folder))
        start, end = bisect.bisect_left(names, "."), bisect.bisect_left(names, "/")  # "." sorts as one run, then "/"
        if start == end:  # no pass over the names in Python: ImageNet's 1.33 M are listed in ~1,000 folders
            return names
        hidden += [os.path.join(folder, name) for name in names[start:end]]
        return names[:start] + names[end:]


class Bucket:
    def __init__(self, src):
        self.src = str(src).rstrip("/")
        self.keys = listing(self.src)  # {key below src: bytes}
        self.children = {}  # {folder: ({sub-folders}, [files])}, "" the top
        for key in self.keys:
            parts = key.split("/")
            for depth in range(len(parts) - 1):
                self.children.setdefault("/".join(parts[:depth]), (set(), []))[0].add(parts[depth])
            self.children.setdefault("/".join(parts[:-1]), (set(), []))[1].append(parts[-1])
        self._copies = None

    def name(self, rel="") -> str:
        return storage.join(self.src, rel) if rel else self.src

    def exists(self, rel="") -> bool:
        return self.is_file(rel) or self.is_dir(rel)

    def is_dir(self, rel="") -> bool:
        return rel.strip("/") in self.children

    def is_file(self, rel) -> bool:
        return rel in self.keys

    def local(self, rel) -> Path:
        """A copy of the object `rel` (or of every object under the prefix `rel`) in a temporary folder
        that lives as long as this Bucket, under the same name."""
        if self._copies is None:
            self._copies = tempfile.TemporaryDirectory(prefix="bucket-src-")
        fetch(self.src, [rel] if self.is_file(rel) else [k for k in self.keys if k.startswith(f"{rel}/")],
              self._copies.name)
        return Path(self._copies.name, rel)

    def listing(self, rel, hidden):
        folders, files = self.children.get(rel.strip("/"), (set(), []))
        shown = [sorted(n for n in names if not n.startswith(".")) for names in (folders, files)]
        hidden += [self.name(f"{rel}/{n}") for names in (folders, files) for n in names if n.startswith(".")]
        return shown[0], shown[1]

    def entries(self, rel, hidden):
        folders, files = self.listing(rel, hidden)
        return sorted(folders + files)


def listing(url) -> dict:
    """{key below url: bytes} of every object under url/: the first levels listed with a delimiter until
    SPREAD prefixes are found, then each of those listed whole, LIST_THREADS at a time."""
    found, level = {}, [""]
    while level and len(level) < SPREAD:
        deeper = []
        for rel in level:
            folders, objects = storage.listing_level(storage.join(url, rel) if rel else url)
            found.update({f"{rel}{name}": size for name, size in objects.items()})
            deeper += [f"{rel}{folder}/" for folder in folders]
        level = deeper
    with ThreadPoolExecutor(LIST_THREADS) as pool:
        for rel, objects in zip(level, pool.map(lambda rel: storage.listing(storage.join(url, rel.rstrip("/"))), level)):
            found.update({f"{rel}{name}": size for name, size in objects.items()})
    return found


def fetch(url, keys, folder):
    """Each object url/key into folder/key, its folders made."""
    for key in keys:
        path = Path(folder, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.download(storage.join(url, key), path)


def local_copy(url, folder) -> Path:
    """A copy of the object at `url`, or of every object under url/ (a folder, as extracted), in `folder`
    under the URL's last name; FileNotFoundError if there is neither. A HEAD, then a listing of url/ alone:
    a file at the bucket's root beside 1.33 M images lists nothing else."""
    base, _, name = str(url).rstrip("/").rpartition("/")
    try:
        storage.head(url)
        keys = [name]
    except FileNotFoundError:
        keys = [f"{name}/{rel}" for rel in storage.listing(url)]
        if not keys:
            raise FileNotFoundError(f"{url} does not exist") from None
    fetch(base, keys, folder)
    return Path(folder, name)
