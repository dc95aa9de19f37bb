"""pipeline.build_loader against numpy on the same DALI-decoded images, with fixed seeds."""
import json
import shutil

import numpy as np
import pytest
import torch

from pipeline import build_loader
from pipeline.manifest import ShardDirError

CROP, SPAN = 227, 256 - 227


@pytest.fixture(scope="module")
def decoded(shards):
    return decode_all(shards)


def decode_all(shards):
    """{split: {key: (DALI's decode of the sample on the CPU, [256, 256, 3] uint8, label)}}: the reference images."""
    from nvidia.dali import fn, pipeline_def, types

    manifest = json.loads((shards / "manifest.json").read_text())
    result = {}
    for split in ("train", "val"):
        entries = manifest["splits"][split]["shards"]

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def plain():
            jpg, cls = fn.readers.webdataset(paths=[str(shards / e["name"]) for e in entries],
                                             index_paths=[str(shards / e["index"]) for e in entries],
                                             ext=["jpg", "cls"], missing_component_behavior="error")
            return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, \
                fn.get_property(jpg, key="source_info")

        pipe = plain()
        pipe.build()
        result[split] = {}
        for _ in range(manifest["splits"][split]["samples"]):
            image, cls, source = (np.array(t[0]) for t in pipe.run())
            key = bytes(source.tolist()).decode().rsplit(":", 1)[-1].split(".")[0]
            result[split][key] = (image, int(bytes(cls.tolist())))
    return result


@pytest.fixture(scope="module")
def pca(shards):
    return json.loads((shards / "pca.json").read_text())


def normalise(crop, pca, inputs="raw"):
    """numpy's x - 255 mean ("raw", the paper's) or (x/255 - mean) / std ("standardised"), as CHW float32."""
    x = crop - 255 * np.array(pca["mean"]) if inputs == "raw" else (crop / 255 - pca["mean"]) / pca["std"]
    return x.transpose(2, 0, 1).astype(np.float32)


def unnormalise(image, pca, inputs):
    """The loader's output back in [0, 1] units, HWC float64."""
    std = np.array(pca["std"]) if inputs == "standardised" else np.full(3, 1 / 255)
    return image.numpy().transpose(1, 2, 0) * std + pca["mean"]


def numpy_crop(image, x, y, flip):
    out = image[y:y + CROP, x:x + CROP]
    return out[:, ::-1] if flip else out


def random_batches(shards, epochs, **kwargs):
    loader = build_loader(shards, batch_size=8, crops="random", with_params=True, **kwargs)
    return [batch for _ in range(epochs) for batch in loader]


def test_random_crops_and_flips_are_what_they_claim(shards, decoded, pca):
    batches = random_batches(shards, epochs=4, fancy_pca_sigma=0.0, seed=3, inputs="standardised")
    params = torch.cat([info["params"] for _, _, info in batches])
    for images, labels, info in batches:
        for image, label, key, (x, y, flip) in zip(images, labels, info["keys"], info["params"].tolist()):
            source, source_label = decoded["train"][key]
            assert label == source_label
            expected = normalise(numpy_crop(source, x, y, flip), pca, "standardised")
            np.testing.assert_allclose(image.numpy(), expected, rtol=0, atol=2e-5)  # sigma 0: plain crop+normalise
    assert params[:, :2].min() == 0 and params[:, :2].max() == SPAN  # integer anchors over 0..29
    assert len(set(params[:, 0].tolist())) > 15 and len(set(params[:, 1].tolist())) > 15
    assert 0.3 < params[:, 2].float().mean() < 0.7  # flips with p = 0.5 (96 draws)


