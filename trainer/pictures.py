"""PNGs a person would rather look at than read: conv1's kernels (paper, figure 3) and the curves.

Drawn with matplotlib's Agg backend: no display needed.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402


def kernels_grid(towers_weights, gap=1) -> np.ndarray:
    """towers_weights: per tower [48, 3, 11, 11] conv1 weights -> [H, W, 3] uint8: one block of
    6 x 8 kernels per tower, tower 0 above tower 1 as in the paper's figure 3, each kernel scaled
    to 0..255 on its own, white gaps, a grey band between the towers."""
    blocks = []
    for weights in towers_weights:
        w = weights.detach().float().cpu().numpy()
        lo, hi = w.min(axis=(1, 2, 3), keepdims=True), w.max(axis=(1, 2, 3), keepdims=True)
        tiles = ((w - lo) / np.maximum(hi - lo, 1e-12) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
        n, k = len(tiles), tiles.shape[1]
        rows, cols = 6, (n + 5) // 6
        block = np.full((rows * (k + gap) + gap, cols * (k + gap) + gap, 3), 255, np.uint8)
        for i, tile in enumerate(tiles):
            r, c = divmod(i, cols)
            block[gap + r * (k + gap):gap + r * (k + gap) + k, gap + c * (k + gap):gap + c * (k + gap) + k] = tile
        blocks.append(block)
    band = np.full((3 * gap, blocks[0].shape[1], 3), 128, np.uint8)
    return np.vstack([blocks[0], band, blocks[1]])


def kernels_png(path, towers_weights):
    grid = kernels_grid(towers_weights)
    figure, axes = plt.subplots(figsize=(grid.shape[1] / 16, grid.shape[0] / 16 + 0.4), dpi=80)
    axes.imshow(grid, interpolation="nearest")
    axes.set_title("conv1 kernels: tower 0 (top), tower 1 (bottom)", fontsize=9)
    axes.axis("off")
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)


def curves_png(path, steps, epochs):
    """steps: [(epoch as a fraction, training loss)]; epochs: [(epoch, top-1 error, top-5 error, lr)],
    errors None without a val split. Loss on a log scale on the left, errors on the right, the epochs
    after which the lr was divided marked on both."""
    figure, (loss_axes, error_axes) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    loss_axes.set(yscale="log", xlabel="epoch", ylabel="cross-entropy loss (log scale)", title="training loss")
    if steps:
        loss_axes.plot(*zip(*steps), color="tab:blue", linewidth=1, label="training loss")
        losses = [loss for _, loss in steps]
        # ticks at 1, 2, 5 of each decade over a wide range, evenly spaced over a narrow one; plain numbers
        wide = max(losses) > 4 * min(losses)
        loss_axes.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)) if wide else ticker.MaxNLocator(5))
        loss_axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        loss_axes.yaxis.set_minor_formatter(ticker.NullFormatter())
    scored = [e for e in epochs if e[1] is not None]
    if scored:
        x = [e[0] for e in scored]
        error_axes.plot(x, [100 * e[1] for e in scored], "o-", color="tab:red", label="val top-1 error")
        error_axes.plot(x, [100 * e[2] for e in scored], "s-", color="tab:green", label="val top-5 error")
    error_axes.set(xlabel="epoch", ylabel="error (%)", ylim=(0, 100), title="validation error (centre crop)")
    drops = [b[0] for a, b in zip(epochs, epochs[1:]) if b[3] < a[3]]
    for axes in (loss_axes, error_axes):
        for i, epoch in enumerate(drops):
            axes.axvline(epoch, color="grey", linestyle="--", linewidth=1, label="lr divided" if i == 0 else None)
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
