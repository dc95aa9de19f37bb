"""ImageNet as people download it, read where it lies: the official archives, Kaggle's copy, the devkit.

    SRC/ILSVRC2012_img_train.tar       a tar of 1,000 tars <wnid>.tar, each of <wnid>_<n>.JPEG
    SRC/ILSVRC2012_img_val.tar         50,000 ILSVRC2012_val_<8 digits>.JPEG
    SRC/ILSVRC2012_devkit_t12.tar.gz   data/meta.mat (the synsets), data/ILSVRC2012_validation_ground_truth.txt
                                       (or the folder ILSVRC2012_devkit_t12/ it extracts to)
    SRC/ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/}, SRC/LOC_val_solution.csv, SRC/LOC_synset_mapping.txt
                                       Kaggle's copy

No image is extracted: the byte range of every image in the archives is indexed once, a task per
inner tar, into OUT/.index/, and the shard tasks read their images from the archives by those ranges.

A class's index is its position among the sorted wnids, as in torchvision's ImageNet and any
ImageFolder. The devkit's ILSVRC2012_IDs are another order (ID 1 is n02119789, the tench n01440764
is 449): its val labels go through meta.mat's ID -> WNID map of the 1,000 leaves.
"""
import csv
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

from pipeline import storage
from pipeline.manifest import write_json
from pipeline.source import local_copy
from pipeline.tasks import JobFailed, parallel

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12"
KAGGLE = "ILSVRC/Data/CLS-LOC"
KAGGLE_LABELS, KAGGLE_NAMES = "LOC_val_solution.csv", "LOC_synset_mapping.txt"
RANGE_BUFFER = 1 << 20  # bytes a ranged GET reads of an archive in a bucket
INDEX = ".index"  # in OUT: the archives' member byte ranges, one JSON per inner tar and one for val
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
LABEL_FORMS = ("the devkit (ILSVRC2012_devkit_t12.tar.gz or its folder), Kaggle's LOC_val_solution.csv, "
               "or a text file of lines '<file> <class>'")


def devkit_beside(view):
    """The devkit in the source `view` (pipeline.source), archive or folder, as a local path; or None."""
    for name in (f"{DEVKIT}.tar.gz", f"{DEVKIT}.tgz", f"{DEVKIT}.tar", DEVKIT):
        if view.exists(name):
            return view.local(name)
    return None


class _Window(storage.Window):
    """The bytes [start, start + size) of an open file, as a file of their own."""

    def __init__(self, f, start, size):
        super().__init__(size)
        self.f, self.start = f, start

    def fetch(self, offset, n):
        self.f.seek(self.start + offset)
        return self.f.read(n)


def tar_members(path, start=0, size=None, what=None) -> list:
    """[(name, offset of its bytes in `path`, size)] of the files of the tar that `path` holds at
    [start, start + size) (the whole file by default), in the tar's order; JobFailed, one line, if
    that is not a tar or it is cut short."""
    what = what or str(path)
    f, total = _open(path)
    with f:
        size = total - start if size is None else size
        try:
            tar = tarfile.open(fileobj=_Window(f, start, size), mode="r:")
            members = [(m.name, start + m.offset_data, m.size) for m in tar if m.isfile()]
        except tarfile.ReadError as e:
            if "unexpected end of data" in str(e):  # a member's bytes run past the end
                raise JobFailed(_truncated(what, size)) from None
            raise JobFailed(f"{what} is not a tar ({e}): the download is damaged; download it again") from None
    # tarfile ends quietly where a header is missing; a whole tar ends with zero blocks after its last member
    if size - tar.offset < tarfile.BLOCKSIZE or any(offset + n > start + size for _, offset, n in members):
        raise JobFailed(_truncated(what, size))
    return members


def _truncated(what, size):
    return f"{what} is truncated (it ends after {size:,} bytes, inside its last member): download it again"


def index_member(path, start, size, what, cache, stamp) -> list:
    """A task: the members of the tar at [start, start + size) of `path`, kept in `cache` with `stamp`."""
    members = tar_members(path, start, size, what)
    if cache:
        write_json(cache, {"stamp": stamp, "members": members})
    return members


def _open(path):
    """-> (a binary file, its size): a local file, or an object read by ranged GETs of RANGE_BUFFER bytes
    (a tar's headers lie ~110 kB apart in ImageNet's: one GET reads ~9 of them)."""
    if storage.is_url(path):
        reader = storage.RangeReader(path)
        return io.BufferedReader(reader, RANGE_BUFFER), reader.size
    f = open(path, "rb")
    return f, os.fstat(f.fileno()).st_size


