"""The input pipeline on NVIDIA DALI: shards -> decoded, cropped, flipped, lit, normalised batches.

    loader = build_loader("shards/", split="train", batch_size=128, device="cuda:0")
    for images, labels in loader:   # images [B, 3, 227, 227] ("ten": [B, 10, 3, 227, 227]), labels int64 [B]
        ...

One pipeline definition serves both devices: on CUDA the JPEGs are decoded by nvJPEG (and the
hardware decoder where there is one, `device="mixed"`) and everything after runs on the GPU; on
the CPU, the same operators run on the CPU with `device_id=None`.

Augmentation (paper, section 4.1), for crops="random":
  - a random 227x227 crop of the 256x256 image (the paper says 224; its conv1 arithmetic needs 227),
    anchors uniform over the 30 x 30 integer positions; only that window is decoded
    (`fn.decoders.image_crop`, on the CPU and on the GPU);
  - a horizontal flip with p = 0.5;
  - Fancy PCA: the same RGB offset P (alpha * s) added to every pixel of an image, alpha ~ N(0, sigma^2)
    per image and component, P and lambda the eigenvectors and eigenvalues of pca.json ([0, 1] units);
    s = sqrt(lambda) by default (cuda-convnet2's `pca_stdevs`, fancy_pca_scale="sqrt"), or s = lambda
    as the paper's text writes it (fancy_pca_scale="linear").
The offset is constant over an image, so it is folded into the per-sample mean of the
normalisation: out = (x/255 + offset - mean) / std = (x - 255 (mean - offset)) / (255 std).

Inputs (`inputs`): "raw" is the paper's (section 2, "the (centered) raw RGB values"): x - 255 mean,
in 0-255 units, Fancy PCA's offset in the same units (std = 1/255 above); "standardised" divides by
the training pixels' std as well, (x/255 - mean)/std, which suits PyTorch's default init.

The uint8 hand-over (uint8=True, training crops): DALI crops and flips and hands over uint8 with each
image's mean [B, 3], Fancy PCA's offset folded in; normalise() then gives the float path's batch in the
consumer's step (a quarter of the bytes, and no float write among DALI's GPU work). The random operators
are seeded each on its own, so that both hand-overs draw the same numbers.

crops="center" takes the central 227x227; crops="ten" the four corners and the centre, then the same
five mirrored, in the order top-left, top-right, bottom-left, bottom-right, centre.

Order (crops="random"): every epoch the tar files are read in a new order (DALI's
shuffle_after_epoch, seeded by `seed` and so the same on every rank), and a shuffle buffer of
`shuffle_buffer` samples reorders the samples as they stream by. A shard holds a seeded mix of all
classes (jobs/preprocess.py), so the order of the shards is what makes one epoch unlike the last:
with a buffer alone, consecutive epochs come in nearly the same order. Evaluation (center, ten)
reads in stored order.

Sharding: rank r of world_size reads the r-th of world_size equal slices of the samples (DALI's
reader sharding), padded so that every rank yields len(loader) batches; the padding is dropped,
so each rank's last batch may be partial and every sample is seen once per epoch across ranks.
The shard order is the same on every rank, so that their slices never overlap; the augmentation
(crops, flips, Fancy PCA's alpha) and the shuffle buffer draw from a seed of each rank's own,
`rank_seed(seed, rank)`.
"""
import os

import numpy as np
import torch

from pipeline import shard_cache, storage
from pipeline.manifest import SPLITS, read_pca
from pipeline.verify import verify

CROP = 227  # paper section 4.1 (see the module docstring)
LABEL_DIGITS = 8  # <key>.cls holds the class index in ASCII; padded to this many bytes
SOURCE_BYTES = 4096  # DALI's source_info (a shard path, offset and file name), padded
INPUTS = ("raw", "standardised")


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random operators: its own, and the same for the same (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0] >> 1)  # DALI takes a signed int


