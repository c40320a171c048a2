"""Fundus photograph preprocessing in numpy, shared by training and serving.

decode -> field-of-view crop -> pad to square -> resize -> normalise. The constants (image size, mean,
std) come from the model config at training time and from the bundle at serving time, never from code.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 60_000_000
"""Pillow's decompression-bomb limit used here: a 60 MP image is larger than any fundus camera's."""

FOV_THRESHOLD = 0.08
"""Field of view: pixels brighter than this share of the image's 99th-percentile intensity."""


class ImageDecodeError(ValueError):
    """The bytes are not a photograph this system can read (format, truncation, size, mode)."""


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects: a square RGB image of `size` pixels, normalised by mean/std."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_fov: bool = True


def decode_image(data: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode JPEG/PNG/TIFF bytes (or a file) to an RGB image, honouring EXIF orientation.

    Greyscale, CMYK, palette and 16-bit images are converted to 8-bit RGB. Raises ImageDecodeError with
    a readable reason for anything else: not an image, truncated, or more than `max_pixels` pixels.
    """
    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            if opened.format not in {"JPEG", "PNG", "TIFF", "MPO"}:
                raise ImageDecodeError(f"unsupported image format {opened.format}; send JPEG, PNG or TIFF")
            width, height = opened.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} pixels, more than the limit of {max_pixels:,} pixels"
                )
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image is too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (expected JPEG, PNG or TIFF)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"image could not be decoded: {error}") from None
    return _to_rgb8(image)


def _to_rgb8(image: Image.Image) -> Image.Image:
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        values = np.asarray(image, dtype=np.float64)
        peak = values.max() or 1.0
        image = Image.fromarray((values / peak * 255.0).astype(np.uint8), mode="L")
    return image.convert("RGB") if image.mode != "RGB" else image


def field_of_view_box(rgb: np.ndarray, threshold: float = FOV_THRESHOLD) -> tuple[int, int, int, int] | None:
    """Bounding box (left, top, right, bottom) of the circular field of view, or None when the image
    has no dark border to remove (the whole frame is retina, or the image is blank)."""
    intensity = rgb.astype(np.float32).max(axis=2)
    peak = float(np.percentile(intensity, 99))
    if peak <= 0:
        return None
    mask = intensity > threshold * peak
    rows = np.flatnonzero(mask.mean(axis=1) > 0.02)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.02)
    if rows.size == 0 or cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_to_square(image: Image.Image, crop_fov: bool = True) -> Image.Image:
    """Crop the black border around the field of view, then pad with black to a centred square."""
    if crop_fov:
        # The border is found on a small thumbnail (fast on 5 MP photographs), then scaled back.
        scale = max(1, max(image.size) // 256)
        thumbnail = image.reduce(scale) if scale > 1 else image
        box = field_of_view_box(np.asarray(thumbnail))
        if box is not None:
            left, top, right, bottom = (v * scale for v in box)
            image = image.crop((left, top, min(right, image.width), min(bottom, image.height)))
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image
    square = Image.new("RGB", (side, side))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def to_model_input(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """An RGB image -> float32 array (3, size, size): FOV crop, square, resize, normalise."""
    square = crop_to_square(image, spec.crop_fov)
    resized = square.resize((spec.size, spec.size), Image.Resampling.BICUBIC, reducing_gap=2.0)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def batch_model_inputs(images: Sequence[Image.Image], spec: ImageSpec) -> np.ndarray:
    """Stack several images into one float32 batch (B, 3, size, size)."""
    return np.stack([to_model_input(image, spec) for image in images]) if images else np.zeros(
        (0, 3, spec.size, spec.size), dtype=np.float32
    )
