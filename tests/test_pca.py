"""pca.json against numpy's covariance and eigh over the decoded training pixels."""
import json

import cv2
import numpy as np

from pipeline.pca import Moments
from pipeline.shards import iter_samples


def numpy_pca(pixels):
    """pixels: [N, 3] in [0, 1] -> (mean, cov, eigenvalues descending, eigenvectors as columns)."""
    cov = np.cov(pixels, rowvar=False, bias=True)
    values, vectors = np.linalg.eigh(cov)
    return pixels.mean(0), cov, values[::-1], vectors[:, ::-1]


def assert_matches_numpy(pca, pixels):
    mean, cov, values, vectors = numpy_pca(pixels)
    assert pca["pixels"] == len(pixels)
    np.testing.assert_allclose(pca["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(pca["std"], pixels.std(0), rtol=1e-6)
    np.testing.assert_allclose(pca["cov"], cov, rtol=1e-6)
    np.testing.assert_allclose(pca["eigenvalues"], values, rtol=1e-6)
    got = np.array(pca["eigenvectors"])
    np.testing.assert_allclose(np.abs(got.T @ vectors), np.eye(3), atol=1e-6)  # same axes, up to sign
    np.testing.assert_allclose(got @ np.diag(pca["eigenvalues"]) @ got.T, cov, rtol=1e-6, atol=1e-12)


def test_moments_merge_equals_numpy_on_random_images():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(5, 7), (16, 3), (9, 9)]]
    a, b = Moments(), Moments()
    for img in images[:2]:
        a.add_image(img)
    b.add_image(images[2])
    a.merge(b)
    pixels = np.concatenate([img.reshape(-1, 3) for img in images]).astype(np.float64) / 255
    assert_matches_numpy(a.pca(), pixels)


def test_pca_json_equals_numpy_over_decoded_train_pixels(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    decoded = [cv2.cvtColor(cv2.imdecode(np.frombuffer(files["jpg"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
               for shard in manifest["splits"]["train"]["shards"]
               for _, files in iter_samples(shards / shard["name"])]
    assert len(decoded) == manifest["splits"]["train"]["samples"]
    pixels = np.concatenate([img.reshape(-1, 3) for img in decoded]).astype(np.float64) / 255
    assert_matches_numpy(json.loads((shards / "pca.json").read_text()), pixels)
