"""One image in, one 256x256 RGB JPEG out: decode by content, orient, resize, crop, encode.

Every way an input can be unusable raises `Rejected` with a reason of the form
"category: detail", so the job can report it and carry on.
"""
import io

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own bomb check warns or raises at its own limits; we check the header ourselves
# against `max_pixels` so that the reason names the cap the user chose.
Image.MAX_IMAGE_PIXELS = None
MAX_PIXELS = 100_000_000  # 100 MP: ImageNet's largest image is ~30 MP; a 10k x 10k bomb is refused


class Rejected(Exception):
    """An input that cannot become a sample; str() is "category: detail"."""

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}")
        self.category = category


def read_bytes(path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Rejected("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
    if not data:
        raise Rejected("empty", "zero-byte file")
    return data


def decode_rgb(data: bytes, size: int = 256, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Any image Pillow (or failing that OpenCV) can read -> [H, W, 3] uint8 RGB, EXIF-oriented.

    Transparent images are composited on white. 16-bit images keep their high byte.
    """
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return _decode_with_opencv(data, max_pixels)
    except Exception as e:  # Pillow raises many types on a damaged header
        raise Rejected("corrupt", f"unreadable header ({e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise Rejected("bomb", f"{w}x{h} = {w * h} pixels exceeds the cap of {max_pixels}")
    if w == 0 or h == 0:
        raise Rejected("corrupt", f"{w}x{h} image")
    # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale while the short side stays >= size
    img.draft(None, (w * size // min(w, h), h * size // min(w, h)))
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except Exception as e:
        category = "truncated" if "truncated" in str(e) else "corrupt"
        raise Rejected(category, f"{img.format} does not decode ({e})") from None
    return _to_rgb8(img)


def _decode_with_opencv(data: bytes, max_pixels: int) -> np.ndarray:
    buf = np.frombuffer(data, np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if bgr is None:
        raise Rejected("not-an-image", "neither Pillow nor OpenCV recognises the content")
    if bgr.shape[0] * bgr.shape[1] > max_pixels:
        raise Rejected("bomb", f"{bgr.shape[1]}x{bgr.shape[0]} exceeds the cap of {max_pixels}")
    if bgr.dtype == np.uint16:
        bgr = (bgr >> 8).astype(np.uint8)
    if bgr.dtype != np.uint8:
        raise Rejected("unsupported", f"{bgr.dtype} pixels")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _to_rgb8(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I;16") or img.mode == "I":
        high_byte = (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(high_byte[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    try:
        return np.asarray(img.convert("RGB"))
    except Exception as e:
        raise Rejected("unsupported", f"mode {img.mode} does not convert to RGB ({e})") from None


def resize_center_crop(rgb: np.ndarray, size: int = 256) -> np.ndarray:
    """Shorter side to `size`, then the central size x size (paper, section 2)."""
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(rgb, (nw, nh), interpolation=interpolation)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(resized[top:top + size, left:left + size])


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buf.tobytes()


def decode_jpeg(data: bytes, rgb: bool = True) -> np.ndarray | None:
    """A written JPEG back to [H, W, 3] uint8 RGB (BGR if not `rgb`), or None if it does not decode."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if rgb and bgr is not None else bgr