def _cached(cache, stamp):
    """The members kept in `cache` if it was written for `stamp`, else None."""
    try:
        kept = json.loads(storage.read(cache))
    except (OSError, ValueError):
        return None
    return kept["members"] if kept.get("stamp") == stamp else None


def read_archives(src, out, processes, hidden):
    """-> ({wnid: [(name, class index, where)]} of train, [(name, -1, where)] of val): every image of the
    archives in `src`, where = (archive, offset, size), name = train/<wnid>/<file> or val/<file> as in
    the extracted tree, each list sorted by name, a class's index its wnid's position among the sorted.
    Inner tars whose index OUT/.index/ lacks are indexed in parallel (Ray tasks, or `processes`). `src`
    and `out` may be s3:// URLs: an archive in a bucket is read by ranged GETs, never downloaded whole."""
    src = str(src)
    index = storage.join(out, INDEX) if out else None
    stamps = {name: stamp for name in (TRAIN_TAR, VAL_TAR) if (stamp := _stamp(storage.join(src, name)))}
    if index and not storage.is_url(index):
        Path(index, TRAIN_TAR).mkdir(parents=True, exist_ok=True)
    wnids, regions = {}, {}  # the inner tars by wnid, those named like ._n01440764.tar left out
    train_tar = storage.join(src, TRAIN_TAR)
    for name, start, size in _list(train_tar, index and storage.join(index, f"{TRAIN_TAR}.json"), stamps[TRAIN_TAR]):
        wnid = name.rsplit("/", 1)[-1].removesuffix(".tar")
        if not _hide(wnid, f"{train_tar}:{name}", hidden):
            wnids[wnid], regions[TRAIN_TAR, name] = name, (start, size)
    if VAL_TAR in stamps:
        regions[VAL_TAR, ""] = (0, stamps[VAL_TAR]["bytes"])
    found, calls = {}, {}
    for (archive, name), (start, size) in regions.items():
        stamp = {**stamps[archive], "start": start, "size": size}
        cache = index and (storage.join(index, archive, f"{name.replace('/', '%')}.json") if name
                           else storage.join(index, f"{archive}.json"))
        members = cache and _cached(cache, stamp)
        if members is None:
            what = f"{storage.join(src, archive)}: {name}" if name else storage.join(src, archive)
            calls[archive, name] = (storage.join(src, archive), start, size, what, cache, stamp)
        else:
            found[archive, name] = members
    found.update(parallel(index_member, calls.items(), processes))
    train = {wnid: _images(found[TRAIN_TAR, wnids[wnid]], TRAIN_TAR, f"train/{wnid}", src, hidden, label)
             for label, wnid in enumerate(sorted(wnids))}
    return train, _images(found.get((VAL_TAR, ""), []), VAL_TAR, "val", src, hidden, -1)


def _stamp(path) -> dict | None:
    """What changes when the archive does, or None where there is none."""
    try:
        if storage.is_url(path):
            meta = storage.head(path)
            return {"bytes": meta["size"], "etag": meta["etag"]}
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _list(path, cache, stamp):
    """The outer tar's members, from `cache` when it was written for this file."""
    members = cache and _cached(cache, stamp)
    return index_member(path, 0, None, str(path), cache, stamp) if members is None else members


def _images(members, archive, folder, src, hidden, label):
    images = []
    for name, start, size in sorted(members):
        file = name.rsplit("/", 1)[-1]
        if not _hide(file, f"{storage.join(src, archive)}:{name}", hidden):
            images.append((f"{folder}/{file}", label, (archive, start, size)))
    return images


def _hide(name, path, hidden):
    if name.startswith("."):
        hidden.append(path)
    return name.startswith(".")


def read_labels(path, val_files) -> tuple[dict, dict]:
    """-> ({file of val: wnid}, {wnid: words}) from `path` in any of LABEL_FORMS; val_files are val's
    file names, sorted (the devkit's ground truth is in that order). JobFailed, one line, for a file
    that is none of them or does not fit val. An s3:// URL is copied first: the object, or every object
    under it (the devkit's folder)."""
    if storage.is_url(path):
        with tempfile.TemporaryDirectory(prefix="val-labels-") as folder:
            try:
                copy = local_copy(path, folder)
            except FileNotFoundError:
                raise JobFailed(f"--val-labels {path} does not exist: give {LABEL_FORMS}") from None
            try:
                return read_labels(copy, val_files)
            except JobFailed as e:  # said of the URL given, not of its copy
                raise JobFailed(str(e).replace(str(copy), str(path))) from None
    path = Path(path)
    if not path.exists():
        raise JobFailed(f"--val-labels {path} does not exist: give {LABEL_FORMS}")
    if path.is_dir() or tarfile.is_tarfile(path):
        return _devkit_labels(path, val_files)
    data = path.read_bytes()
    try:
        text = data.decode()
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise JobFailed(f"--val-labels {path} is a binary file, not labels: give {LABEL_FORMS}")
    lines = text.splitlines()
    if lines and lines[0].replace(" ", "").startswith("ImageId,PredictionString"):
        return _kaggle_labels(path, lines, val_files), {}
    labels = {}
    for n, line in enumerate(lines, 1):
        if line.strip():
            name, _, wnid = line.strip().rpartition(" ")
            if not name.strip():
                raise JobFailed(f"{path}:{n}: expected '<file> <class>', got {line.strip()!r}: give {LABEL_FORMS}")
            labels[name.strip()] = wnid
    return labels, {}


