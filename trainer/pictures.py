"""PNGs a person would rather look at than read: conv1's kernels (paper, figure 3) and the curves."""
import cv2
import numpy as np


def kernels_png(path, towers_weights, zoom=4, gap=2):
    """towers_weights: per tower [48, 3, 11, 11] conv1 weights. One block of 6 x 8 kernels per tower,
    tower 0 above tower 1 as in the paper's figure 3; each kernel scaled to 0..255 on its own."""
    blocks = []
    for weights in towers_weights:
        w = weights.detach().float().cpu().numpy()
        lo, hi = w.min(axis=(1, 2, 3), keepdims=True), w.max(axis=(1, 2, 3), keepdims=True)
        tiles = ((w - lo) / np.maximum(hi - lo, 1e-12) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
        k = tiles.shape[1] * zoom
        rows, cols = 6, (len(tiles) + 5) // 6
        block = np.full((rows * (k + gap) + gap, cols * (k + gap) + gap, 3), 255, np.uint8)
        for i, tile in enumerate(tiles):
            r, c = divmod(i, cols)
            y, x = gap + r * (k + gap), gap + c * (k + gap)
            block[y:y + k, x:x + k] = cv2.resize(tile, (k, k), interpolation=cv2.INTER_NEAREST)
        blocks.append(block)
    separator = np.full((3 * gap, blocks[0].shape[1], 3), 128, np.uint8)
    cv2.imwrite(str(path), cv2.cvtColor(np.vstack([blocks[0], separator, blocks[1]]), cv2.COLOR_RGB2BGR))


def curves_png(path, series, width=900, height=360):
    """series: {name: [(x, y), ...]} drawn as lines in two panels: losses (left) and error rates in
    [0, 1] (right), x in epochs."""
    canvas = np.full((height, width, 3), 255, np.uint8)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]
    panels = [[n for n in series if "loss" in n], [n for n in series if "loss" not in n]]
    for p, names in enumerate(panels):
        x0, x1, y0, y1 = p * width // 2 + 50, (p + 1) * width // 2 - 15, 20, height - 40
        cv2.rectangle(canvas, (x0, y0), (x1, y1), (0, 0, 0), 1)
        points = [pt for n in names for pt in series[n]]
        if not points:
            continue
        xmax = max(max(x for x, _ in points), 1e-9)
        ymax = 1.0 if p == 1 else max(y for _, y in points) * 1.05 or 1.0
        cv2.putText(canvas, f"{ymax:.3g}", (x0 - 48, y0 + 10), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
        cv2.putText(canvas, f"epoch {xmax:.3g}", (x1 - 80, y1 + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        for i, name in enumerate(names):
            pts = np.array([(x0 + (x1 - x0) * x / xmax, y1 - (y1 - y0) * min(y / ymax, 1.0)) for x, y in series[name]],
                           np.int32)
            colour = colours[i % len(colours)][::-1]
            cv2.polylines(canvas, [pts], False, colour, 2 if len(pts) < 50 else 1, cv2.LINE_AA)
            cv2.putText(canvas, name, (x0 + 8, y0 + 16 + 16 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    cv2.imwrite(str(path), canvas)