@pytest.mark.parametrize("split, inputs", [("train", "raw"), ("val", "standardised")])
def test_center_and_ten_crops_equal_numpy_slicing(shards, decoded, pca, split, inputs):
    center = build_loader(shards, split=split, batch_size=4, crops="center", inputs=inputs)
    ten = build_loader(shards, split=split, batch_size=4, crops="ten", inputs=inputs)
    atol = 2e-5 if inputs == "standardised" else 1e-4  # float32 of values up to 1e1 or 255
    corners = [(0, 0), (SPAN, 0), (0, SPAN), (SPAN, SPAN), (SPAN // 2, SPAN // 2)]
    references = list(decoded[split].values())  # neither shuffles: the reader's order
    n = 0
    for (c_images, c_labels), (t_images, t_labels) in zip(center, ten):
        assert torch.equal(c_labels, t_labels) and t_images.shape[1:] == (10, 3, CROP, CROP)
        for c_image, t_image, label in zip(c_images, t_images, c_labels):
            source, source_label = references[n]
            assert label == source_label
            np.testing.assert_allclose(c_image.numpy(), normalise(source[14:241, 14:241], pca, inputs), atol=atol)
            expected = [normalise(numpy_crop(source, x, y, flip), pca, inputs) for flip in (0, 1) for x, y in corners]
            np.testing.assert_allclose(t_image.numpy(), np.stack(expected), atol=atol)
            n += 1
    assert n == len(references)


@pytest.mark.parametrize("scale, inputs", [("sqrt", "raw"), ("linear", "standardised")])
def test_fancy_pca_offsets_have_the_claimed_distribution(shards, decoded, pca, scale, inputs):
    """Checked in [0, 1] units in both modes: the offset is the same fraction of the pixel range
    whichever the inputs (in 0-255 units for the raw ones, divided by no std)."""
    sigma = 0.1
    offsets = []
    batches = random_batches(shards, epochs=15, fancy_pca_sigma=sigma, fancy_pca_scale=scale, inputs=inputs)
    for images, _, info in batches:
        for image, key, (x, y, flip) in zip(images, info["keys"], info["params"].tolist()):
            pixels = numpy_crop(decoded["train"][key][0], x, y, flip) / 255
            shift = (unnormalise(image, pca, inputs) - pixels).reshape(-1, 3).T
            offset = shift.mean(1)
            np.testing.assert_allclose(shift, offset[:, None].repeat(CROP * CROP, 1), atol=1e-5)
            offsets.append(offset)  # the same offset for every pixel of the image
    offsets = np.array(offsets)
    P, lam = np.array(pca["eigenvectors"]), np.array(pca["eigenvalues"])
    variances = sigma ** 2 * (lam if scale == "sqrt" else lam ** 2)
    in_basis = offsets @ P  # components along the eigenvectors: independent, N(0, variances)
    n = len(offsets)
    assert n == 24 * 15
    np.testing.assert_array_less(np.abs(in_basis.mean(0)), 4 * np.sqrt(variances / n))
    cov = np.cov(in_basis, rowvar=False)
    np.testing.assert_allclose(np.diag(cov), variances, rtol=4 * np.sqrt(2 / n))
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert abs(cov[i, j]) < 4 * np.sqrt(variances[i] * variances[j] / n)


def test_two_ranks_see_every_sample_once_in_equal_batches(shards, decoded):
    loaders = [build_loader(shards, batch_size=5, rank=r, world_size=2, with_params=True) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 3  # 12 samples a rank: 5 + 5 + 2
    orders = []
    for epoch in range(2):
        keys = [[k for _, _, info in loader for k in info["keys"]] for loader in loaders]
        assert sorted(keys[0] + keys[1]) == sorted(decoded["train"])  # every sample, once
        orders.append(keys[0] + keys[1])
    assert orders[0] != orders[1]  # another order in the second epoch


def test_each_rank_draws_its_own_augmentation(shards, decoded, pca):
    """The ranks' k-th samples get crop positions, flips and Fancy PCA offsets of their own; each
    rank's draws are fixed by (seed, rank)."""
    def draws(rank, seed=7):
        loader = build_loader(shards, batch_size=6, rank=rank, world_size=2, seed=seed, with_params=True)
        params, offsets = [], []
        for _ in range(2):
            for images, _, info in loader:
                params.append(info["params"])
                for image, key, (x, y, flip) in zip(images, info["keys"], info["params"].tolist()):
                    pixels = numpy_crop(decoded["train"][key][0], x, y, flip) / 255
                    offsets.append((unnormalise(image, pca, "raw") - pixels).reshape(-1, 3).mean(0))
        return torch.cat(params), np.array(offsets)

    (params0, offsets0), (params1, offsets1), (again1, again_offsets1) = draws(0), draws(1), draws(1)
    assert len(params0) == len(params1) == 24  # 12 samples a rank, 2 epochs
    assert torch.equal(params1, again1)
    np.testing.assert_allclose(offsets1, again_offsets1, atol=1e-6)
    assert (params0 != params1).any(1).float().mean() > 0.5  # alike by chance with p = 1/1800 a sample
    assert (np.abs(offsets0 - offsets1).max(1) > 1e-4).all()  # alpha ~ N(0, 0.1^2): never alike by chance
    assert not torch.equal(draws(1, seed=8)[0], params1)


def test_loader_output_statistics_in_each_mode(shards, decoded, pca):
    """Per channel mean and std of the centre crops of the train split against numpy's: the raw
    inputs are the pixels less the mean in 0-255 units, the standardised ones divided by 255 std."""
    pixels = np.stack([image[14:241, 14:241] for image, _ in decoded["train"].values()]).reshape(-1, 3)
    for inputs, shift, scale in [("raw", 255 * np.array(pca["mean"]), np.ones(3)),
                                 ("standardised", 255 * np.array(pca["mean"]), 255 * np.array(pca["std"]))]:
        out = torch.cat([images for images, _ in build_loader(shards, batch_size=8, crops="center", inputs=inputs)])
        out = out.double().movedim(1, -1).reshape(-1, 3).numpy()
        np.testing.assert_allclose(out.mean(0), (pixels.mean(0) - shift) / scale, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.std(0), pixels.std(0) / scale, rtol=1e-5)
        if inputs == "raw":
            assert (out.std(0) > 10).all()  # 0-255 units: the fixture's pixels spread by tens
        else:
            assert (0.3 < out.std(0)).all() and (out.std(0) < 3).all()


def test_uneven_split_still_gives_equal_batch_counts(shards, decoded):
    loaders = [build_loader(shards, batch_size=4, rank=r, world_size=5, with_params=True) for r in range(5)]
    counts = [[len(info["keys"]) for _, _, info in loader] for loader in loaders]
    assert {len(c) for c in counts} == {2}  # 24 samples over 5 ranks: 4 or 5 each, 2 batches each
    assert sum(map(sum, counts)) == 24


def test_resume_mid_epoch_gives_the_uninterrupted_batches(shards):
    loader = build_loader(shards, batch_size=4, seed=5, with_params=True)
    batches = iter(loader)
    for _ in range(2):
        next(batches)
    state = loader.state_dict()
    expected = list(batches) + list(loader)  # the rest of this epoch, then the next one

    resumed = build_loader(shards, batch_size=4, seed=5, with_params=True, state=state)
    got = list(resumed) + list(resumed)
    assert len(got) == len(expected) == 4 + 6
    for (a_images, a_labels, a_info), (b_images, b_labels, b_info) in zip(expected, got):
        assert a_info["keys"] == b_info["keys"] and torch.equal(a_info["params"], b_info["params"])
        assert torch.equal(a_labels, b_labels) and torch.equal(a_images, b_images)


def test_folder_that_does_not_match_its_manifest_is_refused(shards, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(shards, folder)
    with open(folder / "train-000003.tar", "ab") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(ShardDirError, match="train-000003.tar has .* bytes, the manifest says"):
        build_loader(folder)


def test_bad_arguments_say_what_is_allowed(shards):
    with pytest.raises(ValueError, match="crops must be"):
        build_loader(shards, crops="five")
    with pytest.raises(ValueError, match="rank 2 is not within world_size 2"):
        build_loader(shards, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"inputs must be one of \('raw', 'standardised'\), not 'scaled'"):
        build_loader(shards, inputs="scaled")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pipeline_matches_cpu(local_shards):
    # standardised inputs, so that the tolerances below are in units of the pixels' std
    cpu = next(iter(build_loader(local_shards, split="val", batch_size=9, crops="center", inputs="standardised")))
    for dtype, channels_last in [(torch.float32, False), (torch.float16, True), (torch.bfloat16, True)]:
        images, labels = next(iter(build_loader(local_shards, split="val", batch_size=9, crops="center",
                                                inputs="standardised", device="cuda:0", dtype=dtype,
                                                channels_last=channels_last)))
        assert images.device.type == "cuda" and images.dtype == dtype and labels.device.type == "cuda"
        assert images.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert torch.equal(labels.cpu(), cpu[1])
        # nvJPEG and libjpeg-turbo may differ by a few levels per pixel: compare means and maxima
        diff = (images.float().cpu() - cpu[0]).abs()
        assert diff.mean() < 0.02 and diff.max() < 0.5
    # random crops: nvJPEG decodes the window alone (ROI), at the positions and flips the batch reports
    pca, train = json.loads((local_shards / "pca.json").read_text()), decode_all(local_shards)["train"]
    loader = build_loader(local_shards, batch_size=8, device="cuda:0", with_params=True, fancy_pca_sigma=0.0,
                          inputs="standardised")
    for images, _, info in loader:
        for image, key, (x, y, flip) in zip(images.cpu(), info["keys"], info["params"].tolist()):
            diff = np.abs(image.numpy() - normalise(numpy_crop(train[key][0], x, y, flip), pca, "standardised"))
            assert diff.mean() < 0.02 and diff.max() < 0.5, (key, x, y, flip)


@pytest.mark.parametrize("sigma", [0.1, 0.0])
def test_the_uint8_hand_over_normalised_in_the_step_is_the_float_paths_input(local_shards, sigma):
    """The same seed draws the same crops, flips and Fancy PCA offsets on both paths; normalise() of the
    uint8 crops with the yielded means is the float path's batch, to float32's rounding."""
    from pipeline.loader import normalise

    options = dict(batch_size=8, seed=3, fancy_pca_sigma=sigma, inputs="standardised")
    floats, uint8 = (list(build_loader(local_shards, **options, uint8=u)) for u in (False, True))
    std = json.loads((local_shards / "pca.json").read_text())["std"]
    assert len(floats) == len(uint8) > 1
    for (images, labels), (pixels, labels8, mean) in zip(floats, uint8):
        assert pixels.dtype == torch.uint8 and pixels.shape == images.shape and mean.shape == (len(labels), 3)
        assert torch.equal(labels, labels8)
        torch.testing.assert_close(normalise(pixels, mean, std), images, rtol=1e-5, atol=1e-5)
    offsets = torch.cat([mean for _, _, mean in uint8])  # Fancy PCA's: one per image, or none
    assert (offsets.std(0) > 0.1).all() if sigma else (offsets == offsets[0]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_uint8_hand_over_on_the_gpu_is_the_float_paths_bf16_input(local_shards):
    """As the trainer takes it on CUDA: bf16, channels-last; equal to bf16's rounding (8 bits of mantissa)."""
    from pipeline.loader import normalise

    options = dict(batch_size=8, seed=3, inputs="standardised", device="cuda:0", dtype=torch.bfloat16,
                   channels_last=True)
    floats, uint8 = (list(build_loader(local_shards, **options, uint8=u)) for u in (False, True))
    std = json.loads((local_shards / "pca.json").read_text())["std"]
    for (images, labels), (pixels, labels8, mean) in zip(floats, uint8):
        assert mean.device.type == "cuda" and pixels.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(labels, labels8)
        ours = normalise(pixels, mean, std, torch.bfloat16)
        assert ours.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ours, images, rtol=2 ** -7, atol=2 ** -7)


def rank_correlation(a, b):
    """Spearman's rho of the positions of the same keys in two orders."""
    where = {key: i for i, key in enumerate(b)}
    return np.corrcoef(np.arange(len(a)), [where[key] for key in a])[0, 1]


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, ray_head):
    """600 training samples in 600 shards: ImageNet's 1,282 shards in miniature (tiny images)."""
    from PIL import Image

    from conftest import preprocess

    src = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("val", 1)):
        for c in range(3):
            folder = src / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path_factory.mktemp("many-shards")
    preprocess(src, out, "--shard-size", 1, address=ray_head)
    return out


def epoch_orders(shards, epochs, **kwargs):
    loader = build_loader(shards, batch_size=16, with_params=True, **kwargs)
    return [[key for _, _, info in loader for key in info["keys"]] for _ in range(epochs)]


def test_consecutive_epochs_come_in_unrelated_orders(many_shards):
    # ImageNet: a 4,096-sample buffer over 1.28 M samples, 0.0032 of the data; here 2 of 600
    orders = epoch_orders(many_shards, 5, shuffle_buffer=2, seed=0)
    assert all(sorted(order) == sorted(orders[0]) and len(order) == 600 for order in orders)
    rhos = [rank_correlation(a, b) for a, b in zip(orders, orders[1:])]
    assert np.mean(np.abs(rhos)) < 0.1, rhos  # a buffer alone gives rho = 1.00 here (0.98 at 18 shards)
    assert epoch_orders(many_shards, 3, shuffle_buffer=2, seed=0) == orders[:3]  # deterministic for a seed
    assert epoch_orders(many_shards, 2, shuffle_buffer=2, seed=1)[1] != orders[1]


def test_ranks_split_every_reshuffled_epoch(many_shards):
    loaders = [build_loader(many_shards, batch_size=16, rank=r, world_size=3, with_params=True) for r in range(3)]
    for epoch in range(3):
        keys = [key for loader in loaders for _, _, info in loader for key in info["keys"]]
        assert len(keys) == len(set(keys)) == 600, f"epoch {epoch + 1}"