def _kaggle_labels(path, lines, val_files):
    """Kaggle's solution: ImageId, then per box '<wnid> x y x y'; the first box's wnid is the label."""
    by_stem = {file.rsplit(".", 1)[0]: file for file in val_files}
    labels = {}
    for n, row in enumerate(csv.reader(lines[1:]), 2):
        if not row:
            continue
        if len(row) != 2 or not row[1].split():
            raise JobFailed(f"{path}:{n}: expected 'ImageId,<wnid> <box> ...', got {','.join(row)!r}")
        labels[by_stem.get(row[0], f"{row[0]}.JPEG")] = row[1].split()[0]
    return labels


def read_devkit(path) -> tuple[dict, dict, list]:
    """-> ({ILSVRC2012_ID: wnid}, {wnid: words}, the val ground truth's IDs) of the devkit at `path`
    (its archive, or the folder it extracts to), over the 1,000 leaves of meta.mat's synsets."""
    import numpy as np
    import scipy.io

    meta, truth = _devkit_files(Path(path))
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        leaves = np.asarray(synsets["num_children"], dtype=int) == 0
        ids = [int(i) for i in synsets["ILSVRC2012_ID"][leaves]]
        wnids = [str(w) for w in synsets["WNID"][leaves]]
        words = [str(w) for w in synsets["words"][leaves]]
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise JobFailed(f"{path}: {META} has no readable synsets ({type(e).__name__}: {e}): "
                        f"download the ILSVRC2012 devkit again") from None
    try:
        ground_truth = [int(line) for line in truth.decode().split()]
    except (UnicodeDecodeError, ValueError):
        raise JobFailed(f"{path}: {GROUND_TRUTH} is not one ILSVRC2012_ID per line: "
                        f"download the ILSVRC2012 devkit again") from None
    return dict(zip(ids, wnids)), dict(zip(wnids, words)), ground_truth


def _devkit_files(path):
    """-> (meta.mat's bytes, the ground truth's bytes) from the devkit's archive or folder."""
    wanted = {}
    if path.is_dir():
        for name in (META, GROUND_TRUTH):
            for candidate in (path / name, path / DEVKIT / name):
                if candidate.is_file():
                    wanted[name] = candidate.read_bytes()
    else:
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    for name in (META, GROUND_TRUTH):
                        if member.isfile() and member.name.endswith(name):
                            wanted[name] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise JobFailed(f"{path} does not read as the devkit's archive ({e}): download it again") from None
    missing = [name for name in (META, GROUND_TRUTH) if name not in wanted]
    if missing:
        raise JobFailed(f"{path} is not the ILSVRC2012 devkit: it has no {' and no '.join(missing)}")
    return wanted[META], wanted[GROUND_TRUTH]


def _devkit_labels(path, val_files):
    wnid_of, words, ground_truth = read_devkit(path)
    if len(ground_truth) != len(val_files):
        raise JobFailed(f"{path}: {GROUND_TRUTH} has {len(ground_truth):,} labels for {len(val_files):,} val "
                        f"images: this devkit is not for these val images (ILSVRC2012 has 50,000 of each)")
    unknown = sorted(set(ground_truth) - wnid_of.keys())
    if unknown:
        raise JobFailed(f"{path}: {GROUND_TRUTH} names ILSVRC2012_ID {unknown[0]}, which is no leaf of {META}")
    return {file: wnid_of[i] for file, i in zip(val_files, ground_truth)}, words


def read_names(path) -> dict:
    """Kaggle's LOC_synset_mapping.txt: lines '<wnid> <words>' -> {wnid: words}."""
    names = {}
    for line in Path(path).read_text().splitlines():
        wnid, _, words = line.strip().partition(" ")
        if wnid:
            names[wnid] = words.strip()
    return names
