"""The exact 3x3 RGB covariance of the training pixels and its eigen-decomposition.

Each shard task sums its pixels' moments in uint8 units: count, sum of x and sum of x x^T.
They are integers, so merging them is exact and independent of order (a shard's sums fit
float64 exactly: 65,536 pixels x 255^2 per image), and the driver turns the merged sums
into `pca.json` with one division at the end.
"""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Moments:
    count: int = 0  # pixels
    sum: list = field(default_factory=lambda: [0, 0, 0])  # [3] sum of x, x in 0..255
    outer: list = field(default_factory=lambda: [[0] * 3 for _ in range(3)])  # [3][3] sum of x x^T

    def add_image(self, rgb: np.ndarray):
        """rgb: [H, W, 3] uint8."""
        # [3, N] channel planes, float64: products <= 255^2, so the sums stay exact. BLAS on planes
        # costs 0.57 ms for 256x256 where [N, 3] pixels cost 0.88 ms; x.sum(axis=0) is slower still
        x = np.ascontiguousarray(rgb.transpose(2, 0, 1)).reshape(3, -1).astype(np.float64)
        s, xx = x @ np.ones(x.shape[1]), x @ x.T
        self.count += x.shape[1]
        self.sum = [a + int(b) for a, b in zip(self.sum, s)]
        self.outer = [[a + int(b) for a, b in zip(ra, rb)] for ra, rb in zip(self.outer, xx)]

    def merge(self, other: "Moments"):
        self.count += other.count
        self.sum = [a + b for a, b in zip(self.sum, other.sum)]
        self.outer = [[a + b for a, b in zip(ra, rb)] for ra, rb in zip(self.outer, other.outer)]

    def pca(self) -> dict:
        """Mean, std, covariance (population, as np.cov(bias=True)) and eigen-pairs in [0,1] units."""
        if self.count == 0:
            raise ValueError("no training pixels: every training image was rejected")
        n = self.count
        # n^2 cov = n * sum(x x^T) - sum(x) sum(x)^T, exactly, in Python integers
        scaled = [[n * self.outer[i][j] - self.sum[i] * self.sum[j] for j in range(3)]
                  for i in range(3)]
        cov = np.array(scaled, dtype=np.float64) / (n * n * 255.0 * 255.0)
        mean = np.array(self.sum, dtype=np.float64) / (n * 255.0)
        eigenvalues, eigenvectors = np.linalg.eigh(cov)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
        eigenvectors *= np.where(eigenvectors.sum(axis=0) < 0, -1.0, 1.0)  # a fixed sign per column
        return {
            "mean": mean.tolist(),
            "std": np.sqrt(np.diag(cov)).tolist(),
            "cov": cov.tolist(),
            "eigenvalues": eigenvalues.tolist(),
            "eigenvectors": eigenvectors.tolist(),  # eigenvector i is column i
            "pixels": n,
        }
