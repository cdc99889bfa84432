"""Image decoding for every reader of untrusted images: the pixel-count guard, decode to
upright RGB (with the libspng fast path for PNG), resize and encode."""

from __future__ import annotations

import io

import pyspng
from PIL import Image, ImageOps

from data_pipeline.config import IngestConfig

_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_EXIF_ORIENTATION = 0x0112
_DOWNSCALE = {"box": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC,
              "lanczos": Image.Resampling.LANCZOS}


class Rejected(Exception):
    """A sample that cannot be kept; ``reason`` is a bounded snake_case label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Pillow's lazy open of ``data``: the header only, refused (``too_many_pixels``) when it
    declares more than ``max_pixels`` pixels, before any pixel is decoded. The decompression
    bomb guard of every decoder of untrusted images (ingest, training, eval, inspect)."""
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning: under -W error
        raise Rejected("too_many_pixels", str(e)) from None
    except Exception as e:  # PIL raises many types for hostile input
        raise Rejected("decode_error", f"{type(e).__name__}: {e}") from None
    if width * height > max_pixels:
        raise Rejected("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")
    return img


def decode_image(data: bytes, cfg: IngestConfig) -> tuple[Image.Image, int, int]:
    """Decode ``data`` to an upright RGB image; returns (image, original width, height).

    The pixels are Pillow's (first frame, EXIF orientation applied, alpha and tRNS
    transparency composited on white; tests/unit/test_image_fidelity.py checks every format).
    Size filters run on the header, before the pixels are decoded.
    """
    img = open_image(data, cfg.max_pixels)
    width, height = img.size
    if min(width, height) < max(cfg.min_image_size, 1):
        raise Rejected("too_small", f"{width}x{height}")
    if cfg.max_image_size and max(width, height) > cfg.max_image_size:
        raise Rejected("too_big", f"{width}x{height} > {cfg.max_image_size}")
    if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        raise Rejected("bad_aspect_ratio", f"{width}x{height}")
    try:
        if img.format == "PNG":
            img = _decode_png(data, img)
        else:
            if cfg.resize_mode != "no" and img.format == "JPEG":
                img.draft("RGB", (cfg.image_size, cfg.image_size))  # decode at reduced scale
            img.load()
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise Rejected("too_many_pixels", str(e)) from None
    except Exception as e:
        raise Rejected("decode_error", f"{type(e).__name__}: {e}") from None
    return img, width, height


# Pillow's mode of a PNG -> the libspng output that gives the same pixels. libspng is not
# told to apply tRNS (pyspng passes no decode flags), so a PNG with tRNS never takes it.
_SPNG_FORMAT = {"RGB": "RGB", "RGBA": "RGBA", "L": "RGB", "LA": "RGBA", "P": "RGB", "1": "RGB",
                "I;16": "RGB", "I;16B": "RGB", "I": "RGB"}


def _decode_png(data: bytes, header: Image.Image) -> Image.Image:
    """Decode a PNG with libspng (pyspng) rather than Pillow where the two give the same
    pixels: 1.6 ms against Pillow's 3.7 ms for the benchmark corpus's PNGs (256-1024 px),
    the largest cost of ingesting them. Pillow has read the header (size checks, mode,
    tRNS, eXIf before the pixels). libspng ignores tRNS, so a PNG with one is decoded by
    Pillow (its 16-bit kinds by ``_png_trns16``, as Pillow compares 16-bit tRNS values
    with 8-bit pixels); so is one with an eXIf after the pixels, and the rare PNG that
    libspng refuses, so a file Pillow accepts is not lost."""
    fmt = _SPNG_FORMAT.get(header.mode)
    if "transparency" in header.info:
        return _png_trns16(data, header) if data[24:25] == b"\x10" else _pillow_load(header)
    if fmt is None or ("exif" not in header.info and _png_late_exif(data, header)):
        return _pillow_load(header)
    try:
        pixels = pyspng.load(data, format=fmt)
    except RuntimeError:
        return _pillow_load(header)
    img = Image.fromarray(pixels, fmt)
    if "exif" in header.info:  # an eXIf chunk before the pixels: keep the orientation
        img.info["exif"] = header.info["exif"]
    return img


def _pillow_load(img: Image.Image) -> Image.Image:
    img.load()
    return img


def _png_late_exif(data: bytes, header: Image.Image) -> bool:
    """Whether an eXIf chunk follows the image data (Pillow reads it on load; the header
    has not seen it). Walks the chunk headers from the first IDAT: a few hops."""
    pos = header.tile[0][2] - 8 if header.tile else 8
    while pos + 8 <= len(data):
        kind = data[pos + 4:pos + 8]
        if kind == b"eXIf":
            return True
        if kind == b"IEND":
            return False
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return False


def _png_trns16(data: bytes, header: Image.Image) -> Image.Image:
    """A 16-bit grey or RGB PNG with tRNS: the pixels equal to the 16-bit tRNS value are
    transparent; the rest keep their high byte, as Pillow and libspng reduce 16 bits."""
    import numpy as np

    try:
        pixels = pyspng.load(data)  # 16-bit grey -> GA16, RGB -> RGBA16, alpha all opaque
    except RuntimeError:
        return _pillow_load(header)
    colour = pixels[..., :-1]
    trns = np.asarray(header.info["transparency"], dtype=np.uint16).reshape(-1)
    alpha = np.where((colour == trns).all(axis=-1), 0, 255).astype(np.uint8)
    rgb = np.broadcast_to((colour >> 8).astype(np.uint8), colour.shape[:2] + (3,))
    img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    if "exif" in header.info:
        img.info["exif"] = header.info["exif"]
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any transparency (an alpha band, a palette's alpha, a tRNS colour or
    index) composited on white; 16-bit grey reduced to its high byte (Pillow's own
    conversion clips it at 255, turning it white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = _grey16_to_8(img)
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if (img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
            or (img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA")):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _grey16_to_8(img: Image.Image) -> Image.Image:
    """16-bit grey -> 8-bit 'L' (high byte), or 'LA' where a tRNS value makes pixels
    transparent."""
    import numpy as np

    samples = np.asarray(img).astype(np.int64)
    grey = Image.fromarray(np.clip(samples >> 8, 0, 255).astype(np.uint8), "L")
    trns = img.info.get("transparency")
    if not isinstance(trns, int):
        return grey
    alpha = Image.fromarray(np.where(samples == trns, 0, 255).astype(np.uint8), "L")
    return Image.merge("LA", (grey, alpha))


def resize_image(img: Image.Image, size: int, mode: str, downscale: str = "box") -> Image.Image:
    """``center_crop``: shorter side to ``size`` then crop the centre square;
    ``keep_ratio``: shorter side to ``size``; ``border``: longer side to ``size`` then pad
    to a black square; ``no``: unchanged.

    Shrinking uses ``downscale`` ("box": area averaging, like OpenCV's INTER_AREA that
    img2dataset uses; "bicubic"; "lanczos"), enlarging bicubic. center_crop resamples
    only the centre square of the source, not the whole image."""
    if mode == "no":
        return img
    w, h = img.size
    scale = size / (max(w, h) if mode == "border" else min(w, h))
    resample = _DOWNSCALE[downscale] if scale < 1 else Image.Resampling.BICUBIC
    if mode == "center_crop":
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return img.resize((size, size), resample, box=box)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    if mode == "border":
        canvas = Image.new("RGB", (size, size))
        canvas.paste(img, ((size - nw) // 2, (size - nh) // 2))
        img = canvas
    return img


def encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format=_PIL_FORMATS[fmt], quality=quality)
    return buf.getvalue()