def normalisation_of(pca: dict, inputs: str) -> dict:
    """-> {"inputs", "mean", "std"}: the loader's output is (x/255 - mean)/std for x in 0-255 (see the
    module docstring); a checkpoint keeps it, so that evaluation and prediction prepare images alike."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, not {inputs!r}")
    std = list(pca["std"]) if inputs == "standardised" else [1 / 255] * 3
    return {"inputs": inputs, "mean": list(pca["mean"]), "std": std}


def build_loader(shards, split="train", batch_size=128, device="cpu", crops="random", seed=0, rank=0,
                 world_size=1, fancy_pca_sigma=0.1, fancy_pca_scale="sqrt", dtype=torch.float32,
                 channels_last=False, shuffle_buffer=4096, num_threads=None, state=None, with_params=False,
                 inputs="raw", normalisation=None, hw_decoder_load=None, prefetch_queue_depth=2, uint8=False):
    """-> Loader over `split` of the shard folder `shards`.

    dtype: torch.float32, or on CUDA torch.float16 / torch.bfloat16. channels_last: NCHW tensors in
    channels-last memory (free: DALI writes HWC). state: a Loader.state_dict() to resume from.
    with_params: (crops="random") also yield {"keys": the samples' keys, "params": [B, 3] int64
    (crop x, crop y, flipped)}, to check or replay what the augmentation did. normalisation: {"mean",
    "std"} to use instead of pca.json's with `inputs` (a checkpoint's own, evaluated on other shards).
    hw_decoder_load: on CUDA, the share of images for the hardware JPEG decoder (DALI's default if None).
    prefetch_queue_depth: batches DALI prepares ahead (its own default, 2). uint8: (crops="random") hand over
    the crops as uint8 and yield (images, labels, mean): mean [B, 3] float32 on `device`, each image's
    normalisation mean in pixel units with Fancy PCA's offset folded in; `normalise(images, mean, ...)`
    then gives what the float path gives, a quarter of the bytes handed over and no float write in DALI.
    """
    if crops not in ("random", "center", "ten"):
        raise ValueError(f"crops must be 'random', 'center' or 'ten', not {crops!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if fancy_pca_scale not in ("sqrt", "linear"):
        raise ValueError(f"fancy_pca_scale must be 'sqrt' or 'linear', not {fancy_pca_scale!r}")
    if uint8 and (crops != "random" or with_params):
        raise ValueError("uint8 hands over training crops (crops='random') without with_params")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world_size {world_size}")
    device = torch.device(device)
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError("the CPU pipeline writes float32; half precision is for CUDA")
    manifest = verify(shards, deep=False)  # refuse a folder that does not match its manifest
    entries = manifest["splits"][split]["shards"]
    if not entries:
        raise ValueError(f"{shards} has no {split} samples")
    pca = read_pca(shards)
    if storage.is_url(shards):  # DALI reads a bucket a sample at a time: from whole copies instead (shard_cache)
        shards = str(shard_cache.local_copy(shards, [name for e in entries for name in (e["name"], e["index"])]))
    size = manifest["settings"]["size"]
    span = size - CROP
    if span < 0:
        raise ValueError(f"shards of {size} px are smaller than the {CROP} px crop")

    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise ImportError(f"NVIDIA DALI does not import ({e}): pip install 'alexnet-pipeline[cuda130]' under a CUDA 13 "
                          f"driver or without a GPU, 'alexnet-pipeline[cuda120]' under a CUDA 12 driver (`make` picks "
                          f"by nvidia-smi)") from None

    gpu = device.type == "cuda"
    # grayscale data has a rank-1 covariance: its other eigenvalues are 0 up to rounding, maybe -1e-18
    eigenvalues = [max(v, 0.0) for v in pca["eigenvalues"]]
    scale = [v ** 0.5 if fancy_pca_scale == "sqrt" else v for v in eigenvalues]
    # Fancy PCA's offset is M alpha, M[c][k] = 255 * sigma * s_k * P[c][k] in pixel units, and the
    # per-sample mean mean255 - M alpha: -M here, row-major, for fn.coord_transform
    lighting = [-255.0 * fancy_pca_sigma * scale[k] * pca["eigenvectors"][c][k] for c in range(3) for k in range(3)]
    normalisation = normalisation or normalisation_of(pca, inputs)
    mean255 = [255.0 * m for m in normalisation["mean"]]
    std255 = [255.0 * s for s in normalisation["std"]]
    layout = "HWC" if channels_last else "CHW"
    out_type = types.FLOAT16 if dtype == torch.float16 else types.FLOAT

    @pipeline_def(enable_checkpointing=True)
    def pipeline():
        jpg, cls = fn.readers.webdataset(
            paths=[os.path.join(shards, e["name"]) for e in entries],
            index_paths=[os.path.join(shards, e["index"]) for e in entries],
            ext=["jpg", "cls"], missing_component_behavior="error", name="reader",
            shard_id=rank, num_shards=world_size, pad_last_batch=True, stick_to_shard=False,
            random_shuffle=crops == "random", initial_fill=shuffle_buffer,
            # a new order of the tar files every epoch, the same on every rank (the seed is shared)
            **({"shuffle_after_epoch": True, "shuffle_after_epoch_seed": seed} if crops == "random" else {}))
        labels = fn.pad(cls, shape=[LABEL_DIGITS], fill_value=0)
        # on the GPU: nvJPEG (and the hardware decoder, for the share hw_decoder_load gives it), its
        # buffers sized for the shards' fixed side up front, its chroma upsampled as libjpeg-turbo does
        # on the CPU, so that both devices give the same pixels (1.1 levels apart on average without)
        decoder = dict(device="mixed", preallocate_width_hint=size, preallocate_height_hint=size,
                       jpeg_fancy_upsampling=True,
                       **({} if hw_decoder_load is None else {"hw_decoder_load": hw_decoder_load})) if gpu \
            else dict(device="cpu")

        if crops == "random":
            # discrete positions k/span make the anchors exact integers 0..span
            positions = [k / span for k in range(span + 1)] if span else [0.0]
            # seeds of their own: DALI would give each the next of the pipeline's seeds in the order it walks
            # the graph from the outputs, which differs between the float and the uint8 hand-over
            seeds = [int(s >> 1) for s in np.random.SeedSequence([seed, rank, 1]).generate_state(4)]
            x, y = (fn.random.uniform(values=positions, seed=s) for s in seeds[:2])
            mirror = fn.random.coin_flip(probability=0.5, seed=seeds[2])
            mean = mean255
            if fancy_pca_sigma:
                # one operator for the sum over k: each operator costs a few us a sample
                alpha = fn.random.normal(shape=[1, 3], seed=seeds[3])
                mean = fn.reshape(fn.coord_transform(alpha, M=lighting, T=mean255), shape=[3])
            # only the crop's window is decoded (ROI decoding): 227 x 227 of the 256 x 256
            window = fn.decoders.image_crop(jpg, output_type=types.RGB, crop=(CROP, CROP), crop_pos_x=x,
                                            crop_pos_y=y, **decoder)
            if uint8:  # the flip and the layout only
                out = fn.crop_mirror_normalize(window, mirror=mirror, dtype=types.UINT8, output_layout=layout)
                if not fancy_pca_sigma:
                    mean = fn.constant(fdata=mean255, shape=[3])
                return out, mean, labels
            out = fn.crop_mirror_normalize(window, mirror=mirror, mean=mean, std=std255, dtype=out_type,
                                           output_layout=layout)
            if with_params:
                params = fn.stack(x * span, y * span, fn.cast(mirror, dtype=types.FLOAT))
                source = fn.pad(fn.get_property(jpg, key="source_info"), shape=[SOURCE_BYTES], fill_value=0)
                return out, labels, params, source
            return out, labels

        images = fn.decoders.image(jpg, output_type=types.RGB, **decoder)

        def crop(x, y, mirror):
            return fn.crop_mirror_normalize(
                images, crop=(CROP, CROP), crop_pos_x=x, crop_pos_y=y, mirror=mirror, mean=mean255,
                std=std255, dtype=out_type, output_layout=layout)

        c = (span // 2) / span if span else 0.0
        if crops == "center":
            return crop(c, c, 0), labels
        corners = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (c, c)]
        return fn.stack(*[crop(x, y, m) for m in (0, 1) for x, y in corners]), labels

    pipe = pipeline(batch_size=batch_size, num_threads=num_threads or len(os.sched_getaffinity(0)),
                    prefetch_queue_depth=prefetch_queue_depth,
                    device_id=(device.index or 0) if gpu else None, seed=rank_seed(seed, rank),
                    checkpoint=None if state is None else state["dali"])
    try:
        pipe.build()
    except RuntimeError as e:
        if state is None:
            raise
        raise StaleLoaderState(" ".join(str(e).split())) from None
    names = (["images", "mean", "labels"] if uint8 else
             ["images", "labels"] + (["params", "source"] if with_params else []))
    iterator = DALIGenericIterator([pipe], names, reader_name="reader", auto_reset=True,
                                   last_batch_policy=LastBatchPolicy.PARTIAL)
    return Loader(iterator, device, torch.uint8 if uint8 else dtype, channels_last)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: list, dtype=torch.float32) -> torch.Tensor:
    """What build_loader's float path hands over, from its uint8 one: images uint8 [B, 3, H, W] (either
    memory format, kept), mean [B, 3] pixel units as yielded, std the normalisation's ([3], [0, 1] units)
    -> (images - mean) / (255 std) as dtype. One elementwise pass: under torch.compile, one kernel."""
    std255 = torch.tensor([255.0 * s for s in std], device=images.device)
    return ((images.float() - mean[:, :, None, None]) / std255[:, None, None]).to(dtype)


class StaleLoaderState(ValueError):
    """build_loader(state=...) with a state that this pipeline cannot continue from: written by another
    version of build_loader, or with other options (crops, Fancy PCA's sigma). str(): DALI's reason."""


class Loader:
    """Batches of (images, labels) as torch tensors on the loader's device; len() per epoch."""

    def __init__(self, iterator, device, dtype, channels_last):
        self.iterator, self.device, self.dtype, self.channels_last = iterator, device, dtype, channels_last

    def __len__(self):
        return len(self.iterator)

    def __iter__(self):
        for (out,) in self.iterator:
            images = out["images"]
            if self.channels_last:  # [B, H, W, C] -> NCHW view in channels-last memory
                images = images.movedim(-1, -3)
            if images.dtype != self.dtype:
                images = images.to(self.dtype)
            labels = _parse_labels(out["labels"]).to(self.device, non_blocking=True)
            if "params" in out:
                yield images, labels, {"keys": _parse_keys(out["source"]), "params": out["params"].round().long()}
            elif "mean" in out:
                yield images, labels, out["mean"].to(self.device, non_blocking=True)
            else:
                yield images, labels

    def state_dict(self) -> dict:
        """Where the loader stands, mid-epoch too: pass as build_loader(state=...) to continue."""
        return {"dali": self.iterator.checkpoints()[0]}


def _parse_keys(source: torch.Tensor) -> list[str]:
    """DALI's source_info, "<tar path>:<offset>:<key>.jpg" as zero-padded bytes -> the keys."""
    return [bytes(row[row > 0].tolist()).decode().rsplit(":", 1)[-1].split(".")[0] for row in source.cpu()]


def _parse_labels(ascii_digits: torch.Tensor) -> torch.Tensor:
    """[B, LABEL_DIGITS] uint8 ASCII digits, zero-padded on the right -> [B] int64."""
    codes = ascii_digits.long()
    value = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
    for column in codes.unbind(1):
        value = torch.where(column > 0, value * 10 + column - ord("0"), value)
    return value
