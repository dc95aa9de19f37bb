"""One image in, one 256x256 RGB JPEG out: decode by content, orient, resize, crop, encode.

Every way an input can be unusable raises `Rejected` with a reason of the form
"category: detail", so the job can report it and carry on.
"""
import io

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import storage

# Pillow's own bomb check warns or raises at its own limits; we check the header ourselves
# against `max_pixels` so that the reason names the cap the user chose.
Image.MAX_IMAGE_PIXELS = None
MAX_PIXELS = 100_000_000  # 100 MP: ImageNet's largest image is ~30 MP; a 10k x 10k bomb is refused


class Rejected(Exception):
    """An input that cannot become a sample; str() is "category: detail"."""

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}")
        self.category = category


def read_bytes(path, start=0, size=-1) -> bytes:
    """The file's (or object's) bytes, or `size` of them from `start` (an image inside an archive). An
    object that cannot be read for want of a server (StorageError) is not the image's fault: raised."""
    try:
        if storage.is_url(path):
            data = storage.read_bytes(path) if size < 0 else storage.read_range(path, start, size)
        else:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(size)
    except storage.StorageError:
        raise
    except OSError as e:
        raise Rejected("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
    if len(data) < size:
        raise Rejected("truncated", f"{path} ends {size - len(data):,} bytes before this image does")
    if not data:
        raise Rejected("empty", "zero-byte file")
    return data


def decode_square(data: bytes, size: int = 256, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Any image Pillow (or failing that OpenCV) can read -> its central square, [S, S, 3] uint8
    RGB, EXIF-oriented, S the shorter side (JPEGs may be decoded at 1/2, 1/4 or 1/8 scale, S >= size).

    The square is cut from the decoded image before anything else is done to it, so that the work
    and memory an input costs are bounded by its pixels whatever its shape: a 30000 x 2 strip costs
    a 2 x 2 square, not a 3.8M x 256 image. Transparent images are composited on white; 16-bit
    images keep their high byte.
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
        if img.width != img.height:  # each step below copies at most the square, and only if it must
            img = img.crop(_square_box(*img.size))
        # the central square of an image is the central square of any of its EXIF rotations
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as e:
        category = "truncated" if "truncated" in str(e) else "corrupt"
        raise Rejected(category, f"{img.format} does not decode ({e})") from None
    return _to_rgb8(img)


def _square_box(w: int, h: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the central min(w, h) square."""
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def _decode_with_opencv(data: bytes, max_pixels: int) -> np.ndarray:
    buf = np.frombuffer(data, np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if bgr is None:
        raise Rejected("not-an-image", "neither Pillow nor OpenCV recognises the content")
    if bgr.shape[0] * bgr.shape[1] > max_pixels:
        raise Rejected("bomb", f"{bgr.shape[1]}x{bgr.shape[0]} exceeds the cap of {max_pixels}")
    left, top, right, bottom = _square_box(bgr.shape[1], bgr.shape[0])
    bgr = bgr[top:bottom, left:right]
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
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, img.convert("RGBA")).convert("RGB"))
    try:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except Exception as e:
        raise Rejected("unsupported", f"mode {img.mode} does not convert to RGB ({e})") from None


def resize_center_crop(rgb: np.ndarray, size: int = 256) -> np.ndarray:
    """The central square, resized to size x size: the paper's "shorter side to 256, then the
    central 256x256" (section 2), computed on the square alone. Area interpolation when shrinking,
    bicubic when enlarging."""
    left, top, right, bottom = _square_box(rgb.shape[1], rgb.shape[0])
    square = rgb[top:bottom, left:right]
    interpolation = cv2.INTER_AREA if square.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(square), (size, size), interpolation=interpolation)


def to_sample(data: bytes, size: int = 256, quality: int = 90, max_pixels: int = MAX_PIXELS):
    """An input file's bytes -> (the sample's JPEG, that JPEG decoded back: [size, size, 3] uint8 RGB),
    or Rejected. The decode-back is the check that no JPEG that fails to decode reaches a shard (one
    such stops a DALI pipeline for good), and it is what the network sees of the input."""
    try:
        jpeg = encode_jpeg(resize_center_crop(decode_square(data, size, max_pixels), size), quality)
    except Rejected:
        raise
    except Exception as e:  # whatever a damaged input makes a decoder do, it stops only this input
        raise Rejected("corrupt", f"{type(e).__name__}: {e}") from None
    decoded = decode_jpeg(jpeg, rgb=False)
    if decoded is None or decoded.shape != (size, size, 3):
        raise Rejected("reencode", "the written JPEG did not decode back")
    return jpeg, decoded[..., ::-1]  # BGR -> RGB as a view


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """Baseline JPEG (the GPU's hardware decoder takes nothing else), 4:2:0 as OpenCV writes it."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_PROGRESSIVE, 0])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buf.tobytes()


# the frame header (SOFn) markers, by the coding process they name; 0xC4, 0xC8 and 0xCC are not frames
FRAMES = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive", 0xC3: "lossless",
          0xC5: "differential sequential", 0xC6: "differential progressive", 0xC7: "differential lossless",
          0xC9: "arithmetic sequential", 0xCA: "arithmetic progressive", 0xCB: "arithmetic lossless",
          0xCD: "arithmetic differential sequential", 0xCE: "arithmetic differential progressive",
          0xCF: "arithmetic differential lossless"}


def jpeg_frame(data: bytes) -> str | None:
    """The coding process a JPEG's frame header names ("baseline", "progressive", ...), read from the
    markers before it; None where there is no frame header."""
    i = 2  # after SOI
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        if marker in FRAMES:
            return FRAMES[marker]
        if marker == 0xDA:  # the scan begins: no frame header came before it
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def decode_jpeg(data: bytes, rgb: bool = True) -> np.ndarray | None:
    """A written JPEG back to [H, W, 3] uint8 RGB (BGR if not `rgb`), or None if it does not decode."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if rgb and bgr is not None else bgr
